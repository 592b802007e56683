"""Why a request for partitions is refused: one enum every edge maps to its own answer.

The kubelet edge maps a :class:`Refusal` to a gRPC status, the DRA edge to a Prepare
error and the REST edge to an HTTP problem; the core only says which kind it is.
"""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    """The kind of a refusal, by what the caller should do about it."""

    UNKNOWN = "unknown"  # names nothing served here: fix the request
    INVALID = "invalid"  # malformed (a device twice, too many IDs): fix the request
    REFUSED = "refused"  # the node's state forbids it now: ask for another, or later
    FABRIC = "fabric"  # Fabric Manager failed or did not answer: retry later


class AllocationError(Exception):
    """An Allocate (or claim) the node refuses; the message says what blocks it and
    :attr:`kind` what the caller should do."""

    def __init__(self, message: str, *, kind: Refusal = Refusal.REFUSED) -> None:
        super().__init__(message)
        self.kind = kind


__all__ = ["AllocationError", "Refusal"]
