"""The release rule: how long an unassigned partition waits before it is deactivated."""

from __future__ import annotations

import pytest

from nvswitch_dp.partitions.release import ReleaseTracker


@pytest.mark.parametrize(
    ("readings", "due"),
    [
        # (now, in_use, assigned) readings; what the last one releases
        ([(0, {1}, {1}), (100, {1}, {1})], []),  # held throughout: never
        ([(0, {1}, set()), (29.9, {1}, set())], []),  # not yet past the grace
        ([(0, {1}, set()), (30, {1}, set())], [1]),  # grace reached
        ([(0, {1}, set()), (20, {1}, {1}), (40, {1}, set())], []),  # re-held: clock restarts
        ([(0, {1, 3}, set()), (31, {1, 3}, {3})], [1]),  # only the unassigned one
        ([(0, {1}, set()), (31, set(), set())], []),  # released elsewhere meanwhile
    ],
)
def test_grace_counts_from_first_seen_unassigned(
    readings: list[tuple[float, set[int], set[int]]], due: list[int]
) -> None:
    tracker = ReleaseTracker(30)
    result: list[int] = []
    for now, in_use, assigned in readings:
        result = tracker.observe(now, in_use, assigned, {})
    assert result == due


def test_a_fresh_claim_postpones_release() -> None:
    tracker = ReleaseTracker(30)
    assert tracker.observe(0, {7}, set(), {}) == []
    # A new pod got partition 7 at t=25; PodResources has not caught up at t=40.
    assert tracker.observe(40, {7}, set(), {7: 25}) == []
    assert tracker.observe(55, {7}, set(), {7: 25}) == [7]


def test_unreadable_pod_resources_resets_every_clock() -> None:
    tracker = ReleaseTracker(30)
    tracker.observe(0, {2}, set(), {})
    tracker.reset()
    assert tracker.waiting() == {}
    assert tracker.observe(35, {2}, set(), {}) == []
    assert tracker.observe(65, {2}, set(), {}) == [2]


def test_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="grace"):
        ReleaseTracker(-1)
