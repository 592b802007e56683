"""Partition state: which partitions are active in FM, which are held by pods, which are sick.

Rules of the partition book (rules P1-P5; the node machine, ``node.py``, builds its
rules N1-N11 on top of these):

1. Each partition has a *phase* in Fabric Manager: INACTIVE -> ACTIVATING -> ACTIVE ->
   DEACTIVATING -> INACTIVE. A failed activation returns to INACTIVE, a failed
   deactivation to ACTIVE. A call whose outcome is unknown (cancelled, timed out, its
   process killed) moves ACTIVATING or DEACTIVATING to UNKNOWN, which only FM's own
   report settles (to ACTIVE or INACTIVE). Any other move raises
   :class:`IllegalTransition` and changes nothing.
2. A partition is *occupied* when its phase is not INACTIVE or a pod holds it (UNKNOWN
   is occupied: FM may have it active). Two
   occupied partitions never share a GPU: every transition that would break this raises
   :class:`PartitionBlocked` before changing anything.
3. A partition a pod holds (*in use*) is never deactivated without ``force``.
4. A partition is *available* when it is free to hand out: not in use, phase INACTIVE or
   ACTIVE (pre-warmed), no occupied partition overlaps it, none of its GPUs is faulty
   or drained, and FM as a whole can activate partitions (no fabric fault).
5. What the kubelet sees: a partition in use is Healthy unless its own hardware is faulty
   (never Unhealthy merely because it overlaps another); any other partition is Healthy
   exactly when it is available.

Every change bumps :attr:`PartitionBook.generation`; the node machine folds it into its
own generation, which the edges follow. Not thread-safe; the daemon owns one book and
mutates it from a single Trio thread.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from nvswitch_dp.partitions.table import Partition, PartitionTable


class Phase(enum.Enum):
    """A partition's life in Fabric Manager."""

    INACTIVE = "inactive"
    ACTIVATING = "activating"
    ACTIVE = "active"
    DEACTIVATING = "deactivating"
    UNKNOWN = "unknown"  # an FM call's outcome is unknown; FM's next report settles it


class State(enum.Enum):
    """The one word an operator reads for a partition (REST, metrics, status)."""

    FREE = "free"  # available, inactive in FM
    READY = "ready"  # available, already active in FM (pre-warmed, or awaiting release)
    BLOCKED = "blocked"  # an occupied partition shares a GPU with it
    ACTIVATING = "activating"
    ALLOCATED = "allocated"  # active and held by a pod
    DEACTIVATING = "deactivating"
    UNHEALTHY = "unhealthy"  # a GPU of it is faulty or drained, or FM cannot serve it
    UNSETTLED = "unsettled"  # an FM call's outcome is unknown; being checked with FM


class Claim(enum.Enum):
    """What :meth:`PartitionBook.claim` asks the caller to do next."""

    ACTIVATE = "activate"  # call FM, then report activated()/activation_failed()
    READY = "ready"  # already active in FM: nothing to do
    WAIT = "wait"  # an activation is in flight: wait for its outcome


class StateError(Exception):
    """Base of every refusal of the partition state machine."""


class UnknownPartition(StateError):
    def __init__(self, partition_id: int) -> None:
        self.partition_id = partition_id
        super().__init__(f"partition {partition_id} is not in Fabric Manager's table")


class OverlappingActive(StateError):
    """FM reports partitions active that share a GPU (FM itself forbids this)."""

    def __init__(self, pairs: Sequence[tuple[int, int]]) -> None:
        self.pairs = tuple(pairs)
        super().__init__(describe_overlaps(self.pairs))


def describe_overlaps(pairs: Sequence[tuple[int, int]]) -> str:
    """``Fabric Manager reports partitions 1 and 3 active, but they share a GPU``."""
    named = "; ".join(f"partitions {a} and {b}" for a, b in pairs)
    return f"Fabric Manager reports {named} active, but they share a GPU"


def active_overlaps(table: PartitionTable, active_ids: Iterable[int]) -> list[tuple[int, int]]:
    """Each pair ``(a, b)``, ``a < b``, of partitions in ``active_ids`` sharing a GPU;
    IDs not in ``table`` are left out. Pure."""
    active = {pid for pid in active_ids if pid in table}
    return sorted(
        (pid, other) for pid in active for other in table.overlapping(pid) & active if pid < other
    )


class PartitionBlocked(StateError):
    """The partition shares a GPU with an occupied one."""

    def __init__(self, partition_id: int, blocker: int, blocker_state: State) -> None:
        self.partition_id = partition_id
        self.blocker = blocker
        self.blocker_state = blocker_state
        super().__init__(
            f"partition {partition_id} shares a GPU with partition {blocker}, "
            f"which is {blocker_state.value}"
        )


class PartitionUnhealthy(StateError):
    def __init__(self, partition_id: int, reason: str) -> None:
        self.partition_id = partition_id
        self.reason = reason
        super().__init__(f"partition {partition_id} is unhealthy: {reason}")


class PartitionInUse(StateError):
    def __init__(self, partition_id: int) -> None:
        self.partition_id = partition_id
        super().__init__(f"partition {partition_id} is held by a pod")


class IllegalTransition(StateError):
    def __init__(self, partition_id: int, phase: Phase, event: str) -> None:
        self.partition_id = partition_id
        self.phase = phase
        self.event = event
        super().__init__(f"partition {partition_id} cannot {event} while {phase.value}")


class Availability(Protocol):
    """What the allocation policy reads: the table and which partitions are free now.
    A :class:`PartitionBook` and the node machine's immutable view both offer it."""

    @property
    def table(self) -> PartitionTable: ...

    def available_ids(self) -> frozenset[int]: ...


@dataclass(frozen=True, slots=True)
class PartitionView:
    """A read-only picture of one partition, for the edges."""

    partition: Partition
    phase: Phase
    in_use: bool
    state: State
    healthy: bool
    blocker: int | None
    fault: str | None


class PartitionBook:
    """The mutable state of every partition of one :class:`PartitionTable`.

    Ownership: one book per daemon, created from FM's report at start and mutated only
    through the methods below. Errors: every refusal is a :class:`StateError` subclass
    raised before anything changed.
    """

    def __init__(self, table: PartitionTable) -> None:
        self.table = table
        self.generation = 0
        self._phase: dict[int, Phase] = {pid: Phase.INACTIVE for pid in table.ids}
        self._in_use: set[int] = set()
        self._module_faults: dict[int, str] = {}
        self._drained: set[int] = set()
        self._partition_faults: dict[int, str] = {}
        self._fabric_fault: str | None = None

    # -- questions -------------------------------------------------------------------

    def phase(self, partition_id: int) -> Phase:
        return self._phase[self._known(partition_id)]

    def in_use(self, partition_id: int) -> bool:
        return self._known(partition_id) in self._in_use

    @property
    def in_use_ids(self) -> frozenset[int]:
        return frozenset(self._in_use)

    @property
    def active_ids(self) -> frozenset[int]:
        """Partitions FM has (or is about to have) active: phase other than INACTIVE."""
        return frozenset(pid for pid, ph in self._phase.items() if ph is not Phase.INACTIVE)

    @property
    def drained_modules(self) -> frozenset[int]:
        return frozenset(self._drained)

    @property
    def module_faults(self) -> Mapping[int, str]:
        return dict(self._module_faults)

    def occupied(self, partition_id: int) -> bool:
        return (
            self._phase[self._known(partition_id)] is not Phase.INACTIVE
            or partition_id in self._in_use
        )

    def blocker(self, partition_id: int) -> int | None:
        """An occupied partition sharing a GPU with ``partition_id``, lowest ID first."""
        for other in sorted(self.table.overlapping(self._known(partition_id))):
            if self.occupied(other):
                return other
        return None

    def fault(self, partition_id: int) -> str | None:
        """Why the partition's own hardware (or FM) cannot serve it, or None."""
        reasons = []
        if partition_id in self._in_use and self._phase[partition_id] is Phase.INACTIVE:
            reasons.append("held but inactive in Fabric Manager (activating it again)")
        if partition_id in self._partition_faults:
            reasons.append(self._partition_faults[partition_id])
        for module in sorted(self.table[self._known(partition_id)].module_ids):
            if module in self._module_faults:
                reasons.append(f"GPU {module}: {self._module_faults[module]}")
        return "; ".join(reasons) or None

    def drained(self, partition_id: int) -> bool:
        return not self._drained.isdisjoint(self.table[self._known(partition_id)].module_ids)

    def available(self, partition_id: int) -> bool:
        """Free to hand out now (rule 4)."""
        return (
            partition_id not in self._in_use
            and self._phase[self._known(partition_id)] in (Phase.INACTIVE, Phase.ACTIVE)
            and self.blocker(partition_id) is None
            and self.fault(partition_id) is None
            and not self.drained(partition_id)
            and self._fabric_fault is None
        )

    def available_ids(self) -> frozenset[int]:
        return frozenset(pid for pid in self.table.ids if self.available(pid))

    def healthy(self, partition_id: int) -> bool:
        """What ListAndWatch reports (rule 5)."""
        if partition_id in self._in_use:
            return self.fault(partition_id) is None
        return self.available(partition_id)

    def state(self, partition_id: int) -> State:
        phase = self._phase[self._known(partition_id)]
        if partition_id in self._in_use:
            if self.fault(partition_id) is not None:
                return State.UNHEALTHY
            if phase is Phase.UNKNOWN:
                return State.UNSETTLED
            return State.ACTIVATING if phase is Phase.ACTIVATING else State.ALLOCATED
        if phase is Phase.ACTIVATING:
            return State.ACTIVATING
        if phase is Phase.DEACTIVATING:
            return State.DEACTIVATING
        if phase is Phase.UNKNOWN:
            return State.UNSETTLED
        if (
            self.fault(partition_id) is not None
            or self.drained(partition_id)
            or self._fabric_fault is not None
        ):
            return State.UNHEALTHY
        if phase is Phase.ACTIVE:
            # Rule 2: nothing occupied overlaps an active partition, so it is available.
            return State.READY
        return State.FREE if self.blocker(partition_id) is None else State.BLOCKED

    def view(self, partition_id: int) -> PartitionView:
        return PartitionView(
            partition=self.table[self._known(partition_id)],
            phase=self._phase[partition_id],
            in_use=partition_id in self._in_use,
            state=self.state(partition_id),
            healthy=self.healthy(partition_id),
            blocker=self.blocker(partition_id),
            fault=self.fault(partition_id)
            or (None if partition_id in self._in_use else self._fabric_fault),
        )

    def views(self) -> list[PartitionView]:
        return [self.view(pid) for pid in self.table.ids]

    def health_by_size(self, size: int) -> dict[str, bool]:
        """Device ID -> healthy for every partition of ``size``: one ListAndWatch message."""
        return {p.device_id: self.healthy(p.partition_id) for p in self.table.of_size(size)}

    # -- transitions -----------------------------------------------------------------

    def claim(self, partition_id: int) -> Claim:
        """A pod is given ``partition_id`` (kubelet Allocate); mark it in use.

        A partition already in use may be claimed again: the kubelet is the authority on
        who holds a device, and it hands a device out again only after the pod that had
        it is gone (a release we may not have processed yet).

        Raises :class:`UnknownPartition`, :class:`PartitionBlocked` (naming the
        blocker), :class:`PartitionUnhealthy`, or :class:`IllegalTransition` while it
        is being deactivated.
        """
        phase = self.check_claim(partition_id)
        newly = partition_id not in self._in_use
        self._in_use.add(partition_id)
        if phase is Phase.INACTIVE:
            self._phase[partition_id] = Phase.ACTIVATING
            self._changed()
            return Claim.ACTIVATE
        if newly:  # a claim again of what is in use changes nothing anyone sees
            self._changed()
        return Claim.WAIT if phase is Phase.ACTIVATING else Claim.READY

    def check_claim(self, partition_id: int) -> Phase:
        """Raise what :meth:`claim` would raise, changing nothing; return the phase."""
        phase = self._phase[self._known(partition_id)]
        if phase in (Phase.DEACTIVATING, Phase.UNKNOWN):
            raise IllegalTransition(partition_id, phase, "be allocated")
        self._check_not_blocked(partition_id)
        self._check_not_faulty(partition_id)
        if partition_id not in self._in_use and self.drained(partition_id):
            raise PartitionUnhealthy(partition_id, "a GPU of it is drained for maintenance")
        return phase

    def begin_activation(self, partition_id: int) -> None:
        """Activate without a pod (operator pre-warming); the partition stays not in use.

        Raises as :meth:`claim` does, and :class:`IllegalTransition` unless INACTIVE.
        """
        phase = self._phase[self._known(partition_id)]
        if phase is not Phase.INACTIVE:
            raise IllegalTransition(partition_id, phase, "be activated")
        self._check_not_blocked(partition_id)
        self._check_not_faulty(partition_id)
        if self.drained(partition_id):
            raise PartitionUnhealthy(partition_id, "a GPU of it is drained for maintenance")
        self._phase[partition_id] = Phase.ACTIVATING
        self._changed()

    def activated(self, partition_id: int) -> None:
        """FM confirmed the activation."""
        self._move(partition_id, Phase.ACTIVATING, Phase.ACTIVE, "finish activating")

    def activation_failed(self, partition_id: int, *, keep_claim: bool = False) -> None:
        """FM refused or failed the activation: back to INACTIVE, held by nobody unless
        ``keep_claim`` (a pod or claim that held it before still has its GPUs)."""
        self._move(partition_id, Phase.ACTIVATING, Phase.INACTIVE, "fail activating")
        if not keep_claim:
            self._in_use.discard(partition_id)
        self._changed()

    def mark_held(self, partition_id: int) -> None:
        """Record a fact, not a request: something holds the partition (FM has it active
        behind our back, or PodResources shows it assigned). No checks beyond the phase:
        refusing a fact would only make the book wrong."""
        phase = self._phase[self._known(partition_id)]
        if phase is Phase.DEACTIVATING:
            raise IllegalTransition(partition_id, phase, "be held")
        if partition_id not in self._in_use:
            self._in_use.add(partition_id)
            self._changed()

    def reactivate(self, partition_id: int) -> None:
        """Activate again a held partition FM has inactive (its holder keeps its GPUs)."""
        phase = self._phase[self._known(partition_id)]
        if phase is not Phase.INACTIVE or partition_id not in self._in_use:
            raise IllegalTransition(partition_id, phase, "be activated again")
        self._phase[partition_id] = Phase.ACTIVATING
        self._changed()

    def begin_deactivation(self, partition_id: int, *, force: bool = False) -> None:
        """Start deactivating an ACTIVE partition.

        Raises :class:`PartitionInUse` when a pod holds it and ``force`` is false, and
        :class:`IllegalTransition` unless ACTIVE. With ``force`` the pod's claim is
        dropped first (the operator takes responsibility).
        """
        phase = self._phase[self._known(partition_id)]
        if phase is not Phase.ACTIVE:
            raise IllegalTransition(partition_id, phase, "be deactivated")
        if partition_id in self._in_use:
            if not force:
                raise PartitionInUse(partition_id)
            self._in_use.discard(partition_id)
        self._phase[partition_id] = Phase.DEACTIVATING
        self._changed()

    def deactivated(self, partition_id: int) -> None:
        self._move(partition_id, Phase.DEACTIVATING, Phase.INACTIVE, "finish deactivating")

    def deactivation_failed(self, partition_id: int) -> None:
        self._move(partition_id, Phase.DEACTIVATING, Phase.ACTIVE, "fail deactivating")

    def outcome_unknown(self, partition_id: int) -> None:
        """The activation or deactivation in flight ended without an answer (cancelled,
        timed out, killed): FM may have done it or not. A pod's claim is kept."""
        phase = self._phase[self._known(partition_id)]
        if phase not in (Phase.ACTIVATING, Phase.DEACTIVATING):
            raise IllegalTransition(partition_id, phase, "lose an FM call's outcome")
        self._phase[partition_id] = Phase.UNKNOWN
        self._changed()

    def settle(self, partition_id: int, *, active: bool) -> None:
        """FM's report settles an UNKNOWN partition. A claim is kept either way (as
        :meth:`observe_active` keeps it): only a release drops it."""
        phase = self._phase[self._known(partition_id)]
        if phase is not Phase.UNKNOWN:
            raise IllegalTransition(partition_id, phase, "be settled")
        self._phase[partition_id] = Phase.ACTIVE if active else Phase.INACTIVE
        self._changed()

    def touch(self) -> None:
        """Something outside the book that the edges show changed: bump the generation."""
        self._changed()

    def release(self, partition_id: int) -> None:
        """No pod holds the partition any more; it stays active until deactivated."""
        self._known(partition_id)
        if partition_id in self._in_use:
            self._in_use.discard(partition_id)
            self._changed()

    def adopt(self, active_ids: Iterable[int], in_use_ids: Iterable[int]) -> None:
        """Rebuild from facts after a restart: FM's active set and the pods' holdings.

        Partitions in use but not active in FM are left out (FM is the truth about
        activation; the pod's partition will be activated again on its next Allocate).
        Raises :class:`TableError`-like :class:`StateError` if FM reports overlapping
        active partitions, which FM itself forbids.
        """
        active = set(active_ids)
        for pid in active:
            self._known(pid)
        pairs = active_overlaps(self.table, active)
        if pairs:
            raise OverlappingActive(pairs)
        self._phase = {
            pid: Phase.ACTIVE if pid in active else Phase.INACTIVE for pid in self.table.ids
        }
        self._in_use = {pid for pid in in_use_ids if pid in active}
        self._changed()

    def observe_active(self, active_ids: Iterable[int], *, ignore: Iterable[int] = ()) -> set[int]:
        """Reconcile the settled phases with FM's active set; return the IDs corrected.

        Partitions in flight (ACTIVATING, DEACTIVATING) are left alone: their outcome
        arrives through the transition methods. FM's word wins for settled ones and
        settles UNKNOWN ones. A partition FM dropped keeps its claim: its pod still has
        the GPUs, so nothing overlapping may be handed out until it is released. IDs FM
        reports that are not in the table are ignored, and so are the partitions in
        ``ignore`` (the report may be older than what the book knows of them).
        """
        skip = set(ignore)
        active = {pid for pid in active_ids if pid not in skip}
        active |= {pid for pid in skip if pid in self._phase and self._phase[pid] is Phase.ACTIVE}
        corrected: set[int] = set()
        # Drops first, so a partition FM swapped for an overlapping one can be taken up.
        for pid in self.table.ids:
            if pid in skip:
                continue
            if self._phase[pid] in (Phase.ACTIVE, Phase.UNKNOWN) and pid not in active:
                self._phase[pid] = Phase.INACTIVE
                corrected.add(pid)
        for pid in self.table.ids:
            if pid in skip:
                continue
            if self._phase[pid] is Phase.UNKNOWN:  # occupied, so nothing overlapping is
                self._phase[pid] = Phase.ACTIVE
                corrected.add(pid)
            elif self._phase[pid] is Phase.INACTIVE and pid in active:
                if any(self.occupied(o) for o in self.table.overlapping(pid)):
                    continue  # cannot be true at FM; the next list settles it
                self._phase[pid] = Phase.ACTIVE
                corrected.add(pid)
        if corrected:
            self._changed()
        return corrected

    def set_module_fault(self, module_id: int, reason: str | None) -> bool:
        """Mark GPU ``module_id`` faulty (``reason``) or healthy (None). True if changed.

        Raises :class:`StateError` for a GPU in no partition.
        """
        self._known_module(module_id)
        if self._module_faults.get(module_id) == reason:
            return False
        if reason is None:
            del self._module_faults[module_id]
        else:
            self._module_faults[module_id] = reason
        self._changed()
        return True

    def set_partition_fault(self, partition_id: int, reason: str | None) -> bool:
        """Mark a partition FM cannot serve (``reason``) or servable again (None)."""
        self._known(partition_id)
        if self._partition_faults.get(partition_id) == reason:
            return False
        if reason is None:
            del self._partition_faults[partition_id]
        else:
            self._partition_faults[partition_id] = reason
        self._changed()
        return True

    @property
    def fabric_fault(self) -> str | None:
        return self._fabric_fault

    def set_fabric_fault(self, reason: str | None) -> bool:
        """FM as a whole cannot activate anything (unreachable, restarting), or can again.

        Unlike a hardware fault this leaves partitions in use Healthy: their GPUs and
        NVLinks keep working without FM; only handing out new partitions stops.
        """
        if self._fabric_fault == reason:
            return False
        self._fabric_fault = reason
        self._changed()
        return True

    def drain(self, module_id: int) -> None:
        """Take GPU ``module_id`` out of the pool; partitions in use keep running."""
        self._known_module(module_id)
        if module_id not in self._drained:
            self._drained.add(module_id)
            self._changed()

    def undrain(self, module_id: int) -> None:
        self._known_module(module_id)
        if module_id in self._drained:
            self._drained.discard(module_id)
            self._changed()

    def check_invariants(self) -> None:
        """Raise AssertionError if rule 2 or the in-use bookkeeping is broken (tests)."""
        occupied = [pid for pid in self.table.ids if self.occupied(pid)]
        for i, a in enumerate(occupied):
            for b in occupied[i + 1 :]:
                assert not self.table[a].overlaps(self.table[b]), (a, b)
        for pid in self._in_use:
            assert self._phase[pid] is not Phase.DEACTIVATING, pid

    # -- helpers ---------------------------------------------------------------------

    def _known(self, partition_id: int) -> int:
        if partition_id not in self._phase:
            raise UnknownPartition(partition_id)
        return partition_id

    def _known_module(self, module_id: int) -> int:
        if module_id not in self.table.module_ids:
            raise StateError(f"GPU {module_id} is in no partition")
        return module_id

    def _check_not_blocked(self, partition_id: int) -> None:
        blocker = self.blocker(partition_id)
        if blocker is not None:
            raise PartitionBlocked(partition_id, blocker, self.state(blocker))

    def _check_not_faulty(self, partition_id: int) -> None:
        reason = self.fault(partition_id)
        if reason is not None:
            raise PartitionUnhealthy(partition_id, reason)

    def _move(self, partition_id: int, expected: Phase, to: Phase, event: str) -> None:
        phase = self._phase[self._known(partition_id)]
        if phase is not expected:
            raise IllegalTransition(partition_id, phase, event)
        self._phase[partition_id] = to
        self._changed()

    def _changed(self) -> None:
        self.generation += 1
