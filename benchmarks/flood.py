"""A connection flood on the REST port under a low descriptor limit, with a kubelet
restart in the middle. Prints a Markdown table.

    python benchmarks/flood.py [--seconds 60] [--idle 2000] [--nofile 256]

The daemon runs as ``prlimit --nofile=N:N nvswitch-dp run --simulate hgx-h200`` with the
grpcio kubelet stand-in. For ``--seconds``: one thread keeps up to ``--idle`` idle,
unauthenticated TCP connections open to the REST port (reopening every one the daemon
resets), another connects and closes as fast as it can (a reconnect storm), and the
kubelet sends an Allocate of an active partition every 20 ms; halfway the kubelet
restarts (every plugin socket deleted, served and registered again). Then the flood
stops, and the time until ``/readyz`` is 200 and an Allocate answers again is measured.
Issue 16's bar: the daemon never exits, Allocate p99 < 50 ms, recovered within 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.harness import simulated_node

R = "nvidia.com/gpu-h200"
RESOURCES = [f"{R}-{n}x" for n in (1, 2, 4, 8)]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Flood:
    """The two attacking threads; counts what they did."""

    def __init__(self, port: int, idle: int) -> None:
        self.port = port
        self.idle = idle
        self.stop = threading.Event()
        self.connects = 0
        self.storm_connects = 0
        self.max_open = 0

    def hold_idle(self) -> None:
        held: list[socket.socket] = []
        while not self.stop.is_set():
            # Drop those the daemon reset or closed, then open more up to the target.
            alive = []
            for sock in held:
                try:
                    if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                        sock.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
                    continue
                alive.append(sock)
            held = alive
            while len(held) < self.idle and not self.stop.is_set():
                try:
                    held.append(socket.create_connection(("127.0.0.1", self.port), timeout=1))
                    self.connects += 1
                except OSError:
                    break
            self.max_open = max(self.max_open, len(held))
            time.sleep(0.05)
        for sock in held:
            sock.close()

    def storm(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                self.storm_connects += 1


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--nofile", type=int, default=256)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker needs fds
    prefix = ["prlimit", f"--nofile={args.nofile}:{args.nofile}"]
    latencies: list[float] = []
    refused_during_restart = 0
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulated_node(Path(tmp), command_prefix=prefix) as (daemon, kubelet),
    ):
        kubelet.allocate(f"{R}-1x", ["partition-7"])  # active from now on: the fast path
        flood = Flood(daemon.port, args.idle)
        threads = [threading.Thread(target=flood.hold_idle), threading.Thread(target=flood.storm)]
        for thread in threads:
            thread.start()
        begin = time.monotonic()
        restarted = False
        reregistered_s = float("nan")
        try:
            while time.monotonic() - begin < args.seconds:
                if not restarted and time.monotonic() - begin > args.seconds / 2:
                    restarted = True
                    t0 = time.monotonic()
                    kubelet.restart()
                    kubelet.wait_registered(RESOURCES, timeout=30)
                    reregistered_s = time.monotonic() - t0
                t0 = time.perf_counter()
                try:
                    kubelet.allocate(f"{R}-1x", ["partition-7"], timeout=5)
                    latencies.append(time.perf_counter() - t0)
                except Exception as exc:  # counted: the bar is none outside the restart
                    failures.append(type(exc).__name__)
                    refused_during_restart += 1
                daemon.check_alive()
                time.sleep(0.02)
        finally:
            flood.stop.set()
            for thread in threads:
                thread.join()
        stopped = time.monotonic()
        while not ready(daemon.url):
            daemon.check_alive()
            time.sleep(0.05)
        kubelet.allocate(f"{R}-1x", ["partition-7"], timeout=5)
        recovered_s = time.monotonic() - stopped
        _status, metrics = daemon.get("/metrics")
        refused = sum(
            float(line.rsplit(" ", 1)[1])
            for line in str(metrics).splitlines()
            if line.startswith("hgx_h200_api_connections_refused_total")
        )
        log = daemon.log_text()
        log_kb = len(log) / 1024
        kinds = Counter(" ".join(line.split()[1:4])[:90] for line in log.splitlines())
        code, _ = daemon.terminate()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    ms = [x * 1000 for x in latencies]
    rows = [
        ("flood (s) / descriptor limit", f"{args.seconds:g} / {args.nofile}"),
        ("idle connections held at most / opened in all", f"{flood.max_open} / {flood.connects}"),
        ("reconnect-storm connects", f"{flood.storm_connects}"),
        ("REST connections refused by the daemon (metric)", f"{refused:.0f}"),
        ("Allocates answered / failed", f"{len(latencies)} / {len(failures)}"),
        (
            "Allocate p50 / p99 / max (ms)",
            f"{percentile(ms, 50):.2f} / {percentile(ms, 99):.2f} / {max(ms):.2f}",
        ),
        ("re-registered after the kubelet restart (s)", f"{reregistered_s:.2f}"),
        ("flood stopped to ready and allocating (s)", f"{recovered_s:.2f}"),
        ("daemon log (KB)", f"{log_kb:.0f}"),
        ("exit status on SIGTERM", f"{code}"),
    ]
    print("| measure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if failures:
        print(f"\nfailed Allocates: {sorted(set(failures))}")
    print("\nmost frequent log lines:", *kinds.most_common(4), sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
