"""A scheduler stand-in: allocates claims from a published pool as kube-scheduler does.

Written from the structured allocator of ``k8s.io/dynamic-resource-allocation``
(kubernetes/kubernetes ``staging/src/k8s.io/dynamic-resource-allocation/structured/``:
``internal/stable/allocator_stable.go`` as of commit 03ab440c and ``pools.go`` /
``internal/{stable,incubating}/pools_*.go``, with the incubating and experimental
allocators, which loop the same way; the code of 1.35 and later (1.36, 1.37), where shared
counters live in their own slices and a pool carries ``DeviceSlicesTargetingNode``).
What it does, and so what this does:

- **Pools** (``GatherPools``): the slices of one (driver, pool) with the highest
  ``pool.generation`` are the pool; older ones are ignored. A pool whose slice count is not
  ``resourceSliceCount`` is *incomplete* and nothing is allocated from it; a pool with a
  duplicate device name, or a device consuming a counter no counter slice declares, is
  *invalid*, likewise. Pools come out of a Go map, so their order is undefined; **the
  slices of a pool keep the order the scheduler's informer lists them in**, which is not
  defined either (a cache keyed by name). ``slice_order`` plays that: ``None`` keeps the
  order given, a ``random.Random`` shuffles the device slices of the pool.
- **Search** (``allocateOne``): claims one after the other, each claim's requests in order,
  each request's ``count`` devices one at a time; for each, ``for pool … for slice in
  pool.DeviceSlicesTargetingNode … for device in slice.Spec.Devices`` **in listed order**:
  skip a device already allocated (in the API server or earlier in this search), one
  the class and request selectors do not select, one whose counters do not fit after the
  devices allocated and being allocated, one with a ``NoSchedule`` or ``NoExecute``
  taint the request does not tolerate (``DRADeviceTaints`` on), and one a constraint
  (``matchAttribute``) refuses; take the first that remains and recurse. Backtracking
  happens only when a later device of the claim cannot be found. No scoring: the first
  full solution is the answer, **so the order a slice lists its devices in is the
  placement policy.**

Kept smaller than the real one, for what our claims use: one claim at a time, exact
requests (no ``firstAvailable``, no ``allocationMode: All``, no admin access), a single
``matchAttribute`` constraint; DeviceClass CEL is played by :class:`DeviceClass` (kind and
size, as our classes select). One pruning the real search lacks: devices of one run of
interchangeable requests (same class) are tried in increasing list position, so each set
is tried once instead of once per permutation (the first solution found is the same set
of devices; the real search's worst case on a hopeless 16-GPU claim is 16!).

Pure and synchronous; the objects are the JSON slices
:func:`~nvswitch_dp.dra.slices.build_pool` returns, or the API server's copies.
"""

from __future__ import annotations

import random
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
    tolerations: tuple[Mapping[str, Any], ...] = ()


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
    taints: tuple[Mapping[str, Any], ...] = ()

    def blocked(self, tolerations: Sequence[Mapping[str, Any]] = ()) -> bool:
        """A ``NoSchedule`` or ``NoExecute`` taint no toleration tolerates (other effects,
        ``None`` included, never block: ``taintPreventsAllocation``)."""
        for taint in self.taints:
            if taint.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            if not any(_tolerates(t, taint) for t in tolerations):
                return True
        return False

    def attribute(self, name: str) -> Any:
        found = self.attributes.get(name)
        return None if found is None else next(iter(found.values()))


def _tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """``resourceclaim.ToleratesTaint``: key (empty: any, with Exists), operator Equal
    (the default) or Exists, value, effect (empty: any)."""
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    key = toleration.get("key", "")
    if key and key != taint.get("key"):
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True
    return bool(key) and toleration.get("value", "") == taint.get("value", "")


class PoolUnusable(LookupError):
    """The pool is incomplete or invalid: the scheduler allocates nothing from it."""


@dataclass
class Allocator:
    """The pool's devices (in the order the scheduler walks them) and counters, and
    what is allocated now. ``unusable`` says why nothing can be allocated (an
    incomplete or invalid pool), else None."""

    devices: dict[str, Device]
    capacity: Counters
    allocated: set[str] = field(default_factory=set)
    unusable: str | None = None

    @classmethod
    def from_slices(
        cls,
        slices: Iterable[Mapping[str, Any]],
        *,
        slice_order: random.Random | None = None,
        taints: bool = True,
    ) -> Allocator:
        """The pool of ``slices`` (one driver, one pool) as ``GatherPools`` builds it: the
        newest generation only; incomplete or invalid: ``unusable`` says so.

        ``slice_order``: shuffle the device slices (the informer's order is undefined);
        ``taints``: whether the scheduler honours device taints (``DRADeviceTaints``)."""
        listed = list(slices)
        newest = max((int(s["spec"]["pool"]["generation"]) for s in listed), default=0)
        current = [s for s in listed if int(s["spec"]["pool"]["generation"]) == newest]
        unusable: str | None = None
        if current and len(current) != int(current[0]["spec"]["pool"]["resourceSliceCount"]):
            unusable = (
                f"pool incomplete: {len(current)} of "
                f"{current[0]['spec']['pool']['resourceSliceCount']} slices"
            )
        counter_slices = [s for s in current if s["spec"].get("sharedCounters")]
        device_slices = [s for s in current if not s["spec"].get("sharedCounters")]
        if slice_order is not None:
            slice_order.shuffle(device_slices)
        devices: dict[str, Device] = {}
        capacity: Counters = {}
        for s in counter_slices:
            for counter_set in s["spec"]["sharedCounters"]:
                for counter, v in counter_set["counters"].items():
                    capacity[(counter_set["name"], counter)] = int(v["value"])
        for s in device_slices:
            for d in s["spec"].get("devices") or []:
                consumes = {
                    (entry["counterSet"], counter): int(v["value"])
                    for entry in d.get("consumesCounters") or []
                    for counter, v in entry["counters"].items()
                }
                if d["name"] in devices:
                    unusable = unusable or f"pool invalid: duplicate device name {d['name']}"
                missing = sorted(f"{a}/{b}" for a, b in consumes if (a, b) not in capacity)
                if missing:
                    unusable = unusable or f"pool invalid: counter {missing[0]} not found"
                found_taints = tuple(d.get("taints") or ()) if taints else ()
                devices[d["name"]] = Device(
                    d["name"], d.get("attributes") or {}, consumes, found_taints
                )
        return cls(devices, capacity, unusable=unusable)

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
        if self.unusable is not None:
            return
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
        # Slots of one device class are interchangeable: take their devices in list order,
        # so each set is tried once, not once per permutation.
        position = {name: i for i, name in enumerate(self.devices)}
        floor = (
            position[chosen[-1]]
            if chosen and slots[len(chosen) - 1].device_class == request.device_class
            else -1
        )
        candidates = []
        for device in self.devices.values():  # the order the slices list them in
            if device.name in self.allocated or device.name in chosen:
                continue
            if position[device.name] <= floor:
                continue
            if not request.device_class.selects(device.attributes) or not self._fits(device, used):
                continue
            if device.blocked(request.tolerations):
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
