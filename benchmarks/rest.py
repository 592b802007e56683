"""REST benchmark: GET /v1/partitions throughput and p99 with 16 keep-alive connections
(``wrk``), and kubelet Allocate latency alone vs. with that REST load beside it.
Prints a Markdown table.

    python benchmarks/rest.py [--seconds 10] [--calls 1500] [--rounds 2]

The daemon is the real process on a simulated HGX H200 node (``nvswitch-dp run
--simulate hgx-h200``) with the grpcio kubelet stand-in; partition-1 (4x) is allocated
once first, so every timed Allocate takes the claim path without an FM call (as
``benchmarks/daemon.py`` measures it). Alone and loaded Allocate runs alternate
``--rounds`` times so machine noise hits both alike. Needs ``wrk`` (Debian package).
Target: Allocate p99 grows by at most 20% under REST load.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon import allocate_request, allocate_stub, percentile  # benchmarks/daemon.py

from testkit.harness import free_port, simulated_node

R = "nvidia.com/gpu-h200"
RESOURCES = [f"{R}-{n}x" for n in (1, 2, 4, 8)]
CONNECTIONS = 16
P99_GROWTH_TARGET = 1.20
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> tuple[float, float]:
    """(requests per second, p99 latency in ms) from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    if rps is None or p99 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    return float(rps.group(1)), float(p99.group(1)) * _UNITS[p99.group(2)]


def start_wrk(url: str, seconds: float) -> subprocess.Popen[str]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    return subprocess.Popen(
        [wrk, "-t2", f"-c{CONNECTIONS}", f"-d{seconds:.0f}s", "--latency", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def time_allocates(stub: object, calls: int, *, until: subprocess.Popen[str] | None) -> list[float]:
    """Milliseconds per Allocate for ``calls`` calls (stopping early if ``until`` exits)."""
    request = allocate_request("partition-1")
    samples: list[float] = []
    for _ in range(calls):
        if until is not None and until.poll() is not None:
            break
        begin = time.perf_counter()
        stub.Allocate(request, timeout=5)  # type: ignore[attr-defined]
        samples.append(1000 * (time.perf_counter() - begin))
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each wrk run")
    parser.add_argument("--calls", type=int, default=1500, help="Allocate calls per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--rest-rate", type=float, default=None, help="api.requests_per_second (default: ours)"
    )
    args = parser.parse_args()
    alone: list[float] = []
    loaded: list[float] = []
    rest_alone: list[tuple[float, float]] = []
    rest_loaded: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="nvswitch-dp-rest-bench-") as tmp:
        root = Path(tmp)
        extra: list[str] = []
        if args.rest_rate is not None:
            config = root / "config.yaml"
            config.write_text(f"version: v1\napi:\n  requests_per_second: {args.rest_rate}\n")
            extra = ["--config", str(config)]
        with simulated_node(root, extra_args=extra) as (daemon, kubelet):
            kubelet.allocate(f"{R}-4x", ["partition-1"])
            stub, channel = allocate_stub(daemon.plugin_dir / "nvswitch-dp-gpu-h200-4x.sock")
            url = daemon.url + "/v1/partitions"
            time_allocates(stub, 100, until=None)  # warm up
            for _ in range(args.rounds):
                wrk = start_wrk(url, args.seconds)
                rest_alone.append(parse_wrk(wrk.communicate()[0]))
                alone += time_allocates(stub, args.calls, until=None)
                wrk = start_wrk(url, args.seconds)
                time.sleep(0.5)  # let the connections open and the load settle
                loaded += time_allocates(stub, args.calls, until=wrk)
                rest_loaded.append(parse_wrk(wrk.communicate()[0]))
            # Control: the same wrk load on another process (Python's http.server). What
            # Allocate loses here is CPU sharing on this machine, not our event loop.
            control_port = free_port()
            other = subprocess.Popen(
                [sys.executable, "-m", "http.server", str(control_port), "--bind", "127.0.0.1"],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(1.0)
                wrk = start_wrk(f"http://127.0.0.1:{control_port}/", args.seconds)
                time.sleep(0.5)
                control = time_allocates(stub, args.calls, until=wrk)
                wrk.communicate()
            finally:
                other.terminate()
                other.wait(timeout=10)
            channel.close()

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    growth = percentile(loaded, 99) / percentile(alone, 99)
    rows = [
        (
            f"GET /v1/partitions, {CONNECTIONS} connections: requests/s",
            f"{mean([r for r, _ in rest_alone]):.0f}",
            f"{mean([r for r, _ in rest_loaded]):.0f}",
            "",
        ),
        (
            "GET /v1/partitions p99 (ms, wrk)",
            f"{mean([p for _, p in rest_alone]):.1f}",
            f"{mean([p for _, p in rest_loaded]):.1f}",
            "",
        ),
        ("Allocate calls timed", str(len(alone)), str(len(loaded)), ""),
        ("Allocate p50 (ms)", f"{percentile(alone, 50):.2f}", f"{percentile(loaded, 50):.2f}", ""),
        ("Allocate p99 (ms)", f"{percentile(alone, 99):.2f}", f"{percentile(loaded, 99):.2f}", ""),
        (
            "Allocate p99 growth under REST load",
            "",
            f"{(growth - 1) * 100:+.0f}%",
            f"<= +{(P99_GROWTH_TARGET - 1) * 100:.0f}%: "
            + ("met" if growth <= P99_GROWTH_TARGET else "MISSED"),
        ),
        (
            "Control: Allocate p99 growth, same wrk load on another process",
            "",
            f"{(percentile(control, 99) / percentile(alone, 99) - 1) * 100:+.0f}%",
            "CPU sharing alone",
        ),
    ]
    print("| measure | alone | beside the other load | target |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
