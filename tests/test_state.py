"""PartitionBook: every transition, legal and illegal, blockers, health rules, adopt/observe.

Illegal moves must raise the documented :class:`StateError` subclass and change nothing,
which is checked by comparing a full snapshot (generation and every view) before and after.
Partitions used (HGX H200 table): 0 = modules 1-8; 1 = 1-4; 2 = 5-8; 3 = (1,3); 4 = (2,4);
5 = (5,7); 6 = (6,8); 7..14 = module 1..8.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.state import (
    Claim,
    IllegalTransition,
    PartitionBlocked,
    PartitionBook,
    PartitionInUse,
    PartitionUnhealthy,
    PartitionView,
    Phase,
    State,
    StateError,
    UnknownPartition,
)
from nvswitch_dp.partitions.table import PartitionTable

H200 = PartitionTable.from_rows((pid, mods) for pid, mods, _ in platform("hgx-h200").rows)
P = 3  # the partition under test: modules 1 and 3

Snapshot = tuple[int, list[PartitionView], frozenset[int], dict[int, str]]


def snapshot(book: PartitionBook) -> Snapshot:
    return (book.generation, book.views(), book.drained_modules, dict(book.module_faults))


def assert_refused(
    book: PartitionBook, action: Callable[[], object], error: type[StateError]
) -> StateError:
    """``action`` raises exactly ``error`` (a StateError) and leaves the book untouched."""
    before = snapshot(book)
    with pytest.raises(error) as raised:
        action()
    assert snapshot(book) == before
    book.check_invariants()
    return raised.value


# -- the phase machine, table-driven ---------------------------------------------------

# How to reach each starting point with legal moves.
SETUPS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "inactive": [],
    "activating-claimed": [("claim", {})],
    "activating-prewarm": [("begin_activation", {})],
    "active-in-use": [("claim", {}), ("activated", {})],
    "active-free": [("begin_activation", {}), ("activated", {})],
    "deactivating": [("begin_activation", {}), ("activated", {}), ("begin_deactivation", {})],
    "unknown-claimed": [("claim", {}), ("outcome_unknown", {})],
    "unknown-free": [("begin_activation", {}), ("outcome_unknown", {})],
    # A pod holds it but FM has it inactive (FM dropped it, or a re-activation failed).
    "held-inactive": [("claim", {}), ("activation_failed", {"keep_claim": True})],
}

EVENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "claim": ("claim", {}),
    "begin_activation": ("begin_activation", {}),
    "activated": ("activated", {}),
    "activation_failed": ("activation_failed", {}),
    "begin_deactivation": ("begin_deactivation", {}),
    "force_deactivation": ("begin_deactivation", {"force": True}),
    "deactivated": ("deactivated", {}),
    "deactivation_failed": ("deactivation_failed", {}),
    "release": ("release", {}),
    "outcome_unknown": ("outcome_unknown", {}),
    "settle_active": ("settle", {"active": True}),
    "settle_inactive": ("settle", {"active": False}),
    "mark_held": ("mark_held", {}),
    "reactivate": ("reactivate", {}),
    "failed_keeping_claim": ("activation_failed", {"keep_claim": True}),
}

IN, ACT, A, D = Phase.INACTIVE, Phase.ACTIVATING, Phase.ACTIVE, Phase.DEACTIVATING
U = Phase.UNKNOWN
ILLEGAL = IllegalTransition

# (setup, event) -> (phase after, in use after, return value) or the error raised.
Outcome = tuple[Phase, bool, object] | type[StateError]
TRANSITIONS: dict[tuple[str, str], Outcome] = {
    ("inactive", "claim"): (ACT, True, Claim.ACTIVATE),
    ("inactive", "begin_activation"): (ACT, False, None),
    ("inactive", "activated"): ILLEGAL,
    ("inactive", "activation_failed"): ILLEGAL,
    ("inactive", "begin_deactivation"): ILLEGAL,
    ("inactive", "force_deactivation"): ILLEGAL,
    ("inactive", "deactivated"): ILLEGAL,
    ("inactive", "deactivation_failed"): ILLEGAL,
    ("inactive", "release"): (IN, False, None),
    ("activating-claimed", "claim"): (ACT, True, Claim.WAIT),
    ("activating-claimed", "begin_activation"): ILLEGAL,
    ("activating-claimed", "activated"): (A, True, None),
    ("activating-claimed", "activation_failed"): (IN, False, None),
    ("activating-claimed", "begin_deactivation"): ILLEGAL,
    ("activating-claimed", "force_deactivation"): ILLEGAL,
    ("activating-claimed", "deactivated"): ILLEGAL,
    ("activating-claimed", "deactivation_failed"): ILLEGAL,
    ("activating-claimed", "release"): (ACT, False, None),
    ("activating-prewarm", "claim"): (ACT, True, Claim.WAIT),
    ("activating-prewarm", "begin_activation"): ILLEGAL,
    ("activating-prewarm", "activated"): (A, False, None),
    ("activating-prewarm", "activation_failed"): (IN, False, None),
    ("activating-prewarm", "begin_deactivation"): ILLEGAL,
    ("activating-prewarm", "force_deactivation"): ILLEGAL,
    ("activating-prewarm", "deactivated"): ILLEGAL,
    ("activating-prewarm", "deactivation_failed"): ILLEGAL,
    ("activating-prewarm", "release"): (ACT, False, None),
    ("active-in-use", "claim"): (A, True, Claim.READY),
    ("active-in-use", "begin_activation"): ILLEGAL,
    ("active-in-use", "activated"): ILLEGAL,
    ("active-in-use", "activation_failed"): ILLEGAL,
    ("active-in-use", "begin_deactivation"): PartitionInUse,
    ("active-in-use", "force_deactivation"): (D, False, None),
    ("active-in-use", "deactivated"): ILLEGAL,
    ("active-in-use", "deactivation_failed"): ILLEGAL,
    ("active-in-use", "release"): (A, False, None),
    ("active-free", "claim"): (A, True, Claim.READY),
    ("active-free", "begin_activation"): ILLEGAL,
    ("active-free", "activated"): ILLEGAL,
    ("active-free", "activation_failed"): ILLEGAL,
    ("active-free", "begin_deactivation"): (D, False, None),
    ("active-free", "force_deactivation"): (D, False, None),
    ("active-free", "deactivated"): ILLEGAL,
    ("active-free", "deactivation_failed"): ILLEGAL,
    ("active-free", "release"): (A, False, None),
    ("deactivating", "claim"): ILLEGAL,
    ("deactivating", "begin_activation"): ILLEGAL,
    ("deactivating", "activated"): ILLEGAL,
    ("deactivating", "activation_failed"): ILLEGAL,
    ("deactivating", "begin_deactivation"): ILLEGAL,
    ("deactivating", "force_deactivation"): ILLEGAL,
    ("deactivating", "deactivated"): (IN, False, None),
    ("deactivating", "deactivation_failed"): (A, False, None),
    ("deactivating", "release"): (D, False, None),
    ("inactive", "outcome_unknown"): ILLEGAL,
    ("inactive", "settle_active"): ILLEGAL,
    ("inactive", "settle_inactive"): ILLEGAL,
    ("inactive", "mark_held"): (IN, True, None),
    ("inactive", "reactivate"): ILLEGAL,
    ("inactive", "failed_keeping_claim"): ILLEGAL,
    ("activating-claimed", "outcome_unknown"): (U, True, None),
    ("activating-claimed", "settle_active"): ILLEGAL,
    ("activating-claimed", "settle_inactive"): ILLEGAL,
    ("activating-claimed", "mark_held"): (ACT, True, None),
    ("activating-claimed", "reactivate"): ILLEGAL,
    ("activating-claimed", "failed_keeping_claim"): (IN, True, None),
    ("activating-prewarm", "outcome_unknown"): (U, False, None),
    ("activating-prewarm", "settle_active"): ILLEGAL,
    ("activating-prewarm", "settle_inactive"): ILLEGAL,
    ("activating-prewarm", "mark_held"): (ACT, True, None),
    ("activating-prewarm", "reactivate"): ILLEGAL,
    ("activating-prewarm", "failed_keeping_claim"): (IN, False, None),
    ("active-in-use", "outcome_unknown"): ILLEGAL,
    ("active-in-use", "settle_active"): ILLEGAL,
    ("active-in-use", "settle_inactive"): ILLEGAL,
    ("active-in-use", "mark_held"): (A, True, None),
    ("active-in-use", "reactivate"): ILLEGAL,
    ("active-in-use", "failed_keeping_claim"): ILLEGAL,
    ("active-free", "outcome_unknown"): ILLEGAL,
    ("active-free", "settle_active"): ILLEGAL,
    ("active-free", "settle_inactive"): ILLEGAL,
    ("active-free", "mark_held"): (A, True, None),
    ("active-free", "reactivate"): ILLEGAL,
    ("active-free", "failed_keeping_claim"): ILLEGAL,
    ("deactivating", "outcome_unknown"): (U, False, None),
    ("deactivating", "settle_active"): ILLEGAL,
    ("deactivating", "settle_inactive"): ILLEGAL,
    ("deactivating", "mark_held"): ILLEGAL,
    ("deactivating", "reactivate"): ILLEGAL,
    ("deactivating", "failed_keeping_claim"): ILLEGAL,
    ("unknown-claimed", "claim"): ILLEGAL,
    ("unknown-claimed", "begin_activation"): ILLEGAL,
    ("unknown-claimed", "activated"): ILLEGAL,
    ("unknown-claimed", "activation_failed"): ILLEGAL,
    ("unknown-claimed", "begin_deactivation"): ILLEGAL,
    ("unknown-claimed", "force_deactivation"): ILLEGAL,
    ("unknown-claimed", "deactivated"): ILLEGAL,
    ("unknown-claimed", "deactivation_failed"): ILLEGAL,
    ("unknown-claimed", "release"): (U, False, None),
    ("unknown-claimed", "outcome_unknown"): ILLEGAL,
    ("unknown-claimed", "settle_active"): (A, True, None),
    ("unknown-claimed", "settle_inactive"): (IN, True, None),
    ("unknown-claimed", "mark_held"): (U, True, None),
    ("unknown-claimed", "reactivate"): ILLEGAL,
    ("unknown-claimed", "failed_keeping_claim"): ILLEGAL,
    ("unknown-free", "claim"): ILLEGAL,
    ("unknown-free", "begin_activation"): ILLEGAL,
    ("unknown-free", "activated"): ILLEGAL,
    ("unknown-free", "activation_failed"): ILLEGAL,
    ("unknown-free", "begin_deactivation"): ILLEGAL,
    ("unknown-free", "force_deactivation"): ILLEGAL,
    ("unknown-free", "deactivated"): ILLEGAL,
    ("unknown-free", "deactivation_failed"): ILLEGAL,
    ("unknown-free", "release"): (U, False, None),
    ("unknown-free", "outcome_unknown"): ILLEGAL,
    ("unknown-free", "settle_active"): (A, False, None),
    ("unknown-free", "settle_inactive"): (IN, False, None),
    ("unknown-free", "mark_held"): (U, True, None),
    ("unknown-free", "reactivate"): ILLEGAL,
    ("unknown-free", "failed_keeping_claim"): ILLEGAL,
    ("held-inactive", "claim"): PartitionUnhealthy,
    ("held-inactive", "begin_activation"): PartitionUnhealthy,
    ("held-inactive", "activated"): ILLEGAL,
    ("held-inactive", "activation_failed"): ILLEGAL,
    ("held-inactive", "begin_deactivation"): ILLEGAL,
    ("held-inactive", "force_deactivation"): ILLEGAL,
    ("held-inactive", "deactivated"): ILLEGAL,
    ("held-inactive", "deactivation_failed"): ILLEGAL,
    ("held-inactive", "release"): (IN, False, None),
    ("held-inactive", "outcome_unknown"): ILLEGAL,
    ("held-inactive", "settle_active"): ILLEGAL,
    ("held-inactive", "settle_inactive"): ILLEGAL,
    ("held-inactive", "mark_held"): (IN, True, None),
    ("held-inactive", "reactivate"): (ACT, True, None),
    ("held-inactive", "failed_keeping_claim"): ILLEGAL,
}


def test_the_transition_table_covers_every_pair() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in SETUPS for e in EVENTS}


def book_at(setup: str, partition_id: int = P) -> PartitionBook:
    book = PartitionBook(H200)
    for method, kwargs in SETUPS[setup]:
        getattr(book, method)(partition_id, **kwargs)
    book.check_invariants()
    return book


@pytest.mark.parametrize(("setup", "event"), sorted(TRANSITIONS))
def test_transition(setup: str, event: str) -> None:
    book = book_at(setup)
    method, kwargs = EVENTS[event]
    expected = TRANSITIONS[setup, event]

    def action() -> object:
        return getattr(book, method)(P, **kwargs)

    if isinstance(expected, type):
        error = assert_refused(book, action, expected)
        assert getattr(error, "partition_id", None) == P
        assert str(P) in str(error)
        return
    phase, in_use, returned = expected
    before = book.generation
    assert action() == returned
    assert (book.phase(P), book.in_use(P)) == (phase, in_use)
    # A real change always bumps the generation (it wakes ListAndWatch).
    changed = (phase, in_use) != (book_at(setup).phase(P), book_at(setup).in_use(P))
    assert book.generation > before if changed else book.generation >= before
    book.check_invariants()


def test_a_no_op_release_does_not_wake_anyone() -> None:
    book = book_at("active-free")
    before = book.generation
    book.release(P)
    assert book.generation == before


def test_illegal_transition_names_the_phase_and_event() -> None:
    book = book_at("deactivating")
    error = assert_refused(book, lambda: book.claim(P), IllegalTransition)
    assert isinstance(error, IllegalTransition)
    assert (error.phase, error.event) == (Phase.DEACTIVATING, "be allocated")
    assert str(error) == "partition 3 cannot be allocated while deactivating"


@pytest.mark.parametrize(
    "action",
    [
        lambda b: b.claim(99),
        lambda b: b.begin_activation(99),
        lambda b: b.activated(99),
        lambda b: b.activation_failed(99),
        lambda b: b.begin_deactivation(99, force=True),
        lambda b: b.deactivated(99),
        lambda b: b.deactivation_failed(99),
        lambda b: b.release(99),
        lambda b: b.set_partition_fault(99, "x"),
        lambda b: b.adopt([99], []),
        lambda b: b.in_use(99),
        lambda b: b.outcome_unknown(99),
        lambda b: b.settle(99, active=True),
        lambda b: b.mark_held(99),
        lambda b: b.reactivate(99),
        lambda b: b.phase(99),
        lambda b: b.state(99),
        lambda b: b.view(99),
        lambda b: b.blocker(99),
        lambda b: b.available(99),
    ],
)
def test_unknown_partitions_are_refused(action: Callable[[PartitionBook], object]) -> None:
    book = book_at("active-in-use")
    error = assert_refused(book, lambda: action(book), UnknownPartition)
    assert "partition 99 is not in Fabric Manager's table" in str(error)


# -- blockers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "blocker_state"),
    [
        ("activating-claimed", State.ACTIVATING),
        ("activating-prewarm", State.ACTIVATING),
        ("active-in-use", State.ALLOCATED),
        ("active-free", State.READY),
        ("deactivating", State.DEACTIVATING),
    ],
)
@pytest.mark.parametrize("victim", [0, 1, 7, 9])  # everything sharing module 1 or 3
def test_an_occupied_partition_blocks_every_overlapping_one(
    setup: str, blocker_state: State, victim: int
) -> None:
    book = book_at(setup)
    assert book.blocker(victim) == P
    assert not book.available(victim)
    assert not book.healthy(victim)
    assert book.state(victim) is State.BLOCKED
    for action in (lambda: book.claim(victim), lambda: book.begin_activation(victim)):
        error = assert_refused(book, action, PartitionBlocked)
        assert isinstance(error, PartitionBlocked)
        assert (error.partition_id, error.blocker, error.blocker_state) == (
            victim,
            P,
            blocker_state,
        )
        assert f"shares a GPU with partition {P}, which is {blocker_state.value}" in str(error)


def test_disjoint_partitions_are_not_blocked() -> None:
    book = book_at("active-in-use")
    for free in (2, 4, 5, 6, 8, 10, 11, 12, 13, 14):
        assert book.blocker(free) is None
        assert book.available(free)
        assert book.state(free) is State.FREE
    assert book.claim(4) is Claim.ACTIVATE
    book.check_invariants()


def test_the_lowest_blocker_is_named() -> None:
    book = PartitionBook(H200)
    book.claim(10)  # module 4
    book.claim(7)  # module 1
    assert book.blocker(1) == 7
    assert book.blocker(0) == 7
    error = assert_refused(book, lambda: book.claim(1), PartitionBlocked)
    assert isinstance(error, PartitionBlocked)
    assert error.blocker == 7


def test_a_blocked_partition_becomes_free_when_its_blocker_goes() -> None:
    book = book_at("active-in-use")
    book.release(P)
    assert book.state(1) is State.BLOCKED  # still active in FM: still occupies its GPUs
    book.begin_deactivation(P)
    assert book.state(1) is State.BLOCKED
    book.deactivated(P)
    assert book.state(1) is State.FREE
    assert book.available_ids() == frozenset(H200.ids)


# -- health ----------------------------------------------------------------------------


def test_an_in_use_partition_stays_healthy_though_it_overlaps_others() -> None:
    book = book_at("active-in-use")
    assert book.healthy(P)
    assert book.state(P) is State.ALLOCATED
    assert book.health_by_size(2) == {
        "partition-3": True,
        "partition-4": True,
        "partition-5": True,
        "partition-6": True,
    }
    assert book.health_by_size(4) == {"partition-1": False, "partition-2": True}
    assert book.health_by_size(8) == {"partition-0": False}
    assert [d for d, ok in book.health_by_size(1).items() if not ok] == [
        "partition-7",
        "partition-9",
    ]


def test_an_activating_claim_is_healthy_and_reads_activating() -> None:
    book = book_at("activating-claimed")
    assert book.healthy(P)
    assert book.state(P) is State.ACTIVATING
    assert not book.available(P)


@pytest.mark.parametrize(
    ("setup", "state"),
    [
        ("inactive", State.FREE),
        ("activating-prewarm", State.ACTIVATING),
        ("active-free", State.READY),
        ("deactivating", State.DEACTIVATING),
    ],
)
def test_a_partition_no_pod_holds_is_healthy_exactly_when_available(
    setup: str, state: State
) -> None:
    book = book_at(setup)
    assert book.state(P) is state
    assert book.healthy(P) is book.available(P) is (state in (State.FREE, State.READY))


def test_a_faulty_gpu_makes_its_partitions_unhealthy_and_unclaimable() -> None:
    book = PartitionBook(H200)
    before = book.generation
    assert book.set_module_fault(2, "Xid 79")
    assert book.generation > before
    assert book.module_faults == {2: "Xid 79"}
    for pid in (0, 1, 4, 8):
        assert book.fault(pid) == "GPU 2: Xid 79"
        assert not book.healthy(pid)
        assert book.state(pid) is State.UNHEALTHY
        error = assert_refused(book, partial(book.claim, pid), PartitionUnhealthy)
        assert "GPU 2: Xid 79" in str(error)
        assert_refused(book, partial(book.begin_activation, pid), PartitionUnhealthy)
    assert book.healthy(3) and book.state(3) is State.FREE
    # Setting the same fault again is no change (no wake-up); clearing restores health.
    generation = book.generation
    assert not book.set_module_fault(2, "Xid 79")
    assert book.generation == generation
    assert book.set_module_fault(2, None)
    assert not book.set_module_fault(2, None)
    assert all(book.healthy(pid) for pid in H200.ids)


def test_a_faulty_gpu_makes_the_in_use_partition_on_it_unhealthy() -> None:
    book = book_at("active-in-use")
    book.set_module_fault(3, "fell off the bus")
    assert not book.healthy(P)
    assert book.state(P) is State.UNHEALTHY
    assert book.in_use(P)  # the pod keeps it; the kubelet decides what to do
    assert_refused(book, lambda: book.claim(P), PartitionUnhealthy)
    book.set_module_fault(3, None)
    assert book.healthy(P) and book.state(P) is State.ALLOCATED


def test_faults_of_several_gpus_and_of_fm_are_all_named() -> None:
    book = PartitionBook(H200)
    book.set_module_fault(4, "b")
    book.set_module_fault(1, "a")
    assert book.set_partition_fault(1, "NVLINK_ERROR")
    assert not book.set_partition_fault(1, "NVLINK_ERROR")
    assert book.fault(1) == "NVLINK_ERROR; GPU 1: a; GPU 4: b"
    assert book.set_partition_fault(1, None)
    assert book.fault(1) == "GPU 1: a; GPU 4: b"


def test_a_partition_fault_touches_only_that_partition() -> None:
    book = PartitionBook(H200)
    book.set_partition_fault(4, "activation failed: NVLINK_ERROR")
    assert [pid for pid in H200.ids if not book.healthy(pid)] == [4]
    assert_refused(book, lambda: book.claim(4), PartitionUnhealthy)


def test_drain_takes_gpus_out_but_in_use_partitions_keep_running() -> None:
    book = book_at("active-in-use")
    book.drain(3)
    book.drain(2)
    assert book.drained_modules == {2, 3}
    assert book.drained(P) and book.healthy(P) and book.state(P) is State.ALLOCATED
    assert book.claim(P) is Claim.READY  # the kubelet may hand it out again
    for pid in (4, 8):  # free partitions on a drained GPU
        assert book.state(pid) is State.UNHEALTHY
        assert not book.healthy(pid)
        error = assert_refused(book, partial(book.claim, pid), PartitionUnhealthy)
        assert "drained" in str(error)
        assert_refused(book, partial(book.begin_activation, pid), PartitionUnhealthy)
    generation = book.generation
    book.drain(2)  # again: no change
    assert book.generation == generation
    book.undrain(2)
    book.undrain(2)
    assert book.drained_modules == {3}
    assert book.available(4)


@pytest.mark.parametrize(
    "action",
    [
        lambda b: b.drain(9),
        lambda b: b.undrain(9),
        lambda b: b.set_module_fault(9, "Xid 79"),
        lambda b: b.set_module_fault(9, None),
    ],
)
def test_a_gpu_outside_the_table_is_refused(action: Callable[[PartitionBook], object]) -> None:
    book = PartitionBook(H200)
    error = assert_refused(book, lambda: action(book), StateError)
    assert "GPU 9" in str(error)


def test_a_released_partition_on_a_drained_gpu_cannot_be_claimed_again() -> None:
    book = book_at("active-in-use")
    book.drain(1)
    book.release(P)
    assert book.state(P) is State.UNHEALTHY
    assert_refused(book, lambda: book.claim(P), PartitionUnhealthy)
    book.begin_deactivation(P)  # but it can still be wound down
    book.deactivated(P)


# -- adopt and observe_active ----------------------------------------------------------


def test_adopt_rebuilds_from_fm_and_the_pods() -> None:
    book = book_at("active-in-use")
    book.claim(12)  # module 6: FM does not list it, so it is gone
    before = book.generation
    book.adopt(active_ids=[1, 5], in_use_ids=[1, 9, 99])
    assert book.generation > before
    assert book.active_ids == {1, 5}
    assert book.in_use_ids == {1}  # 9 is not active in FM; 99 is not ours
    assert book.state(1) is State.ALLOCATED
    assert book.state(5) is State.READY
    assert book.state(P) is State.BLOCKED
    assert book.state(12) is State.FREE
    book.check_invariants()


@pytest.mark.parametrize(
    ("active", "error"),
    [([1, 3], StateError), ([0, 14], StateError), ([2, 99], UnknownPartition)],
)
def test_adopt_refuses_impossible_facts_and_changes_nothing(
    active: list[int], error: type[StateError]
) -> None:
    book = book_at("active-in-use")
    raised = assert_refused(book, lambda: book.adopt(active, []), error)
    if error is StateError:
        assert "share a GPU" in str(raised)


def test_observe_active_drops_what_fm_dropped_but_keeps_its_claim() -> None:
    book = book_at("active-in-use")
    assert book.observe_active([]) == {P}
    # The pod still has the GPUs: nothing overlapping may be handed out meanwhile.
    assert (book.phase(P), book.in_use(P)) == (Phase.INACTIVE, True)
    assert book.state(P) is State.UNHEALTHY
    assert "inactive in Fabric Manager" in (book.fault(P) or "")
    assert book.blocker(1) == P


def test_observe_active_settles_unknown_partitions_either_way() -> None:
    book = book_at("unknown-claimed")
    assert book.observe_active([P]) == {P}
    assert (book.phase(P), book.state(P)) == (Phase.ACTIVE, State.ALLOCATED)
    other = book_at("unknown-free")
    assert other.state(P) is State.UNSETTLED and not other.available(P)
    assert other.blocker(1) == P  # FM may have it active: its overlaps stay out
    assert other.observe_active([]) == {P}
    assert other.state(P) is State.FREE


def test_observe_active_takes_up_what_fm_activated() -> None:
    book = PartitionBook(H200)
    assert book.observe_active([2, 4, 99]) == {2, 4}  # 99 is not ours: ignored
    assert book.state(2) is State.READY and not book.in_use(2)


def test_observe_active_swaps_overlapping_partitions_in_one_reconcile() -> None:
    book = book_at("active-free")
    assert book.observe_active([1]) == {P, 1}
    assert book.active_ids == {1}
    book.check_invariants()


def test_observe_active_leaves_partitions_in_flight_alone() -> None:
    book = PartitionBook(H200)
    book.claim(P)  # activating, FM does not list it yet
    book.begin_activation(4)
    book.activated(4)
    book.begin_deactivation(4)  # deactivating, FM still lists it
    before = book.generation
    assert book.observe_active([4, 1, 9]) == set()  # 1 and 9 overlap the activating 3
    assert (book.phase(P), book.phase(4)) == (Phase.ACTIVATING, Phase.DEACTIVATING)
    assert book.generation == before
    book.check_invariants()


def test_observe_active_without_news_changes_nothing() -> None:
    book = book_at("active-in-use")
    before = snapshot(book)
    assert book.observe_active([P]) == set()
    assert snapshot(book) == before


@pytest.mark.parametrize("question", ["fault", "drained", "occupied"])
def test_every_question_about_an_unknown_partition_raises_unknown_partition(
    question: str,
) -> None:
    book = PartitionBook(H200)
    with pytest.raises(UnknownPartition):
        getattr(book, question)(99)
