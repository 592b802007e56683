"""Who holds each partition in use, with the claim index derived from the holds.

A partition in use is held by a pod (the kubelet's, learned from Allocate or
PodResources) or by a DRA claim (its UID). :class:`Holds` keeps one :class:`Hold` per
partition and answers "which partition does claim X hold" from those holds alone, so the
two can never disagree. Pure: no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


class HoldKind(enum.Enum):
    POD = "pod"
    CLAIM = "claim"


@dataclass
class Hold:
    """One partition's holder and its release clock (rule N5)."""

    kind: HoldKind
    claim_uid: str | None = None  # set exactly when kind is CLAIM
    clock_from: float | None = None  # when the release clock may start (N5)
    unassigned_since: float | None = None

    @classmethod
    def pod(cls, clock_from: float | None = None) -> Hold:
        return cls(HoldKind.POD, clock_from=clock_from)

    @classmethod
    def claim(cls, claim_uid: str) -> Hold:
        return cls(HoldKind.CLAIM, claim_uid)

    def become_claim(self, claim_uid: str) -> None:
        """A DRA claim takes this hold over (a partition found active, N9)."""
        self.kind, self.claim_uid = HoldKind.CLAIM, claim_uid


class Holds:
    """Partition ID -> :class:`Hold`. A claim UID holds at most one partition; the index
    from UIDs is computed from the holds (at most a few dozen partitions per node)."""

    def __init__(self) -> None:
        self._by_partition: dict[int, Hold] = {}

    def __contains__(self, partition_id: object) -> bool:
        return partition_id in self._by_partition

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_partition)

    def get(self, partition_id: int) -> Hold | None:
        return self._by_partition.get(partition_id)

    def items(self) -> list[tuple[int, Hold]]:
        """A copy: callers may drop holds while they walk it."""
        return list(self._by_partition.items())

    def pods(self) -> list[tuple[int, Hold]]:
        return [(p, h) for p, h in self._by_partition.items() if h.kind is HoldKind.POD]

    def add(self, partition_id: int, hold: Hold) -> Hold:
        assert partition_id not in self._by_partition, f"partition {partition_id} held twice"
        if hold.claim_uid is not None:
            assert self.claimed_by(hold.claim_uid) is None, f"claim {hold.claim_uid} twice"
        self._by_partition[partition_id] = hold
        return hold

    def pop(self, partition_id: int) -> Hold:
        return self._by_partition.pop(partition_id)

    def claimed_by(self, claim_uid: str) -> int | None:
        """The partition claim ``claim_uid`` holds, if any."""
        for pid, hold in self._by_partition.items():
            if hold.claim_uid == claim_uid:
                return pid
        return None

    def claims(self) -> Mapping[str, int]:
        """Claim UID -> partition, for every claim hold."""
        return {h.claim_uid: p for p, h in self._by_partition.items() if h.claim_uid is not None}


__all__ = ["Hold", "HoldKind", "Holds"]
