"""What the node machine shows: the immutable :class:`NodeView` every edge reads, and the
enums of its modes, FM's status and a request's end. Pure values."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from nvswitch_dp.partitions.state import PartitionView, UnknownPartition
from nvswitch_dp.partitions.table import PartitionTable


class Mode(enum.Enum):
    DEVICE_PLUGIN = "device-plugin"
    DRA = "dra"


class FabricStatus(enum.Enum):
    UP = "up"
    UNREACHABLE = "unreachable"
    RESTARTING = "restarting"  # NOT_CONFIGURED: waiting for set-activated


class RequestStatus(enum.Enum):
    PENDING = "pending"
    GRANTED = "granted"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RequestResult:
    status: RequestStatus
    error: str | None = None  # why it failed (FM failed or did not answer: retry later)
    code: int | None = None  # FM's return code when FM refused


@dataclass(frozen=True, slots=True)
class NodeView:
    """An immutable picture of the node at one generation: what every edge reads."""

    generation: int
    table: PartitionTable
    partitions: Mapping[int, PartitionView]
    available: frozenset[int]
    drained_modules: frozenset[int]
    module_faults: Mapping[int, str]
    fabric: FabricStatus
    fabric_problem: str | None
    pod_resources_reachable: bool | None
    registered: Mapping[str, bool]
    claims: Mapping[str, int]  # DRA claim UID -> partition
    # FM's last report had partitions active that share a GPU (N11): what it said.
    fabric_overlap: str | None = None
    # Since when every FM list has failed (any cause); None after one succeeded (N11).
    lists_failing_since: float | None = None
    list_failure: str | None = None  # the last failed list's reason, while they fail

    def available_ids(self) -> frozenset[int]:
        return self.available

    def healthy(self, partition_id: int) -> bool:
        return self.partitions[partition_id].healthy

    def in_use(self, partition_id: int) -> bool:
        return self.partitions[partition_id].in_use

    def view(self, partition_id: int) -> PartitionView:
        if partition_id not in self.partitions:
            raise UnknownPartition(partition_id)
        return self.partitions[partition_id]

    @property
    def fabric_reachable(self) -> bool:
        return self.fabric is not FabricStatus.UNREACHABLE


__all__ = ["FabricStatus", "Mode", "NodeView", "RequestResult", "RequestStatus"]
