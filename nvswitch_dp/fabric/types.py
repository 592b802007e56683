"""What Fabric Manager reports, and how it fails, in FM's own terms.

These are plain values shared by every backend (simulator, ``fmpm``, ``libnvfm``), so the
core never learns which one it talks to.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class FmReturn(enum.IntEnum):
    """``fmReturn_t`` from ``nv_fm_types.h``."""

    SUCCESS = 0
    BADPARAM = -1
    GENERIC_ERROR = -2
    NOT_SUPPORTED = -3
    UNINITIALIZED = -4
    TIMEOUT = -5
    VERSION_MISMATCH = -6
    IN_USE = -7
    NOT_CONFIGURED = -8
    CONNECTION_NOT_VALID = -9
    NVLINK_ERROR = -10

    @classmethod
    def from_code(cls, code: int) -> FmReturn | int:
        """The enum member for ``code``, or the bare int for codes newer headers added."""
        try:
            return cls(code)
        except ValueError:
            return code


def fm_return_name(code: int) -> str:
    member = FmReturn.from_code(code)
    return member.name if isinstance(member, FmReturn) else f"FM_ST_{code}"


@dataclass(frozen=True, slots=True)
class FmGpu:
    """One GPU as FM lists it inside a partition.

    ``pci_bus_id`` and ``uuid`` are what FM says; on H100 and later they are
    ``00000000:00:00.0`` and empty, which is why PCI addresses come from our own module map.
    """

    physical_id: int
    max_nvlinks: int
    nvlinks_available: int
    nvlink_line_rate_mbps: int = 0
    pci_bus_id: str = "00000000:00:00.0"
    uuid: str = ""

    @property
    def nvlinks_degraded(self) -> bool:
        return self.nvlinks_available < self.max_nvlinks


@dataclass(frozen=True, slots=True)
class FmPartition:
    """One row of FM's partition list (``fmFabricPartitionInfo_t``)."""

    partition_id: int
    is_active: bool
    gpus: tuple[FmGpu, ...]

    @property
    def module_ids(self) -> tuple[int, ...]:
        return tuple(sorted(g.physical_id for g in self.gpus))


@dataclass(frozen=True, slots=True)
class FmReport:
    """FM's whole answer to "list partitions" (``fmFabricPartitionList_t``)."""

    partitions: tuple[FmPartition, ...]
    max_partitions: int = 64

    @property
    def active_ids(self) -> frozenset[int]:
        return frozenset(p.partition_id for p in self.partitions if p.is_active)


class FabricManagerError(Exception):
    """Fabric Manager refused or failed an operation.

    ``code`` is FM's return code; subclasses exist for the codes the plugin treats
    differently (see :data:`ERRORS_BY_CODE`). Raised by every backend alike.
    """

    code: int = FmReturn.GENERIC_ERROR

    def __init__(self, operation: str, detail: str = "", *, code: int | None = None) -> None:
        if code is not None:
            self.code = code
        self.operation = operation
        self.detail = detail
        text = f"Fabric Manager {operation} failed: {fm_return_name(self.code)} ({self.code})"
        super().__init__(f"{text}: {detail}" if detail else text)

    @property
    def code_name(self) -> str:
        return fm_return_name(self.code)

    @property
    def transient(self) -> bool:
        """Worth retrying as is: FM was busy, starting or unreachable, not wrong."""
        return self.code in _TRANSIENT


class FmBadParam(FabricManagerError):
    code = FmReturn.BADPARAM


class FmNotSupported(FabricManagerError):
    code = FmReturn.NOT_SUPPORTED


class FmUninitialized(FabricManagerError):
    """Deactivating a partition that is not active, or FM still waiting after a restart."""

    code = FmReturn.UNINITIALIZED


class FmTimeout(FabricManagerError):
    code = FmReturn.TIMEOUT


class FmInUse(FabricManagerError):
    """The partition, or one sharing a GPU with it, is already active."""

    code = FmReturn.IN_USE


class FmNotConfigured(FabricManagerError):
    """FM is still initialising (or waits for set-activated after a restart)."""

    code = FmReturn.NOT_CONFIGURED


class FmConnectionNotValid(FabricManagerError):
    """FM cannot be reached."""

    code = FmReturn.CONNECTION_NOT_VALID


class FmNvlinkError(FabricManagerError):
    """FM could not train the NVLinks of the partition."""

    code = FmReturn.NVLINK_ERROR


ERRORS_BY_CODE: dict[int, type[FabricManagerError]] = {
    cls.code: cls
    for cls in (
        FmBadParam,
        FmNotSupported,
        FmUninitialized,
        FmTimeout,
        FmInUse,
        FmNotConfigured,
        FmConnectionNotValid,
        FmNvlinkError,
    )
}

# NOT_CONFIGURED is not transient: a restarted FM refuses everything until it is told
# set-activated, so retrying a call only delays the supervisor that will tell it.
_TRANSIENT = frozenset({FmReturn.TIMEOUT, FmReturn.CONNECTION_NOT_VALID})


def error_for(code: int, operation: str, detail: str = "") -> FabricManagerError:
    """The typed exception for FM return ``code`` (never for SUCCESS)."""
    cls = ERRORS_BY_CODE.get(code, FabricManagerError)
    return cls(operation, detail, code=code)


def activated_list_argument(partition_ids: Sequence[int]) -> list[int]:
    """Sorted, de-duplicated IDs: a duplicate made old ``fmpm`` versions loop forever."""
    return sorted(set(partition_ids))
