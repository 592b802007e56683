"""The allocation unit: what one kubelet device of a partition resource stands for.

``plugin.allocation_unit`` picks one of two units for the whole node, and this module is
the only place that knows the difference (docs/kubevirt.md):

* ``partition`` (default): one device is one whole partition, ``partition-<id>``. A pod
  asks for ``nvidia.com/gpu-h200-4x: 1`` and gets all four GPUs' addresses.
* ``gpu``: a partition of size N is N devices, ``partition-<id>-gpu-<module>``, because
  KubeVirt asks for one device per ``hostDevices`` entry and attaches one address per
  entry. The unit of *allocation* stays the partition: the preferred answer is whole
  partitions, and a request naming part of a partition is refused with a message that
  says what to ask for instead.

Rules, for both units:

1. :meth:`AllocationUnit.device_ids` lists a partition's devices; they all share the
   partition's health and topology (the caller's business).
2. :meth:`AllocationUnit.select` turns an Allocate request into partition IDs (in the
   order the request first names them) and the GPU modules in the order their PCI
   addresses are handed out, or raises :class:`UnitError`. It checks form and
   wholeness only; whether the partitions are free is the book's question.
3. :meth:`AllocationUnit.preferred` answers GetPreferredAllocation and never raises for
   any input (kubernetes #97131). Both units pick partitions with the same policy,
   :func:`~nvswitch_dp.partitions.policy.preferred_allocation` on partition IDs; the
   ``gpu`` unit then expands each to its GPUs' IDs in module order.

Pure: no I/O; the book is only read.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

from nvswitch_dp.echo import clipped
from nvswitch_dp.partitions.policy import parse_device, preferred_allocation
from nvswitch_dp.partitions.refusal import Refusal
from nvswitch_dp.partitions.state import Availability
from nvswitch_dp.partitions.table import (
    DeviceRef,
    Partition,
    PartitionTable,
    device_id,
    gpu_device_id,
    parse_device_id,
)

__all__ = [
    "GPU_UNIT",
    "PARTITION_UNIT",
    "UNIT_NAMES",
    "AllocationUnit",
    "GpuUnit",
    "PartitionUnit",
    "Selection",
    "UnitError",
    "allocation_unit",
]

T = TypeVar("T", bound=Hashable)
UnitName = Literal["partition", "gpu"]
UNIT_NAMES: tuple[UnitName, ...] = ("partition", "gpu")


class UnitError(ValueError):
    """An Allocate request the unit cannot map to whole partitions.

    ``kind`` is :attr:`Refusal.UNKNOWN` for IDs that name nothing of this resource (the
    kubelet invented or mangled them) and :attr:`Refusal.REFUSED` for real IDs in an
    unusable combination.
    """

    def __init__(self, message: str, *, kind: Refusal) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Selection:
    """The partitions an Allocate request names and the order of their GPUs' addresses."""

    partition_ids: tuple[int, ...]
    module_order: tuple[int, ...]


class AllocationUnit(ABC):
    """One way to count a partition resource in kubelet devices. Stateless; share freely."""

    name: ClassVar[UnitName]

    @abstractmethod
    def device_ids(self, partition: Partition) -> tuple[str, ...]:
        """The kubelet device IDs ``partition`` is advertised as."""

    @abstractmethod
    def select(
        self, table: PartitionTable, size: int, resource: str, devices: Sequence[str]
    ) -> Selection:
        """Map the device IDs of one container's Allocate to partitions of ``size``.

        Raises :class:`UnitError` naming the offending device (or the missing GPUs).
        """

    @abstractmethod
    def preferred(
        self,
        book: Availability,
        available: Sequence[str],
        must_include: Sequence[str],
        allocation_size: int,
        partition_size: int,
    ) -> list[str]:
        """GetPreferredAllocation's answer: at most ``allocation_size`` IDs of
        ``available`` (plus ``must_include``). Never raises."""


class PartitionUnit(AllocationUnit):
    """One device per partition (the default)."""

    name = "partition"

    def device_ids(self, partition: Partition) -> tuple[str, ...]:
        return (partition.device_id,)

    def select(
        self, table: PartitionTable, size: int, resource: str, devices: Sequence[str]
    ) -> Selection:
        # Duplicates are left to the book, which refuses claiming a partition twice.
        wanted: list[int] = []
        for device in devices:
            ref = _parse(device)
            if ref.module_id is not None:
                raise UnitError(
                    f"device {clipped(device)} names one GPU, but {resource} counts whole "
                    "partitions (plugin.allocation_unit: partition)",
                    kind=Refusal.UNKNOWN,
                )
            if ref.partition_id not in table or table[ref.partition_id].size != size:
                raise UnitError(
                    f"device {clipped(device)} is not a partition of {resource}",
                    kind=Refusal.UNKNOWN,
                )
            wanted.append(ref.partition_id)
        modules = tuple(m for pid in wanted for m in table[pid].sorted_modules)
        return Selection(tuple(wanted), modules)

    def preferred(
        self,
        book: Availability,
        available: Sequence[str],
        must_include: Sequence[str],
        allocation_size: int,
        partition_size: int,
    ) -> list[str]:
        return preferred_allocation(book, available, must_include, allocation_size)


class GpuUnit(AllocationUnit):
    """One device per GPU of a partition; allocation still goes by whole partitions."""

    name = "gpu"

    def device_ids(self, partition: Partition) -> tuple[str, ...]:
        return tuple(gpu_device_id(partition.partition_id, m) for m in partition.sorted_modules)

    def select(
        self, table: PartitionTable, size: int, resource: str, devices: Sequence[str]
    ) -> Selection:
        held: dict[int, set[int]] = {}  # partition -> its requested modules, first-named order
        order: list[int] = []
        for device in devices:
            ref = _parse(device)
            pid, module = ref.partition_id, ref.module_id
            if pid not in table or table[pid].size != size:
                raise UnitError(
                    f"device {clipped(device)} is not a GPU of a partition of {resource}",
                    kind=Refusal.UNKNOWN,
                )
            partition = table[pid]
            if module is None:
                raise UnitError(
                    f"device {clipped(device)} names a whole partition, but {resource} counts GPUs "
                    f"(plugin.allocation_unit: gpu); ask for "
                    f"{', '.join(self.device_ids(partition))}",
                    kind=Refusal.UNKNOWN,
                )
            if module not in partition.module_ids:
                raise UnitError(
                    f"device {clipped(device)}: GPU {module} is not in partition {pid} "
                    f"of {resource}",
                    kind=Refusal.UNKNOWN,
                )
            if module in held.get(pid, ()):
                raise UnitError(
                    f"device {clipped(device)} is requested twice", kind=Refusal.REFUSED
                )
            held.setdefault(pid, set()).add(module)
            order.append(module)
        partial = {
            pid: sorted(table[pid].module_ids - modules)
            for pid, modules in held.items()
            if modules != table[pid].module_ids
        }
        if partial:
            raise UnitError(
                self._partial_message(resource, size, len(devices), partial), kind=Refusal.REFUSED
            )
        return Selection(tuple(held), tuple(order))

    @staticmethod
    def _partial_message(
        resource: str, size: int, requested: int, partial: dict[int, list[int]]
    ) -> str:
        missing = "; ".join(
            f"partition {pid} lacks {', '.join(gpu_device_id(pid, m) for m in modules)}"
            for pid, modules in partial.items()
        )
        count = (
            f"{requested} GPUs is not a whole number of {size}-GPU partitions; "
            if requested % size
            else ""
        )
        return (
            f"{resource} hands out whole {size}-GPU partitions only "
            f"(plugin.allocation_unit: gpu), and this request holds only part of one: {count}"
            f"{missing}. List all {size} GPUs of each partition instead: a VM needs "
            f"{size} hostDevices entries of {resource} per partition (and a pod "
            f"{resource}: {size} per partition)"
        )

    def preferred(
        self,
        book: Availability,
        available: Sequence[str],
        must_include: Sequence[str],
        allocation_size: int,
        partition_size: int,
    ) -> list[str]:
        if allocation_size < 1:
            return []
        table = book.table
        offered: dict[int, dict[int, str]] = {}  # partition -> module -> the kubelet's ID
        must: list[int] = []
        listed: list[int] = []
        for device in (*must_include, *available):
            ref = _known_gpu(device, table)
            if ref is not None and ref.module_id is not None:
                offered.setdefault(ref.partition_id, {}).setdefault(ref.module_id, device)
                listed.append(ref.partition_id)
        for device in must_include:
            ref = _known_gpu(device, table)
            if ref is not None:
                must.append(ref.partition_id)
        # Only a partition the kubelet offers whole can be handed out (or one the pod
        # already holds part of); pick among them with the partition unit's policy.
        whole = [pid for pid in listed if len(offered[pid]) == table[pid].size]
        wanted = math.ceil(allocation_size / max(partition_size, 1))
        chosen = preferred_allocation(
            book,
            [device_id(pid) for pid in _ordered([*must, *whole])],
            [device_id(pid) for pid in _ordered(must)],
            wanted,
        )
        answer: list[str] = []
        for pdev in chosen:
            pid = parse_device(pdev, table)
            if pid is not None:
                answer += [offered[pid][m] for m in sorted(offered[pid])]
        # Short (too few whole partitions): fill from what is left, must_include first;
        # Allocate will then say what is missing.
        answer += [
            d
            for d in (*must_include, *available)
            if d not in answer and _known_gpu(d, table) is not None
        ]
        return _ordered(answer)[:allocation_size]


def _parse(device: str) -> DeviceRef:
    try:
        return parse_device_id(device)
    except (ValueError, TypeError, AttributeError) as exc:
        raise UnitError(str(exc), kind=Refusal.UNKNOWN) from None


def _known_gpu(device: str, table: PartitionTable) -> DeviceRef | None:
    """``device`` as a canonical GPU ID of ``table``, else None. Never raises."""
    try:
        ref = parse_device_id(device)
    except (ValueError, TypeError, AttributeError):
        return None
    if (
        ref.module_id is None
        or ref.device_id != device
        or ref.partition_id not in table
        or ref.module_id not in table[ref.partition_id].module_ids
    ):
        return None
    return ref


def _ordered(items: Iterable[T]) -> list[T]:
    """Items once each, first occurrence first."""
    return list(dict.fromkeys(items))


PARTITION_UNIT = PartitionUnit()
GPU_UNIT = GpuUnit()

_BY_NAME: dict[str, AllocationUnit] = {u.name: u for u in (PARTITION_UNIT, GPU_UNIT)}


def allocation_unit(name: str) -> AllocationUnit:
    """The unit ``plugin.allocation_unit`` names. ``ValueError`` for any other name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown allocation unit {name!r}; known: {', '.join(UNIT_NAMES)}"
        ) from None
