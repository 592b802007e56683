"""Churn simulation: how much each allocation policy fragments an NVSwitch board.

Requests for 1, 2, 4 or 8 GPUs (one partition each) arrive as a Poisson process and
hold their partition for an exponentially distributed lifetime. Each request is served
the way the daemon serves it: the kubelet offers every Healthy partition of the
requested size, the policy picks one through :func:`preferred_allocation`, and the
:class:`PartitionBook` records it (claim + activated; on departure release +
begin_deactivation + deactivated). A request is refused when no partition of its size is
available; a *fragmentation refusal* is one refused while at least that many GPUs were
free, i.e. a refusal a better placement could have avoided.

**DRA mode** (``dra`` rows): the scheduler places each request itself. The pool is built
by the daemon's own code (:func:`~nvswitch_dp.dra.slices.build_pool`, devices listed in
:func:`~nvswitch_dp.partitions.policy.placement_order` for what is free) and the
scheduler stand-in (:mod:`nvswitch_dp.demo.dra_allocator`, first fit in listed order
over shared counters, as kube-scheduler's structured allocator) allocates a one-device
claim of the requested size from it. ``dra`` sees the pool re-published after every
change; ``dra, stale L`` sees it re-published at most every ``L`` time units (``--lag``;
mean lifetime 1), the allocator still counting every allocation, as the real scheduler
does: ``off-policy`` counts the placements that differ from what the policy would have
chosen at that moment.

Every policy sees the same arrivals, sizes and lifetimes (one trace per table, drawn from
``--seed``), so differences come from placement alone. Tables: HGX H200 8-GPU and HGX
A100 16-GPU, from :mod:`nvswitch_dp.fabric.platforms`.

Usage::

    python benchmarks/churn.py [--seed N] [--events N] [--load F] [--mix 1:4,2:3,4:2,8:1]
                               [--lag L]

Prints a Markdown table on stdout. Errors: bad arguments exit with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nvswitch_dp.demo.dra_allocator import Allocator, partition_claim
from nvswitch_dp.dra.slices import DEFAULT_DRIVER, PoolInputs, build_pool, partition_device_name
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.layout import GpuSlot
from nvswitch_dp.partitions.policy import (
    FIRST_FIT,
    KEEP_LARGEST,
    Policy,
    gpu_order,
    parse_device,
    placement_order,
    preferred_allocation,
    random_fit,
)
from nvswitch_dp.partitions.state import PartitionBook
from nvswitch_dp.partitions.table import PartitionTable

TABLES = ("hgx-h200", "hgx-a100-16")
DEFAULT_MIX = "1:4,2:3,4:2,8:1"


@dataclass(frozen=True, slots=True)
class Request:
    arrival: float
    size: int
    lifetime: float


@dataclass(slots=True)
class Outcome:
    """What one policy did with one trace."""

    requests: int = 0
    refused: int = 0
    fragmentation_refused: int = 0
    refused_by_size: Counter[int] = field(default_factory=Counter)
    busy_gpu_time: float = 0.0
    horizon: float = 0.0
    gpus: int = 0
    off_policy: int | None = None  # DRA mode: placements other than the policy's choice

    @property
    def utilisation(self) -> float:
        return self.busy_gpu_time / (self.gpus * self.horizon) if self.horizon else 0.0


def parse_mix(text: str) -> dict[int, float]:
    """``"1:4,2:3"`` -> {1: 4.0, 2: 3.0}: request sizes and their relative weights."""
    mix: dict[int, float] = {}
    try:
        for item in text.split(","):
            size, weight = item.split(":")
            mix[int(size)] = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"mix {text!r} is not SIZE:WEIGHT,...") from None
    if not mix or any(s < 1 or w < 0 for s, w in mix.items()) or sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError(f"mix {text!r} needs sizes >= 1 and positive weights")
    return mix


def make_trace(
    rng: random.Random, events: int, mix: dict[int, float], gpus: int, load: float
) -> list[Request]:
    """``events`` arrivals offering ``load`` x ``gpus`` GPU-time units per time unit.

    Mean lifetime is 1; the arrival rate is set so the offered load (mean size x rate x
    mean lifetime / GPUs) equals ``load``.
    """
    sizes = list(mix)
    weights = [mix[s] for s in sizes]
    mean_size = sum(s * w for s, w in mix.items()) / sum(weights)
    rate = load * gpus / mean_size
    now = 0.0
    trace = []
    for _ in range(events):
        now += rng.expovariate(rate)
        size = rng.choices(sizes, weights)[0]
        trace.append(Request(now, size, rng.expovariate(1.0)))
    return trace


Chooser = Callable[[PartitionBook, Request, float], "int | None"]


def device_plugin_chooser(table: PartitionTable, policy: Policy) -> Chooser:
    """The device-plugin path: the kubelet offers the Healthy partitions of the size,
    GetPreferredAllocation (the policy) picks one."""

    def choose(book: PartitionBook, request: Request, now: float) -> int | None:
        # The kubelet offers what ListAndWatch reported Healthy for this resource, less
        # what it already gave to pods.
        offered = [
            p.device_id
            for p in table.of_size(request.size)
            if book.healthy(p.partition_id) and not book.in_use(p.partition_id)
        ]
        answer = preferred_allocation(book, offered, [], 1, policy=policy)
        return parse_device(answer[0], table) if answer else None

    return choose


class DraChooser:
    """The DRA path: the scheduler stand-in allocates from the pool as last published.

    The pool is re-published (built again in the policy's order for what is free) when
    ``lag`` time has passed since the last publication and the order changed; ``lag`` 0
    re-publishes after every change. Counts the placements that differ from the
    policy's own choice at that moment."""

    def __init__(self, table: PartitionTable, platform_name: str, policy: Policy, lag: float):
        self.table = table
        self.policy = policy
        self.lag = lag
        p = platform(platform_name)
        self.base = PoolInputs(
            "node",
            DEFAULT_DRIVER,
            platform_name,
            table,
            {
                m: GpuSlot(m, address, 40 + m, p.numa_node(m))
                for m, address in p.module_map().items()
            },
            {},
            {},
        )
        self.published: Allocator | None = None
        self.published_at = -math.inf
        self.order: tuple[int, ...] = ()
        self.cache: dict[tuple[int, ...], Allocator] = {}
        self.off_policy = 0
        self.republished = 0
        self.choose_policy = device_plugin_chooser(table, policy)

    def _publish(self, free: frozenset[int], now: float) -> Allocator:
        order = placement_order(self.table, free, policy=self.policy)
        if self.published is None or (order != self.order and now - self.published_at >= self.lag):
            pool = self.cache.get(order)
            if pool is None:
                inputs = dataclasses.replace(
                    self.base,
                    order=order,
                    gpu_order=gpu_order(self.table, free, policy=self.policy),
                )
                pool = self.cache[order] = Allocator.from_slices(build_pool(inputs, 1))
            self.published, self.order, self.published_at = pool, order, now
            self.republished += 1
        return self.published

    def __call__(self, book: PartitionBook, request: Request, now: float) -> int | None:
        pool = self._publish(book.available_ids(), now)
        # The scheduler counts every allocated claim, published order or not.
        allocator = Allocator(
            pool.devices,
            pool.capacity,
            {partition_device_name(pid) for pid in self.table.ids if book.in_use(pid)},
        )
        found = allocator.allocate(partition_claim(request.size))
        if found is None:
            return None
        pid = parse_device(found[0], self.table)
        if pid != self.choose_policy(book, request, now):
            self.off_policy += 1
        return pid


def simulate(table: PartitionTable, trace: Sequence[Request], choose: Chooser) -> Outcome:
    """Run ``trace`` on a fresh book of ``table``, placing with ``choose``; the book
    holds the state."""
    book = PartitionBook(table)
    all_gpus = len(table.module_ids)
    outcome = Outcome(gpus=all_gpus)
    departures: list[tuple[float, int]] = []  # (time, partition ID); IDs are unique in use
    busy = 0  # GPUs held by requests
    occupied_gpus = 0  # GPUs in occupied partitions (equal to busy here: no pre-warming)
    last = 0.0

    def advance(to: float) -> None:
        nonlocal last
        outcome.busy_gpu_time += busy * (to - last)
        last = to

    for request in trace:
        while departures and departures[0][0] <= request.arrival:
            when, pid = heapq.heappop(departures)
            advance(when)
            book.release(pid)
            book.begin_deactivation(pid)
            book.deactivated(pid)
            busy -= table[pid].size
            occupied_gpus -= table[pid].size
        advance(request.arrival)
        outcome.requests += 1
        chosen = choose(book, request, request.arrival)
        if chosen is None:
            outcome.refused += 1
            outcome.refused_by_size[request.size] += 1
            if all_gpus - occupied_gpus >= request.size:
                outcome.fragmentation_refused += 1
            continue
        book.claim(chosen)
        book.activated(chosen)
        busy += request.size
        occupied_gpus += request.size
        heapq.heappush(departures, (request.arrival + request.lifetime, chosen))
    outcome.horizon = last
    return outcome


def policies(seed: int) -> list[Callable[[], Policy]]:
    """Fresh policy makers: ``random`` gets a new seeded generator for every run."""
    return [
        lambda: KEEP_LARGEST,
        lambda: FIRST_FIT,
        lambda: random_fit(random.Random(seed + 1)),
    ]


def render(rows: list[tuple[str, str, Outcome]], sizes: Sequence[int]) -> str:
    head = ["table", "placement", "requests", "refused", "fragmentation refusals"]
    head += [f"refused {s}x" for s in sizes] + ["utilisation", "off-policy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for table, name, o in rows:

        def pct(n: int, o: Outcome = o) -> str:
            return f"{n} ({100 * n / o.requests:.1f}%)"

        cells = [table, name, str(o.requests), pct(o.refused), pct(o.fragmentation_refused)]
        cells += [str(o.refused_by_size[s]) for s in sizes]
        cells.append(f"{100 * o.utilisation:.1f}%")
        cells.append("" if o.off_policy is None else pct(o.off_policy))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=2026, help="trace seed (default 2026)")
    parser.add_argument("--events", type=int, default=20_000, help="arrivals per table")
    parser.add_argument(
        "--load", type=float, default=0.9, help="offered load as a fraction of the GPUs"
    )
    parser.add_argument(
        "--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX), help="SIZE:WEIGHT,..."
    )
    parser.add_argument(
        "--lag",
        type=float,
        default=0.05,
        help="DRA: least time between two publications of the pool for the 'stale' row "
        "(mean lifetime 1; default 0.05)",
    )
    args = parser.parse_args(argv)
    if args.events < 1 or not math.isfinite(args.load) or args.load <= 0:
        parser.error("--events must be >= 1 and --load > 0")
    if not math.isfinite(args.lag) or args.lag < 0:
        parser.error("--lag must be >= 0")

    started = time.perf_counter()
    rows: list[tuple[str, str, Outcome]] = []
    for index, name in enumerate(TABLES):
        p = platform(name)
        table = PartitionTable.from_rows((pid, mods) for pid, mods, _ in p.rows)
        # One trace per table, the same for every policy (common random numbers).
        trace = make_trace(
            random.Random(args.seed * 1000 + index), args.events, args.mix, p.gpu_count, args.load
        )
        for make in policies(args.seed):
            policy = make()
            chooser = device_plugin_chooser(table, policy)
            rows.append((name, policy.name, simulate(table, trace, chooser)))
        for dra_policy, lag, label in (
            (FIRST_FIT, 0.0, "dra, by FM ID (before)"),
            (KEEP_LARGEST, 0.0, f"dra ({KEEP_LARGEST.name})"),
            (KEEP_LARGEST, args.lag, f"dra, stale {args.lag:g}"),
        ):
            dra = DraChooser(table, name, dra_policy, lag)
            outcome = simulate(table, trace, dra)
            outcome.off_policy = dra.off_policy
            rows.append((name, label, outcome))
    mix = ", ".join(f"{s}x:{w:g}" for s, w in args.mix.items())
    print(
        f"Churn: seed {args.seed}, {args.events} arrivals per table, offered load "
        f"{args.load:g}, mix {mix}, mean lifetime 1.\n"
    )
    print(render(rows, sorted(args.mix)))
    print(f"\n({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
