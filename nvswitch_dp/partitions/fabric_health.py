"""What the node machine knows about Fabric Manager itself, and about each partition's
links: rules N7 (trouble and supervision) and N11 (impossible or missing reports), and
the partition faults FM's report and failed activations cause. Pure: no I/O.

:class:`FabricHealth` owns FM's status (up, unreachable, restarting), whether the
supervisor should run at once, whether set-activated was sent for the restart under way,
and the list failures and overlaps the last lists showed. :class:`PartitionFaults` owns
why a partition is out of the pool for FM's reasons: links FM reports degraded or GPUs it
does not list, and holds after NVLINK_ERROR/GENERIC_ERROR.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvswitch_dp.fabric.types import FmReport, FmReturn
from nvswitch_dp.partitions.effects import Outcome, Succeeded, Unknown, describe_outcome
from nvswitch_dp.partitions.state import active_overlaps, describe_overlaps
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.partitions.view import FabricStatus

# Supervision period while FM is unreachable or restarting, or its lists fail.
TROUBLE_SUPERVISION_S = 1.0


@dataclass
class FabricHealth:
    """FM's status as the outcomes of calls show it. Every ``note_*`` method returns
    whether anything the edges show changed."""

    status: FabricStatus = FabricStatus.UP
    problem: str | None = None
    supervise_now: bool = False  # trouble began: supervise now, not next period
    set_activated_sent: bool = False  # for the restart under way (N7)
    overlap: str | None = None  # FM's last report had overlapping partitions active
    lists_failing_since: float | None = None  # every list since then failed (N11)
    list_failure: str | None = None  # the last failed list's reason, while they fail

    def supervision_delay(self, interval: float) -> float:
        """How long the supervisor may sleep now; 0 when supervision is asked for."""
        if self.supervise_now:
            return 0.0
        if self.status is not FabricStatus.UP or self.lists_failing_since is not None:
            return min(interval, TROUBLE_SUPERVISION_S)
        return interval

    def note_outcome(self, outcome: Outcome, *, from_list: bool) -> bool:
        """Any call's outcome: what it says about FM (N7)."""
        if isinstance(outcome, Succeeded):
            return self._set(FabricStatus.UP, None, from_list=from_list)
        if isinstance(outcome, Unknown):
            return False  # says nothing about FM; the list it triggers will
        if outcome.code in (FmReturn.CONNECTION_NOT_VALID, FmReturn.TIMEOUT):
            problem = f"Fabric Manager unreachable: {outcome.message}"
            return self._set(FabricStatus.UNREACHABLE, problem, from_list=from_list)
        if outcome.code == FmReturn.NOT_CONFIGURED:
            if self.status is not FabricStatus.RESTARTING:
                self.set_activated_sent = False
            problem = "Fabric Manager is starting or restarting (waiting for set-activated)"
            return self._set(FabricStatus.RESTARTING, problem, from_list=from_list)
        return False

    def note_list(self, outcome: Outcome, table: PartitionTable, now: float) -> bool:
        """A list's outcome (N11): when lists began to fail, and whether FM's report is
        impossible (overlapping partitions active)."""
        if isinstance(outcome, Succeeded) and outcome.report is not None:
            failing_since, failure = None, None
            pairs = active_overlaps(table, outcome.report.active_ids)
            overlap = describe_overlaps(pairs) if pairs else None
        else:
            failing_since = now if self.lists_failing_since is None else self.lists_failing_since
            failure = describe_outcome(outcome)
            overlap = self.overlap  # no news about it
        state = (failing_since, failure, overlap)
        if state == (self.lists_failing_since, self.list_failure, self.overlap):
            return False
        self.lists_failing_since, self.list_failure, self.overlap = state
        return True

    def _set(self, status: FabricStatus, problem: str | None, *, from_list: bool) -> bool:
        if (self.status, self.problem) == (status, problem):
            return False
        # Trouble seen by a call other than the supervisor's own list: supervise now.
        if status is not FabricStatus.UP and self.status is FabricStatus.UP and not from_list:
            self.supervise_now = True
        self.status, self.problem = status, problem
        return True


class PartitionFaults:
    """Why each partition is out of the pool for FM's reasons (see the module doc)."""

    def __init__(self, table: PartitionTable) -> None:
        self._table = table
        self._from_report: dict[int, str] = {}
        self._held_after_failure: dict[int, tuple[str, float]] = {}  # reason, until

    def take_report(self, report: FmReport) -> None:
        """FM's report: GPUs it does not list, NVLinks it reports degraded."""
        reported = {p.partition_id: p for p in report.partitions}
        faults: dict[int, str] = {}
        for partition in self._table:
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
        self._from_report = faults

    def hold_after_failure(self, partition_id: int, reason: str, until: float) -> None:
        """An activation failed in a way that may repeat: out of the pool until then."""
        self._held_after_failure[partition_id] = (reason, until)

    def expire(self, now: float) -> bool:
        """Drop the holds that ran out; whether any did."""
        expired = [p for p, (_, until) in self._held_after_failure.items() if now >= until]
        for partition_id in expired:
            del self._held_after_failure[partition_id]
        return bool(expired)

    def reason(self, partition_id: int) -> str | None:
        reasons = []
        if partition_id in self._from_report:
            reasons.append(self._from_report[partition_id])
        if partition_id in self._held_after_failure:
            reasons.append(self._held_after_failure[partition_id][0])
        return "; ".join(reasons) or None


__all__ = ["TROUBLE_SUPERVISION_S", "FabricHealth", "PartitionFaults"]
