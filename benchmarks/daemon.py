"""Daemon benchmarks: Allocate latency beside a bare grpclib server, ListAndWatch
propagation, resident memory, start-to-registered time. Prints a Markdown table.

    python benchmarks/daemon.py [--calls 2000] [--starts 5]

Every number comes from real processes over real Unix sockets: the daemon runs
``nvswitch-dp run --simulate hgx-h200`` (simulator with no activation delay), the
kubelet is the grpcio stand-in, and the baseline is ``benchmarks/bare_server.py``, a
plain-asyncio grpclib server answering Allocate with a response of the same shape.
Calls alternate between the two servers so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nvswitch_dp.fabric.simulator import SimulatorStore, inject_fault
from testkit.harness import DaemonProcess
from testkit.kubelet import KubeletStandIn, load_api, unix_address

R = "nvidia.com/gpu-h200"
RESOURCES = [f"{R}-{n}x" for n in (1, 2, 4, 8)]
TOKEN = "bench-token"
TARGETS = {
    "allocate_ratio": 1.3,
    "propagation_ms": 10.0,
    "rss_mb": 80.0,
    "registered_s": 2.0,
}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def allocate_stub(socket_path: Path) -> tuple[Any, grpc.Channel]:
    api = load_api()
    channel = grpc.insecure_channel(unix_address(socket_path))
    grpc.channel_ready_future(channel).result(timeout=10)
    return api.deviceplugin_grpc.DevicePluginStub(channel), channel


def allocate_request(device: str) -> Any:
    pb = load_api().deviceplugin
    return pb.AllocateRequest(
        container_requests=[pb.ContainerAllocateRequest(devices_ids=[device])]
    )


def start_node(workdir: Path) -> tuple[KubeletStandIn, DaemonProcess, float]:
    """A stand-in and a daemon; returns the seconds from spawn to all registered."""
    plugin_dir = workdir / "device-plugins"
    plugin_dir.mkdir(parents=True)
    kubelet = KubeletStandIn(plugin_dir).start()
    token = workdir / "token"
    token.write_text(TOKEN)
    config = workdir / "config.yaml"
    config.write_text(f"version: v1\napi:\n  token_file: {token}\n")
    daemon = DaemonProcess(workdir, plugin_dir, extra_args=["--config", str(config)]).start()
    kubelet.wait_registered(RESOURCES, timeout=30)
    registered = max(p.registered_at for p in kubelet.registered().values())
    return kubelet, daemon, registered - daemon.started_at


def propagation_ms(kubelet: KubeletStandIn) -> float:
    """Allocate partition-1 (4x) and time until the 8x and 2x streams report the change."""
    begin = time.monotonic()
    kubelet.allocate(f"{R}-4x", ["partition-1"])
    kubelet.wait_until(
        lambda: (
            kubelet.devices(f"{R}-8x") == {"partition-0": "Unhealthy"}
            and kubelet.devices(f"{R}-2x")["partition-4"] == "Unhealthy"
        ),
        timeout=5,
    )
    arrived = [
        next(u.timestamp for u in kubelet.updates(f"{R}-8x") if u.timestamp >= begin),
        next(
            u.timestamp
            for u in kubelet.updates(f"{R}-2x")
            if u.timestamp >= begin and u.devices.get("partition-4") == "Unhealthy"
        ),
    ]
    return 1000 * (max(arrived) - begin)


def reregister_ms(kubelet: KubeletStandIn, restarts: int) -> list[float]:
    """Kubelet restarts: time from the new kubelet.sock to every resource registered."""
    samples = []
    for _ in range(restarts):
        kubelet.restart()
        begin = time.monotonic()
        kubelet.wait_until(functools.partial(_registered_since, kubelet, begin), timeout=10)
        latest = max(p.registered_at for p in kubelet.registered().values())
        samples.append(1000 * (latest - begin))
    return samples


def allocate_with_activation(daemon: DaemonProcess, stub: Any, cycles: int) -> list[float]:
    """Allocate partition-2 while inactive (FM activation included), then deactivate it
    through the REST API (forced: it is held) outside the timed part."""
    request = allocate_request("partition-2")
    samples = []
    for _ in range(cycles):
        begin = time.perf_counter()
        stub.Allocate(request, timeout=5)
        samples.append(1000 * (time.perf_counter() - begin))
        post = urllib.request.Request(
            f"{daemon.url}/v1/partitions/2/deactivate",
            data=b'{"force": true}',
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(post, timeout=5) as response:
            assert response.status == 200
    return samples


def _registered_since(kubelet: KubeletStandIn, since: float) -> bool:
    plugins = kubelet.registered()
    return all(r in plugins and plugins[r].registered_at > since for r in RESOURCES)


def fm_resync_s(daemon: DaemonProcess, kubelet: KubeletStandIn, restarts: int) -> list[float]:
    """FM restarts (simulator): time until the daemon's set-activated resumed FM."""
    store = SimulatorStore(daemon.fm_state_file, "hgx-h200")
    samples = []
    for _ in range(restarts):
        sim = store.load()
        inject_fault(sim, "restart")
        store.save(sim)
        begin = time.monotonic()
        kubelet.wait_until(lambda: not store.load().awaiting_set_activated, timeout=60)
        samples.append(time.monotonic() - begin)
    return samples


def build_fake_libnvfm(root: Path) -> Path:
    """The fake ``libnvfm.so`` of the tests (``tests/fakes/libnvfm_fake.c``), built with gcc."""
    source = Path(__file__).resolve().parent.parent / "tests" / "fakes" / "libnvfm_fake.c"
    out = root / "libnvfm_fake.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(source)], check=True)
    return out


class FmRestarts:
    """Restart FM and read whether it was resumed, for one backend's stand-in."""

    def __init__(self, backend: str, state: Path) -> None:
        self.backend = backend
        self.state = state

    def restart(self) -> None:
        if self.backend == "libnvfm":  # "active <mask>\nawaiting <0|1>\ndown <0|1>\n"
            fields: dict[str, str] = {}
            while "awaiting" not in fields:  # the library may be rewriting it this moment
                fields = dict(line.split() for line in self.state.read_text().splitlines())
            fields["awaiting"] = "1"
            self.state.write_text("".join(f"{k} {v}\n" for k, v in fields.items()))
            return
        store = SimulatorStore(self.state, "hgx-h200")
        sim = store.load()
        inject_fault(sim, "restart")
        store.save(sim)

    def resumed_with(self, partition: int) -> bool:
        if self.backend == "libnvfm":
            try:  # the library rewrites the file in place: a read may catch it half done
                fields = dict(line.split() for line in self.state.read_text().splitlines())
                return fields["awaiting"] == "0" and bool(int(fields["active"]) >> partition & 1)
            except (KeyError, ValueError):
                return False
        sim = SimulatorStore(self.state, "hgx-h200").load()
        return not sim.awaiting_set_activated and partition in sim.active


def fm_restart_by_backend(root: Path, restarts: int) -> dict[str, list[float]]:
    """For each backend with default settings: FM restarted while partition 3 is held,
    time until FM was told set-activated naming it (its state file says so). Restarts
    are spaced by a random fraction of a second so they fall at every phase of the
    supervision period."""
    import random

    from testkit.faults import fake_fmpm_path
    from testkit.harness import simulated_node

    rng = random.Random(16)
    library = build_fake_libnvfm(root)
    results: dict[str, list[float]] = {}
    for backend in ("simulator", "fmpm", "libnvfm"):
        workdir = root / f"fm-{backend}"
        workdir.mkdir()
        args: list[str] = []
        env = None
        state = workdir / "state" / "fabricmanager.state"
        if backend == "fmpm":
            state = workdir / "fm.state"
            args = ["--fm-backend", "fmpm", "--fmpm-path", fake_fmpm_path()]
            env = {**os.environ, "NVSWITCH_DP_FMPM_SIM_STATE": str(state)}
        elif backend == "libnvfm":
            state = workdir / "fm.state"
            config = workdir / "config.yaml"
            config.write_text(f"version: v1\nfabric_manager:\n  libnvfm_path: {library}\n")
            args = ["--config", str(config), "--fm-backend", "libnvfm"]
            env = {**os.environ, "NVSWITCH_DP_FAKE_NVFM_STATE": str(state)}
        fm = FmRestarts(backend, state)
        samples = []
        with simulated_node(workdir, extra_args=args, env=env) as (_daemon, kubelet):
            kubelet.allocate(f"{R}-2x", ["partition-3"])
            for _ in range(restarts):
                time.sleep(rng.uniform(0.2, 1.2))
                fm.restart()
                begin = time.monotonic()
                kubelet.wait_until(functools.partial(fm.resumed_with, 3), timeout=60)
                samples.append(time.monotonic() - begin)
        results[backend] = samples
    return results


def fm_restart_rows(results: dict[str, list[float]]) -> list[tuple[str, str, str, str]]:
    return [
        (
            f"FM restart to set-activated naming the held partition, {backend}, median / max (s)",
            f"{statistics.median(samples):.2f} / {max(samples):.2f}",
            "<= 2",
            _ok(max(samples) <= 2),
        )
        for backend, samples in results.items()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--activations", type=int, default=300)
    parser.add_argument("--kubelet-restarts", type=int, default=20)
    parser.add_argument("--fm-restarts", type=int, default=10)
    parser.add_argument(
        "--only-fm-restarts",
        action="store_true",
        help="measure only FM restart to set-activated, on every backend",
    )
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []
    if args.only_fm_restarts:
        with tempfile.TemporaryDirectory(prefix="nvswitch-dp-bench-") as tmp:
            rows = fm_restart_rows(fm_restart_by_backend(Path(tmp), args.fm_restarts))
        print("| measure | value | target | |")
        print("|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return 0
    with tempfile.TemporaryDirectory(prefix="nvswitch-dp-bench-") as tmp:
        root = Path(tmp)
        starts: list[float] = []
        propagations: list[float] = []
        for i in range(args.starts):
            kubelet, daemon, seconds = start_node(root / f"start-{i}")
            starts.append(seconds)
            propagations.append(propagation_ms(kubelet))
            if i < args.starts - 1:
                daemon.terminate()
                kubelet.stop()

        # Allocate: the daemon (partition-1 already active: the claim path, no FM call)
        # against the bare server, interleaved.
        bare_socket = root / "bare.sock"
        bare = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).parent / "bare_server.py"),
                "--socket",
                str(bare_socket),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert bare.stdout is not None and bare.stdout.readline().strip() == "serving"
        ours_stub, ours_channel = allocate_stub(daemon.plugin_dir / "nvswitch-dp-gpu-h200-4x.sock")
        bare_stub, bare_channel = allocate_stub(bare_socket)
        request = allocate_request("partition-1")
        for stub in (ours_stub, bare_stub):  # warm up both
            for _ in range(50):
                stub.Allocate(request, timeout=5)
        ours: list[float] = []
        baseline: list[float] = []
        for _ in range(args.calls):
            for stub, samples in ((ours_stub, ours), (bare_stub, baseline)):
                begin = time.perf_counter()
                stub.Allocate(request, timeout=5)
                samples.append(1000 * (time.perf_counter() - begin))
        activating = allocate_with_activation(daemon, ours_stub, args.activations)
        rss = rss_mb(daemon.process.pid)  # type: ignore[union-attr]
        reregister = reregister_ms(kubelet, args.kubelet_restarts)
        resync = fm_resync_s(daemon, kubelet, args.fm_restarts)
        ours_channel.close()
        bare_channel.close()
        bare.terminate()
        bare.wait(timeout=10)
        code, stop_seconds = daemon.terminate()
        kubelet.stop()
        by_backend = fm_restart_by_backend(root, args.fm_restarts)

    p99_ratio = percentile(ours, 99) / percentile(baseline, 99)
    rows += [
        ("Allocate p50, daemon (ms)", f"{percentile(ours, 50):.2f}", "", f"{args.calls} calls"),
        ("Allocate p99, daemon (ms)", f"{percentile(ours, 99):.2f}", "", ""),
        ("Allocate p50, bare grpclib (ms)", f"{percentile(baseline, 50):.2f}", "", ""),
        ("Allocate p99, bare grpclib (ms)", f"{percentile(baseline, 99):.2f}", "", ""),
        (
            "Allocate with FM activation p50 / p99, daemon (ms)",
            f"{percentile(activating, 50):.2f} / {percentile(activating, 99):.2f}",
            "",
            f"{args.activations} calls, simulator",
        ),
        (
            "Allocate p99 ratio daemon/bare",
            f"{p99_ratio:.2f}",
            f"<= {TARGETS['allocate_ratio']}",
            _ok(p99_ratio <= TARGETS["allocate_ratio"]),
        ),
        (
            "ListAndWatch propagation, median / max (ms)",
            f"{statistics.median(propagations):.1f} / {max(propagations):.1f}",
            f"<= {TARGETS['propagation_ms']:g}",
            _ok(max(propagations) <= TARGETS["propagation_ms"]),
        ),
        ("Daemon RSS after the Allocate run (MB)", f"{rss:.1f}", "<= 80", _ok(rss <= 80)),
        (
            "Start to all registered, median / max (s)",
            f"{statistics.median(starts):.2f} / {max(starts):.2f}",
            "<= 2",
            _ok(max(starts) <= 2),
        ),
        (
            "Re-registered after a kubelet restart, median / max (ms)",
            f"{statistics.median(reregister):.0f} / {max(reregister):.0f}",
            "<= 1000",
            _ok(max(reregister) <= 1000),
        ),
        (
            "FM resumed after an FM restart, median / max (s)",
            f"{statistics.median(resync):.1f} / {max(resync):.1f}",
            "< 60 (FM's window)",
            _ok(max(resync) < 60),
        ),
        *fm_restart_rows(by_backend),
        (
            "SIGTERM to exit (s), exit status",
            f"{stop_seconds:.2f}, {code}",
            "<= 3, 0",
            _ok(stop_seconds <= 3 and code == 0),
        ),
    ]
    print("| measure | value | target | |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


def _ok(passed: bool) -> str:
    return "met" if passed else "MISSED"


if __name__ == "__main__":
    raise SystemExit(main())
