"""The policy in every reachable state of the H200 and B200 tables: never a dominated choice.

A reachable state is a set of pairwise disjoint partitions in use (677 on either
8-GPU table: 26 states per half-board, squared, plus the whole board). For every state
and every partition size, the kubelet offers the whole resource and asks for one device.
The choice must be Pareto-optimal with respect to larger free partitions: no other
candidate of that size keeps a strict superset of the larger-size partitions the chosen
one keeps available. The check is brute force and independent of the policy's score.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.policy import preferred_allocation, remaining_after
from nvswitch_dp.partitions.state import PartitionBook
from nvswitch_dp.partitions.table import PartitionTable

TABLES = {
    name: PartitionTable.from_rows((pid, mods) for pid, mods, _ in platform(name).rows)
    for name in ("hgx-h200", "hgx-b200")
}


def disjoint_sets(table: PartitionTable) -> Iterator[frozenset[int]]:
    """Every set of pairwise non-overlapping partitions of ``table``, the empty one too."""
    ids = table.ids

    def extend(
        start: int, chosen: frozenset[int], used: frozenset[int]
    ) -> Iterator[frozenset[int]]:
        yield chosen
        for i in range(start, len(ids)):
            mods = table[ids[i]].module_ids
            if used.isdisjoint(mods):
                yield from extend(i + 1, chosen | {ids[i]}, used | mods)

    yield from extend(0, frozenset(), frozenset())


def book_in(table: PartitionTable, in_use: frozenset[int]) -> PartitionBook:
    book = PartitionBook(table)
    book.adopt(active_ids=in_use, in_use_ids=in_use)
    return book


def assert_undominated(
    table: PartitionTable,
    free: frozenset[int],
    candidates: list[int],
    chosen: int,
    larger: set[int],
    where: str,
) -> None:
    """No candidate keeps a strict superset of the larger partitions ``chosen`` keeps."""
    assert chosen in candidates, (where, chosen, candidates)
    kept = remaining_after(table, free, [chosen]) & larger
    for other in candidates:
        alternative = remaining_after(table, free, [other]) & larger
        assert not alternative > kept, (
            f"{where}: took {chosen}, keeping {sorted(kept)}; "
            f"{other} would keep {sorted(alternative)}"
        )


@pytest.mark.parametrize("name", sorted(TABLES))
def test_there_are_677_reachable_states(name: str) -> None:
    states = list(disjoint_sets(TABLES[name]))
    assert len(states) == len(set(states)) == 677


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_choice_is_pareto_optimal_for_larger_partitions(name: str) -> None:
    table = TABLES[name]
    checked = 0
    for in_use in disjoint_sets(table):
        book = book_in(table, in_use)
        free = book.available_ids()
        for size in table.sizes:
            offered = [p.device_id for p in table.of_size(size)]
            larger = {p.partition_id for p in table if p.size > size}
            candidates = sorted(
                p.partition_id for p in table.of_size(size) if p.partition_id in free
            )

            answer = preferred_allocation(book, offered, [], 1)

            if not candidates:
                # Best effort: something from the offer, so the kubelet can decide.
                assert len(answer) == 1 and answer[0] in offered
                continue
            assert len(answer) == 1
            chosen = int(answer[0].removeprefix("partition-"))
            assert_undominated(table, free, candidates, chosen, larger, f"{name} {sorted(in_use)}")
            checked += 1

            # Two devices: the greedy loop's first step is the same, and its second step
            # is again undominated among what the first one left.
            two = preferred_allocation(book, offered, [], 2)
            assert two[0] == answer[0]
            left = remaining_after(table, free, [chosen])
            rest = [pid for pid in candidates if pid in left]
            if rest:
                second = int(two[1].removeprefix("partition-"))
                assert_undominated(
                    table, left, rest, second, larger, f"{name} {sorted(in_use)} 2nd"
                )
    assert checked > 1000  # the loop really ran over many states with a choice to make


@pytest.mark.parametrize("name", sorted(TABLES))
def test_a_single_is_never_taken_from_a_whole_pair_while_a_broken_pair_exists(
    name: str,
) -> None:
    """The pair-mate rule, stated directly: it follows from Pareto-optimality plus the
    count of pairs kept, but is the behaviour operators check first."""
    table = TABLES[name]
    pairs = table.of_size(2)
    for in_use in disjoint_sets(table):
        book = book_in(table, in_use)
        free = book.available_ids()
        singles = [p for p in table.of_size(1) if p.partition_id in free]
        # Free singles whose pair has its other GPU taken (the pair itself is not free).
        widowed = [
            s
            for s in singles
            if any(s.module_ids < p.module_ids and p.partition_id not in free for p in pairs)
        ]
        if not widowed or len(widowed) == len(singles):
            continue
        answer = preferred_allocation(book, [s.device_id for s in table.of_size(1)], [], 1)
        assert answer[0] in {s.device_id for s in widowed}, (sorted(in_use), answer)
