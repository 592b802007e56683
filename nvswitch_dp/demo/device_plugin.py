"""``nvswitch-dp demo``: the device-plugin mode on a simulated node, from a pod to its end.

The shape of :mod:`nvswitch_dp.demo.session` (a new node, ``prepare-node``, the real
daemon as a process), with the demo's grpclib kubelet (:mod:`nvswitch_dp.demo.kubelet`)
serving ``Registration`` and ``PodResourcesLister``. The walk-through:

1. the daemon registers one resource per partition size; their ListAndWatch lists;
2. a pod asks for a 4-GPU partition: GetPreferredAllocation, Allocate, and the kubelet
   records the assignment in PodResources;
3. every partition sharing a GPU with it leaves the pool (Unhealthy in its ListAndWatch);
4. the inventory over REST; 5. ``nvswitch-dp status``, the operator's fabric map;
6. the pod ends: the kubelet drops it from PodResources, and after the release grace
   (set short here, ``RELEASE_GRACE_S``) the daemon deactivates the partition in FM and
   its neighbours come back to the pool;
7. the REST API with its bearer token: commands to paste while the demo serves.
"""

from __future__ import annotations

import functools

import trio

from nvswitch_dp.demo.cluster import fm_active
from nvswitch_dp.demo.kubelet import HEALTHY, DemoKubelet, PodResources
from nvswitch_dp.demo.session import (
    Daemon,
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
from nvswitch_dp.demo.wire import serve
from nvswitch_dp.status import status_main

RELEASE_GRACE_S = 1.0  # plugin.release_grace_seconds (30 s by default): short, to watch it
POD = ("default", "pod-4x-gpus")
REGISTER_WITHIN_S = 20.0


def run_demo(
    platform: str = "hgx-h200", api_listen: str = "127.0.0.1:9090", *, wait: bool = True
) -> int:
    """``nvswitch-dp demo``: the walk-through of the module docstring; the exit status
    (130 when interrupted before the walk-through ended, 1 when a step failed)."""
    body = functools.partial(_demo, platform=platform, wait=wait)
    return run_session("nvswitch-dp-demo-", api_listen, body)


async def _demo(session: Session, *, platform: str, wait: bool) -> int:
    plugin_dir = session.workdir / "device-plugins"
    pod_socket = session.workdir / "pod-resources" / "kubelet.sock"
    plugin_dir.mkdir()
    pod_socket.parent.mkdir()
    settings = {
        "plugin": {
            "directory": str(plugin_dir),
            "pod_resources_socket": str(pod_socket),
            "release_grace_seconds": RELEASE_GRACE_S,
        }
    }
    config = await prepare_node(session, platform, settings)
    kubelet = DemoKubelet(plugin_dir)
    pods = PodResources(kubelet)
    async with trio.open_nursery() as nursery:
        await nursery.start(kubelet.serve)
        await nursery.start(serve, [pods], pod_socket)
        say(
            f"\nthe demo's kubelet (grpclib): Registration on {kubelet.socket_path}, "
            f"PodResourcesLister on {pod_socket}"
        )
        async with running_daemon(session, config) as daemon:
            await _walk_through(session, kubelet, pods, daemon)
            status = await serve_until_interrupted(session, daemon, wait)
        nursery.cancel_scope.cancel()
    return status


def _health_line(devices: dict[str, str]) -> str:
    return "  ".join(
        f"{d}:{'ok' if h == HEALTHY else 'UNHEALTHY'}"
        for d, h in sorted(devices.items(), key=lambda kv: int(kv[0].split("-")[1]))
    )


def _show_pool(kubelet: DemoKubelet, resources: list[str]) -> None:
    for resource in resources:
        say(f"   {resource:24} {_health_line(kubelet.devices(resource))}")


async def _walk_through(
    session: Session, kubelet: DemoKubelet, pods: PodResources, daemon: Daemon
) -> None:
    await wait_for_api(session, daemon)
    inventory = (await rest(session, "/v1/partitions"))["partitions"]
    by_size = sorted({(p["size"], p["resource"]) for p in inventory})
    resources = [resource for _, resource in by_size]
    took = await wait_until(
        lambda: kubelet.registered(resources), REGISTER_WITHIN_S, "registration", daemon
    )
    say(f"\n1. registered {len(resources)} resources, {took:.2f} s after the API answered:")
    _show_pool(kubelet, resources)

    four = next((r for s, r in by_size if s == 4), resources[-1])
    chosen = await _admit_pod(kubelet, pods, four)
    taken = next(p for p in inventory if p["device_id"] == chosen)
    neighbours = {
        (p["resource"], p["device_id"])
        for p in inventory
        if p is not taken and set(p["modules"]) & set(taken["modules"])
    }

    def neighbours_are(health: str) -> bool:
        return all(kubelet.devices(r).get(d) == health for r, d in neighbours)

    await wait_until(lambda: neighbours_are("Unhealthy"), 5, "the neighbours to leave", daemon)
    say(
        f"\n3. the {len(neighbours)} partitions sharing a GPU with {chosen} "
        "left the pool (Unhealthy in their ListAndWatch):"
    )
    _show_pool(kubelet, resources)
    await _show_inventory(session)
    await _show_status(session)

    say(
        f"\n6. the pod ends: the kubelet drops {POD[0]}/{POD[1]} from PodResources. The "
        "daemon releases a partition no pod holds after plugin.release_grace_seconds "
        f"({RELEASE_GRACE_S:g} s here; 30 s by default):"
    )
    active = fm_active(session.fm_state_file)
    pods.remove(*POD)
    took = await wait_until(
        lambda: taken["id"] not in fm_active(session.fm_state_file) and neighbours_are(HEALTHY),
        10 + RELEASE_GRACE_S,
        f"the release of {chosen}",
        daemon,
    )
    say(
        f"   {took:.2f} s later: Fabric Manager active partitions {active} -> "
        f"{fm_active(session.fm_state_file)}; the {len(neighbours)} partitions are back "
        "in the pool:"
    )
    _show_pool(kubelet, resources)
    await show_rest_access(session, 7)


async def _admit_pod(kubelet: DemoKubelet, pods: PodResources, resource: str) -> str:
    """Step 2: the kubelet admits a pod asking for one device of ``resource``."""
    available = [d for d, h in kubelet.devices(resource).items() if h == HEALTHY]
    chosen = await kubelet.preferred_allocation(resource, available, 1)
    say(f"\n2. GetPreferredAllocation({resource}, available={available}) -> {chosen}")
    started = trio.current_time()
    container = await kubelet.allocate(resource, chosen)
    say(f"   Allocate({chosen}) answered in {1000 * (trio.current_time() - started):.1f} ms:")
    for spec in container.devices:
        say(f"     device {spec.container_path}  (host {spec.host_path}, {spec.permissions})")
    for key, value in sorted(container.envs.items()):
        say(f"     env    {key}={value}")
    for key, value in sorted(container.annotations.items()):
        say(f"     annot. {key}={value}")
    # As the kubelet's device manager does once Allocate answered: the assignment is in
    # its books, which PodResources List reads.
    pods.assign(*POD, "main", resource, chosen)
    say(f"   PodResources now lists pod {POD[0]}/{POD[1]} holding {chosen[0]}")
    return chosen[0]


async def _show_inventory(session: Session) -> None:
    inventory = (await rest(session, "/v1/partitions"))["partitions"]
    say(f"\n4. GET {session.api_url}/v1/partitions")
    say(f"   {'ID':>3} {'device':14} {'resource':24} {'GPUs':15} {'state':11} PCI addresses")
    for p in inventory:
        modules = ",".join(str(m) for m in p["modules"])
        say(
            f"   {p['id']:>3} {p['device_id']:14} {p['resource']:24} {modules:15} "
            f"{p['state']:11} {' '.join(p['pci_addresses'])}"
        )


async def _show_status(session: Session) -> None:
    say(f"\n5. nvswitch-dp status --api {session.api_url}   (the operator's fabric map)\n")
    await trio.to_thread.run_sync(status_main, ["--api", session.api_url])
    ready = await rest(session, "/readyz")
    say(f"\n   /readyz: {ready}")
