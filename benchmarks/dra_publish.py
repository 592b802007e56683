"""How long the DRA publisher takes against the API-server stand-in (real HTTP, lightkube).

Usage::

    python benchmarks/dra_publish.py [--platform hgx-h200] [--runs 30]

Prints p50/p99/max in milliseconds of: a first publish of the whole pool into an empty
API server, a round that finds everything equal (no write), and a GPU fault's round
(the device slice and the counters slice rewritten at a new generation). The stand-in runs
in a thread of this process, so the numbers include its share of the same cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import trio

from nvswitch_dp.demo.apiserver import ApiServer
from nvswitch_dp.dra.kube import KubeClient
from nvswitch_dp.dra.publish import PoolPublisher
from nvswitch_dp.dra.slices import DEFAULT_DRIVER, PoolInputs
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.layout import GpuSlot
from nvswitch_dp.partitions.table import PartitionTable


def _inputs(name: str, node: str) -> PoolInputs:
    p = platform(name)
    table = PartitionTable.from_rows((pid, mods) for pid, mods, _ in p.rows)
    gpus = {m: GpuSlot(m, a, 40 + m, p.numa_node(m)) for m, a in p.module_map().items()}
    return PoolInputs(node, DEFAULT_DRIVER, name, table, gpus, {}, {})


def _report(label: str, samples: list[float]) -> None:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    print(
        f"{label:<34} p50 {statistics.median(ms):7.2f} ms  p99 {p99:7.2f} ms  "
        f"max {ms[-1]:7.2f} ms  (n={len(ms)})"
    )


async def _measure(name: str, runs: int) -> None:
    first: list[float] = []
    equal: list[float] = []
    fault: list[float] = []
    with ApiServer(token="bench") as server, tempfile.TemporaryDirectory() as tmp:
        kubeconfig = server.write_kubeconfig(Path(tmp) / "kubeconfig")
        async with KubeClient.from_kubeconfig(kubeconfig) as client:

            async def never(last: int) -> int:
                await trio.sleep_forever()
                return last

            for i in range(runs):
                inputs = _inputs(name, f"node-{i}")
                pub = PoolPublisher(client, lambda: _inputs(name, "unused"), never)
                t0 = time.perf_counter()
                await pub.publish_once(inputs)
                first.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await pub.publish_once(inputs)
                equal.append(time.perf_counter() - t0)
                faulty = replace(inputs, gpu_problems={1 + i % 8: "fault"})
                t0 = time.perf_counter()
                await pub.publish_once(faulty)
                fault.append(time.perf_counter() - t0)
    _report(f"{name} first publish", first)
    _report(f"{name} round, no change", equal)
    _report(f"{name} round after GPU fault", fault)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", default="hgx-h200")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    trio.run(_measure, args.platform, args.runs)


if __name__ == "__main__":
    main()
