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

Every change bumps the book's one generation, which ListAndWatch and the other edges
follow. Ownership: one machine per daemon, driven from one thread.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from nvswitch_dp.fabric.types import FmReport, FmReturn, fm_return_name
from nvswitch_dp.partitions.state import (
    Claim,
    PartitionBlocked,
    PartitionBook,
    PartitionView,
    Phase,
    State,
    StateError,
    UnknownPartition,
    active_overlaps,
    describe_overlaps,
)
from nvswitch_dp.partitions.table import PartitionTable

# How long a partition FM failed to activate (NVLINK_ERROR, GENERIC_ERROR) stays out of
# the pool before the scheduler may try it again.
FAILURE_HOLD_S = 60.0
# Supervision period while FM is unreachable or restarting.
TROUBLE_SUPERVISION_S = 1.0


class Mode(enum.Enum):
    DEVICE_PLUGIN = "device-plugin"
    DRA = "dra"


class FabricStatus(enum.Enum):
    UP = "up"
    UNREACHABLE = "unreachable"
    RESTARTING = "restarting"  # NOT_CONFIGURED: waiting for set-activated


# -- effects and outcomes ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Activate:
    op: int
    partition_id: int


@dataclass(frozen=True, slots=True)
class Deactivate:
    op: int
    partition_id: int


@dataclass(frozen=True, slots=True)
class SetActivated:
    op: int
    partition_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ListFabric:
    op: int


Effect = Activate | Deactivate | SetActivated | ListFabric


@dataclass(frozen=True, slots=True)
class Succeeded:
    report: FmReport | None = None  # ListFabric's answer


@dataclass(frozen=True, slots=True)
class Failed:
    code: int  # FM's return code
    message: str


@dataclass(frozen=True, slots=True)
class Unknown:
    reason: str  # "cancelled", "timed out", ...


Outcome = Succeeded | Failed | Unknown


# -- requests --------------------------------------------------------------------------


class DuplicatePartition(StateError):
    def __init__(self, partition_id: int) -> None:
        self.partition_id = partition_id
        super().__init__(f"partition {partition_id} is named twice in one request")


class UnknownRequest(StateError):
    def __init__(self, request_id: int) -> None:
        super().__init__(f"request {request_id} is not known (already forgotten?)")


class UnknownOperation(StateError):
    def __init__(self, op: int) -> None:
        super().__init__(f"FM call {op} is not in flight")


class RequestStatus(enum.Enum):
    PENDING = "pending"
    GRANTED = "granted"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RequestResult:
    status: RequestStatus
    error: str | None = None  # why it failed (FM failed or did not answer: retry later)
    code: int | None = None  # FM's return code when FM refused


@dataclass
class _Request:
    partitions: tuple[int, ...]
    waiting: set[int]
    fresh: set[int]  # partitions this request put in use (let go if it fails)
    deactivating: bool = False  # an operator's deactivation (waits for INACTIVE)
    abandoned: bool = False  # forgotten by its caller while pending
    status: RequestStatus = RequestStatus.PENDING
    error: str | None = None
    code: int | None = None


# -- the view --------------------------------------------------------------------------


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


# -- start-up --------------------------------------------------------------------------


def _describe(outcome: Outcome) -> str:
    if isinstance(outcome, Failed):
        return outcome.message
    if isinstance(outcome, Unknown):
        return outcome.reason
    return "no report"


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


@dataclass
class _Hold:
    """Who holds a partition in use: ``pod`` (the kubelet's) or ``claim`` (a DRA UID)."""

    kind: str
    claim_uid: str | None = None
    clock_from: float | None = None  # when the release clock may start (N5)
    unassigned_since: float | None = None


@dataclass
class _Trouble:
    status: FabricStatus = FabricStatus.UP
    problem: str | None = None


class NodeMachine:
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
        self._ops = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._outbox: list[Effect] = []
        self._inflight: dict[int, Effect] = {}
        self._call_on: dict[int, int] = {}  # partition -> op in flight on it
        self._requests: dict[int, _Request] = {}
        self._holds: dict[int, _Hold] = {}
        self._claims: dict[str, int] = {}
        self._to_deactivate: set[int] = set()
        # What the last PodResources reading listed: never deactivated without force.
        self._assigned_last: frozenset[int] = frozenset()
        self._forced: dict[int, _Hold] = {}  # holds a forced deactivation in flight dropped
        self._retry_after_report: set[int] = set()  # deactivations that failed
        self._failure_holds: dict[int, tuple[str, float]] = {}
        self._report_faults: dict[int, str] = {}  # partition -> link/GPU problem in FM
        self._trouble = _Trouble()
        self._fabric_overlap: str | None = None
        self._lists_failing_since: float | None = None
        self._list_failure: str | None = None
        self._set_activated_sent = False
        self._list_wanted = False
        self._supervise_now = False
        self._pod_resources_reachable: bool | None = None
        self._registered: dict[str, bool] = dict.fromkeys(resources, False)
        self._view: NodeView | None = None
        self._now = now  # the time of the event being taken
        # Stale reports: a list answered after an outcome it did not see must not undo it.
        self._outcomes_seen = 0  # activation/deactivation outcomes so far
        self._changed_at: dict[int, int] = {}  # partition -> outcome count at its last one
        self._list_began: dict[int, int] = {}  # list op -> outcome count when emitted
        claims = dict(claims or {})
        for pid in claims.values():
            if pid not in table:
                raise UnknownPartition(pid)
        self.book.adopt(report.active_ids, in_use_ids=report.active_ids)
        by_partition = {pid: uid for uid, pid in claims.items()}
        for pid in self.book.in_use_ids:
            uid = by_partition.get(pid)
            if uid is not None:
                self._holds[pid] = _Hold("claim", uid)
                self._claims[uid] = pid
            else:
                self._holds[pid] = _Hold("pod", clock_from=now)
        # A checkpointed claim FM no longer has active is held and activated again (N6);
        # one that cannot be (blocked, faulty) is dropped: its Prepare is answered again.
        for uid, pid in claims.items():
            if uid not in self._claims and pid not in self._holds:
                try:
                    self.book.claim(pid)
                except StateError:
                    continue
                self._holds[pid] = _Hold("claim", uid)
                self._claims[uid] = pid
                self._emit_activation(pid)
        self._apply_link_state(report)
        self._pump()

    # -- questions -----------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self.book.generation

    def snapshot(self) -> NodeView:
        """The node at this generation (cached until the next change)."""
        view = self._view
        if view is None or view.generation != self.book.generation:
            views = {v.partition.partition_id: v for v in self.book.views()}
            view = NodeView(
                generation=self.book.generation,
                table=self.table,
                partitions=views,
                available=self.book.available_ids(),
                drained_modules=self.book.drained_modules,
                module_faults=self.book.module_faults,
                fabric=self._trouble.status,
                fabric_problem=self._trouble.problem,
                pod_resources_reachable=self._pod_resources_reachable,
                registered=dict(self._registered),
                claims=dict(self._claims),
                fabric_overlap=self._fabric_overlap,
                lists_failing_since=self._lists_failing_since,
                list_failure=self._list_failure,
            )
            self._view = view
        return view

    def result(self, request_id: int) -> RequestResult:
        request = self._request(request_id)
        return RequestResult(request.status, request.error, request.code)

    def supervision_delay(self, interval: float) -> float:
        """How long the supervisor may sleep now (N7); 0 when supervision is asked for."""
        if self._supervise_now:
            return 0.0
        if self._trouble.status is not FabricStatus.UP or self._lists_failing_since is not None:
            return min(interval, TROUBLE_SUPERVISION_S)
        return interval

    @property
    def supervision_wanted(self) -> bool:
        """FM trouble began: supervise now rather than at the end of the period."""
        return self._supervise_now

    @property
    def has_effects(self) -> bool:
        return bool(self._outbox)

    def held_partitions(self) -> frozenset[int]:
        return frozenset(self._holds)

    def in_flight(self) -> Mapping[int, Effect]:
        return dict(self._inflight)

    def take_effects(self) -> list[Effect]:
        """The FM calls to start now (each is then in flight until its outcome)."""
        effects, self._outbox = self._outbox, []
        return effects

    # -- kubelet path --------------------------------------------------------------

    def allocate(self, partition_ids: Sequence[int], now: float) -> int:
        """A kubelet Allocate of ``partition_ids`` (N1); returns the request ID.

        Raises :class:`DuplicatePartition`, :class:`UnknownPartition`,
        :class:`~nvswitch_dp.partitions.state.PartitionBlocked` (naming the blocker),
        :class:`~nvswitch_dp.partitions.state.PartitionUnhealthy` or
        :class:`~nvswitch_dp.partitions.state.IllegalTransition`; nothing changed.
        """
        self._now = now
        return self._take(partition_ids, now, lambda pid: _Hold("pod"))

    def forget(self, request_id: int) -> None:
        """The edge answered (or gave up on) the request; its holds are unaffected. A
        pending one is kept, unseen, until it ends, so that a failure still lets go of
        what it took (N4)."""
        request = self._request(request_id)
        if request.status is RequestStatus.PENDING:
            request.abandoned = True
        else:
            del self._requests[request_id]

    # -- DRA path ------------------------------------------------------------------

    def claim(self, claim_uid: str, partition_id: int, now: float) -> int:
        """A DRA claim (NodePrepareResources) takes one partition (N9).

        The same UID on the same partition again is granted at once when active (or
        waits for its activation). The UID on another partition raises
        :class:`StateError`; otherwise raises as :meth:`allocate`.
        """
        self._now = now
        phase = self.book.phase(partition_id)
        held = self._claims.get(claim_uid)
        if held is not None and held != partition_id:
            raise StateError(
                f"claim {claim_uid} already holds partition {held}, not {partition_id}"
            )
        hold = self._holds.get(partition_id)
        if hold is None:
            rid = self._take([partition_id], now, lambda pid: _Hold("claim", claim_uid))
            self._claims[claim_uid] = partition_id
            self.book.touch()
            return rid
        if hold.kind == "claim" and hold.claim_uid != claim_uid:
            raise StateError(f"partition {partition_id} is held by claim {hold.claim_uid}")
        if phase is Phase.UNKNOWN:
            raise StateError(
                f"partition {partition_id}'s state in Fabric Manager is being checked; retry"
            )
        # Ours already, or found active and held by a pod that may exist (in DRA mode
        # only claims hold partitions, so the claim takes it over).
        hold.kind, hold.claim_uid = "claim", claim_uid
        self._claims[claim_uid] = partition_id
        request = _Request((partition_id,), set(), set())
        if phase is not Phase.ACTIVE:
            request.waiting.add(partition_id)
            if phase is Phase.INACTIVE and partition_id not in self._call_on:
                self.book.reactivate(partition_id)
                self._emit_activation(partition_id)
        rid = next(self._request_ids)
        self._requests[rid] = request
        self.book.touch()
        self._finish_if_done(request)
        self._pump()
        return rid

    def release_claim(self, claim_uid: str, now: float) -> None:
        """Unprepare: drop the claim's hold and deactivate its partition. Unknown UID:
        nothing to do (the kubelet retries Unprepare)."""
        self._now = now
        pid = self._claims.pop(claim_uid, None)
        if pid is None:
            return
        hold = self._holds.get(pid)
        if hold is not None and hold.claim_uid == claim_uid:
            self._drop_hold(pid)
        self.book.touch()
        self._pump()

    # -- operator path -------------------------------------------------------------

    def operator_activate(self, partition_id: int, now: float) -> int:
        """Pre-warm a partition no pod holds (N8). Raises as the book's
        ``begin_activation`` does."""
        self._now = now
        self._free_of_calls([partition_id])
        self.book.begin_activation(partition_id)
        self._emit_activation(partition_id)
        rid = next(self._request_ids)
        self._requests[rid] = _Request((partition_id,), {partition_id}, set())
        self._pump()
        return rid

    def operator_deactivate(self, partition_id: int, now: float, *, force: bool = False) -> int:
        """Deactivate an active partition (N8); with ``force`` its hold is dropped first.

        Raises :class:`~nvswitch_dp.partitions.state.PartitionInUse` when held and not
        ``force``, :class:`~nvswitch_dp.partitions.state.IllegalTransition` unless ACTIVE.
        """
        self._now = now
        self._free_of_calls([partition_id])
        self.book.begin_deactivation(partition_id, force=force)
        hold = self._holds.pop(partition_id, None)
        if hold is not None:
            # Kept aside: if FM does not deactivate it, the holder still has it.
            self._forced[partition_id] = hold
            if hold.claim_uid is not None:
                self._claims.pop(hold.claim_uid, None)
        self._to_deactivate.discard(partition_id)
        self._emit(Deactivate(next(self._ops), partition_id), partition_id)
        rid = next(self._request_ids)
        self._requests[rid] = _Request((partition_id,), {partition_id}, set(), deactivating=True)
        self._pump()
        return rid

    def drain(self, module_id: int) -> None:
        """Take GPU ``module_id`` out of the pool. Raises StateError for an unknown GPU."""
        self.book.drain(module_id)

    def undrain(self, module_id: int) -> None:
        self.book.undrain(module_id)

    # -- observations --------------------------------------------------------------

    def gpu_fault(self, module_id: int, reason: str | None) -> bool:
        """A GPU's VFIO/hardware problem (None: fine again). True if anything changed."""
        return self.book.set_module_fault(module_id, reason)

    def set_registered(self, resource: str, registered: bool) -> None:
        if self._registered.get(resource) != registered:
            self._registered[resource] = registered
            self.book.touch()

    def pod_resources(self, assigned: Iterable[int] | None, now: float) -> None:
        """One PodResources reading: the partitions some container holds, or None when
        it could not be read (N5). IDs not in the table are ignored."""
        self._now = now
        if assigned is None:
            for hold in self._holds.values():
                hold.unassigned_since = None
            if self._pod_resources_reachable is not False:
                self._pod_resources_reachable = False
                self.book.touch()
            return
        if self._pod_resources_reachable is not True:
            self._pod_resources_reachable = True
            self.book.touch()
        seen = {pid for pid in assigned if pid in self.table}
        self._assigned_last = frozenset(seen)
        for pid in sorted(seen - set(self._holds)):
            self._hold_found(pid, now)
        for pid, hold in list(self._holds.items()):
            if hold.kind != "pod":
                continue
            if pid in seen:
                hold.unassigned_since = None
                continue
            if hold.unassigned_since is None:
                hold.unassigned_since = now
            if self._release_due(pid, hold, now):
                self._drop_hold(pid)
        self._pump()

    def tick(self, now: float) -> None:
        """Time passes: holds after failures expire; in DRA mode, partitions found
        active that no claim holds are released after ``grace`` (N6)."""
        self._now = now
        changed = False
        for pid, (_, until) in list(self._failure_holds.items()):
            if now >= until:
                del self._failure_holds[pid]
                changed = True
        if changed:
            self._refresh_partition_faults()
        if self.mode is Mode.DRA:
            for pid, hold in list(self._holds.items()):
                if hold.kind == "pod":
                    hold.unassigned_since = hold.unassigned_since or now
                    if self._release_due(pid, hold, now):
                        self._drop_hold(pid)
        self._pump()

    def supervise(self, now: float) -> None:
        """The supervision period came round: list FM (and let time pass)."""
        self._supervise_now = False
        self._list_wanted = True
        if self._trouble.status is FabricStatus.RESTARTING and not self._any(SetActivated):
            self._set_activated_sent = False
        self.tick(now)

    # -- FM outcomes ---------------------------------------------------------------

    def fm_outcome(self, op: int, outcome: Outcome, now: float) -> None:
        """The outcome of FM call ``op`` (N2-N7). Raises :class:`UnknownOperation` for an
        op not in flight (nothing changed)."""
        self._now = now
        effect = self._inflight.get(op)
        if effect is None:
            raise UnknownOperation(op)
        del self._inflight[op]
        if isinstance(effect, Activate | Deactivate):
            del self._call_on[effect.partition_id]
            self._outcomes_seen += 1
            self._changed_at[effect.partition_id] = self._outcomes_seen
        self._note_trouble(outcome, from_list=isinstance(effect, ListFabric))
        if isinstance(effect, ListFabric):
            self._note_list(outcome, now)
        if isinstance(effect, Activate):
            self._activation_outcome(effect.partition_id, outcome, now)
        elif isinstance(effect, Deactivate):
            self._deactivation_outcome(effect.partition_id, outcome)
        elif isinstance(effect, SetActivated):
            # Either way, ask FM where it stands; a failed set-activated is sent again at
            # the next supervision if FM is still waiting for it (paced, not a hot loop).
            self._list_wanted = True
        elif isinstance(outcome, Succeeded) and outcome.report is not None:
            began = self._list_began.pop(op, self._outcomes_seen)
            stale = {pid for pid, at in self._changed_at.items() if at > began}
            self._reconcile(outcome.report, now, stale)
        else:
            self._list_began.pop(op, None)
            self._unsettled_fail(f"Fabric Manager could not be asked ({_describe(outcome)})")
        self._pump()

    # -- internals: taking and letting go ------------------------------------------

    def _take(
        self, partition_ids: Sequence[int], now: float, hold_for: Callable[[int], _Hold]
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
        request = _Request(tuple(wanted), set(), set())
        for pid, claim in claimed:
            hold = self._holds.get(pid)
            if hold is None:
                hold = self._holds[pid] = hold_for(pid)
                request.fresh.add(pid)
            if hold.kind == "pod":
                hold.clock_from = now if claim is Claim.READY else None
                hold.unassigned_since = None
            self._to_deactivate.discard(pid)
            if claim is Claim.ACTIVATE:
                self._emit_activation(pid)
            if claim is not Claim.READY:
                request.waiting.add(pid)
        rid = next(self._request_ids)
        self._requests[rid] = request
        self._finish_if_done(request)
        self._pump()
        return rid

    def _free_of_calls(self, partition_ids: Iterable[int]) -> None:
        for pid in partition_ids:
            if pid in self._call_on:
                phase = self.book.phase(pid)
                raise StateError(
                    f"partition {pid} has a Fabric Manager call in flight ({phase.value}); "
                    "retry once it ends"
                )

    def _hold_found(self, pid: int, now: float) -> None:
        """PodResources shows ``pid`` assigned, and we do not hold it (N5)."""
        phase = self.book.phase(pid)
        if pid in self._call_on or phase in (Phase.DEACTIVATING, Phase.UNKNOWN):
            return  # the call's outcome comes first; the next reading decides
        try:
            claim = self.book.claim(pid)
        except StateError:
            return  # blocked or faulty: the pod's partition cannot be ours now
        self._holds[pid] = _Hold("pod", clock_from=now if claim is Claim.READY else None)
        self._to_deactivate.discard(pid)
        if claim is Claim.ACTIVATE:
            self._emit_activation(pid)

    def _release_due(self, pid: int, hold: _Hold, now: float) -> bool:
        if pid in self._call_on or hold.unassigned_since is None:
            return False
        if hold.clock_from is None:
            # No activation completed (it failed, or FM had an overlap active): the
            # clock starts now that nothing is in flight, so the hold cannot outlive
            # its pod.
            hold.clock_from = now
            return False
        if any(
            pid in r.partitions and r.status is RequestStatus.PENDING
            for r in self._requests.values()
        ):
            return False  # a request still waits on it (or on its siblings)
        phase = self.book.phase(pid)
        if phase not in (Phase.ACTIVE, Phase.INACTIVE):
            return False
        return now - max(hold.clock_from, hold.unassigned_since) >= self.grace

    def _drop_hold(self, pid: int) -> None:
        """Nobody holds ``pid`` any more: let it go and deactivate it once it is active."""
        hold = self._holds.pop(pid)
        if hold.claim_uid is not None and self._claims.get(hold.claim_uid) == pid:
            del self._claims[hold.claim_uid]
        self.book.release(pid)
        self._to_deactivate.add(pid)

    # -- internals: FM -------------------------------------------------------------

    def _emit(self, effect: Effect, pid: int | None = None) -> None:
        if isinstance(effect, ListFabric):
            self._list_began[effect.op] = self._outcomes_seen
        self._inflight[effect.op] = effect
        if pid is not None:
            self._call_on[pid] = effect.op
        self._outbox.append(effect)

    def _emit_activation(self, pid: int) -> None:
        self._emit(Activate(next(self._ops), pid), pid)

    def _activation_outcome(self, pid: int, outcome: Outcome, now: float) -> None:
        waiting = [r for r in self._requests.values() if pid in r.waiting]
        if isinstance(outcome, Failed) and outcome.code == FmReturn.IN_USE:
            # FM may have it active already (a lost answer, a restart): ask, not guess.
            outcome = Unknown("Fabric Manager says in use; checking its active set")
        if isinstance(outcome, Succeeded):
            self.book.activated(pid)
            hold = self._holds.get(pid)
            if hold is not None and hold.kind == "pod":
                hold.clock_from = now
                hold.unassigned_since = None
            for request in waiting:
                request.waiting.discard(pid)
                self._finish_if_done(request)
            return
        if isinstance(outcome, Unknown):
            # Waiters keep waiting: FM's report settles it (N3).
            self.book.outcome_unknown(pid)
            self._list_wanted = True
            return
        else:
            if outcome.code in (FmReturn.NVLINK_ERROR, FmReturn.GENERIC_ERROR):
                reason = f"activation failed with {fm_return_name(outcome.code)}"
                self._failure_holds[pid] = (reason, now + self.failure_hold)
                self._refresh_partition_faults()
            fresh = any(pid in r.fresh for r in waiting)
            # A hold from before keeps the partition (N6): its pod or claim still has
            # the GPUs; the next report activates it again.
            self.book.activation_failed(pid, keep_claim=pid in self._holds and not fresh)
            message = f"Fabric Manager could not activate partition {pid}: {outcome.message}"
        for request in waiting:
            self._fail(request, message, outcome.code)

    def _deactivation_outcome(self, pid: int, outcome: Outcome) -> None:
        waiting = [r for r in self._requests.values() if pid in r.waiting]
        if isinstance(outcome, Failed) and outcome.code == FmReturn.UNINITIALIZED:
            outcome = Succeeded()  # FM already had it inactive
        if isinstance(outcome, Succeeded):
            self.book.deactivated(pid)
            self._to_deactivate.discard(pid)
            self._forced.pop(pid, None)
            for request in waiting:
                request.waiting.discard(pid)
                self._finish_if_done(request)
            return
        if isinstance(outcome, Unknown):
            self.book.outcome_unknown(pid)
            self._list_wanted = True
            return
        self.book.deactivation_failed(pid)
        self._restore_forced(pid)
        self._retry_after_report.add(pid)
        message = f"Fabric Manager could not deactivate partition {pid}: {outcome.message}"
        for request in waiting:
            self._fail(request, message, outcome.code)

    def _unsettled_fail(self, why: str) -> None:
        """No report came to settle UNKNOWN partitions: their waiters fail (N3); the
        partitions stay UNKNOWN (occupied) until a report does come."""
        for pid in self.table.ids:
            if self.book.phase(pid) is Phase.UNKNOWN:
                for request in [r for r in self._requests.values() if pid in r.waiting]:
                    self._fail(
                        request,
                        f"partition {pid}'s state in Fabric Manager is unknown: {why}; retry",
                        None,
                    )

    def _fail(self, request: _Request, message: str, code: int | None) -> None:
        """N4: the request fails; what it newly took is let go."""
        if request.status is not RequestStatus.PENDING:
            return
        request.status = RequestStatus.FAILED
        request.error, request.code = message, code
        request.waiting.clear()
        for pid in request.fresh:
            if pid in self._holds:
                phase = self.book.phase(pid)
                if phase is Phase.INACTIVE and pid not in self._call_on:
                    hold = self._holds.pop(pid)
                    if hold.claim_uid is not None:
                        self._claims.pop(hold.claim_uid, None)
                    self.book.release(pid)
                else:
                    self._drop_hold(pid)
        self.book.touch()

    def _finish_if_done(self, request: _Request) -> None:
        if request.status is RequestStatus.PENDING and not request.waiting:
            request.status = RequestStatus.GRANTED
            # The grant is the moment the kubelet may record the pod's devices: every
            # pod hold of the request starts its release clock now (N5).
            for pid in request.partitions:
                hold = self._holds.get(pid)
                if hold is not None and hold.kind == "pod":
                    hold.clock_from = self._now
                    hold.unassigned_since = None
            self.book.touch()

    def _note_trouble(self, outcome: Outcome, *, from_list: bool) -> None:
        if isinstance(outcome, Succeeded):
            self._set_trouble(FabricStatus.UP, None, from_list=from_list)
            return
        if isinstance(outcome, Unknown):
            return  # says nothing about FM; the list it triggers will
        code = outcome.code
        if code in (FmReturn.CONNECTION_NOT_VALID, FmReturn.TIMEOUT):
            self._set_trouble(
                FabricStatus.UNREACHABLE,
                f"Fabric Manager unreachable: {outcome.message}",
                from_list=from_list,
            )
        elif code == FmReturn.NOT_CONFIGURED:
            if self._trouble.status is not FabricStatus.RESTARTING:
                self._set_activated_sent = False
            self._set_trouble(
                FabricStatus.RESTARTING,
                "Fabric Manager is starting or restarting (waiting for set-activated)",
                from_list=from_list,
            )

    def _note_list(self, outcome: Outcome, now: float) -> None:
        """N11: when lists began to fail, and whether FM's report is impossible."""
        if isinstance(outcome, Succeeded) and outcome.report is not None:
            failing_since, failure = None, None
            pairs = active_overlaps(self.table, outcome.report.active_ids)
            overlap = describe_overlaps(pairs) if pairs else None
        else:
            failing_since = self._lists_failing_since
            failing_since = now if failing_since is None else failing_since
            failure = _describe(outcome)
            overlap = self._fabric_overlap  # no news about it
        state = (failing_since, failure, overlap)
        if state != (self._lists_failing_since, self._list_failure, self._fabric_overlap):
            self._lists_failing_since, self._list_failure, self._fabric_overlap = state
            self.book.touch()

    def _set_trouble(self, status: FabricStatus, problem: str | None, *, from_list: bool) -> None:
        if (self._trouble.status, self._trouble.problem) == (status, problem):
            return
        # Trouble seen by a call other than the supervisor's own list: supervise now.
        began = (
            status is not FabricStatus.UP
            and self._trouble.status is FabricStatus.UP
            and not from_list
        )
        self._trouble = _Trouble(status, problem)
        self.book.set_fabric_fault(problem)
        self.book.touch()
        if began:
            self._supervise_now = True  # trouble began: supervise now, not next period

    def _reconcile(self, report: FmReport, now: float, stale: set[int]) -> None:
        """N6: take FM's report. ``stale``: partitions whose activation or deactivation
        ended after the list was asked for; the report may predate it, so for them our
        own outcome stands (an overlapping partition keeps them from being taken up)."""
        # FM has a partition active over the GPUs of a pod's hold that FM has inactive
        # (both facts, contradicting each other): FM's truth about activity wins. The
        # hold is let go, which deactivates nothing; PodResources takes it again once
        # the other partition is released.
        for pid, hold in list(self._holds.items()):
            if (
                hold.kind == "pod"
                and self.book.phase(pid) is Phase.INACTIVE
                and pid not in self._call_on
                and pid not in stale
                and self.table.overlapping(pid) & report.active_ids
            ):
                del self._holds[pid]
                self.book.release(pid)
        before = {pid: self.book.phase(pid) for pid in self.table.ids}
        self.book.observe_active(report.active_ids, ignore=stale)
        if any(before[pid] is Phase.UNKNOWN for pid in stale):
            self._list_wanted = True  # settle it with a report that saw its outcome
        for pid in self.table.ids:
            was, phase = before[pid], self.book.phase(pid)
            if was is Phase.UNKNOWN:
                wanted = self._settled(pid, active=phase is Phase.ACTIVE)
                if phase is Phase.ACTIVE and pid not in self._holds and not wanted:
                    self._to_deactivate.add(pid)  # a failed request's, or nobody's: let go
            if was is Phase.INACTIVE and phase is Phase.ACTIVE and pid not in self._holds:
                # Active behind our back (N6): maybe a pod's; N5 decides.
                self.book.mark_held(pid)
                self._holds[pid] = _Hold("pod", clock_from=now)
        for pid, hold in self._holds.items():
            settled = self.book.phase(pid) is Phase.ACTIVE and pid not in self._call_on
            if hold.kind == "pod" and settled and hold.clock_from is None:
                hold.clock_from = now
        self._retry_after_report.clear()
        self._apply_link_state(report)
        # Held partitions FM has inactive are activated again (N6), unless FM has an
        # overlapping one active (taken behind our back: it would only answer IN_USE;
        # the hold's release, or that partition's, resolves it).
        if self._trouble.status is FabricStatus.UP:
            for pid in sorted(self._holds):
                if self.book.phase(pid) is not Phase.INACTIVE or pid in self._call_on:
                    continue
                if self.table.overlapping(pid) & report.active_ids:
                    continue
                self.book.reactivate(pid)
                self._emit_activation(pid)
        self.tick(now)

    def _restore_forced(self, pid: int) -> None:
        """A forced deactivation did not happen: the holder it dropped still holds it."""
        hold = self._forced.pop(pid, None)
        if hold is None or pid in self._holds:
            return
        if hold.claim_uid is not None and hold.claim_uid in self._claims:
            # The claim has taken another partition since: whoever may still use this
            # one is unknown, so it is held as a pod's that may exist (N6) and released
            # by the usual rule rather than kept for good.
            hold = _Hold("pod", clock_from=self._now)
        self.book.mark_held(pid)
        self._holds[pid] = hold
        if hold.claim_uid is not None:
            self._claims[hold.claim_uid] = pid

    def _settled(self, pid: int, *, active: bool) -> bool:
        """An UNKNOWN partition is settled: its waiters learn whether FM did it (N3).
        Returns whether a waiter got what it waited for (an operator's pre-warm)."""
        if active:
            self._restore_forced(pid)
        else:
            self._forced.pop(pid, None)
        granted = False
        for request in [r for r in self._requests.values() if pid in r.waiting]:
            if active != request.deactivating:
                request.waiting.discard(pid)
                self._finish_if_done(request)
                granted = True
            else:
                did = "deactivate" if request.deactivating else "activate"
                self._fail(
                    request,
                    f"Fabric Manager did not {did} partition {pid} (its outcome was lost and "
                    "FM's report says so); retry",
                    None,
                )
        return granted

    def _apply_link_state(self, report: FmReport) -> None:
        reported = {p.partition_id: p for p in report.partitions}
        faults: dict[int, str] = {}
        for partition in self.table:
            problems = []
            fm_partition = reported.get(partition.partition_id)
            gpus = {g.physical_id: g for g in fm_partition.gpus} if fm_partition else {}
            for module in partition.sorted_modules:
                gpu = gpus.get(module)
                if gpu is None:
                    problems.append(f"GPU {module} is missing from Fabric Manager's report")
                elif gpu.nvlinks_degraded:
                    problems.append(
                        f"GPU {module} has {gpu.nvlinks_available} of {gpu.max_nvlinks} NVLinks"
                    )
            if problems:
                faults[partition.partition_id] = "; ".join(problems)
        self._report_faults = faults
        self._refresh_partition_faults()

    def _refresh_partition_faults(self) -> None:
        for pid in self.table.ids:
            reasons = []
            if pid in self._report_faults:
                reasons.append(self._report_faults[pid])
            if pid in self._failure_holds:
                reasons.append(self._failure_holds[pid][0])
            self.book.set_partition_fault(pid, "; ".join(reasons) or None)

    def _pump(self) -> None:
        """Ask for the FM calls the state now needs (N2, N4, N7)."""
        self._drop_abandoned()
        if self._trouble.status is FabricStatus.RESTARTING:
            if self._any(SetActivated):
                return
            if not self._set_activated_sent:
                self._set_activated_sent = True
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
                self._emit(SetActivated(next(self._ops), held))
            elif self._list_wanted and not self._any(ListFabric):
                self._list_wanted = False
                self._emit(ListFabric(next(self._ops)))
            return
        for pid in sorted(self._to_deactivate):
            if pid in self._holds or pid in self._call_on or pid in self._assigned_last:
                continue  # a pod holds it per PodResources: the next reading holds it
            phase = self.book.phase(pid)
            if phase is Phase.INACTIVE:
                self._to_deactivate.discard(pid)
            elif phase is Phase.ACTIVE and pid not in self._retry_after_report:
                self.book.begin_deactivation(pid)
                self._emit(Deactivate(next(self._ops), pid), pid)
        if self._list_wanted and not self._any(ListFabric):
            self._list_wanted = False
            self._emit(ListFabric(next(self._ops)))

    def _any(self, kind: type) -> bool:
        return any(isinstance(e, kind) for e in self._inflight.values())

    def _request(self, request_id: int) -> _Request:
        request = self._requests.get(request_id)
        if request is None or request.abandoned:
            raise UnknownRequest(request_id)
        return request

    def _drop_abandoned(self) -> None:
        for rid in [
            r
            for r, q in self._requests.items()
            if q.abandoned and q.status is not RequestStatus.PENDING
        ]:
            del self._requests[rid]

    # -- tests ---------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if a rule is broken (tests and the fault campaign)."""
        self.book.check_invariants()
        for pid in self._holds:
            assert self.book.in_use(pid), f"held partition {pid} not in use in the book"
        for pid in self.book.in_use_ids:
            assert pid in self._holds, f"partition {pid} in use but held by nobody"
        for uid, pid in self._claims.items():
            assert self._holds[pid].claim_uid == uid, (uid, pid)
        for pid in self.table.ids:
            phase = self.book.phase(pid)
            in_flight = pid in self._call_on
            assert (phase in (Phase.ACTIVATING, Phase.DEACTIVATING)) == in_flight, (
                pid,
                phase,
                in_flight,
            )


__all__ = [
    "Activate",
    "Deactivate",
    "DuplicatePartition",
    "Effect",
    "FabricStatus",
    "Failed",
    "ListFabric",
    "Mode",
    "NodeMachine",
    "NodeView",
    "Outcome",
    "RequestResult",
    "RequestStatus",
    "SetActivated",
    "Succeeded",
    "Unknown",
    "UnknownOperation",
    "UnknownRequest",
    "resume_list_at_start",
]
