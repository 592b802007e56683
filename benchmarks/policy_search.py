"""What else was tried for the allocation policy, on the churn traces, and a bound.

Runs the seeded traces of ``benchmarks/churn.py`` (same seed, events, load and mix) with
placement policies that were candidates to replace ``keep-largest``, and, for the 8-GPU
table, the optimal placement for that arrival process, found by value iteration over
every state of the board (a set of held, non-overlapping partitions: 677 on HGX H200).
The optimum minimises the long-run rate of refusals of any kind (``--objective total``)
or of fragmentation refusals (``fragmentation``), deciding only *where* a request goes,
never refusing one that fits. Its number is the floor no placement policy reaches on
this trace model: if it is above a target, the target needs something other than
placement (admission control, reservations, migration).

Candidates (all break ties by partition ID):

- ``kl+busiest``: keep-largest, then the candidate whose enclosing blocks (smallest
  first) have the most busy GPUs (best fit by remaining capacity).
- ``kl+holders``: keep-largest, then the enclosing blocks with the most holders (a
  block frees when its last holder leaves; with memoryless lifetimes one more holder in
  a block already held delays its freeing least).
- ``delay-s``, ``delay-4^s``: the sum over enclosing blocks of ``w(size) / (holders + 1)``
  first (breaking a free block costs ``w``), then keep-largest.
- ``demand``: the demand-weighted sizes that stay servable first (mix weight x size for
  each size with a partition left), then keep-largest, then busiest.
- ``segregate``: keep-largest, then fewest holders of another size in the enclosing
  blocks (size classes kept apart, as slab allocators do).

Usage::

    python benchmarks/policy_search.py [--events N] [--optimal] [--objective total]

Prints a Markdown table. Slow: about 1 s per 1,000 arrivals per policy on one core; the
value iteration adds a few minutes.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from churn import (
    DEFAULT_MIX,
    TABLES,
    Chooser,
    Outcome,
    Request,
    device_plugin_chooser,
    make_trace,
    parse_mix,
    simulate,
)

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.policy import FIRST_FIT, KEEP_LARGEST, remaining_after
from nvswitch_dp.partitions.state import PartitionBook
from nvswitch_dp.partitions.table import PartitionTable

Key = Callable[[PartitionTable, frozenset[int], int, list[int]], tuple[float, ...]]


def kept(table: PartitionTable, free: frozenset[int], pid: int) -> tuple[float, ...]:
    """keep-largest's key without the ID: partitions kept per size, largest first."""
    keeps = remaining_after(table, free, (pid,))
    sizes = sorted(table.sizes, reverse=True)
    counts = dict.fromkeys(sizes, 0)
    for q in keeps:
        counts[table[q].size] += 1
    return (*(-counts[s] for s in sizes), -len(keeps))


def enclosing(table: PartitionTable, pid: int) -> list[int]:
    mods = table[pid].module_ids
    return [q.partition_id for q in table if q.size > table[pid].size and mods <= q.module_ids]


def holders_in(table: PartitionTable, block: int, held: list[int]) -> list[int]:
    return [h for h in held if table[h].module_ids & table[block].module_ids]


def per_size(table: PartitionTable, pid: int, score: Callable[[int], float]) -> tuple[float, ...]:
    """For each larger size, smallest first: the best ``score`` among enclosing blocks."""
    blocks = enclosing(table, pid)
    return tuple(
        min(score(q) for q in blocks if table[q].size == s)
        for s in sorted({table[q].size for q in blocks})
    )


def chooser(table: PartitionTable, key: Key) -> Chooser:
    def choose(book: PartitionBook, request: Request, now: float) -> int | None:
        free = book.available_ids()
        held = [p for p in table.ids if book.in_use(p)]
        options = [p.partition_id for p in table.of_size(request.size) if p.partition_id in free]
        if not options:
            return None
        return min(options, key=lambda p: (*key(table, free, p, held), p))

    return choose


def busy(table: PartitionTable, held: list[int]) -> frozenset[int]:
    return frozenset(m for h in held for m in table[h].module_ids)


def candidates(mix: dict[int, float]) -> dict[str, Key]:
    total = sum(mix.values())

    def delay(weight: Callable[[int], float]) -> Key:
        return lambda t, free, p, held: (
            sum(weight(t[q].size) / (len(holders_in(t, q, held)) + 1) for q in enclosing(t, p)),
            *kept(t, free, p),
        )

    def demand(
        t: PartitionTable, free: frozenset[int], p: int, held: list[int]
    ) -> tuple[float, ...]:
        keeps = remaining_after(t, free, (p,))
        servable = sum(
            mix.get(s, 0) / total * s for s in t.sizes if any(t[q].size == s for q in keeps)
        )
        gone = busy(t, held)
        return (
            -servable,
            *kept(t, free, p),
            *per_size(t, p, lambda q: -len(t[q].module_ids & gone)),
        )

    def busiest(
        t: PartitionTable, free: frozenset[int], p: int, held: list[int]
    ) -> tuple[float, ...]:
        gone = busy(t, held)
        return (*kept(t, free, p), *per_size(t, p, lambda q: -len(t[q].module_ids & gone)))

    return {
        "kl+busiest": busiest,
        "kl+holders": lambda t, free, p, held: (
            *kept(t, free, p),
            *per_size(t, p, lambda q: -len(holders_in(t, q, held))),
        ),
        "delay-s": delay(lambda s: s),
        "delay-4^s": delay(lambda s: 4.0**s),
        "demand": demand,
        "segregate": lambda t, free, p, held: (
            *kept(t, free, p),
            *per_size(
                t,
                p,
                lambda q: sum(1 for h in holders_in(t, q, held) if t[h].size != t[p].size),
            ),
        ),
    }


def optimal(
    table: PartitionTable, mix: dict[int, float], load: float, objective: str, sweeps: int
) -> Chooser:
    """The placement that minimises the expected discounted refusals (discount 0.9995
    per uniformised event, near the long-run rate), by value iteration over all states."""
    ids = sorted(table.ids)
    states: list[frozenset[int]] = []

    def walk(i: int, chosen: tuple[int, ...], used: frozenset[int]) -> None:
        if i == len(ids):
            states.append(frozenset(chosen))
            return
        walk(i + 1, chosen, used)
        mods = table[ids[i]].module_ids
        if not mods & used:
            walk(i + 1, (*chosen, ids[i]), used | mods)

    walk(0, (), frozenset())
    index = {s: i for i, s in enumerate(states)}
    gpus = len(table.module_ids)
    total = sum(mix.values())
    rate = load * gpus / (sum(s * w for s, w in mix.items()) / total)
    arrivals = {s: rate * w / total for s, w in mix.items()}
    uniform = sum(arrivals.values()) + gpus
    gamma = 0.9995
    moves: list[tuple[dict[int, list[int]], dict[int, float], list[int]]] = []
    for x in states:
        taken = busy(table, list(x))
        options = {
            s: [index[x | {q.partition_id}] for q in table.of_size(s) if not q.module_ids & taken]
            for s in arrivals
        }
        cost = {s: 1.0 if objective == "total" else float(gpus - len(taken) >= s) for s in arrivals}
        moves.append((options, cost, [index[x - {h}] for h in x]))
    value = [0.0] * len(states)
    for _ in range(sweeps):
        new = []
        for i, (options, cost, departures) in enumerate(moves):
            acc = 0.0
            for s, lam in arrivals.items():
                if options[s]:
                    acc += lam * gamma * min(value[j] for j in options[s])
                else:
                    acc += lam * (cost[s] + gamma * value[i])
            acc += gamma * sum(value[j] for j in departures)
            acc += (uniform - sum(arrivals.values()) - len(departures)) * gamma * value[i]
            new.append(acc / uniform)
        delta = max(abs(a - b) for a, b in zip(new, value, strict=True))
        value = new
        if delta < 1e-7:
            break

    def choose(book: PartitionBook, request: Request, now: float) -> int | None:
        x = frozenset(p for p in table.ids if book.in_use(p))
        free = book.available_ids()
        options = [p.partition_id for p in table.of_size(request.size) if p.partition_id in free]
        if not options:
            return None
        return min(options, key=lambda q: (value[index[x | {q}]], q))

    return choose


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX))
    parser.add_argument("--optimal", action="store_true", help="add the optimum (8-GPU table)")
    parser.add_argument("--objective", choices=("total", "fragmentation"), default="total")
    parser.add_argument("--sweeps", type=int, default=3000, help="value-iteration sweeps")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    lines = [
        "| table | policy | refused | fragmentation refusals | of first-fit's | "
        "refused vs keep-largest |",
        "|---|---|---|---|---|---|",
    ]
    for number, name in enumerate(TABLES):
        p = platform(name)
        table = PartitionTable.from_rows((pid, mods) for pid, mods, _ in p.rows)
        trace = make_trace(
            random.Random(args.seed * 1000 + number), args.events, args.mix, p.gpu_count, args.load
        )
        ff = simulate(table, trace, device_plugin_chooser(table, FIRST_FIT))
        kl = simulate(table, trace, device_plugin_chooser(table, KEEP_LARGEST))
        results: list[tuple[str, Outcome]] = [("first-fit", ff), ("keep-largest", kl)]
        for label, key in candidates(args.mix).items():
            results.append((label, simulate(table, trace, chooser(table, key))))
        if args.optimal and len(table.module_ids) <= 8:
            best = optimal(table, args.mix, args.load, args.objective, args.sweeps)
            results.append((f"optimal ({args.objective})", simulate(table, trace, best)))
        for label, o in results:
            share = 100 * o.fragmentation_refused / max(ff.fragmentation_refused, 1)
            lines.append(
                f"| {name} | {label} | {o.refused} | {o.fragmentation_refused} | {share:.0f}% | "
                f"{o.refused - kl.refused:+d} |"
            )
    print(
        f"Policy search: seed {args.seed}, {args.events} arrivals per table, load "
        f"{args.load:g}, the churn benchmark's traces.\n"
    )
    print("\n".join(lines))
    print(f"\n({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
