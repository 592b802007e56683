"""``nvswitch-dp demo --mode dra``: the DRA mode on a simulated node, with its cluster.

The shape of :mod:`nvswitch_dp.demo.session` (a new node, ``prepare-node``, the real
daemon as a process), with the cluster around it played by this package: the API server
(:mod:`.apiserver`, over real HTTP, in a thread of this process), the scheduler
(:class:`~nvswitch_dp.demo.cluster.ControlPlane`, honouring the shared counters) and the
DRA kubelet (:mod:`.dra_kubelet`, grpclib, on real Unix sockets). The walk-through:

1. the kubelet registers the driver, which publishes its pool (ResourceSlices);
2. a claim for a 4-GPU partition, allocated by the scheduler, prepared by the kubelet:
   the partition active in FM, the CDI spec written;
3. a claim allocated three GPUs that are no partition is refused;
4. a KubeVirt-style claim of four GPUs on one partition, with its device metadata files;
5. nothing is left to allocate; 6. the pods end, both claims are unprepared, FM has
   nothing active and the CDI specs are gone;
7. the REST API with its bearer token; 8. ``/readyz``.
"""

from __future__ import annotations

import functools
import json
import secrets
import textwrap
from pathlib import Path
from typing import Any

import trio

from nvswitch_dp.config import DEFAULT_DRA_DRIVER
from nvswitch_dp.demo.apiserver import ApiServer
from nvswitch_dp.demo.cluster import ClaimSpec, ControlPlane, cdi_spec, fm_active, pool_complete
from nvswitch_dp.demo.dra_allocator import Claim, gpu_claim, partition_claim
from nvswitch_dp.demo.dra_kubelet import DemoDraKubelet
from nvswitch_dp.demo.session import (
    Daemon,
    DemoFailed,
    Session,
    prepare_node,
    rest,
    run_session,
    running_daemon,
    say,
    serve_until_interrupted,
    show_rest_access,
    wait_for_api,
    wait_until,
)
from nvswitch_dp.dra.cdi import CdiDirectory

NODE = "hgx-node-1"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


def run_dra_demo(
    platform: str = "hgx-h200", api_listen: str = "127.0.0.1:9090", *, wait: bool = True
) -> int:
    """``nvswitch-dp demo --mode dra``: the walk-through of the module docstring; the exit
    status (130 when interrupted before the walk-through ended, 1 when a step failed)."""
    body = functools.partial(_demo, platform=platform, wait=wait)
    return run_session("nvswitch-dp-dra-demo-", api_listen, body)


class _Cluster:
    """The demo's cluster: where things are, the control plane, the kubelet."""

    def __init__(self, session: Session, api: ApiServer) -> None:
        workdir = session.workdir
        self.session = session
        self.api = api
        self.driver = DEFAULT_DRA_DRIVER
        self.registry_dir = workdir / "plugins_registry"
        self.plugin_dir = workdir / "plugins" / self.driver
        self.cdi_dir = workdir / "cdi"
        self.kubeconfig = api.write_kubeconfig(workdir / "kubeconfig")
        self.control = ControlPlane(api.store, NODE, self.driver)
        self.kubelet = DemoDraKubelet(self.registry_dir)
        socket = self.plugin_dir / "dra.sock"
        if len(str(socket).encode()) > MAX_SOCKET_PATH:
            raise DemoFailed(
                f"{socket} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} "
                "bytes): set TMPDIR to a shorter directory"
            )

    def settings(self) -> dict[str, Any]:
        """The mode's configuration sections."""
        return {
            "plugin": {"mode": "dra"},
            "dra": {
                "node_name": NODE,
                "kubeconfig": str(self.kubeconfig),
                "driver_name": self.driver,
                "plugin_registry_dir": str(self.registry_dir),
                "plugin_dir": str(self.plugin_dir),
                "cdi_dir": str(self.cdi_dir),
            },
        }

    async def create_claim(self, claim: Claim, **options: Any) -> ClaimSpec:
        """A ResourceClaim allocated by the scheduler (which may wait for a pool being
        rewritten: in a worker thread)."""
        create = functools.partial(self.control.create_claim, claim, **options)
        return await trio.to_thread.run_sync(create)

    async def prepare(self, claim: ClaimSpec) -> Any:
        return (await self.kubelet.prepare(self.driver, [claim]))[claim.uid]

    async def unprepare(self, claim: ClaimSpec) -> str:
        return (await self.kubelet.unprepare(self.driver, [claim]))[claim.uid]

    def fm_active(self) -> list[int]:
        return fm_active(self.session.fm_state_file)


async def _demo(session: Session, *, platform: str, wait: bool) -> int:
    # The API server's own token (the daemon's kubeconfig holds it), not the REST API's.
    with ApiServer(token=secrets.token_urlsafe(16)) as api:
        cluster = _Cluster(session, api)
        config = await prepare_node(session, platform, cluster.settings())
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.kubelet.watch)
            say(
                f"\nthe cluster: an API server on {api.url}; the scheduler; the DRA "
                f"kubelet (grpclib) watching {cluster.registry_dir}"
            )
            async with running_daemon(session, config) as daemon:
                await _walk_through(cluster, daemon)
                status = await serve_until_interrupted(session, daemon, wait)
            nursery.cancel_scope.cancel()
    return status


async def _walk_through(cluster: _Cluster, daemon: Daemon) -> None:
    session = cluster.session
    await wait_for_api(session, daemon)
    took = await wait_until(
        lambda: cluster.driver in cluster.kubelet.drivers and cluster.kubelet.registrations > 0,
        20,
        f"the kubelet to register {cluster.driver}",
        daemon,
    )
    await wait_until(
        lambda: pool_complete(cluster.control.slices()), 20, "the pool to be published", daemon
    )
    _show_pool(cluster, took)
    pod = await _prepare_pod_claim(cluster)
    bad = await cluster.create_claim(
        gpu_claim(3), name="vm-three-gpus", devices=["gpu-5", "gpu-6", "gpu-7"]
    )
    refused = await cluster.prepare(bad)
    say(f"\n3. a claim allocated three GPUs (gpu-5, gpu-6, gpu-7) is refused:\n   {refused.error}")
    cluster.control.delete_claim(bad)
    vm = await _prepare_vm_claim(cluster)
    left = cluster.control.allocator().allocate(partition_claim(1))
    say(f"\n5. every GPU is allocated now; a further 1-GPU claim: {left or 'not allocatable'}")

    say("\n6. the pods end: the kubelet unprepares both claims")
    for claim in (pod, vm):
        error = await cluster.unprepare(claim)
        say(f"   NodeUnprepareResources {claim.name}: {error or 'done'}")
        cluster.control.delete_claim(claim)
    await wait_until(lambda: not cluster.fm_active(), 10, "every partition deactivated", daemon)
    gone = all(cdi_spec(cluster.cdi_dir, c) is None for c in (pod, vm))
    say(f"   Fabric Manager active partitions: {cluster.fm_active()}; CDI specs removed: {gone}")
    await show_rest_access(session, 7)
    say(f"\n8. /readyz: {await rest(session, '/readyz')}")


def _show_pool(cluster: _Cluster, took: float) -> None:
    slices = cluster.control.slices()
    devices = [d for s in slices for d in s["spec"].get("devices") or []]
    counters = [c for s in slices for c in s["spec"].get("sharedCounters") or []]
    say(
        f"\n1. the kubelet registered {cluster.driver} ({took:.2f} s after the API answered), "
        f"and the pool of {NODE} is published: {len(slices)} ResourceSlices (generation "
        f"{slices[0]['spec']['pool']['generation']})"
    )
    for counter_set in counters:
        say(f"   counter set {counter_set['name']}: {', '.join(counter_set['counters'])} (1 each)")
    say(f"   {'device':13} {'kind':9} {'size':4}  consumes")
    for device in devices:
        attributes = device["attributes"]
        kind = attributes["kind"]["string"]
        size = attributes["size"]["int"] if kind == "partition" else 1
        consumed = ",".join(c for e in device["consumesCounters"] for c in e["counters"])
        say(f"   {device['name']:13} {kind:9} {size:>4}  {consumed}")


async def _prepare_pod_claim(cluster: _Cluster) -> ClaimSpec:
    """Step 2: a claim for one 4-GPU partition, allocated and prepared."""
    pod = await cluster.create_claim(partition_claim(4), name="pod-4x-gpus")
    (chosen,) = cluster.control.allocated(pod)
    say(
        f"\n2. ResourceClaim {pod.name}: one device of class partition-4x.{cluster.driver}; "
        f"the scheduler (honouring the counters) allocates {chosen}"
    )
    started = trio.current_time()
    answer = await cluster.prepare(pod)
    say(
        f"   NodePrepareResources answered in {1000 * (trio.current_time() - started):.1f} ms: "
        f"{answer.error or answer.cdi_device_ids}"
    )
    say(f"   Fabric Manager active partitions: {cluster.fm_active()}")
    spec = cdi_spec(cluster.cdi_dir, pod)
    say(f"   its CDI spec, {CdiDirectory(cluster.cdi_dir).spec_path(pod.uid)}:")
    for line in json.dumps(spec, indent=2).splitlines():
        say(f"     {line}")
    return pod


async def _prepare_vm_claim(cluster: _Cluster) -> ClaimSpec:
    """Step 4: a KubeVirt-style claim of four GPUs of one partition, with its metadata."""
    vm = await cluster.create_claim(
        gpu_claim(4, "partition4x"), name="vm-4x", pod_claim_name="gpus"
    )
    say(
        f"\n4. KubeVirt-style ResourceClaim {vm.name} (from a template, pod claim 'gpus'): "
        f"requests gpu0..gpu3 of class gpu.{cluster.driver}, matchAttribute "
        f"{cluster.driver}/partition4x; the scheduler allocates {cluster.control.allocated(vm)}"
    )
    answer = await cluster.prepare(vm)
    say(f"   NodePrepareResources: {answer.error or answer.cdi_device_ids}")
    say(f"   Fabric Manager active partitions: {cluster.fm_active()}")
    spec = cdi_spec(cluster.cdi_dir, vm) or {}
    mounts = spec.get("devices", [{}])[0].get("containerEdits", {}).get("mounts", [])
    if not mounts:
        raise DemoFailed(f"the CDI spec of {vm.name} mounts no device metadata file: {spec}")
    say(
        f"   {len(mounts)} device metadata files mounted read-only, one per request; "
        f"{mounts[0]['containerPath']}:"
    )
    text = json.dumps(json.loads(Path(mounts[0]["hostPath"]).read_text()))
    for line in textwrap.wrap(text, 92):
        say(f"     {line}")
    return vm
