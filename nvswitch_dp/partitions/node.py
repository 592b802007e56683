"""The node state machine: every decision about this node's partitions, without I/O.

Events in, effects out (h11's shape). The caller feeds events (a kubelet Allocate, a DRA
claim, an operator command, the outcome of an FM call, an FM report, a PodResources
reading, a GPU's VFIO state, the time) and runs the effects the machine asks for
(:class:`Activate`, :class:`Deactivate`, :class:`SetActivated`, :class:`ListFabric`),
reporting each one's outcome back with :meth:`NodeMachine.fm_outcome`. The machine never
awaits, never reads a clock (``now`` is passed in) and imports no I/O library.

Rules. Rule 1 of this module: everything that decides the state of a partition lives here
or in :class:`~nvswitch_dp.partitions.state.PartitionBook` (rules P1-P5 in ``state.py``:
phases, no two occupied partitions overlap, in use is never deactivated without force,
availability, kubelet health). On top of those:

N1 Requests. An Allocate (kubelet), a claim (DRA) or an operator command is one request:
   all its partitions are taken at once or none (:class:`StateError` raised, nothing
   changed). Duplicate partitions in one request are refused. A request is *pending* while
   an FM call it needs is in flight, then *granted* or *failed*; the edge waits for that.
N2 FM calls. The machine asks for FM calls as effects, each with an ``op`` number, and
   learns their outcome: succeeded, failed (FM's return code) or unknown (cancelled,
   timed out, its process killed). At most one call per partition is in flight, one list
   and one set-activated.
N3 Unknown outcomes. An activation or deactivation whose outcome is unknown leaves the
   partition UNKNOWN (occupied, so nothing overlapping is handed out) and asks FM for a
   list, whose report settles it: requests waiting for it are granted if FM did what
   they wait for, and fail otherwise, or when the list itself fails (retriable).
N4 Failures roll back. A failed activation fails every request waiting for it;
   the partitions those requests newly took are let go (deactivated once active), so
   nothing is left half done. NVLINK_ERROR and GENERIC_ERROR also hold the partition out
   of the pool for ``failure_hold`` seconds. IN_USE on activate is not believed blindly:
   FM may already have it active (a lost answer), so it is treated as unknown.
N5 Release (device-plugin mode). The kubelet never says a pod ended. A partition a pod
   holds is released (its hold dropped, then deactivated) once it has been ACTIVE with no
   call in flight and absent from every PodResources reading for ``grace`` seconds,
   counted from the latest of: its activation completing (or, when none completed,
   the first reading after its call ended), its request's grant, its first absence.
   Nothing is released while its call is in flight or while a pending request names
   it. An unreadable PodResources resets every clock: nothing is released on missing
   facts. A partition PodResources shows assigned but that we do not hold is taken as
   held.
N6 Reconcile. FM's report is the truth for settled partitions. A held partition FM has
   inactive stays held (its pod or claim still has the GPUs) and is activated again; a
   partition FM has active that we had inactive (found at start, the late end of a
   killed call, an operator's ``fmpm -a``) is taken as held by a pod that may exist, so
   N5 releases it unless PodResources shows it (in DRA mode, where only claims hold
   partitions, it is released ``grace`` seconds after it was found). A held partition
   is not activated again while FM reports an overlapping one active (FM would only say
   IN_USE); the release of one of the two resolves it. A report asked for before an
   activation or deactivation ended, but answered after, does not undo that outcome:
   those partitions keep what their own outcome said (UNKNOWN ones wait for a newer
   list).
N7 FM restart. NOT_CONFIGURED from any call means FM restarted and waits for
   set-activated: the machine asks for it with exactly the partitions held and active
   (a forced deactivation still in flight counts as held: it has not happened yet),
   then lists; a set-activated that fails is sent again at the next supervision. While
   FM is unreachable or restarting nothing new is handed out (the fabric fault) but
   partitions in use stay Healthy. Trouble seen by any call but the supervisor's own
   list asks for supervision at once; while it lasts supervision runs every second.
N8 Operator. Activate pre-warms a partition held by nobody (not released by N5);
   deactivate is refused while a pod or claim holds it unless ``force``; drain and undrain
   take GPUs out of and back into the pool.
N9 Claims (DRA). A claim holds one partition under its UID; only :meth:`release_claim`
   (Unprepare) or an operator's force drops it. Holding the same partition again under
   the same UID is a no-op.
N10 Illegal events raise and change nothing: unknown partitions, GPUs, ops and requests.
N11 Impossible or missing reports. A report with overlapping partitions active (FM
   forbids it) is not acted on beyond N6 (nothing is deactivated for it: either may be
   a VM's); the view says which partitions (``fabric_overlap``) until a report without
   one. A failed or unknown list starts ``lists_failing_since`` (kept until a list
   succeeds), and supervision runs every second while lists fail.

Events (those that depend on time take ``now``; any may leave effects to take):
the constructor (FM's first report, checkpointed claims), ``allocate``, ``forget``,
``claim``, ``release_claim``, ``operator_activate``, ``operator_deactivate``, ``drain``,
``undrain``, ``gpu_fault``, ``set_registered``, ``pod_resources`` (a reading, or None),
``tick`` (time passes), ``supervise`` (the period came round) and ``fm_outcome`` (an FM
call's outcome, with the report for a list). Questions: ``snapshot`` (the immutable
:class:`NodeView`), ``result`` of a request, ``supervision_delay``, ``in_flight``.

State, each part owning its invariant: the partition book (``state.py``: phases and
occupancy), :class:`~nvswitch_dp.partitions.holds.Holds` (who holds what; the claim index
derived from it), :class:`~nvswitch_dp.partitions.effects.Calls` (one call per
partition, stale reports), :class:`~nvswitch_dp.partitions.requests.Requests`,
:class:`~nvswitch_dp.partitions.fabric_health.FabricHealth` (N7, N11) and
:class:`~nvswitch_dp.partitions.fabric_health.PartitionFaults`. The outcome and reconcile
rules (N3, N4, N6) are in ``outcomes.py``, this class's base.

Every event ends in one place, :meth:`NodeMachine._commit`: it asks for the FM calls the
new state needs and moves the machine's generation once when anything changed, which
ListAndWatch and the other edges follow. Ownership: one machine per daemon, driven from
one thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Concatenate, ParamSpec, TypeVar

from nvswitch_dp.fabric.types import FmReport
from nvswitch_dp.partitions.effects import (
    Activate,
    Calls,
    Deactivate,
    Effect,
    ListFabric,
    Outcome,
    SetActivated,
    Succeeded,
    describe_outcome,
)
from nvswitch_dp.partitions.fabric_health import FabricHealth, PartitionFaults
from nvswitch_dp.partitions.holds import Hold, HoldKind, Holds
from nvswitch_dp.partitions.outcomes import OutcomeRules
from nvswitch_dp.partitions.requests import DuplicatePartition, Request, Requests
from nvswitch_dp.partitions.state import (
    Claim,
    PartitionBlocked,
    PartitionBook,
    Phase,
    State,
    StateError,
    UnknownPartition,
)
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.partitions.view import FabricStatus, Mode, NodeView, RequestResult, RequestStatus

_P = ParamSpec("_P")
_R = TypeVar("_R")

# How long a partition FM failed to activate (NVLINK_ERROR, GENERIC_ERROR) stays out of
# the pool before the scheduler may try it again.
FAILURE_HOLD_S = 60.0


# -- start-up --------------------------------------------------------------------------


def resume_list_at_start(
    held: Iterable[int] | None, waited: float, patience: float
) -> tuple[int, ...] | None:
    """What to tell a restarted FM found at start (N7 before there is a table).

    ``held``: the partitions pods (or checkpointed claims) hold, None when unknown.
    Returns the set-activated list, or None to wait for the holdings: FM exits 60 s
    after its restart unless told, so after ``patience`` seconds we name none.
    """
    if held is not None:
        return tuple(sorted(set(held)))
    return () if waited >= patience else None


# -- the machine -----------------------------------------------------------------------


def _event(
    method: Callable[Concatenate[NodeMachine, _P], _R],
) -> Callable[Concatenate[NodeMachine, _P], _R]:
    """An event: whatever it changed is committed in one place, :meth:`NodeMachine._commit`
    (the FM calls the new state needs are asked for, and the generation moves once), even
    when it raises after a change (it never should: refusals come before changes)."""

    def event(machine: NodeMachine, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(machine, *args, **kwargs)
        finally:
            machine._commit()

    return functools.update_wrapper(event, method)  # type: ignore[return-value]


class NodeMachine(OutcomeRules):
    """See the module docstring. Errors: :class:`StateError` subclasses, raised before
    anything changed."""

    def __init__(
        self,
        table: PartitionTable,
        report: FmReport,
        now: float,
        *,
        grace: float,
        mode: Mode = Mode.DEVICE_PLUGIN,
        failure_hold: float = FAILURE_HOLD_S,
        claims: Mapping[str, int] | None = None,
        resources: Iterable[str] = (),
    ) -> None:
        """Start from FM's first report. Whatever FM has active is held (N6): by the
        checkpointed DRA ``claims`` (UID -> partition), else by a pod that may exist.

        Raises :class:`StateError` when FM reports overlapping partitions active or a
        claim names a partition not in the table.
        """
        if grace < 0:
            raise ValueError(f"release grace must be >= 0, got {grace}")
        self.book = PartitionBook(table)
        self.table = table
        self.grace = grace
        self.mode = mode
        self.failure_hold = failure_hold
        self._calls = Calls()
        self._requests = Requests()
        self._holds = Holds()
        self._to_deactivate: set[int] = set()
        # What the last PodResources reading listed: never deactivated without force.
        self._assigned_last: frozenset[int] = frozenset()
        self._forced: dict[int, Hold] = {}  # holds a forced deactivation in flight dropped
        self._retry_after_report: set[int] = set()  # deactivations that failed
        self._faults = PartitionFaults(table)
        self._fabric = FabricHealth()
        self._list_wanted = False
        self._pod_resources_reachable: bool | None = None
        self._registered: dict[str, bool] = dict.fromkeys(resources, False)
        self._view: NodeView | None = None
        # The generation: moved only by _commit, when the book or the machine changed.
        self._generation = 0
        self._book_seen = self.book.generation
        self._dirty = False
        claims = dict(claims or {})
        for pid in claims.values():
            if pid not in table:
                raise UnknownPartition(pid)
        self.book.adopt(report.active_ids, in_use_ids=report.active_ids)
        by_partition = {pid: uid for uid, pid in claims.items()}
        for pid in self.book.in_use_ids:
            uid = by_partition.get(pid)
            if uid is not None:
                self._holds.add(pid, Hold.claim(uid))
            else:
                self._holds.add(pid, Hold.pod(clock_from=now))
        # A checkpointed claim FM no longer has active is held and activated again (N6);
        # one that cannot be (blocked, faulty) is dropped: its Prepare is answered again.
        for uid, pid in claims.items():
            if self._holds.claimed_by(uid) is None and pid not in self._holds:
                try:
                    self.book.claim(pid)
                except StateError:
                    continue
                self._holds.add(pid, Hold.claim(uid))
                self._emit_activation(pid)
        self._apply_link_state(report)
        self._commit()

    # -- questions -----------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Moves once per event that changed anything the edges show (:meth:`_commit`)."""
        return self._generation

    def snapshot(self) -> NodeView:
        """The node at this generation (cached until the next change)."""
        view = self._view
        if view is None or view.generation != self._generation:
            views = {v.partition.partition_id: v for v in self.book.views()}
            view = NodeView(
                generation=self._generation,
                table=self.table,
                partitions=views,
                available=self.book.available_ids(),
                drained_modules=self.book.drained_modules,
                module_faults=self.book.module_faults,
                fabric=self._fabric.status,
                fabric_problem=self._fabric.problem,
                pod_resources_reachable=self._pod_resources_reachable,
                registered=dict(self._registered),
                claims=self._holds.claims(),
                fabric_overlap=self._fabric.overlap,
                lists_failing_since=self._fabric.lists_failing_since,
                list_failure=self._fabric.list_failure,
            )
            self._view = view
        return view

    def result(self, request_id: int) -> RequestResult:
        return self._requests.get(request_id).result

    def supervision_delay(self, interval: float) -> float:
        """How long the supervisor may sleep now (N7); 0 when supervision is asked for."""
        return self._fabric.supervision_delay(interval)

    @property
    def supervision_wanted(self) -> bool:
        """FM trouble began: supervise now rather than at the end of the period."""
        return self._fabric.supervise_now

    @property
    def has_effects(self) -> bool:
        return self._calls.has_outbox

    def held_partitions(self) -> frozenset[int]:
        return frozenset(self._holds)

    def in_flight(self) -> Mapping[int, Effect]:
        return self._calls.in_flight()

    def take_effects(self) -> list[Effect]:
        """The FM calls to start now (each is then in flight until its outcome)."""
        return self._calls.take()

    # -- kubelet path --------------------------------------------------------------

    @_event
    def allocate(self, partition_ids: Sequence[int], now: float) -> int:
        """A kubelet Allocate of ``partition_ids`` (N1); returns the request ID.

        Raises :class:`DuplicatePartition`, :class:`UnknownPartition`,
        :class:`~nvswitch_dp.partitions.state.PartitionBlocked` (naming the blocker),
        :class:`~nvswitch_dp.partitions.state.PartitionUnhealthy` or
        :class:`~nvswitch_dp.partitions.state.IllegalTransition`; nothing changed.
        """
        return self._take(partition_ids, now, lambda pid: Hold.pod())

    def forget(self, request_id: int) -> None:
        """The edge answered (or gave up on) the request; its holds are unaffected. A
        pending one is kept, unseen, until it ends, so that a failure still lets go of
        what it took (N4)."""
        self._requests.forget(request_id)

    # -- DRA path ------------------------------------------------------------------

    @_event
    def claim(self, claim_uid: str, partition_id: int, now: float) -> int:
        """A DRA claim (NodePrepareResources) takes one partition (N9).

        The same UID on the same partition again is granted at once when active (or
        waits for its activation). The UID on another partition raises
        :class:`StateError`; otherwise raises as :meth:`allocate`.
        """
        phase = self.book.phase(partition_id)
        held = self._holds.claimed_by(claim_uid)
        if held is not None and held != partition_id:
            raise StateError(
                f"claim {claim_uid} already holds partition {held}, not {partition_id}"
            )
        hold = self._holds.get(partition_id)
        if hold is None:
            return self._take([partition_id], now, lambda pid: Hold.claim(claim_uid))
        if hold.kind is HoldKind.CLAIM and hold.claim_uid != claim_uid:
            raise StateError(f"partition {partition_id} is held by claim {hold.claim_uid}")
        if phase is Phase.UNKNOWN:
            raise StateError(
                f"partition {partition_id}'s state in Fabric Manager is being checked; retry"
            )
        # Ours already, or found active and held by a pod that may exist (in DRA mode
        # only claims hold partitions, so the claim takes it over).
        hold.become_claim(claim_uid)
        rid, request = self._requests.open((partition_id,))
        if phase is not Phase.ACTIVE:
            request.waiting.add(partition_id)
            if phase is Phase.INACTIVE and not self._calls.on(partition_id):
                self.book.reactivate(partition_id)
                self._emit_activation(partition_id)
        self._dirty = True
        self._finish_if_done(request, now)
        return rid

    @_event
    def release_claim(self, claim_uid: str, now: float) -> None:
        """Unprepare: drop the claim's hold and deactivate its partition. Unknown UID:
        nothing to do (the kubelet retries Unprepare)."""
        pid = self._holds.claimed_by(claim_uid)
        if pid is not None:
            self._drop_hold(pid)

    # -- operator path -------------------------------------------------------------

    @_event
    def operator_activate(self, partition_id: int, now: float) -> int:
        """Pre-warm a partition no pod holds (N8). Raises as the book's
        ``begin_activation`` does."""
        self._free_of_calls([partition_id])
        self.book.begin_activation(partition_id)
        self._emit_activation(partition_id)
        rid, _ = self._requests.open((partition_id,), (partition_id,))
        return rid

    @_event
    def operator_deactivate(self, partition_id: int, now: float, *, force: bool = False) -> int:
        """Deactivate an active partition (N8); with ``force`` its hold is dropped first.

        Raises :class:`~nvswitch_dp.partitions.state.PartitionInUse` when held and not
        ``force``, :class:`~nvswitch_dp.partitions.state.IllegalTransition` unless ACTIVE.
        """
        self._free_of_calls([partition_id])
        self.book.begin_deactivation(partition_id, force=force)
        if partition_id in self._holds:
            # Kept aside: if FM does not deactivate it, the holder still has it.
            self._forced[partition_id] = self._holds.pop(partition_id)
        self._to_deactivate.discard(partition_id)
        self._calls.deactivate(partition_id)
        rid, _ = self._requests.open((partition_id,), (partition_id,), deactivating=True)
        return rid

    @_event
    def drain(self, module_id: int) -> None:
        """Take GPU ``module_id`` out of the pool. Raises StateError for an unknown GPU."""
        self.book.drain(module_id)

    @_event
    def undrain(self, module_id: int) -> None:
        self.book.undrain(module_id)

    # -- observations --------------------------------------------------------------

    @_event
    def gpu_fault(self, module_id: int, reason: str | None) -> bool:
        """A GPU's VFIO/hardware problem (None: fine again). True if anything changed."""
        return self.book.set_module_fault(module_id, reason)

    @_event
    def set_registered(self, resource: str, registered: bool) -> None:
        if self._registered.get(resource) != registered:
            self._registered[resource] = registered
            self._dirty = True

    @_event
    def pod_resources(self, assigned: Iterable[int] | None, now: float) -> None:
        """One PodResources reading: the partitions some container holds, or None when
        it could not be read (N5). IDs not in the table are ignored."""
        if assigned is None:
            for _, hold in self._holds.items():
                hold.unassigned_since = None
            if self._pod_resources_reachable is not False:
                self._pod_resources_reachable = False
                self._dirty = True
            return
        if self._pod_resources_reachable is not True:
            self._pod_resources_reachable = True
            self._dirty = True
        seen = {pid for pid in assigned if pid in self.table}
        self._assigned_last = frozenset(seen)
        for pid in sorted(seen - set(self._holds)):
            self._hold_found(pid, now)
        for pid, hold in list(self._holds.items()):
            if hold.kind is not HoldKind.POD:
                continue
            if pid in seen:
                hold.unassigned_since = None
                continue
            if hold.unassigned_since is None:
                hold.unassigned_since = now
            if self._release_due(pid, hold, now):
                self._drop_hold(pid)

    @_event
    def tick(self, now: float) -> None:
        """Time passes (see :meth:`_tick`)."""
        self._tick(now)

    def _tick(self, now: float) -> None:
        """Time passes: holds after failures expire; in DRA mode, partitions found
        active that no claim holds are released after ``grace`` (N6)."""
        if self._faults.expire(now):
            self._refresh_partition_faults()
        if self.mode is Mode.DRA:
            for pid, hold in list(self._holds.items()):
                if hold.kind is HoldKind.POD:
                    hold.unassigned_since = hold.unassigned_since or now
                    if self._release_due(pid, hold, now):
                        self._drop_hold(pid)

    @_event
    def supervise(self, now: float) -> None:
        """The supervision period came round: list FM (and let time pass)."""
        self._fabric.supervise_now = False
        self._list_wanted = True
        if self._fabric.status is FabricStatus.RESTARTING and not self._calls.any(SetActivated):
            self._fabric.set_activated_sent = False
        self._tick(now)

    # -- FM outcomes ---------------------------------------------------------------

    @_event
    def fm_outcome(self, op: int, outcome: Outcome, now: float) -> None:
        """The outcome of FM call ``op`` (N2-N7). Raises :class:`UnknownOperation` for an
        op not in flight (nothing changed)."""
        effect = self._calls.finish(op)
        if self._fabric.note_outcome(outcome, from_list=isinstance(effect, ListFabric)):
            self.book.set_fabric_fault(self._fabric.problem)
            self._dirty = True
        if isinstance(effect, ListFabric) and self._fabric.note_list(outcome, self.table, now):
            self._dirty = True
        if isinstance(effect, Activate):
            self._activation_outcome(effect.partition_id, outcome, now)
        elif isinstance(effect, Deactivate):
            self._deactivation_outcome(effect.partition_id, outcome, now)
        elif isinstance(effect, SetActivated):
            # Either way, ask FM where it stands; a failed set-activated is sent again at
            # the next supervision if FM is still waiting for it (paced, not a hot loop).
            self._list_wanted = True
        elif isinstance(outcome, Succeeded) and outcome.report is not None:
            stale = self._calls.stale_for(op)
            self._reconcile(outcome.report, now, stale)
        else:
            self._calls.forget_list(op)
            why = describe_outcome(outcome)
            self._unsettled_fail(f"Fabric Manager could not be asked ({why})")

    # -- internals: taking and letting go ------------------------------------------

    def _take(
        self, partition_ids: Sequence[int], now: float, hold_for: Callable[[int], Hold]
    ) -> int:
        wanted = list(partition_ids)
        seen: set[int] = set()
        for pid in wanted:
            if pid in seen:
                raise DuplicatePartition(pid)
            seen.add(pid)
            self.book.phase(pid)  # UnknownPartition before anything changes
        self._free_of_calls([pid for pid in wanted if not self.book.in_use(pid)])
        # Check everything first, so a refusal changes nothing (not even the generation).
        for i, pid in enumerate(wanted):
            self.book.check_claim(pid)
            for other in wanted[:i]:
                if self.table[pid].overlaps(self.table[other]):
                    raise PartitionBlocked(pid, other, State.ACTIVATING)
        claimed = [(pid, self.book.claim(pid)) for pid in wanted]
        rid, request = self._requests.open(wanted)
        for pid, claim in claimed:
            hold = self._holds.get(pid)
            if hold is None:
                hold = self._holds.add(pid, hold_for(pid))
                request.fresh.add(pid)
            if hold.kind is HoldKind.POD:
                hold.clock_from = now if claim is Claim.READY else None
                hold.unassigned_since = None
            self._to_deactivate.discard(pid)
            if claim is Claim.ACTIVATE:
                self._emit_activation(pid)
            if claim is not Claim.READY:
                request.waiting.add(pid)
        self._finish_if_done(request, now)
        return rid

    def _free_of_calls(self, partition_ids: Iterable[int]) -> None:
        for pid in partition_ids:
            if self._calls.on(pid):
                phase = self.book.phase(pid)
                raise StateError(
                    f"partition {pid} has a Fabric Manager call in flight ({phase.value}); "
                    "retry once it ends"
                )

    def _hold_found(self, pid: int, now: float) -> None:
        """PodResources shows ``pid`` assigned, and we do not hold it (N5)."""
        phase = self.book.phase(pid)
        if self._calls.on(pid) or phase in (Phase.DEACTIVATING, Phase.UNKNOWN):
            return  # the call's outcome comes first; the next reading decides
        try:
            claim = self.book.claim(pid)
        except StateError:
            return  # blocked or faulty: the pod's partition cannot be ours now
        self._holds.add(pid, Hold.pod(clock_from=now if claim is Claim.READY else None))
        self._to_deactivate.discard(pid)
        if claim is Claim.ACTIVATE:
            self._emit_activation(pid)

    def _release_due(self, pid: int, hold: Hold, now: float) -> bool:
        if self._calls.on(pid) or hold.unassigned_since is None:
            return False
        if hold.clock_from is None:
            # No activation completed (it failed, or FM had an overlap active): the
            # clock starts now that nothing is in flight, so the hold cannot outlive
            # its pod.
            hold.clock_from = now
            return False
        if self._requests.pending_on(pid):
            return False  # a request still waits on it (or on its siblings)
        phase = self.book.phase(pid)
        if phase not in (Phase.ACTIVE, Phase.INACTIVE):
            return False
        return now - max(hold.clock_from, hold.unassigned_since) >= self.grace

    def _drop_hold(self, pid: int) -> None:
        """Nobody holds ``pid`` any more: let it go and deactivate it once it is active."""
        self._holds.pop(pid)
        self.book.release(pid)
        self._to_deactivate.add(pid)

    # -- internals: FM -------------------------------------------------------------

    def _emit_activation(self, pid: int) -> None:
        self._calls.activate(pid)

    def _fail(self, request: Request, message: str, code: int | None) -> None:
        """N4: the request fails; what it newly took is let go."""
        if request.status is not RequestStatus.PENDING:
            return
        request.status = RequestStatus.FAILED
        request.error, request.code = message, code
        request.waiting.clear()
        for pid in request.fresh:
            if pid in self._holds:
                phase = self.book.phase(pid)
                if phase is Phase.INACTIVE and not self._calls.on(pid):
                    self._holds.pop(pid)
                    self.book.release(pid)
                else:
                    self._drop_hold(pid)
        self._dirty = True

    def _finish_if_done(self, request: Request, now: float) -> None:
        if request.status is RequestStatus.PENDING and not request.waiting:
            request.status = RequestStatus.GRANTED
            # The grant is the moment the kubelet may record the pod's devices: every
            # pod hold of the request starts its release clock now (N5).
            for pid in request.partitions:
                hold = self._holds.get(pid)
                if hold is not None and hold.kind is HoldKind.POD:
                    hold.clock_from = now
                    hold.unassigned_since = None
            self._dirty = True

    def _apply_link_state(self, report: FmReport) -> None:
        self._faults.take_report(report)
        self._refresh_partition_faults()

    def _refresh_partition_faults(self) -> None:
        for pid in self.table.ids:
            self.book.set_partition_fault(pid, self._faults.reason(pid))

    def _pump(self) -> None:
        """Ask for the FM calls the state now needs (N2, N4, N7)."""
        self._requests.drop_abandoned()
        if self._fabric.status is FabricStatus.RESTARTING:
            if self._calls.any(SetActivated):
                return
            if not self._fabric.set_activated_sent:
                self._fabric.set_activated_sent = True
                # A forced deactivation still in flight (or unsettled) has not happened
                # as far as the restarted FM knows: its partition is named like any held
                # one, so that if the call fails (NOT_CONFIGURED, as it will while FM
                # restarts) the holder it dropped gets back a partition that is active.
                forced = {p for p in self._forced if self.book.phase(p) is not Phase.INACTIVE}
                held = tuple(
                    sorted(
                        forced
                        | {
                            pid
                            for pid in self._holds
                            if self.book.phase(pid) in (Phase.ACTIVE, Phase.UNKNOWN)
                        }
                    )
                )
                self._calls.set_activated(held)
            elif self._list_wanted and not self._calls.any(ListFabric):
                self._list_wanted = False
                self._calls.list_fabric()
            return
        for pid in sorted(self._to_deactivate):
            if pid in self._holds or self._calls.on(pid) or pid in self._assigned_last:
                continue  # a pod holds it per PodResources: the next reading holds it
            phase = self.book.phase(pid)
            if phase is Phase.INACTIVE:
                self._to_deactivate.discard(pid)
            elif phase is Phase.ACTIVE and pid not in self._retry_after_report:
                self.book.begin_deactivation(pid)
                self._calls.deactivate(pid)
        if self._list_wanted and not self._calls.any(ListFabric):
            self._list_wanted = False
            self._calls.list_fabric()

    def _commit(self) -> None:
        """End of every event: ask for the FM calls the state now needs, and move the
        generation once if the book or the machine changed. The only place it moves."""
        self._pump()
        if self._dirty or self.book.generation != self._book_seen:
            self._generation += 1
            self._book_seen = self.book.generation
            self._dirty = False

    # -- tests ---------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if a rule is broken (tests and the fault campaign)."""
        self.book.check_invariants()
        for pid in self._holds:
            assert self.book.in_use(pid), f"held partition {pid} not in use in the book"
        for pid in self.book.in_use_ids:
            assert pid in self._holds, f"partition {pid} in use but held by nobody"
        for pid, hold in self._holds.items():
            assert (hold.kind is HoldKind.CLAIM) == (hold.claim_uid is not None), (pid, hold)
        for pid in self.table.ids:
            phase = self.book.phase(pid)
            in_flight = self._calls.on(pid)
            assert (phase in (Phase.ACTIVATING, Phase.DEACTIVATING)) == in_flight, (
                pid,
                phase,
                in_flight,
            )


__all__ = ["NodeMachine", "resume_list_at_start"]
