"""How the node machine takes the outcomes of FM calls and FM's reports: rules N3
(unknown outcomes), N4 (failures roll back), N6 (reconcile with FM's report, stale
reports) and the outcome half of N7 (a forced deactivation that did not happen).

A part of :class:`~nvswitch_dp.partitions.node.NodeMachine`, kept in its own module for
size: :class:`OutcomeRules` is its base class and reads and writes the machine's state
(declared below); nothing else uses it. Pure: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nvswitch_dp.fabric.types import FmReport, FmReturn, fm_return_name
from nvswitch_dp.partitions.effects import Calls, Failed, Outcome, Succeeded, Unknown
from nvswitch_dp.partitions.fabric_health import FabricHealth, PartitionFaults
from nvswitch_dp.partitions.holds import Hold, HoldKind, Holds
from nvswitch_dp.partitions.requests import Request, Requests
from nvswitch_dp.partitions.state import PartitionBook, Phase
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.partitions.view import FabricStatus


class OutcomeRules:
    """The outcome and reconcile rules of the node machine (see the module docstring)."""

    book: PartitionBook
    table: PartitionTable
    failure_hold: float
    _holds: Holds
    _calls: Calls
    _requests: Requests
    _faults: PartitionFaults
    _fabric: FabricHealth
    _forced: dict[int, Hold]  # holds a forced deactivation in flight dropped
    _to_deactivate: set[int]
    _retry_after_report: set[int]  # deactivations that failed
    _list_wanted: bool

    if TYPE_CHECKING:  # defined by NodeMachine

        def _fail(self, request: Request, message: str, code: int | None) -> None: ...

        def _finish_if_done(self, request: Request, now: float) -> None: ...

        def _emit_activation(self, pid: int) -> None: ...

        def _tick(self, now: float) -> None: ...

        def _apply_link_state(self, report: FmReport) -> None: ...

        def _refresh_partition_faults(self) -> None: ...

    def _activation_outcome(self, pid: int, outcome: Outcome, now: float) -> None:
        waiting = self._requests.waiting_on(pid)
        if isinstance(outcome, Failed) and outcome.code == FmReturn.IN_USE:
            # FM may have it active already (a lost answer, a restart): ask, not guess.
            outcome = Unknown("Fabric Manager says in use; checking its active set")
        if isinstance(outcome, Succeeded):
            self.book.activated(pid)
            hold = self._holds.get(pid)
            if hold is not None and hold.kind is HoldKind.POD:
                hold.clock_from = now
                hold.unassigned_since = None
            for request in waiting:
                request.waiting.discard(pid)
                self._finish_if_done(request, now)
            return
        if isinstance(outcome, Unknown):
            # Waiters keep waiting: FM's report settles it (N3).
            self.book.outcome_unknown(pid)
            self._list_wanted = True
            return
        else:
            if outcome.code in (FmReturn.NVLINK_ERROR, FmReturn.GENERIC_ERROR):
                reason = f"activation failed with {fm_return_name(outcome.code)}"
                self._faults.hold_after_failure(pid, reason, now + self.failure_hold)
                self._refresh_partition_faults()
            fresh = any(pid in r.fresh for r in waiting)
            # A hold from before keeps the partition (N6): its pod or claim still has
            # the GPUs; the next report activates it again.
            self.book.activation_failed(pid, keep_claim=pid in self._holds and not fresh)
            message = f"Fabric Manager could not activate partition {pid}: {outcome.message}"
        for request in waiting:
            self._fail(request, message, outcome.code)

    def _deactivation_outcome(self, pid: int, outcome: Outcome, now: float) -> None:
        waiting = self._requests.waiting_on(pid)
        if isinstance(outcome, Failed) and outcome.code == FmReturn.UNINITIALIZED:
            outcome = Succeeded()  # FM already had it inactive
        if isinstance(outcome, Succeeded):
            self.book.deactivated(pid)
            self._to_deactivate.discard(pid)
            self._forced.pop(pid, None)
            for request in waiting:
                request.waiting.discard(pid)
                self._finish_if_done(request, now)
            return
        if isinstance(outcome, Unknown):
            self.book.outcome_unknown(pid)
            self._list_wanted = True
            return
        self.book.deactivation_failed(pid)
        self._restore_forced(pid, now)
        self._retry_after_report.add(pid)
        message = f"Fabric Manager could not deactivate partition {pid}: {outcome.message}"
        for request in waiting:
            self._fail(request, message, outcome.code)

    def _unsettled_fail(self, why: str) -> None:
        """No report came to settle UNKNOWN partitions: their waiters fail (N3); the
        partitions stay UNKNOWN (occupied) until a report does come."""
        for pid in self.table.ids:
            if self.book.phase(pid) is Phase.UNKNOWN:
                for request in self._requests.waiting_on(pid):
                    self._fail(
                        request,
                        f"partition {pid}'s state in Fabric Manager is unknown: {why}; retry",
                        None,
                    )

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
                hold.kind is HoldKind.POD
                and self.book.phase(pid) is Phase.INACTIVE
                and not self._calls.on(pid)
                and pid not in stale
                and self.table.overlapping(pid) & report.active_ids
            ):
                self._holds.pop(pid)
                self.book.release(pid)
        before = {pid: self.book.phase(pid) for pid in self.table.ids}
        self.book.observe_active(report.active_ids, ignore=stale)
        if any(before[pid] is Phase.UNKNOWN for pid in stale):
            self._list_wanted = True  # settle it with a report that saw its outcome
        for pid in self.table.ids:
            was, phase = before[pid], self.book.phase(pid)
            if was is Phase.UNKNOWN:
                wanted = self._settled(pid, now, active=phase is Phase.ACTIVE)
                if phase is Phase.ACTIVE and pid not in self._holds and not wanted:
                    self._to_deactivate.add(pid)  # a failed request's, or nobody's: let go
            if was is Phase.INACTIVE and phase is Phase.ACTIVE and pid not in self._holds:
                # Active behind our back (N6): maybe a pod's; N5 decides.
                self.book.mark_held(pid)
                self._holds.add(pid, Hold.pod(clock_from=now))
        for pid, hold in self._holds.items():
            settled = self.book.phase(pid) is Phase.ACTIVE and not self._calls.on(pid)
            if hold.kind is HoldKind.POD and settled and hold.clock_from is None:
                hold.clock_from = now
        self._retry_after_report.clear()
        self._apply_link_state(report)
        # Held partitions FM has inactive are activated again (N6), unless FM has an
        # overlapping one active (taken behind our back: it would only answer IN_USE;
        # the hold's release, or that partition's, resolves it).
        if self._fabric.status is FabricStatus.UP:
            for pid in sorted(self._holds):
                if self.book.phase(pid) is not Phase.INACTIVE or self._calls.on(pid):
                    continue
                if self.table.overlapping(pid) & report.active_ids:
                    continue
                self.book.reactivate(pid)
                self._emit_activation(pid)
        self._tick(now)

    def _restore_forced(self, pid: int, now: float) -> None:
        """A forced deactivation did not happen: the holder it dropped still holds it."""
        hold = self._forced.pop(pid, None)
        if hold is None or pid in self._holds:
            return
        if hold.claim_uid is not None and self._holds.claimed_by(hold.claim_uid) is not None:
            # The claim has taken another partition since: whoever may still use this
            # one is unknown, so it is held as a pod's that may exist (N6) and released
            # by the usual rule rather than kept for good.
            hold = Hold.pod(clock_from=now)
        self.book.mark_held(pid)
        self._holds.add(pid, hold)

    def _settled(self, pid: int, now: float, *, active: bool) -> bool:
        """An UNKNOWN partition is settled: its waiters learn whether FM did it (N3).
        Returns whether a waiter got what it waited for (an operator's pre-warm)."""
        if active:
            self._restore_forced(pid, now)
        else:
            self._forced.pop(pid, None)
        granted = False
        for request in self._requests.waiting_on(pid):
            if active != request.deactivating:
                request.waiting.discard(pid)
                self._finish_if_done(request, now)
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
