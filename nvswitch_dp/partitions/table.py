"""The partition table as Fabric Manager reports it: fixed for the life of FM.

A :class:`PartitionTable` is built once from an :class:`~nvswitch_dp.fabric.types.FmReport`
and answers structural questions (sizes, members, overlap). It holds no state: which
partitions are active or in use lives in :mod:`nvswitch_dp.partitions.state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from nvswitch_dp.echo import clipped
from nvswitch_dp.fabric.types import FmGpu, FmReport

DEVICE_ID_PREFIX = "partition-"
GPU_INFIX = "-gpu-"


def device_id(partition_id: int) -> str:
    """The kubelet device ID of FM partition ``partition_id`` (the ``partition`` unit)."""
    return f"{DEVICE_ID_PREFIX}{partition_id}"


def gpu_device_id(partition_id: int, module_id: int) -> str:
    """The kubelet device ID of GPU ``module_id`` in partition ``partition_id`` (the
    ``gpu`` unit): ``partition-3-gpu-5``. At most 31 characters, far below the 63 allowed."""
    return f"{DEVICE_ID_PREFIX}{partition_id}{GPU_INFIX}{module_id}"


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """What a kubelet device ID names: a whole partition, or one GPU (module) of it."""

    partition_id: int
    module_id: int | None = None  # None: the whole partition

    @property
    def device_id(self) -> str:
        """The canonical spelling (``parse_device_id(ref.device_id) == ref``)."""
        if self.module_id is None:
            return device_id(self.partition_id)
        return gpu_device_id(self.partition_id, self.module_id)


def _number(text: str, device: str, what: str) -> int:
    # ASCII digits only, no leading zero: one spelling per number ("\u0663" is a digit too).
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise ValueError(f"device ID '{clipped(device)}' does not end in a {what} number")
    return int(text)


def parse_device_id(device: str) -> DeviceRef:
    """Parse either form of our kubelet device IDs: ``partition-<id>`` or
    ``partition-<id>-gpu-<module>``. The one parser; pure.

    Raises ``ValueError`` with the reason when ``device`` is not one of ours (also for
    non-canonical numbers such as ``partition-01``). Whether the form fits the
    configured allocation unit, and whether the IDs exist, is for the caller to judge.
    """
    if not device.startswith(DEVICE_ID_PREFIX):
        raise ValueError(f"device ID '{clipped(device)}' does not start with {DEVICE_ID_PREFIX!r}")
    rest = device[len(DEVICE_ID_PREFIX) :]
    head, infix, module = rest.partition(GPU_INFIX)
    if not infix:
        return DeviceRef(_number(rest, device, "partition"))
    return DeviceRef(_number(head, device, "partition"), _number(module, device, "GPU module"))


def partition_id_of(device: str) -> int:
    """The FM partition ID named by kubelet device ID ``device``, in either form
    (``partition-3`` and ``partition-3-gpu-5`` both name partition 3).

    Raises ``ValueError`` with the reason when ``device`` is not one of ours.
    """
    return parse_device_id(device).partition_id


@dataclass(frozen=True, slots=True)
class Partition:
    """One FM partition: its ID and the GPUs (by module ID) it joins."""

    partition_id: int
    module_ids: frozenset[int]
    gpus: tuple[FmGpu, ...] = ()

    @property
    def size(self) -> int:
        return len(self.module_ids)

    @property
    def device_id(self) -> str:
        return device_id(self.partition_id)

    @property
    def sorted_modules(self) -> tuple[int, ...]:
        return tuple(sorted(self.module_ids))

    def overlaps(self, other: Partition) -> bool:
        """True when the two share a GPU (a partition overlaps itself)."""
        return not self.module_ids.isdisjoint(other.module_ids)


class TableError(ValueError):
    """FM's report cannot be a partition table (duplicate IDs, a partition with no GPU)."""


@dataclass(frozen=True)
class PartitionTable:
    """All partitions FM offers, indexed for the questions the core asks.

    Immutable; build it with :meth:`from_report` or :meth:`from_rows`.
    """

    partitions: tuple[Partition, ...]
    _by_id: Mapping[int, Partition] = field(init=False, repr=False, compare=False)
    _overlapping: Mapping[int, frozenset[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[int, Partition] = {}
        for p in self.partitions:
            if p.partition_id in by_id:
                raise TableError(f"partition {p.partition_id} is listed twice")
            if not p.module_ids:
                raise TableError(f"partition {p.partition_id} has no GPU")
            by_id[p.partition_id] = p
        # Overlap is asked on every state change; precompute it (at most 64 x 64).
        overlapping = {
            p.partition_id: frozenset(
                q.partition_id for q in self.partitions if q is not p and p.overlaps(q)
            )
            for p in self.partitions
        }
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_overlapping", overlapping)

    @classmethod
    def from_report(cls, report: FmReport) -> PartitionTable:
        return cls(
            tuple(
                Partition(p.partition_id, frozenset(g.physical_id for g in p.gpus), p.gpus)
                for p in sorted(report.partitions, key=lambda p: p.partition_id)
            )
        )

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, Iterable[int]]]) -> PartitionTable:
        """A table from ``(partition_id, module_ids)`` rows (tests, simulator)."""
        return cls(tuple(Partition(pid, frozenset(mods)) for pid, mods in rows))

    def __iter__(self) -> Iterator[Partition]:
        return iter(self.partitions)

    def __len__(self) -> int:
        return len(self.partitions)

    def __contains__(self, partition_id: object) -> bool:
        return partition_id in self._by_id

    def __getitem__(self, partition_id: int) -> Partition:
        return self._by_id[partition_id]

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(p.partition_id for p in self.partitions)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Distinct partition sizes, smallest first: one resource is served per size."""
        return tuple(sorted({p.size for p in self.partitions}))

    @property
    def module_ids(self) -> frozenset[int]:
        return frozenset().union(*(p.module_ids for p in self.partitions))

    def of_size(self, size: int) -> tuple[Partition, ...]:
        return tuple(p for p in self.partitions if p.size == size)

    def overlapping(self, partition_id: int) -> frozenset[int]:
        """IDs of the other partitions that share a GPU with ``partition_id``."""
        return self._overlapping[partition_id]

    def containing(self, module_id: int) -> tuple[Partition, ...]:
        return tuple(p for p in self.partitions if module_id in p.module_ids)
