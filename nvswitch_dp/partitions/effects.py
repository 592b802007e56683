"""The FM calls the node machine asks for, their outcomes, and the book of calls in flight.

:class:`Calls` owns the rule that at most one call is in flight per partition (and one
list and one set-activated at a time, which the machine checks with :meth:`Calls.any`),
numbers every call with its ``op``, and remembers which activation or deactivation
outcomes a list answered after may not have seen (rule N6's stale reports). Pure: no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from nvswitch_dp.fabric.types import FmReport
from nvswitch_dp.partitions.state import StateError


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


class UnknownOperation(StateError):
    def __init__(self, op: int) -> None:
        super().__init__(f"FM call {op} is not in flight")


def describe_outcome(outcome: Outcome) -> str:
    """What an outcome says, for a log line or a request's error."""
    if isinstance(outcome, Failed):
        return outcome.message
    if isinstance(outcome, Unknown):
        return outcome.reason
    return "no report"


class Calls:
    """FM calls asked for and in flight. Errors: :meth:`finish` raises
    :class:`UnknownOperation` for an op not in flight (nothing changed)."""

    def __init__(self) -> None:
        self._ops = itertools.count(1)
        self._outbox: list[Effect] = []
        self._inflight: dict[int, Effect] = {}
        self._on: dict[int, int] = {}  # partition -> op in flight on it
        # Stale reports: a list answered after an outcome it did not see must not undo it.
        self._outcomes = 0  # activation/deactivation outcomes so far
        self._changed_at: dict[int, int] = {}  # partition -> outcome count at its last one
        self._list_began: dict[int, int] = {}  # list op -> outcome count when asked

    def activate(self, partition_id: int) -> None:
        self._emit(Activate(next(self._ops), partition_id), partition_id)

    def deactivate(self, partition_id: int) -> None:
        self._emit(Deactivate(next(self._ops), partition_id), partition_id)

    def set_activated(self, partition_ids: tuple[int, ...]) -> None:
        self._emit(SetActivated(next(self._ops), partition_ids))

    def list_fabric(self) -> None:
        op = next(self._ops)
        self._list_began[op] = self._outcomes
        self._emit(ListFabric(op))

    def _emit(self, effect: Effect, partition_id: int | None = None) -> None:
        if partition_id is not None:
            assert partition_id not in self._on, f"second call on partition {partition_id}"
            self._on[partition_id] = effect.op
        self._inflight[effect.op] = effect
        self._outbox.append(effect)

    def finish(self, op: int) -> Effect:
        """Call ``op`` ended: it is no longer in flight. Raises :class:`UnknownOperation`."""
        effect = self._inflight.pop(op, None)
        if effect is None:
            raise UnknownOperation(op)
        if isinstance(effect, Activate | Deactivate):
            del self._on[effect.partition_id]
            self._outcomes += 1
            self._changed_at[effect.partition_id] = self._outcomes
        return effect

    def stale_for(self, list_op: int) -> set[int]:
        """Partitions whose activation or deactivation ended after list ``list_op`` was
        asked for: its report may predate their outcome. Forgets the list."""
        began = self._list_began.pop(list_op, self._outcomes)
        return {pid for pid, at in self._changed_at.items() if at > began}

    def forget_list(self, list_op: int) -> None:
        self._list_began.pop(list_op, None)

    def on(self, partition_id: int) -> bool:
        """Whether a call on ``partition_id`` is in flight."""
        return partition_id in self._on

    def any(self, kind: type) -> bool:
        """Whether a call of ``kind`` (``ListFabric``, ``SetActivated``) is in flight."""
        return any(isinstance(e, kind) for e in self._inflight.values())

    @property
    def has_outbox(self) -> bool:
        return bool(self._outbox)

    def take(self) -> list[Effect]:
        """The calls to start now (each stays in flight until :meth:`finish`)."""
        effects, self._outbox = self._outbox, []
        return effects

    def in_flight(self) -> Mapping[int, Effect]:
        return dict(self._inflight)


__all__ = [
    "Activate",
    "Calls",
    "Deactivate",
    "Effect",
    "Failed",
    "ListFabric",
    "Outcome",
    "SetActivated",
    "Succeeded",
    "Unknown",
    "UnknownOperation",
    "describe_outcome",
]
