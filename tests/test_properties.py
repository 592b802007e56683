"""Random walks through the partition book, with the policy asked for advice on the way.

A hypothesis rule-based machine drives a :class:`PartitionBook` on the H200 and the A100
16-GPU tables with every transition, fault and drain, legal or not. After each step:
no two occupied partitions share a GPU (``check_invariants``), a refused move raised a
:class:`StateError` and changed nothing, and the health rules hold. The ``advise`` rule
asks :func:`preferred_allocation` about random (partly garbage) kubelet requests and
checks the answer's contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.policy import parse_device, preferred_allocation
from nvswitch_dp.partitions.state import PartitionBook, Phase, StateError
from nvswitch_dp.partitions.table import PartitionTable


def table_of(name: str) -> PartitionTable:
    return PartitionTable.from_rows((pid, mods) for pid, mods, _ in platform(name).rows)


Snapshot = tuple[
    int, tuple[Phase, ...], frozenset[int], frozenset[int], dict[int, str], tuple[str | None, ...]
]

GARBAGE = st.sampled_from(["", "bogus", "partition-", "partition-07", "partition-999", "gpu-1"])
REASONS = st.sampled_from([None, None, "Xid 79", "fell off the bus"])


class BookMachine(RuleBasedStateMachine):
    """One book, driven at random; subclasses choose the table."""

    table: ClassVar[PartitionTable]

    def __init__(self) -> None:
        super().__init__()
        self.book = PartitionBook(self.table)

    def snapshot(self) -> Snapshot:
        """Everything a move may change, from the public questions (views are derived)."""
        b = self.book
        ids = self.table.ids
        return (
            b.generation,
            tuple(b.phase(pid) for pid in ids),
            b.in_use_ids,
            b.drained_modules,
            dict(b.module_faults),
            tuple(b.fault(pid) for pid in ids),
        )

    def attempt(self, move: Callable[[], object]) -> None:
        """Make ``move``; if it is refused, it must have changed nothing."""
        before = self.snapshot()
        try:
            move()
        except StateError:
            assert self.snapshot() == before

    # The table's IDs plus one unknown; modules likewise. The strategies depend on the
    # subclass's table, so rules draw them through ``data``.
    def pid(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from([*self.table.ids, max(self.table.ids) + 1]), "pid")

    def module(self, data: st.DataObject) -> int:
        modules = sorted(self.table.module_ids)
        return data.draw(st.sampled_from([*modules, modules[-1] + 1]), "module")

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def never_two_occupied_partitions_share_a_gpu(self) -> None:
        self.book.check_invariants()

    @invariant()
    def health_follows_the_rules(self) -> None:
        book, table = self.book, self.table
        available = book.available_ids()
        occupied = {pid for pid in table.ids if book.occupied(pid)}
        for pid in table.ids:
            fault = book.fault(pid)
            if book.in_use(pid):
                # Rule 5: overlap never makes a partition in use unhealthy; only its own
                # hardware does (a drain does not either: it keeps running).
                assert book.healthy(pid) == (fault is None)
            else:
                assert book.healthy(pid) == (pid in available)
            if pid in available:  # rule 4
                assert not occupied & table.overlapping(pid)
                assert fault is None and not book.drained(pid)

    # -- moves ---------------------------------------------------------------------------

    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        pid = self.pid(data)
        self.attempt(lambda: self.book.claim(pid))

    @rule(data=st.data())
    def begin_activation(self, data: st.DataObject) -> None:
        pid = self.pid(data)
        self.attempt(lambda: self.book.begin_activation(pid))

    @rule(data=st.data())
    def activated(self, data: st.DataObject) -> None:
        pid = self.pid(data)
        self.attempt(lambda: self.book.activated(pid))

    @rule(data=st.data())
    def activation_failed(self, data: st.DataObject) -> None:
        pid = self.pid(data)
        self.attempt(lambda: self.book.activation_failed(pid))

    @rule(data=st.data(), force=st.booleans())
    def begin_deactivation(self, data: st.DataObject, force: bool) -> None:
        pid = self.pid(data)
        self.attempt(lambda: self.book.begin_deactivation(pid, force=force))

    @rule(data=st.data())
    def deactivated(self, data: st.DataObject) -> None:
        pid = self.pid(data)
        self.attempt(lambda: self.book.deactivated(pid))

    @rule(data=st.data())
    def deactivation_failed(self, data: st.DataObject) -> None:
        pid = self.pid(data)
        self.attempt(lambda: self.book.deactivation_failed(pid))

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        pid = self.pid(data)
        self.attempt(lambda: self.book.release(pid))

    @rule(data=st.data(), reason=REASONS)
    def set_module_fault(self, data: st.DataObject, reason: str | None) -> None:
        module = self.module(data)
        self.attempt(lambda: self.book.set_module_fault(module, reason))

    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        module = self.module(data)
        self.attempt(lambda: self.book.drain(module))

    @rule(data=st.data())
    def undrain(self, data: st.DataObject) -> None:
        module = self.module(data)
        self.attempt(lambda: self.book.undrain(module))

    # -- the policy's contract, in whatever state the walk reached -----------------------

    @rule(data=st.data(), count=st.integers(min_value=-1, max_value=6))
    def advise(self, data: st.DataObject, count: int) -> None:
        table = self.table
        size = data.draw(st.sampled_from(table.sizes), "partition size")
        devices = [p.device_id for p in table.of_size(size)]
        available = data.draw(st.lists(st.sampled_from(devices) | GARBAGE, max_size=12))
        must_include = (
            data.draw(st.lists(st.sampled_from(available), max_size=3, unique=True))
            if available
            else []
        )
        before = self.snapshot()
        answer = preferred_allocation(self.book, available, must_include, count)
        assert self.snapshot() == before  # advice only reads the book

        assert set(answer) <= set(available)
        assert len(answer) == len(set(answer))
        known = {d: pid for d in available if (pid := parse_device(d, table)) is not None}
        assert set(answer) <= set(known)
        assert len(answer) <= max(count, 0)
        assert len(answer) == min(max(count, 0), len(known))  # as many as it can
        wanted = [d for d in must_include if d in known][: max(count, 0)]
        assert answer[: len(wanted)] == wanted
        rest = answer[len(wanted) :]
        book_available = {
            d for d, pid in known.items() if d not in wanted and self.book.available(pid)
        }
        if len(book_available) >= len(rest):
            assert set(rest) <= book_available


class H200Machine(BookMachine):
    table = table_of("hgx-h200")


class A100Machine(BookMachine):
    table = table_of("hgx-a100-16")


SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestH200Book = H200Machine.TestCase
TestH200Book.settings = SETTINGS
TestA100Book = A100Machine.TestCase
TestA100Book.settings = SETTINGS
