"""Huge bad requests against the real daemon: how long their refusal takes, and how long
an ordinary Allocate on another resource waits meanwhile. Prints a Markdown table.

    python benchmarks/bad_input.py [--rounds 5] [--ids 300000]

Each round sends an Allocate naming ``partition-7`` ``--ids`` times (about 4 MB on the
wire) while a second thread sends 2x Allocates of an active partition back to back; the
refusal time is measured at the client (encoding excluded), the other Allocates' latency
over the whole round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.harness import simulated_node

R = "nvidia.com/gpu-h200"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ids", type=int, default=300_000)
    args = parser.parse_args()
    refusals: list[float] = []
    others: list[float] = []
    codes: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp, simulated_node(Path(tmp)) as (daemon, kubelet):
        kubelet.allocate(f"{R}-2x", ["partition-3"])
        api = kubelet.api
        request = api.deviceplugin.AllocateRequest(
            container_requests=[
                api.deviceplugin.ContainerAllocateRequest(devices_ids=["partition-7"] * args.ids)
            ]
        )
        stub = kubelet._stub(f"{R}-1x")
        size_mb = request.ByteSize() / 1e6
        for _ in range(args.rounds):
            stop = threading.Event()

            def other(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    kubelet.allocate(f"{R}-2x", ["partition-3"])
                    others.append(time.perf_counter() - t0)

            thread = threading.Thread(target=other)
            thread.start()
            time.sleep(0.05)
            t0 = time.perf_counter()
            try:
                stub.Allocate(request, timeout=60)
            except grpc.RpcError as exc:
                codes.add(exc.code().name)
            refusals.append(time.perf_counter() - t0)
            time.sleep(0.05)
            stop.set()
            thread.join()
        daemon.check_alive()
    ms = sorted(x * 1000 for x in others)
    rows = [
        ("request", f"{args.ids} IDs, {size_mb:.1f} MB; answered {sorted(codes)}"),
        ("refusal, median / max (ms)", f"{sorted(refusals)[len(refusals) // 2] * 1000:.0f} / "
         f"{max(refusals) * 1000:.0f}"),
        ("concurrent 2x Allocates: count, p50 / max (ms)",
         f"{len(ms)}, {ms[len(ms) // 2]:.1f} / {ms[-1]:.1f}"),
    ]  # fmt: skip
    print("| measure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
