"""The main job on the embedded default: a simulated HGX H200 node, end to end.

Starts from a simulated node as a freshly installed one is: every GPU on the ``nvidia``
driver (sysfs, /dev and /proc trees whose driver-binding files behave as the kernel's, a
simulated ``nvidia-smi``). ``nvswitch-dp prepare-node`` reads the module IDs into the
node inventory and binds the GPUs to vfio-pci; then the real daemon runs as a subprocess
with a configuration that sets no ``module_map`` (Fabric Manager simulator under the
same state directory), with the grpcio kubelet stand-in playing the kubelet:
registration of every resource, one 4x allocation, the overlapping partitions leaving
the pool, the inventory over REST. Then it keeps serving until
Ctrl-C (or, with ``wait=False``, stops at once), and shuts the daemon down with SIGTERM.

:func:`run_dra_demo` (``nvswitch-dp demo --mode dra``) does the same in DRA mode, with
the API-server stand-in, the DRA kubelet stand-in and the counter-honouring scheduler
stand-in around the daemon: the published pool, a claim for a 4-GPU partition allocated
by the scheduler, Prepare (FM active, the CDI spec), a KubeVirt-style claim of four GPUs
on one partition (with its device metadata file), and Unprepare (FM inactive again).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvswitch_dp.status import status_main
from testkit.kubelet import KubeletStandIn

if TYPE_CHECKING:
    from testkit.dra_cluster import DraCluster

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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _demo_session(prefix: str) -> Iterator[Path]:
    """A fresh demo directory, removed at the end, however the demo ends.

    SIGTERM and SIGHUP end the demo as Ctrl-C does, so the daemon it started is always
    stopped (it runs in its own session, where a signal to the demo does not reach it)
    and nothing it wrote is left behind.
    """
    signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _interrupt) for s in signals}
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    _say(f"demo directory: {workdir}")
    try:
        yield workdir
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        shutil.rmtree(workdir, ignore_errors=True)
        _say(f"removed {workdir}")


def run_demo(
    platform: str = "hgx-h200", api_listen: str = "127.0.0.1:9090", *, wait: bool = True
) -> int:
    """``nvswitch-dp demo``: the walk-through of the module docstring; the exit status
    (130 when interrupted before the walk-through ended)."""
    try:
        with _demo_session("nvswitch-dp-demo-") as workdir:
            return _run_demo(workdir, platform, api_listen, wait)
    except KeyboardInterrupt:
        return 130


def _run_demo(workdir: Path, platform: str, api_listen: str, wait: bool) -> int:
    plugin_dir = workdir / "device-plugins"
    plugin_dir.mkdir()
    config = _prepare_node(workdir, platform)
    if config is None:
        return 1
    kubelet = KubeletStandIn(plugin_dir)
    kubelet.start()
    command = [
        sys.executable, "-m", "nvswitch_dp", "run",
        "--config", str(config),
        "--plugin-dir", str(plugin_dir),
        "--api-listen", api_listen,
    ]  # fmt: skip
    _say("$ " + " ".join(command[2:]).replace("nvswitch_dp", "nvswitch-dp", 1))
    started = time.monotonic()
    # Its own session: Ctrl-C reaches only the demo, which then stops the daemon with
    # SIGTERM as a kubelet's node agent would.
    daemon = subprocess.Popen(command, start_new_session=True)
    try:
        return _walk_through(kubelet, daemon, started, api_listen, wait)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        kubelet.stop()
        _say(f"daemon exited with status {daemon.returncode}")


def _prepare_node(workdir: Path, platform_name: str) -> Path | None:
    """A simulated node with its GPUs on nvidia, prepared by ``prepare-node``; the
    configuration the daemon then runs with (no ``module_map``), or ``None`` if the
    preparation failed (its output says why)."""
    from nvswitch_dp.fabric.platforms import platform
    from nvswitch_dp.vfio.nvidia_smi_sim import install_nvidia_smi
    from nvswitch_dp.vfio.simulate import build_simulated_node

    node = build_simulated_node(workdir / "node", platform(platform_name), gpu_driver="nvidia")
    nvidia_smi = install_nvidia_smi(node)
    config = workdir / "config.yaml"
    config.write_text(
        "version: v1\n"
        f"state_dir: {workdir / 'state'}\n"
        f"fabric_manager:\n  backend: simulator\n  simulator_platform: {platform_name}\n"
        f"vfio:\n  sysfs_root: {node.sysfs_root}\n  dev_root: {node.dev_root}\n"
    )
    command = [
        sys.executable, "-m", "nvswitch_dp", "prepare-node",
        "--config", str(config),
        "--proc-root", str(node.proc_root),
        "--nvidia-smi", str(nvidia_smi),
        "--bind-vfio",
    ]  # fmt: skip
    _say(
        f"\n0. a new node: {len(node.module_map)} GPUs on the nvidia driver, no module_map "
        "in the configuration. Preparing it:"
    )
    _say("$ " + " ".join(command[2:]).replace("nvswitch_dp", "nvswitch-dp", 1))
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    for line in (result.stdout + result.stderr).splitlines():
        _say(f"   {line}")
    if result.returncode != 0:
        _say(f"prepare-node exited with status {result.returncode}")
        return None
    return config


def _walk_through(
    kubelet: KubeletStandIn, daemon: subprocess.Popen[bytes], started: float, api: str, wait: bool
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
    return _serve_until_interrupted(daemon, api, wait)


def _serve_until_interrupted(daemon: subprocess.Popen[bytes], api: str, wait: bool) -> int:
    if not wait:
        _say("\nstopping the daemon (SIGTERM)")
        return 0
    try:  # the line is inside: a signal the moment it is read still stops cleanly
        _say(f"\nThe daemon keeps serving (REST on http://{api}); press Ctrl-C to stop it.")
        while daemon.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        _say("\nstopping the daemon (SIGTERM)")
        return 0
    _say("the daemon stopped on its own")
    return 1


# -- DRA mode ---------------------------------------------------------------------------


def run_dra_demo(
    platform: str = "hgx-h200", api_listen: str = "127.0.0.1:9090", *, wait: bool = True
) -> int:
    """``nvswitch-dp demo --mode dra``: the walk-through of the module docstring.

    The API server, the kubelet and the scheduler are stand-ins (the API server in this
    process, over real HTTP; the kubelet over gRPC on real Unix sockets); the daemon is
    the real one, as a process. Returns the exit status.
    """
    host, _, port = api_listen.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        _say(f"nvswitch-dp demo --mode dra: --api-listen must be 127.0.0.1:PORT, got {api_listen}")
        return 2
    try:
        with _demo_session("nvswitch-dp-dra-demo-") as workdir:
            return _run_dra_demo(workdir, platform, api_listen, int(port), wait)
    except KeyboardInterrupt:
        return 130


def _run_dra_demo(workdir: Path, platform: str, api_listen: str, port: int, wait: bool) -> int:
    from testkit.dra_cluster import DraCluster

    with DraCluster(workdir, platform=platform) as cluster:
        _say(f"API-server stand-in on {cluster.api.url}; DRA kubelet stand-in watching "
             f"{cluster.registry_dir}")  # fmt: skip
        started = time.monotonic()
        daemon = cluster.start_daemon(api_port=port)
        command = daemon.command[2:]
        _say("$ " + " ".join(command).replace("nvswitch_dp", "nvswitch-dp", 1))
        cluster.wait_published()
        status = _dra_walk_through(cluster, started)
        assert daemon.process is not None
        if status == 0:
            status = _serve_until_interrupted(daemon.process, api_listen, wait)
    _say(f"daemon exited with status {daemon.process.returncode}")
    return status


def _dra_walk_through(cluster: DraCluster, started: float) -> int:
    from testkit.dra_allocator import gpu_claim, partition_claim

    driver = cluster.driver
    slices = cluster.slices()
    devices = [d for s in slices for d in s["spec"].get("devices") or []]
    counters = [c for s in slices for c in s["spec"].get("sharedCounters") or []]
    _say(
        f"\n1. the kubelet registered {driver}, and the pool of {cluster.node_name} is "
        f"published, {time.monotonic() - started:.2f} s after the start: {len(slices)} "
        f"ResourceSlices (generation {slices[0]['spec']['pool']['generation']})"
    )
    for counter_set in counters:
        _say(f"   counter set {counter_set['name']}: {', '.join(counter_set['counters'])} (1 each)")
    _say(f"   {'device':13} {'kind':9} {'size':4}  consumes")
    for device in devices:
        attributes = device["attributes"]
        kind = attributes["kind"]["string"]
        size = attributes["size"]["int"] if kind == "partition" else 1
        consumed = ",".join(c for e in device["consumesCounters"] for c in e["counters"])
        _say(f"   {device['name']:13} {kind:9} {size:>4}  {consumed}")

    pod = cluster.create_claim(partition_claim(4), name="pod-4x-gpus")
    (chosen,) = cluster.allocated(pod)
    _say(
        f"\n2. ResourceClaim {pod.name}: one device of class partition-4x.{driver}; the "
        f"scheduler stand-in (honouring the counters) allocates {chosen}"
    )
    before = time.monotonic()
    answer = cluster.prepare(pod)
    _say(
        f"   NodePrepareResources answered in {1000 * (time.monotonic() - before):.1f} ms: "
        f"{answer.error or answer.cdi_device_ids}"
    )
    _say(f"   Fabric Manager active partitions: {cluster.fm_active()}")
    _say(f"   CDI spec {cluster.cdi.spec_path(pod.uid)}:")
    for line in json.dumps(cluster.cdi_spec(pod), indent=2).splitlines():
        _say(f"     {line}")

    bad = cluster.create_claim(
        gpu_claim(3), name="vm-three-gpus", devices=["gpu-5", "gpu-6", "gpu-7"]
    )
    refused = cluster.prepare(bad)
    _say(f"\n3. a claim allocated three GPUs (gpu-5, gpu-6, gpu-7) is refused:\n   {refused.error}")
    cluster.delete_claim(bad)

    vm = cluster.create_claim(gpu_claim(4, "partition4x"), name="vm-4x", pod_claim_name="gpus")
    _say(
        f"\n4. KubeVirt-style ResourceClaim {vm.name} (from a template, pod claim 'gpus'): "
        f"requests gpu0..gpu3 of class gpu.{driver}, matchAttribute "
        f"{driver}/partition4x; the scheduler allocates {cluster.allocated(vm)}"
    )
    answer = cluster.prepare(vm)
    _say(f"   NodePrepareResources: {answer.error or answer.cdi_device_ids}")
    _say(f"   Fabric Manager active partitions: {cluster.fm_active()}")
    spec = cluster.cdi_spec(vm) or {}
    mounts = spec.get("devices", [{}])[0].get("containerEdits", {}).get("mounts", [])
    _say(
        f"   {len(mounts)} device metadata files mounted read-only, one per request; "
        f"{mounts[0]['containerPath']}:"
    )
    text = json.dumps(json.loads(Path(mounts[0]["hostPath"]).read_text()))
    for line in textwrap.wrap(text, 92):
        _say(f"     {line}")
    left = cluster.allocator().allocate(partition_claim(1))
    _say(f"\n5. every GPU is allocated now; a further 1-GPU claim: {left or 'not allocatable'}")

    _say("\n6. the pods end: the kubelet unprepares both claims")
    for claim in (pod, vm):
        error = cluster.unprepare(claim)
        _say(f"   NodeUnprepareResources {claim.name}: {error or 'done'}")
        cluster.delete_claim(claim)

    def settled() -> bool:
        return not cluster.fm_active()

    cluster.wait(settled, 10, "every partition deactivated")
    gone = all(cluster.cdi_spec(c) is None for c in (pod, vm))
    _say(f"   Fabric Manager active partitions: {cluster.fm_active()}; CDI specs removed: {gone}")
    assert cluster.daemon is not None
    _, ready = cluster.daemon.get("/readyz")
    _say(f"\n7. /readyz: {ready}")
    return 0
