"""When a partition no pod holds any more may be deactivated: the release rule.

The kubelet never tells a plugin that a pod ended; the PodResources API only shows
which devices are still assigned. A partition is released when it has been in use in
our book but absent from every pod's devices for ``grace`` seconds, counted from the
later of "first seen unassigned" and "last claimed" (a fresh Allocate may reach
PodResources a moment after it reaches us). When PodResources cannot be read, every
clock is reset: nothing is released on stale or missing facts.

Pure: the caller passes the time and the facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class ReleaseTracker:
    """Counts how long each in-use partition has gone unassigned. Owned by one watcher."""

    def __init__(self, grace: float) -> None:
        if grace < 0:
            raise ValueError(f"release grace must be >= 0, got {grace}")
        self.grace = grace
        self._unassigned_since: dict[int, float] = {}

    def observe(
        self,
        now: float,
        in_use: Iterable[int],
        assigned: Iterable[int],
        claimed_at: Mapping[int, float],
    ) -> list[int]:
        """Record one PodResources reading; return the partitions due for release."""
        in_use_set = set(in_use)
        unassigned = in_use_set - set(assigned)
        for pid in list(self._unassigned_since):
            if pid not in unassigned:
                del self._unassigned_since[pid]
        for pid in unassigned:
            self._unassigned_since.setdefault(pid, now)
        return sorted(
            pid
            for pid, since in self._unassigned_since.items()
            if now - max(since, claimed_at.get(pid, since)) >= self.grace
        )

    def reset(self) -> None:
        """PodResources could not be read: forget every clock."""
        self._unassigned_since.clear()

    def waiting(self) -> dict[int, float]:
        """Partition -> when it was first seen unassigned (for status and logs)."""
        return dict(self._unassigned_since)
