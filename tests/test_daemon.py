"""The daemon end to end: a real process on a simulated HGX node, a grpcio kubelet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from testkit.harness import DaemonProcess, simulated_node
from testkit.kubelet import KubeletStandIn

H200 = "nvidia.com/gpu-h200"
RESOURCES = [f"{H200}-{n}x" for n in (1, 2, 4, 8)]
# HGX H200 table: 0 = all 8; 1-2 = 4 GPUs; 3-6 = pairs (1,3) (2,4) (5,7) (6,8); 7-14 = singles.
DEVICES = {
    f"{H200}-8x": {"partition-0"},
    f"{H200}-4x": {"partition-1", "partition-2"},
    f"{H200}-2x": {f"partition-{i}" for i in range(3, 7)},
    f"{H200}-1x": {f"partition-{i}" for i in range(7, 15)},
}


class Node:
    def __init__(self, daemon: DaemonProcess, kubelet: KubeletStandIn) -> None:
        self.daemon = daemon
        self.kubelet = kubelet

    def healthy(self, resource: str) -> set[str]:
        return {d for d, h in self.kubelet.devices(resource).items() if h == "Healthy"}

    def fm_active(self) -> list[int]:
        if not self.daemon.fm_state_file.exists():  # FM never changed state
            return []
        active: list[int] = json.loads(self.daemon.fm_state_file.read_text())["active"]
        return active


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with simulated_node(tmp_path) as (daemon, kubelet):
        yield Node(daemon, kubelet)


def test_registers_one_resource_per_partition_size_with_every_partition(node: Node) -> None:
    assert set(node.kubelet.registered()) == set(RESOURCES)
    for resource, devices in DEVICES.items():
        assert node.kubelet.devices(resource) == dict.fromkeys(devices, "Healthy")
    assert f"{H200}-16x" not in node.kubelet.registered()


def test_allocate_4x_activates_and_answers_with_vfio_devices_and_pci_env(node: Node) -> None:
    response = node.kubelet.allocate(f"{H200}-4x", ["partition-1"])
    container = response.container_responses[0]
    paths = [d.container_path for d in container.devices]
    assert paths[0] == "/dev/vfio/vfio"
    assert len(paths) == 5 and len(set(paths)) == 5
    addresses = container.envs["PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X"].split(",")
    assert len(addresses) == 4
    assert container.envs["NVSWITCH_DP_PARTITION_IDS"] == "1"
    assert container.annotations["nvswitch-dp.io/partition-ids"] == "1"
    assert node.fm_active() == [1]


def test_after_allocation_every_overlapping_partition_leaves_the_pool(node: Node) -> None:
    node.kubelet.allocate(f"{H200}-4x", ["partition-1"])  # modules 1-4

    def settled() -> bool:
        return node.healthy(f"{H200}-8x") == set() and node.healthy(f"{H200}-2x") == {
            "partition-5",
            "partition-6",
        }

    node.kubelet.wait_until(settled, timeout=5)
    assert node.healthy(f"{H200}-4x") == {"partition-1", "partition-2"}  # in use stays Healthy
    assert node.healthy(f"{H200}-1x") == {f"partition-{i}" for i in range(11, 15)}


def test_allocate_of_an_overlapping_partition_fails_naming_the_blocker(node: Node) -> None:
    node.kubelet.allocate(f"{H200}-4x", ["partition-1"])
    with pytest.raises(grpc.RpcError) as raised:
        node.kubelet.allocate(f"{H200}-2x", ["partition-3"])
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "partition 1" in (raised.value.details() or "")
    assert node.fm_active() == [1]


def test_allocate_of_an_unknown_device_fails_with_not_found(node: Node) -> None:
    for bad in (["partition-99"], ["gpu-0"], ["partition-1"]):  # partition-1 is a 4x
        with pytest.raises(grpc.RpcError) as raised:
            node.kubelet.allocate(f"{H200}-2x", bad)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND, bad
    assert node.fm_active() == []


def test_preferred_allocation_keeps_pairs_whole_and_never_fails(node: Node) -> None:
    node.kubelet.allocate(f"{H200}-1x", ["partition-7"])  # module 1; its pair-mate is 3
    available = sorted(node.healthy(f"{H200}-1x"))
    assert node.kubelet.preferred_allocation(f"{H200}-1x", available, [], 1) == ["partition-9"]
    # Garbage in, an answer out: an error here would fail the pod's admission.
    answer = node.kubelet.preferred_allocation(f"{H200}-1x", ["bogus", "partition-12"], [], 1)
    assert answer == ["partition-12"]


def test_inventory_over_rest_shows_the_allocation(node: Node) -> None:
    node.kubelet.allocate(f"{H200}-4x", ["partition-1"])
    status, body = node.daemon.get("/v1/partitions")
    assert status == 200
    by_id = {p["id"]: p for p in body["partitions"]}
    assert len(by_id) == 15
    assert by_id[1]["state"] == "allocated"
    assert by_id[1]["resource"] == f"{H200}-4x"
    assert by_id[1]["modules"] == [1, 2, 3, 4]
    assert len(by_id[1]["pci_addresses"]) == 4
    assert by_id[0]["state"] == "blocked" and by_id[0]["blocked_by"] == 1
    assert by_id[2]["state"] == "free"


def test_readyz_once_registered_and_metrics_use_the_promised_names(node: Node) -> None:
    node.kubelet.allocate(f"{H200}-4x", ["partition-1"])
    assert node.daemon.get("/healthz")[0] == 200
    status, body = node.daemon.get("/readyz")
    assert (status, body["ready"]) == (200, True)
    status, text = node.daemon.get("/metrics")
    assert status == 200
    for name in (
        "hgx_h200_devices_total",
        "hgx_h200_partition_operations_total",
        "hgx_h200_allocation_duration_seconds_bucket",
    ):
        assert name in text
    assert 'hgx_h200_partition_operations_total{operation="activate",result="SUCCESS"} 1.0' in text


def test_sigterm_ends_streams_removes_sockets_and_exits_0_within_3s(node: Node) -> None:
    sockets = sorted(p.name for p in node.daemon.plugin_dir.glob("nvswitch-dp-*.sock"))
    assert len(sockets) == 4
    code, seconds = node.daemon.terminate()
    assert code == 0, node.daemon.log_text()
    assert seconds < 3.0
    assert list(node.daemon.plugin_dir.glob("nvswitch-dp-*.sock")) == []
    node.kubelet.wait_until(lambda: all(node.kubelet.stream_ended(r) for r in RESOURCES), timeout=2)


def test_a_16_gpu_platform_serves_16x_and_nothing_else_does(tmp_path: Path) -> None:
    """An A100 16-GPU board: resources named after its GPUs, the only one with -16x."""
    sizes = (1, 2, 4, 8, 16)
    a100 = "nvidia.com/gpu-a100"
    with simulated_node(tmp_path, platform="hgx-a100-16", sizes=sizes, resource_prefix=a100) as (
        _,
        kubelet,
    ):
        assert kubelet.devices(f"{a100}-16x") == {"partition-0": "Healthy"}
        assert len(kubelet.devices(f"{a100}-8x")) == 6


def test_a_bad_config_names_the_key_and_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nfabric_manager:\n  timeout_seconds: -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "nvswitch_dp", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "HGX_H200_CONFIG_PATH": ""},
    )
    assert result.returncode == 2
    assert "fabric_manager.timeout_seconds" in result.stderr


def test_a_taken_listen_address_is_one_line_and_status_2(tmp_path: Path) -> None:
    """Another process on api.listen (a second daemon, a demo left running): one
    ``cannot start:`` line naming the address and what to do, no traceback, exit 2."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                *(sys.executable, "-m", "nvswitch_dp", "run", "--simulate", "hgx-h200"),
                *("--state-dir", str(tmp_path / "state"), "--api-listen", f"127.0.0.1:{port}"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HGX_H200_CONFIG_PATH": ""},
        )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "cannot start:" in line]
    assert len(lines) == 1, result.stderr
    assert f"api.listen 127.0.0.1:{port}: Address already in use" in lines[0]
    assert "already running" in lines[0]
    assert "Traceback" not in result.stderr
    # Nothing of the kubelet's was left behind under the state directory either.
    assert not list((tmp_path / "state").rglob("nvswitch-dp-*.sock"))
