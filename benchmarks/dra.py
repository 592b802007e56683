"""DRA-mode benchmarks: Prepare and Unprepare latency, GPU fault to the slice without its
partitions, start to slices published. Prints a Markdown table.

    python benchmarks/dra.py [--cycles 200] [--faults 10] [--starts 3] [--tmpdir DIR]

The node's state, CDI and plugin directories live under ``--tmpdir`` (default: the
system's temporary directory). Prepare and Unprepare fsync every file they write (the
checkpoint twice per Prepare), so their latency is mostly the file system's: compare a
disk with a tmpfs (``--tmpdir /dev/shm``) to see the share.

Real processes over real sockets: the daemon runs ``nvswitch-dp run --mode dra --simulate
hgx-h200`` (simulator with no activation delay); the kubelet is the grpcio DRA stand-in
(NodePrepareResources / NodeUnprepareResources on the daemon's Unix socket); the API server
is the HTTP stand-in in this process, which the daemon reads claims from and publishes
slices to (testkit.dra_cluster).

- Prepare: one 4-GPU partition claim, allocated by the scheduler stand-in beforehand; the
  call reads the claim over HTTP, activates the partition in FM, writes the device metadata
  file, the CDI spec and the checkpoint (fsync), then answers. Unprepare releases the hold
  (the deactivation runs after the answer), removes the files and rewrites the checkpoint.
  Between cycles the benchmark waits, untimed, for FM to have deactivated the partition.
- GPU fault: ``/dev/vfio/<group>`` of module 5 removed, to the moment the API server holds
  a pool without that GPU's partitions (polled every millisecond); then restored, untimed.
- Start: process start to the complete pool in an empty API server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# This file is named dra.py, and the kubelet stand-in imports the kubelet's protos as the
# package "dra": keep this script's own directory off the import path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from nvswitch_dp.demo.dra_allocator import partition_claim  # noqa: E402
from testkit.dra_cluster import DraCluster  # noqa: E402

WITH_GPU_5 = {"partition-0", "partition-2", "partition-5", "partition-11", "gpu-5"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def wait(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.001) -> float:
    """Seconds until ``predicate`` holds (polled every ``poll`` s)."""
    begin = time.monotonic()
    while not predicate():
        if time.monotonic() - begin > timeout:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(poll)
    return time.monotonic() - begin


def prepare_cycles(cluster: DraCluster, cycles: int) -> tuple[list[float], list[float]]:
    prepares: list[float] = []
    unprepares: list[float] = []
    for i in range(cycles + 5):  # the first five warm up (imports, connections)
        claim = cluster.create_claim(partition_claim(4, 1), name=f"bench-{i}")
        begin = time.perf_counter()
        answer = cluster.prepare(claim)
        middle = time.perf_counter()
        if answer.error:
            raise RuntimeError(f"Prepare failed: {answer.error}")
        error = cluster.unprepare(claim)
        end = time.perf_counter()
        if error:
            raise RuntimeError(f"Unprepare failed: {error}")
        cluster.delete_claim(claim)
        wait(lambda: cluster.fm_active() == [], 10, "the deactivation")
        if i >= 5:
            prepares.append(1000 * (middle - begin))
            unprepares.append(1000 * (end - middle))
    return prepares, unprepares


def fault_cycles(cluster: DraCluster, faults: int) -> list[float]:
    group = cluster.vfio_group(5)
    times: list[float] = []
    for _ in range(faults):
        begin = time.monotonic()
        group.unlink()
        wait(lambda: not cluster.devices() & WITH_GPU_5, 10, "the pool without GPU 5")
        times.append(1000 * (time.monotonic() - begin))
        group.write_text("")
        wait(lambda: cluster.devices() >= WITH_GPU_5, 10, "GPU 5 back", poll=0.01)
    return times


def start_times(starts: int, tmpdir: str | None) -> list[float]:
    times: list[float] = []
    for _ in range(starts):
        with (
            tempfile.TemporaryDirectory(prefix="dra-bench-", dir=tmpdir) as workdir,
            DraCluster(Path(workdir)) as cluster,
        ):
            begin = time.monotonic()
            cluster.start_daemon()
            cluster.wait_published()
            times.append(time.monotonic() - begin)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--faults", type=int, default=10)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--tmpdir", help="where the node's directories live")
    args = parser.parse_args()
    where = args.tmpdir or tempfile.gettempdir()
    with (
        tempfile.TemporaryDirectory(prefix="dra-bench-", dir=args.tmpdir) as workdir,
        DraCluster(Path(workdir)) as cluster,
    ):
        cluster.start_daemon()
        cluster.wait_published()
        prepares, unprepares = prepare_cycles(cluster, args.cycles)
        faults = fault_cycles(cluster, args.faults)
    starts = start_times(args.starts, args.tmpdir)
    print(f"Node directories under {where}.\n")
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| Prepare p50 / p99 (ms, {args.cycles} calls, 4-GPU partition activated in FM, "
        f"simulator without delay) | {percentile(prepares, 50):.2f} / "
        f"{percentile(prepares, 99):.2f} |"
    )
    print(
        f"| Unprepare p50 / p99 (ms, {args.cycles} calls) | {percentile(unprepares, 50):.2f} / "
        f"{percentile(unprepares, 99):.2f} |"
    )
    print(
        "| GPU fault (VFIO node removed) to a slice that stops offering its partitions "
        f"(tainted, or left out), median / max "
        f"(ms, {args.faults} faults) | {statistics.median(faults):.1f} / {max(faults):.1f} |"
    )
    print(
        f"| Start to slices published, median / max (s, {args.starts} starts) | "
        f"{statistics.median(starts):.2f} / {max(starts):.2f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
