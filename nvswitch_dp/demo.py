"""The main job on the embedded default: a simulated HGX H200 node, end to end.

Runs the real daemon as a subprocess on a simulated node (sysfs/dev tree and Fabric
Manager simulator under a fresh state directory), with the grpcio kubelet stand-in
playing the kubelet: registration of every resource, one 4x allocation, the overlapping
partitions leaving the pool, the inventory over REST. Then it keeps serving until
Ctrl-C, and shuts the daemon down with SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from nvswitch_dp.status import status_main
from nvswitch_dp.testing.kubelet import KubeletStandIn

RESOURCE_PREFIX = "nvidia.com/gpu-h200"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _health_line(devices: dict[str, str]) -> str:
    return "  ".join(
        f"{d}:{'ok' if h == 'Healthy' else 'UNHEALTHY'}"
        for d, h in sorted(devices.items(), key=lambda kv: int(kv[0].split("-")[1]))
    )


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def run_demo(platform: str = "hgx-h200", api_listen: str = "127.0.0.1:9090") -> int:
    workdir = Path(tempfile.mkdtemp(prefix="nvswitch-dp-demo-"))
    plugin_dir = workdir / "device-plugins"
    plugin_dir.mkdir()
    _say(f"demo directory: {workdir}")
    kubelet = KubeletStandIn(plugin_dir)
    kubelet.start()
    command = [
        sys.executable, "-m", "nvswitch_dp", "run",
        "--simulate", platform,
        "--state-dir", str(workdir / "state"),
        "--plugin-dir", str(plugin_dir),
        "--api-listen", api_listen,
    ]  # fmt: skip
    _say("$ " + " ".join(command[2:]).replace("nvswitch_dp", "nvswitch-dp", 1))
    started = time.monotonic()
    # Its own session: Ctrl-C reaches only the demo, which then stops the daemon with
    # SIGTERM as a kubelet's node agent would.
    daemon = subprocess.Popen(command, start_new_session=True)
    try:
        return _walk_through(kubelet, daemon, started, api_listen)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        kubelet.stop()
        _say(f"daemon exited with status {daemon.returncode}")


def _walk_through(
    kubelet: KubeletStandIn, daemon: subprocess.Popen[bytes], started: float, api: str
) -> int:
    resources = [f"{RESOURCE_PREFIX}-{n}x" for n in (1, 2, 4, 8)]
    kubelet.wait_registered(resources, timeout=20)
    _say(f"\n1. registered {len(resources)} resources in {time.monotonic() - started:.2f} s:")
    for resource in resources:
        _say(f"   {resource:24} {_health_line(kubelet.devices(resource))}")

    four = f"{RESOURCE_PREFIX}-4x"
    available = [d for d, h in kubelet.devices(four).items() if h == "Healthy"]
    chosen = kubelet.preferred_allocation(four, available, [], 1)
    _say(f"\n2. GetPreferredAllocation({four}, available={available}) -> {chosen}")
    before = time.monotonic()
    response = kubelet.allocate(four, chosen)
    container = response.container_responses[0]
    _say(f"   Allocate({chosen}) answered in {1000 * (time.monotonic() - before):.1f} ms:")
    for spec in container.devices:
        _say(f"     device {spec.container_path}  (host {spec.host_path}, {spec.permissions})")
    for key, value in sorted(container.envs.items()):
        _say(f"     env    {key}={value}")
    for key, value in sorted(container.annotations.items()):
        _say(f"     annot. {key}={value}")

    inventory = _get_json(f"http://{api}/v1/partitions")["partitions"]
    taken = next(p for p in inventory if p["device_id"] == chosen[0])
    neighbours = {
        (p["resource"], p["device_id"])
        for p in inventory
        if p is not taken and set(p["modules"]) & set(taken["modules"])
    }

    def neighbours_unhealthy() -> bool:
        return all(kubelet.devices(r).get(d) == "Unhealthy" for r, d in neighbours)

    kubelet.wait_until(neighbours_unhealthy, timeout=5)
    _say(
        f"\n3. the {len(neighbours)} partitions sharing a GPU with {chosen[0]} "
        "left the pool (Unhealthy in their ListAndWatch):"
    )
    for resource in resources:
        _say(f"   {resource:24} {_health_line(kubelet.devices(resource))}")

    inventory = _get_json(f"http://{api}/v1/partitions")["partitions"]
    _say(f"\n4. GET http://{api}/v1/partitions")
    _say(f"   {'ID':>3} {'device':14} {'resource':24} {'GPUs':15} {'state':11} PCI addresses")
    for p in inventory:
        modules = ",".join(str(m) for m in p["modules"])
        _say(
            f"   {p['id']:>3} {p['device_id']:14} {p['resource']:24} {modules:15} "
            f"{p['state']:11} {' '.join(p['pci_addresses'])}"
        )
    _say(f"\n5. nvswitch-dp status --api http://{api}   (the operator's fabric map)\n")
    status_main(["--api", f"http://{api}"])
    ready = _get_json(f"http://{api}/readyz")
    _say(f"\n   /readyz: {ready}")
    _say(f"\nThe daemon keeps serving (REST on http://{api}); press Ctrl-C to stop it.")
    try:
        while daemon.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        _say("\nstopping the daemon (SIGTERM)")
        return 0
    _say("the daemon stopped on its own")
    return 1
