"""The allocation policy behind the kubelet's GetPreferredAllocation: which partitions to offer.

The policy (``keep-largest``): one device is one whole partition. Devices the pod already
holds (``must_include``) come first. Then, one partition at a time, take the candidate
(in the kubelet's ``available`` list *and* available in the book) whose taking leaves the
best set of partitions still available across *every* size, not only the requested one:
compare the counts of still-available partitions per size lexicographically from the
largest size down, then the total count, then prefer the lowest partition ID so the
answer is deterministic.

Why: the kubelet keeps one book per resource and knows nothing of overlap, so without a
preference it hands out any free device and fragments the board (NVIDIA
k8s-device-plugin #546, #1193). Scoring by what stays available, largest first, gives
the effects an operator expects without naming them: a 1x request goes to a GPU whose
pair-mate is already taken, a 2x request stays inside a 4x block that is already broken,
and an 8x partition survives as long as anything else can serve. The largest sizes come
first because they are the ones fragmentation refuses first and cannot recover from.

Policies are data (after NVIDIA k8s-device-plugin ``internal/rm/allocate.go``): a
:class:`Policy` is a named ranking key over :class:`Candidate` values, and one greedy
loop (:func:`preferred_allocation`) serves them all. ``first-fit`` and ``random`` exist
for the churn benchmark (``benchmarks/churn.py``), not for production.

In DRA mode the scheduler picks devices itself, first fit in the order a slice lists them
(see :mod:`nvswitch_dp.demo.dra_allocator`); :func:`placement_order` and
:func:`gpu_order` turn the same policy into that order, so that first fit over the
published list *is* the policy's choice (a property the tests check against
:func:`preferred_allocation`).

Errors: none. An error from GetPreferredAllocation fails the pod's admission (kubernetes
#97131), so :func:`preferred_allocation` never raises: IDs it cannot parse or does not
know are ignored, and when too few partitions are truly available it fills the answer
from the rest of ``available`` (the kubelet discards anything not in ``available`` and
fills any shortfall itself). Pure: no I/O, no clock, no global randomness; the book is
only read.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass

from nvswitch_dp.partitions.state import Availability
from nvswitch_dp.partitions.table import PartitionTable, device_id, partition_id_of

__all__ = [
    "FIRST_FIT",
    "KEEP_LARGEST",
    "POLICIES",
    "Candidate",
    "Policy",
    "candidate",
    "gpu_order",
    "keep_largest_key",
    "parse_device",
    "placement_order",
    "preferred_allocation",
    "random_fit",
    "remaining_after",
    "remaining_available",
]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One partition the greedy loop could take next, and what taking it would leave.

    ``keeps`` holds the IDs of the partitions still available after taking it (and
    everything taken before it); ``kept_by_size`` counts them per size, largest size of
    the table first, so that tuples compare the way the policy reads.
    """

    partition_id: int
    keeps: frozenset[int]
    kept_by_size: tuple[int, ...]


RankKey = tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    """A named ranking of candidates: the greedy loop takes the one with the smallest key.

    A sort key is Python's form of a comparator; keys must be total (end in something
    unique such as the partition ID) for the answer to be deterministic.
    """

    name: str
    key: Callable[[Candidate], RankKey]


def keep_largest_key(c: Candidate) -> RankKey:
    """Most partitions kept per size, largest size first; then most kept; then lowest ID."""
    return (*(-n for n in c.kept_by_size), -len(c.keeps), c.partition_id)


def _first_fit_key(c: Candidate) -> RankKey:
    return (c.partition_id,)


KEEP_LARGEST = Policy("keep-largest", keep_largest_key)
FIRST_FIT = Policy("first-fit", _first_fit_key)

POLICIES: dict[str, Policy] = {p.name: p for p in (KEEP_LARGEST, FIRST_FIT)}
"""The deterministic policies by name; :func:`random_fit` makes the seeded one."""


def random_fit(rng: random.Random) -> Policy:
    """Any candidate, uniformly: the baseline of the benchmark. Owns no state but ``rng``."""
    return Policy("random", lambda c: (rng.random(), c.partition_id))


def parse_device(device: str, table: PartitionTable) -> int | None:
    """The partition ID named by ``device``, or None if it is not one of ``table``'s.

    Only the canonical spelling counts (``partition-3``, not ``partition-03`` nor
    ``partition-\\u0663``), so that the answer holds exactly the strings the kubelet sent.
    Never raises.
    """
    try:
        pid = partition_id_of(device)
    except (ValueError, TypeError, AttributeError):
        return None
    if pid not in table or device_id(pid) != device:
        return None
    return pid


def remaining_after(
    table: PartitionTable, available: Set[int], taken: Iterable[int]
) -> frozenset[int]:
    """What stays of ``available`` once the partitions ``taken`` were taken.

    A taken partition removes itself and every partition sharing a GPU with it. IDs not
    in ``table`` are ignored. Pure; never raises.
    """
    gone: set[int] = set()
    for pid in taken:
        if pid in table:
            gone.add(pid)
            gone |= table.overlapping(pid)
    return frozenset(available) - gone


def remaining_available(book: Availability, taken: Iterable[int]) -> frozenset[int]:
    """The partitions ``book`` would still call available if ``taken`` were taken now.

    Hypothetical: the book is only read. IDs not in the table are ignored.
    """
    return remaining_after(book.table, book.available_ids(), taken)


def candidate(
    table: PartitionTable, available: Set[int], partition_id: int, sizes: Sequence[int]
) -> Candidate:
    """Score taking ``partition_id`` when ``available`` are free; ``sizes`` largest first."""
    keeps = remaining_after(table, available, (partition_id,))
    counts = dict.fromkeys(sizes, 0)
    for pid in keeps:
        size = table[pid].size
        counts[size] = counts.get(size, 0) + 1
    return Candidate(partition_id, keeps, tuple(counts[s] for s in sizes))


def preferred_allocation(
    book: Availability,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    *,
    policy: Policy = KEEP_LARGEST,
) -> list[str]:
    """The device IDs to offer for one container: at most ``size``, all from ``available``.

    Order: ``must_include`` first (those in ``available``, kept in the kubelet's order),
    then the partitions ``policy`` picks greedily among those both in ``available`` and
    available in ``book`` (never one overlapping a partition picked or included before
    it), then, if still short, the rest of ``available``: first partitions the book
    calls available (they overlap a pick, best effort), then the others, by ID.

    Never raises (module docstring): malformed or unknown IDs and duplicates are dropped,
    a ``size`` below 1 gives an empty answer. Reads ``book`` only.
    """
    if size < 1:
        return []
    table = book.table
    offered: dict[int, str] = {}  # partition ID -> device ID, in the kubelet's order
    for device in available:
        pid = parse_device(device, table)
        if pid is not None:
            offered.setdefault(pid, device)

    chosen: list[int] = []
    for device in must_include:
        pid = parse_device(device, table)
        if pid is not None and pid in offered and pid not in chosen:
            chosen.append(pid)
    del chosen[size:]

    book_available = book.available_ids()
    # Included partitions are already the pod's: whatever overlaps them is gone too,
    # even if the book has not recorded the claim (a restart, say).
    free = remaining_after(table, book_available, chosen)
    sizes = sorted(table.sizes, reverse=True)
    while len(chosen) < size:
        options = [pid for pid in offered if pid in free]
        if not options:
            break
        best = min((candidate(table, free, pid, sizes) for pid in options), key=policy.key)
        chosen.append(best.partition_id)
        free = best.keeps

    if len(chosen) < size:
        rest = sorted(pid for pid in offered if pid not in chosen)
        # Book-available ones first: they can be allocated if the pod ends up with
        # only some of them, the others cannot be allocated at all right now.
        rest.sort(key=lambda pid: pid not in book_available)
        chosen += rest[: size - len(chosen)]
    return [offered[pid] for pid in chosen]


def placement_order(
    table: PartitionTable, available: Set[int], *, policy: Policy = KEEP_LARGEST
) -> tuple[int, ...]:
    """Every partition ID of ``table``, in the order a DRA slice should list them.

    Per size, the partitions in ``available`` come first, ranked by ``policy`` as
    :func:`preferred_allocation` would rank them for one request of that size now (the
    first is the one it picks); then the partitions not available, by ID (the scheduler
    skips those, and a fixed tail keeps the list from changing when nothing that matters
    did). Sizes follow one another, smallest first; their relative order does not matter
    to the scheduler, whose device classes select by size.

    The guarantee: for every size, the first partition of that size in the result that
    lies in ``available`` is ``policy``'s choice for a request of that size. Pure; never
    raises (IDs in ``available`` outside ``table`` are ignored).
    """
    sizes = sorted(table.sizes, reverse=True)
    free = frozenset(pid for pid in available if pid in table)
    order: list[int] = []
    for size in sorted(table.sizes):
        ids = [p.partition_id for p in table.of_size(size)]
        ranked = sorted(
            (candidate(table, free, pid, sizes) for pid in ids if pid in free), key=policy.key
        )
        order += [c.partition_id for c in ranked]
        order += sorted(pid for pid in ids if pid not in free)
    return tuple(order)


def gpu_order(
    table: PartitionTable, available: Set[int], *, policy: Policy = KEEP_LARGEST
) -> tuple[int, ...]:
    """Every module ID of ``table``, in the order a DRA slice should list the per-GPU
    devices (KubeVirt claims: N requests of one GPU, ``matchAttribute`` on
    ``partition<N>x``).

    A module's rank is that of the smallest available partition holding it in
    :func:`placement_order` (a 1-GPU partition on every table we know), so a claim for
    one GPU gets the GPU the policy would give a 1x request. Modules in no available
    partition follow, by ID. For N > 1 the scheduler takes the N-GPU partition of the
    earliest-listed GPU whose partition is wholly free: the one holding the GPU the
    policy would give up first, which is a good choice but not always the policy's own
    N-GPU choice (the N-GPU partition devices are). Pure; never raises.
    """
    order = placement_order(table, available, policy=policy)
    position = {pid: i for i, pid in enumerate(order)}
    free = frozenset(pid for pid in available if pid in table)

    def rank(module: int) -> tuple[int, int, int]:
        # The order groups sizes smallest first, so the lowest position among the
        # available partitions holding the module is its smallest one, best ranked.
        held_in = [position[p.partition_id] for p in table if module in p.module_ids]
        ranks = [i for i in held_in if order[i] in free]
        return (0, min(ranks), module) if ranks else (1, 0, module)

    return tuple(sorted(table.module_ids, key=rank))
