"""The allocation policy, table-driven on the H200, B200 and A100 16-GPU partition tables.

Each case sets up a book (partitions claimed and activated), asks for ``size`` devices
out of ``available`` (default: every partition of the requested partition size, as the
kubelet lists its resource) and checks the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.policy import (
    FIRST_FIT,
    KEEP_LARGEST,
    POLICIES,
    Candidate,
    candidate,
    keep_largest_key,
    parse_device,
    preferred_allocation,
    random_fit,
    remaining_after,
    remaining_available,
)
from nvswitch_dp.partitions.state import PartitionBook
from nvswitch_dp.partitions.table import PartitionTable


def table_of(name: str) -> PartitionTable:
    return PartitionTable.from_rows((pid, mods) for pid, mods, _ in platform(name).rows)


TABLES = {name: table_of(name) for name in ("hgx-h200", "hgx-b200", "hgx-a100-16")}


def ids(*pids: int) -> list[str]:
    return [f"partition-{p}" for p in pids]


@dataclass(frozen=True)
class Case:
    name: str
    table: str
    in_use: tuple[int, ...]
    partition_size: int  # which resource: the default ``available`` lists all of its size
    expected: list[str]
    size: int = 1
    available: list[str] | None = None
    must_include: list[str] = field(default_factory=list)


def book_with(table: str, in_use: tuple[int, ...]) -> PartitionBook:
    book = PartitionBook(TABLES[table])
    for pid in in_use:
        book.claim(pid)
        book.activated(pid)
    return book


CASES = [
    # -- HGX H200: pairs are (1,3) (2,4) (5,7) (6,8); singles 7..14 are modules 1..8.
    Case("h200 empty 1x: module 1, the lowest ID", "hgx-h200", (), 1, ids(7)),
    Case("h200 1x beside module 1 goes to its pair-mate 3", "hgx-h200", (7,), 1, ids(9)),
    Case("h200 1x beside module 6 goes to its pair-mate 8", "hgx-h200", (12,), 1, ids(14)),
    Case("h200 1x fills the broken half first", "hgx-h200", (7, 9), 1, ids(8)),
    Case("h200 2x stays in the broken 4x", "hgx-h200", (3,), 2, ids(4)),
    Case("h200 2x stays in the broken 4x (right)", "hgx-h200", (6,), 2, ids(5)),
    Case("h200 2x goes beside a 1x, not into a whole 4x", "hgx-h200", (13,), 2, ids(6)),
    Case("h200 4x takes the whole other half", "hgx-h200", (11,), 4, ids(1)),
    Case("h200 two 2x keep the other 4x whole", "hgx-h200", (), 2, ids(3, 4), size=2),
    Case("h200 four 1x fill one half", "hgx-h200", (), 1, ids(7, 9, 8, 10), size=4),
    Case("h200 8x on an empty board", "hgx-h200", (), 8, ids(0)),
    Case("h200 8x on a busy board: best effort", "hgx-h200", (14,), 8, ids(0)),
    Case(
        "h200 must_include first, then the pair-mate",
        "hgx-h200",
        (7,),
        1,
        ids(7, 9),
        size=2,
        must_include=ids(7),
    ),
    Case(
        "h200 must_include not yet in the book still counts: its pair-mate is next",
        "hgx-h200",
        (),
        1,
        ids(8, 10),
        size=2,
        must_include=ids(8),
    ),
    Case(
        "h200 must_include longer than size is cut",
        "hgx-h200",
        (),
        1,
        ids(10),
        must_include=ids(10, 11),
    ),
    Case(
        "h200 must_include outside available is dropped (the kubelet would)",
        "hgx-h200",
        (),
        1,
        ids(7),
        available=ids(7, 8),
        must_include=ids(12),
    ),
    Case(
        "h200 garbage IDs are ignored",
        "hgx-h200",
        (),
        1,
        ids(12),
        available=[
            "bogus",
            "",
            "partition-",
            "partition-99",
            "partition-07",
            "partition-\u0663",
            "partition-\u00b2",
            "partition--1",
            "gpu-12",
            "partition-12",
        ],
        must_include=["partition-x", "partition-99"],
    ),
    Case(
        "h200 duplicates are answered once",
        "hgx-h200",
        (),
        1,
        ids(9),
        size=2,
        available=ids(9, 9, 9),
    ),
    Case("h200 size above what exists: all of them", "hgx-h200", (), 2, ids(3, 4, 5, 6), size=9),
    Case(
        "h200 short of available partitions: fill from the rest, available first",
        "hgx-h200",
        (1,),
        2,
        ids(5, 6, 3, 4),
        size=4,
    ),
    Case("h200 only blocked ones: best effort", "hgx-h200", (0,), 4, ids(1), available=ids(1)),
    Case("h200 size 0", "hgx-h200", (), 1, [], size=0),
    Case("h200 negative size", "hgx-h200", (), 1, [], size=-3),
    Case("h200 nothing offered", "hgx-h200", (), 1, [], available=[]),
    # -- HGX B200: IDs from 1; pairs are adjacent: 4=(1,2) 5=(3,4) 6=(5,6) 7=(7,8);
    # singles 8..15 are modules 1..8.
    Case("b200 1x beside module 1 goes to module 2", "hgx-b200", (8,), 1, ids(9)),
    Case("b200 1x beside module 7 goes to module 8", "hgx-b200", (14,), 1, ids(15)),
    Case("b200 2x stays in the broken 4x", "hgx-b200", (4,), 2, ids(5)),
    Case("b200 2x beside a 1x on the right", "hgx-b200", (12,), 2, ids(7)),
    Case("b200 4x when one half is broken", "hgx-b200", (10,), 4, ids(3)),
    Case("b200 8x", "hgx-b200", (), 8, ids(1)),
    # -- HGX A100 16-GPU: 0 = all; 1-2 = baseboards; 3-6 = 4+4 across boards; quads 7-10
    # (1-4, 5-8, 9-12, 13-16); pairs 11-18 = (1,2)..(15,16); singles 19-34 = modules 1-16.
    Case("a100 1x beside module 1 goes to module 2", "hgx-a100-16", (19,), 1, ids(20)),
    Case("a100 1x beside module 10 goes to module 9", "hgx-a100-16", (28,), 1, ids(27)),
    Case("a100 2x stays in the broken quad", "hgx-a100-16", (11,), 2, ids(12)),
    Case("a100 2x stays in the quad a 1x broke", "hgx-a100-16", (33,), 2, ids(17)),
    Case(
        "a100 4x beside a broken quad: each keeps one 8x, lowest ID",
        "hgx-a100-16",
        (7,),
        4,
        ids(8),
    ),
    Case(
        "a100 4x beside a pair: each keeps one 8x, lowest ID",
        "hgx-a100-16",
        (17,),
        4,
        ids(7),
    ),
    Case("a100 8x on a broken baseboard takes the other one", "hgx-a100-16", (34,), 8, ids(1)),
    Case(
        "a100 two 8x: the two baseboards, never overlapping ones",
        "hgx-a100-16",
        (),
        8,
        ids(1, 2),
        size=2,
    ),
    Case("a100 16x", "hgx-a100-16", (), 16, ids(0)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_preferred_allocation(case: Case) -> None:
    book = book_with(case.table, case.in_use)
    table = TABLES[case.table]
    available = case.available
    if available is None:
        available = [p.device_id for p in table.of_size(case.partition_size)]
    before = book.generation
    got = preferred_allocation(book, available, case.must_include, case.size)
    assert got == case.expected
    assert book.generation == before  # the book is only read


def test_the_answer_does_not_depend_on_the_kubelets_order() -> None:
    book = book_with("hgx-h200", (7,))
    available = ids(*range(7, 15))
    for seed in range(20):
        random.Random(seed).shuffle(available)
        assert preferred_allocation(book, available, [], 3) == ids(9, 8, 10)


def test_first_fit_takes_the_lowest_id_and_breaks_pairs() -> None:
    book = book_with("hgx-h200", (7,))
    assert preferred_allocation(book, ids(*range(7, 15)), [], 1, policy=FIRST_FIT) == ids(8)
    assert POLICIES == {"keep-largest": KEEP_LARGEST, "first-fit": FIRST_FIT}


def test_random_fit_is_seeded_and_stays_within_the_available() -> None:
    book = book_with("hgx-h200", (7,))
    available = ids(*range(7, 15))

    def pick(seed: int) -> list[str]:
        return preferred_allocation(book, available, [], 2, policy=random_fit(random.Random(seed)))

    assert pick(1) == pick(1)
    answers = {tuple(pick(seed)) for seed in range(30)}
    assert len(answers) > 1
    assert all("partition-7" not in a and len(set(a)) == 2 for a in answers)


@pytest.mark.parametrize(
    ("available", "taken", "left"),
    [
        (set(range(15)), [], set(range(15))),
        (set(range(15)), [7], {2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14}),
        (set(range(15)), [3], {2, 4, 5, 6, 8, 10, 11, 12, 13, 14}),
        (set(range(15)), [3, 6], {4, 5, 8, 10, 11, 13}),
        (set(range(15)), [0], set()),
        ({4, 8, 9}, [3], {4, 8}),
        (set(range(15)), [99, -1], set(range(15))),  # unknown IDs are ignored
    ],
)
def test_remaining_after(available: set[int], taken: list[int], left: set[int]) -> None:
    assert remaining_after(TABLES["hgx-h200"], available, taken) == left


def test_remaining_available_reads_the_book_without_changing_it() -> None:
    book = book_with("hgx-h200", (3,))
    before = book.generation
    assert remaining_available(book, []) == book.available_ids()
    assert remaining_available(book, [4]) == {2, 5, 6, 11, 12, 13, 14}
    assert book.generation == before
    assert book.available_ids() == {2, 4, 5, 6, 8, 10, 11, 12, 13, 14}


def test_candidates_count_what_they_keep_per_size_largest_first() -> None:
    table = TABLES["hgx-h200"]
    sizes = [8, 4, 2, 1]
    free = frozenset(range(15)) - {0, 1, 3, 7, 9}  # partition 3 in use
    four = candidate(table, free, 4, sizes)
    five = candidate(table, free, 5, sizes)
    assert four == Candidate(4, frozenset({2, 5, 6, 11, 12, 13, 14}), (0, 1, 2, 4))
    assert five.kept_by_size == (0, 0, 2, 4)
    assert keep_largest_key(four) < keep_largest_key(five)
    assert keep_largest_key(four) == (0, -1, -2, -4, -7, 4)


@pytest.mark.parametrize(
    ("device", "pid"),
    [
        ("partition-0", 0),
        ("partition-14", 14),
        ("partition-15", None),
        ("partition-00", None),
        ("partition-\u0663", None),
        ("partition-\u00b2", None),
        ("partition- 1", None),
        ("Partition-1", None),
        ("", None),
    ],
)
def test_parse_device_accepts_only_canonical_ids_of_the_table(device: str, pid: int | None) -> None:
    assert parse_device(device, TABLES["hgx-h200"]) == pid
