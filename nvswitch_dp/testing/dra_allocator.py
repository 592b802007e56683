"""A scheduler stand-in: allocates claims from a published pool, honouring shared counters.

It follows the allocation rules of ``resource.k8s.io/v1`` with partitionable devices
(KEP-4815) for what our claims use: a device can be allocated when no claim holds it and
every counter it consumes has at least that much left after the devices already allocated;
a request takes ``count`` devices of its class; a ``matchAttribute`` constraint makes every
device of the listed requests carry the attribute with one value. DeviceClass CEL is
played by :class:`DeviceClass` (kind and size, as our classes select). The search is
exhaustive (backtracking), so "not allocatable" means no allocation exists.

Pure and synchronous; the objects are the JSON slices :func:`~nvswitch_dp.dra.slices.build_pool`
returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Counters = dict[tuple[str, str], int]  # (counter set, counter) -> amount


@dataclass(frozen=True, slots=True)
class DeviceClass:
    """Plays our DeviceClasses' CEL: ``kind`` and, for partitions, ``size``; ``partition_id``
    plays a claim's extra selector on ``partitionID``."""

    kind: str  # "partition" or "gpu"
    size: int | None = None
    partition_id: int | None = None

    def selects(self, attributes: Mapping[str, Any]) -> bool:
        def value(name: str) -> Any:
            found = attributes.get(name)
            return None if found is None else next(iter(found.values()))

        if value("kind") != self.kind:
            return False
        if self.size is not None and value("size") != self.size:
            return False
        return self.partition_id is None or value("partitionID") == self.partition_id


@dataclass(frozen=True, slots=True)
class Request:
    name: str
    device_class: DeviceClass
    count: int = 1


@dataclass(frozen=True, slots=True)
class Claim:
    """Requests, and at most one ``matchAttribute`` over all of them (attribute named
    without its domain, which is the driver's)."""

    requests: tuple[Request, ...]
    match_attribute: str | None = None


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    attributes: Mapping[str, Any]
    consumes: Mapping[tuple[str, str], int]

    def attribute(self, name: str) -> Any:
        found = self.attributes.get(name)
        return None if found is None else next(iter(found.values()))


@dataclass
class Allocator:
    """The pool's devices and counters, and what is allocated now."""

    devices: dict[str, Device]
    capacity: Counters
    allocated: set[str] = field(default_factory=set)

    @classmethod
    def from_slices(cls, slices: Iterable[Mapping[str, Any]]) -> Allocator:
        devices: dict[str, Device] = {}
        capacity: Counters = {}
        for s in slices:
            for counter_set in s["spec"].get("sharedCounters") or []:
                for counter, v in counter_set["counters"].items():
                    capacity[(counter_set["name"], counter)] = int(v["value"])
            for d in s["spec"].get("devices") or []:
                consumes = {
                    (entry["counterSet"], counter): int(v["value"])
                    for entry in d.get("consumesCounters") or []
                    for counter, v in entry["counters"].items()
                }
                devices[d["name"]] = Device(d["name"], d.get("attributes") or {}, consumes)
        return cls(devices, capacity)

    def used(self) -> Counters:
        used: Counters = {}
        for name in self.allocated:
            for key, amount in self.devices[name].consumes.items():
                used[key] = used.get(key, 0) + amount
        return used

    def _fits(self, device: Device, used: Counters) -> bool:
        return all(
            used.get(key, 0) + amount <= self.capacity.get(key, 0)
            for key, amount in device.consumes.items()
        )

    def allocations(self, claim: Claim) -> Iterator[tuple[str, ...]]:
        """Every way (device names, in request order) to satisfy ``claim`` now."""
        slots = [r for r in claim.requests for _ in range(r.count)]
        yield from self._search(slots, claim.match_attribute, (), self.used(), None)

    def _search(
        self,
        slots: Sequence[Request],
        match: str | None,
        chosen: tuple[str, ...],
        used: Counters,
        matched: Any,
    ) -> Iterator[tuple[str, ...]]:
        if len(chosen) == len(slots):
            yield chosen
            return
        request = slots[len(chosen)]
        # Slots of one device class are interchangeable: take their devices in name order, so
        # each set is tried once, not once per permutation.
        floor = (
            chosen[-1]
            if chosen and slots[len(chosen) - 1].device_class == request.device_class
            else ""
        )
        candidates = []
        for device in sorted(self.devices.values(), key=lambda d: d.name):
            if device.name in self.allocated or device.name in chosen or device.name <= floor:
                continue
            if not request.device_class.selects(device.attributes) or not self._fits(device, used):
                continue
            value = device.attribute(match) if match else None
            if match and (value is None or (matched is not None and value != matched)):
                continue
            candidates.append((device, value))
        # The run of slots of this class takes its devices in name order, so it needs that
        # many candidates from here on: stop early
        # (keeps a hopeless 16-GPU claim from trying every subset).
        need = 0
        for later in slots[len(chosen) :]:
            if later.device_class != request.device_class:
                break
            need += 1
        for i, (device, value) in enumerate(candidates):
            if len(candidates) - i < need:
                return
            more = dict(used)
            for key, amount in device.consumes.items():
                more[key] = more.get(key, 0) + amount
            yield from self._search(
                slots, match, (*chosen, device.name), more, value if match else None
            )

    def allocate(self, claim: Claim) -> tuple[str, ...] | None:
        """The first allocation of ``claim``, now held; ``None`` when there is none."""
        for found in self.allocations(claim):
            self.allocated |= set(found)
            return found
        return None

    def free(self, devices: Iterable[str]) -> None:
        self.allocated -= set(devices)


def partition_claim(size: int, partition_id: int | None = None) -> Claim:
    """A claim for one whole-partition device of ``size`` GPUs."""
    return Claim((Request("partition", DeviceClass("partition", size, partition_id)),))


def gpu_claim(count: int, match_attribute: str | None = None) -> Claim:
    """A KubeVirt-style claim: ``count`` requests of one GPU each, ``gpu0..``, constrained
    to one value of ``match_attribute`` (e.g. ``partition4x``)."""
    return Claim(
        tuple(Request(f"gpu{i}", DeviceClass("gpu")) for i in range(count)), match_attribute
    )
