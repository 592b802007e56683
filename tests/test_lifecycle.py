"""Kubernetes lifecycle end to end: release, kubelet and plugin restarts, races, health.

Each test runs the real daemon as a process on a simulated HGX H200 node, with the grpcio
kubelet stand-in and its PodResources service.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.simulator import SimulatorStore
from nvswitch_dp.vfio.simulate.faults import (
    add_foreign_function,
    bind,
    remove_foreign_function,
    remove_vfio_group,
    restore_vfio_group,
    unbind,
)
from nvswitch_dp.vfio.simulate.node import SimulatedNode
from testkit.harness import DaemonProcess
from testkit.kubelet import KubeletStandIn, PodResourcesStandIn

R = "nvidia.com/gpu-h200"
RESOURCES = [f"{R}-{n}x" for n in (1, 2, 4, 8)]
GRACE = 1.0
MODULE_MAP = platform("hgx-h200").module_map()


class Node:
    """A daemon, its kubelet, its PodResources, and the simulated hardware under them."""

    def __init__(
        self, tmp_path: Path, *, health_interval: float = 0.2, extra_config: str = ""
    ) -> None:
        self.tmp_path = tmp_path
        self.plugin_dir = tmp_path / "device-plugins"
        self.plugin_dir.mkdir(exist_ok=True)
        self.pod_socket = tmp_path / "pod-resources" / "kubelet.sock"
        config = tmp_path / "config.yaml"
        config.write_text(
            "version: v1\n"
            f"vfio:\n  health_interval_seconds: {health_interval}\n"
            "fabric_manager:\n  reconcile_interval_seconds: 0.5\n" + extra_config
        )
        self.args = [
            "--config", str(config),
            "--pod-resources-socket", str(self.pod_socket),
            "--release-grace", str(GRACE),
        ]  # fmt: skip
        self.kubelet = KubeletStandIn(self.plugin_dir).start()
        self.pods = PodResourcesStandIn(self.pod_socket, kubelet=self.kubelet).start()
        self.daemon = self.spawn()

    def spawn(self) -> DaemonProcess:
        daemon = DaemonProcess(self.tmp_path, self.plugin_dir, extra_args=self.args).start()
        self.wait_registered_since(daemon.started_at)
        return daemon

    def wait_registered_since(self, since: float, timeout: float = 30) -> None:
        """Every resource registered (again) after ``since`` and its first list arrived."""

        def fresh() -> bool:
            plugins = self.kubelet.registered()
            return all(r in plugins and plugins[r].registered_at > since for r in RESOURCES)

        self.kubelet.wait_until(fresh, timeout)
        self.kubelet.wait_registered(RESOURCES, timeout)

    @property
    def fm(self) -> SimulatorStore:
        return SimulatorStore(self.daemon.fm_state_file, "hgx-h200")

    def fm_active(self) -> list[int]:
        if not self.daemon.fm_state_file.exists():
            return []
        return sorted(self.fm.load().active)

    def health(self, resource: str, device: str) -> str:
        return self.kubelet.devices(resource).get(device, "missing")

    def hardware(self) -> SimulatedNode:
        root = self.daemon.state_dir / "node"
        return SimulatedNode(root / "sys", root / "dev", MODULE_MAP)

    def group_of(self, module: int) -> int:
        link = self.hardware().sysfs_root / "bus/pci/devices" / MODULE_MAP[module] / "iommu_group"
        return int(os.readlink(link).rsplit("/", 1)[-1])

    def close(self) -> None:
        try:
            self.daemon.terminate()
        finally:
            self.pods.stop()
            self.kubelet.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.close()


# -- release ------------------------------------------------------------------------------


def test_a_partition_no_pod_holds_is_released_after_the_grace(node: Node) -> None:
    node.kubelet.allocate(f"{R}-4x", ["partition-1"])
    node.pods.assign("ml", "trainer", "main", f"{R}-4x", ["partition-1"])
    node.kubelet.wait_until(lambda: node.health(f"{R}-8x", "partition-0") == "Unhealthy", 5)
    # Held: several grace periods pass and nothing is touched.
    with pytest.raises(TimeoutError):
        node.kubelet.wait_until(lambda: node.fm_active() != [1], timeout=3 * GRACE)
    node.pods.unassign("ml", "trainer")
    node.kubelet.wait_until(lambda: node.fm_active() == [], timeout=10)
    node.kubelet.wait_until(
        lambda: (
            node.health(f"{R}-8x", "partition-0") == "Healthy"
            and node.health(f"{R}-2x", "partition-3") == "Healthy"
        ),
        timeout=5,
    )


def test_nothing_is_released_while_pod_resources_is_unreachable(node: Node) -> None:
    node.kubelet.allocate(f"{R}-2x", ["partition-5"])
    node.pods.stop()  # the kubelet's PodResources socket is gone
    with pytest.raises(TimeoutError):
        node.kubelet.wait_until(lambda: node.fm_active() != [5], timeout=4 * GRACE)
    assert node.health(f"{R}-2x", "partition-5") == "Healthy"


# -- restarts -----------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_kubelet_restarts_re_register_everything_and_leak_nothing(node: Node) -> None:
    node.kubelet.allocate(f"{R}-4x", ["partition-2"])
    node.pods.assign("ml", "vm", "compute", f"{R}-4x", ["partition-2"])
    pid = node.daemon.process.pid  # type: ignore[union-attr]
    node.kubelet.restart()
    node.kubelet.wait_registered(RESOURCES, timeout=5)
    fds_before = open_fds(pid)
    tasks_before = node.daemon.get("/healthz")[1]["tasks"]
    for _ in range(100):
        node.kubelet.restart()
        node.kubelet.wait_registered(RESOURCES, timeout=5)
    node.daemon.check_alive()
    # State survives the kubelet: partition-2 still in use, its neighbours still out.
    assert node.health(f"{R}-4x", "partition-2") == "Healthy"
    assert node.health(f"{R}-2x", "partition-5") == "Unhealthy"
    assert open_fds(pid) <= fds_before + 2
    assert node.daemon.get("/healthz")[1]["tasks"] <= tasks_before + 2
    sockets = sorted(p.name for p in node.plugin_dir.iterdir())
    assert sockets == sorted(
        ["kubelet.sock"] + [f"nvswitch-dp-gpu-h200-{n}x.sock" for n in (1, 2, 4, 8)]
    )


def test_a_restarted_plugin_rebuilds_from_fm_and_pod_resources(node: Node) -> None:
    node.kubelet.allocate(f"{R}-4x", ["partition-1"])
    node.pods.assign("ml", "trainer", "main", f"{R}-4x", ["partition-1"])
    node.fm.save(_with_active(node.fm, 5))  # active in FM, held by nobody
    assert node.daemon.process is not None
    node.daemon.process.send_signal(signal.SIGKILL)  # a crash: no cleanup at all
    node.daemon.process.wait()
    node.daemon = node.spawn()
    # In use: still active, Healthy, its neighbours blocked from the first list on.
    assert node.health(f"{R}-4x", "partition-1") == "Healthy"
    assert node.health(f"{R}-8x", "partition-0") == "Unhealthy"
    assert node.health(f"{R}-2x", "partition-3") == "Unhealthy"
    with pytest.raises(grpc.RpcError) as raised:
        node.kubelet.allocate(f"{R}-2x", ["partition-3"])
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Held by nobody: released after the grace period; the held one stays.
    node.kubelet.wait_until(lambda: node.fm_active() == [1], timeout=10)
    node.kubelet.wait_until(lambda: node.health(f"{R}-2x", "partition-6") == "Healthy", 5)


def _with_active(store: SimulatorStore, partition_id: int):  # type: ignore[no-untyped-def]
    sim = store.load()
    sim.activate(partition_id)
    return sim


# -- races --------------------------------------------------------------------------------


def test_overlapping_allocates_on_two_resource_servers_one_wins(node: Node) -> None:
    sim = node.fm.load()
    sim.faults.activation_delay_s = 0.3
    node.fm.save(sim)
    results: dict[str, str] = {}

    def allocate(resource: str, device: str) -> None:
        try:
            node.kubelet.allocate(resource, [device])
            results[device] = "ok"
        except grpc.RpcError as exc:
            results[device] = f"{exc.code().name}: {exc.details()}"

    threads = [
        threading.Thread(target=allocate, args=(f"{R}-4x", "partition-1")),
        threading.Thread(target=allocate, args=(f"{R}-2x", "partition-4")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [d for d, r in results.items() if r == "ok"]
    assert len(winners) == 1, results
    loser = next(d for d in results if d not in winners)
    winner_id = winners[0].split("-")[1]
    assert results[loser].startswith("FAILED_PRECONDITION")
    assert f"partition {winner_id}" in results[loser]
    assert node.fm_active() == [int(winner_id)]


def test_an_allocate_during_activation_waits_and_both_succeed(node: Node) -> None:
    sim = node.fm.load()
    sim.faults.activation_delay_s = 0.3
    node.fm.save(sim)
    answers: list[object] = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(node.kubelet.allocate(f"{R}-1x", ["partition-9"]))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 2
    assert node.fm_active() == [9]


def test_an_fm_failure_during_allocate_leaves_everything_consistent(node: Node) -> None:
    sim = node.fm.load()
    sim.faults.nvlink_error_partitions = {2}
    node.fm.save(sim)
    with pytest.raises(grpc.RpcError) as raised:
        node.kubelet.allocate(f"{R}-4x", ["partition-2"])
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "NVLINK_ERROR" in (raised.value.details() or "")
    assert node.fm_active() == []
    node.kubelet.wait_until(lambda: node.health(f"{R}-8x", "partition-0") == "Healthy", 5)
    node.kubelet.allocate(f"{R}-2x", ["partition-5"])  # its GPUs are usable
    assert node.fm_active() == [5]


# -- health -------------------------------------------------------------------------------


def test_vfio_problems_make_partitions_unhealthy_and_recovery_heals(node: Node) -> None:
    hw = node.hardware()
    group = node.group_of(3)

    def containing_3_unhealthy() -> bool:
        return (
            node.health(f"{R}-1x", "partition-9") == "Unhealthy"
            and node.health(f"{R}-2x", "partition-3") == "Unhealthy"
            and node.health(f"{R}-4x", "partition-1") == "Unhealthy"
            and node.health(f"{R}-8x", "partition-0") == "Unhealthy"
        )

    def all_healthy() -> bool:
        return all(h == "Healthy" for r in RESOURCES for h in node.kubelet.devices(r).values())

    # /dev/vfio/<group> removed (inotify), then back.
    remove_vfio_group(hw, group)
    node.kubelet.wait_until(containing_3_unhealthy, timeout=5)
    assert node.health(f"{R}-2x", "partition-4") == "Healthy"  # GPUs 2 and 4 are fine
    restore_vfio_group(hw, group)
    node.kubelet.wait_until(all_healthy, timeout=5)
    # The GPU leaves vfio-pci for the nvidia driver (polled), then comes back.
    unbind(hw, MODULE_MAP[3], to="nvidia")
    node.kubelet.wait_until(containing_3_unhealthy, timeout=5)
    bind(hw, MODULE_MAP[3])
    node.kubelet.wait_until(all_healthy, timeout=5)
    # Another function joins the IOMMU group without vfio-pci: the group is not viable.
    foreign = add_foreign_function(hw, group)
    node.kubelet.wait_until(containing_3_unhealthy, timeout=5)
    remove_foreign_function(hw, foreign)
    node.kubelet.wait_until(all_healthy, timeout=5)


def test_every_device_carries_its_numa_node(node: Node) -> None:
    assert node.kubelet.topology(f"{R}-1x")["partition-7"] == [0]  # module 1
    assert node.kubelet.topology(f"{R}-1x")["partition-14"] == [1]  # module 8
    assert node.kubelet.topology(f"{R}-8x")["partition-0"] == [0, 1]


def test_fm_state_file_is_json_with_the_active_set(node: Node) -> None:
    node.kubelet.allocate(f"{R}-1x", ["partition-14"])
    data = json.loads(node.daemon.fm_state_file.read_text())
    assert data["active"] == [14]
