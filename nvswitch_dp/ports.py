"""The seams between the daemon and the outside world, as small Protocols.

Production implementations live beside the I/O they do (``fabric/``, ``vfio/``,
``plugin/``); fakes with real behaviour live in ``tests/fakes.py``. The core
(``partitions/``) depends on none of these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from nvswitch_dp.fabric.types import FmReport


class FabricManagerClient(Protocol):
    """Fabric Manager's partition API, as every backend offers it.

    Errors: every method raises a :class:`~nvswitch_dp.fabric.types.FabricManagerError`
    subclass carrying FM's return code; a backend that cannot reach FM raises
    ``FmConnectionNotValid`` (or ``FmTimeout``).
    """

    name: str

    async def list_partitions(self) -> FmReport:
        """FM's partition table with each partition's ``isActive``."""
        ...

    async def activate(self, partition_id: int) -> None:
        """Activate one partition (FM: IN_USE if it or an overlapping one is active)."""
        ...

    async def deactivate(self, partition_id: int) -> None:
        """Deactivate one partition (FM: UNINITIALIZED if it is not active)."""
        ...

    async def set_activated(self, partition_ids: Sequence[int]) -> None:
        """Tell a restarted FM which partitions are still active (may be empty)."""
        ...


@dataclass(frozen=True, slots=True)
class PodDevices:
    """Devices of one resource the kubelet has assigned to one container."""

    namespace: str
    pod: str
    container: str
    resource_name: str
    device_ids: tuple[str, ...]


class PodResourcesClient(Protocol):
    """The kubelet's PodResources API (``List``).

    Errors: raises ``OSError`` or a gRPC error when the socket cannot be reached; callers
    must then release nothing.
    """

    async def list_assigned(self) -> Sequence[PodDevices]: ...
