"""Requests the node machine is working on (rule N1): an Allocate, a claim, an operator's
command, each waiting for the FM calls it needs.

:class:`Requests` numbers them, finds the ones waiting on a partition, and keeps a request
its caller forgot while it was pending until it ends (so that a failure still lets go of
what it took, N4). Pure: no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from nvswitch_dp.partitions.state import StateError
from nvswitch_dp.partitions.view import RequestResult, RequestStatus


class DuplicatePartition(StateError):
    def __init__(self, partition_id: int) -> None:
        self.partition_id = partition_id
        super().__init__(f"partition {partition_id} is named twice in one request")


class UnknownRequest(StateError):
    def __init__(self, request_id: int) -> None:
        super().__init__(f"request {request_id} is not known (already forgotten?)")


@dataclass
class Request:
    partitions: tuple[int, ...]
    waiting: set[int] = field(default_factory=set)  # partitions whose FM call it awaits
    fresh: set[int] = field(default_factory=set)  # partitions it put in use (let go on failure)
    deactivating: bool = False  # an operator's deactivation (waits for INACTIVE)
    abandoned: bool = False  # forgotten by its caller while pending
    status: RequestStatus = RequestStatus.PENDING
    error: str | None = None
    code: int | None = None

    @property
    def result(self) -> RequestResult:
        return RequestResult(self.status, self.error, self.code)


class Requests:
    """Request ID -> :class:`Request`. Errors: :meth:`get` raises :class:`UnknownRequest`."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._by_id: dict[int, Request] = {}

    def open(
        self,
        partitions: Iterable[int],
        waiting: Iterable[int] = (),
        *,
        deactivating: bool = False,
    ) -> tuple[int, Request]:
        request = Request(tuple(partitions), set(waiting), deactivating=deactivating)
        rid = next(self._ids)
        self._by_id[rid] = request
        return rid, request

    def get(self, request_id: int) -> Request:
        request = self._by_id.get(request_id)
        if request is None or request.abandoned:
            raise UnknownRequest(request_id)
        return request

    def forget(self, request_id: int) -> None:
        """The caller is done with it; a pending one is kept, unseen, until it ends."""
        request = self.get(request_id)
        if request.status is RequestStatus.PENDING:
            request.abandoned = True
        else:
            del self._by_id[request_id]

    def waiting_on(self, partition_id: int) -> list[Request]:
        return [r for r in self._by_id.values() if partition_id in r.waiting]

    def pending_on(self, partition_id: int) -> bool:
        """Whether a pending request names the partition (or waits on its siblings)."""
        return any(
            partition_id in r.partitions and r.status is RequestStatus.PENDING
            for r in self._by_id.values()
        )

    def drop_abandoned(self) -> None:
        """Forget the requests nobody waits for any more once they ended."""
        for rid in [
            r
            for r, q in self._by_id.items()
            if q.abandoned and q.status is not RequestStatus.PENDING
        ]:
            del self._by_id[rid]


__all__ = ["DuplicatePartition", "Request", "Requests", "UnknownRequest"]
