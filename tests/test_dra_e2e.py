"""DRA mode end to end: the real daemon process, the API-server stand-in (HTTP), the grpcio
DRA kubelet stand-in (Unix sockets) and the counter-honouring scheduler stand-in.

Every test starts its own simulated node (testkit.dra_cluster); waits are
bounded, nothing is timed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvswitch_dp.demo.dra_allocator import gpu_claim, partition_claim
from nvswitch_dp.dra.metadata import CONTAINER_DIR
from testkit.dra_cluster import DraCluster, dra_cluster

DRIVER = "gpu.nvswitch-dp.io"
PCI = "resource.kubernetes.io/pciBusID"
# The partitions of the H200 table that contain GPU module 5, and the GPU itself.
WITH_GPU_5 = {"partition-0", "partition-2", "partition-5", "partition-11", "gpu-5"}


@pytest.fixture
def cluster() -> Iterator[DraCluster]:
    # Not tmp_path: the node's sockets need a path short enough for a Unix socket.
    with (
        tempfile.TemporaryDirectory(prefix="dra-e2e-") as workdir,
        dra_cluster(Path(workdir)) as started,
    ):
        yield started


def ops(cluster: DraCluster, operation: str) -> float:
    """FM operations of ``operation`` the running daemon has done (its metrics)."""
    assert cluster.daemon is not None
    _, text = cluster.daemon.get("/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith("hgx_h200_partition_operations_total{") and (
            f'operation="{operation}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ready(cluster: DraCluster) -> tuple[int, dict[str, object]]:
    assert cluster.daemon is not None
    status, body = cluster.daemon.get("/readyz")
    return status, body


def test_claim_prepare_fm_active_cdi_spec_unprepare(cluster: DraCluster) -> None:
    assert ready(cluster) == (200, {"ready": True, "problems": []})
    assert {"partition-1", "partition-2", "gpu-1"} <= cluster.devices()
    claim = cluster.create_claim(partition_claim(4))
    (device,) = cluster.allocated(claim)
    partition = int(device.removeprefix("partition-"))
    answer = cluster.prepare(claim)
    assert answer.error == ""
    assert answer.cdi_device_ids == [f"nvswitch-dp.io/partition={claim.uid}"]
    assert [d["device_name"] for d in answer.devices] == [device]
    assert cluster.fm_active() == [partition]
    spec = cluster.cdi_spec(claim)
    assert spec is not None and spec["kind"] == "nvswitch-dp.io/partition"
    edits = spec["devices"][0]["containerEdits"]
    paths = [n["path"] for n in edits["deviceNodes"]]
    assert paths[0] == "/dev/vfio/vfio" and len(paths) == 1 + 4
    assert f"NVSWITCH_DP_PARTITION_IDS={partition}" in edits["env"]
    # Idempotent: the kubelet repeats Prepare; the same answer, nothing else activated.
    assert cluster.prepare(claim).cdi_device_ids == answer.cdi_device_ids
    assert cluster.fm_active() == [partition]
    assert cluster.unprepare(claim) == ""
    cluster.wait(lambda: cluster.fm_active() == [], 10, "the partition deactivated")
    assert cluster.cdi_spec(claim) is None
    assert cluster.unprepare(claim) == ""  # an unknown claim is a success
    cluster.delete_claim(claim)  # the pod is gone: the scheduler frees its devices
    # The overlapping 8x partition comes back once the deactivation is published.
    cluster.wait(lambda: "partition-0" in cluster.devices(), 10, "partition-0 published again")
    assert cluster.allocator().allocate(partition_claim(8)) is not None  # all free again


def test_kubevirt_claim_on_one_partition_gets_metadata_files(cluster: DraCluster) -> None:
    vm = cluster.create_claim(gpu_claim(4, "partition4x"), name="vm-gpus", pod_claim_name="gpus")
    gpus = cluster.allocated(vm)
    assert len(gpus) == 4 and all(g.startswith("gpu-") for g in gpus)
    answer = cluster.prepare(vm)
    assert answer.error == ""
    assert [d["request_names"] for d in answer.devices] == [[f"gpu{i}"] for i in range(4)]
    assert len(cluster.fm_active()) == 1
    spec = cluster.cdi_spec(vm)
    assert spec is not None
    mounts = spec["devices"][0]["containerEdits"]["mounts"]
    assert [m["containerPath"] for m in mounts] == [
        f"{CONTAINER_DIR}/resourceclaimtemplates/gpus/gpu{i}/{DRIVER}-metadata.json"
        for i in range(4)
    ]
    assert all("ro" in m["options"] for m in mounts)
    published = {
        d["name"]: d["attributes"][PCI]["string"]
        for s in cluster.slices()
        for d in s["spec"].get("devices") or []
        if PCI in d["attributes"]
    }
    for mount, gpu in zip(mounts, gpus, strict=True):
        data = json.loads(Path(mount["hostPath"]).read_text())
        assert data["kind"] == "DeviceMetadata" and data["podClaimName"] == "gpus"
        (device,) = data["requests"][0]["devices"]
        assert device["name"] == gpu
        assert device["attributes"][PCI]["string"] == published[gpu]
    assert cluster.unprepare(vm) == ""
    assert not any(Path(m["hostPath"]).exists() for m in mounts)


def test_four_gpus_of_no_one_partition_are_refused_with_what_to_ask_for(
    cluster: DraCluster,
) -> None:
    claim = cluster.create_claim(gpu_claim(4), devices=["gpu-1", "gpu-2", "gpu-5", "gpu-6"])
    answer = cluster.prepare(claim)
    assert answer.devices == []
    assert "GPUs 1,2,5,6 are not one Fabric Manager partition" in answer.error
    assert f"matchAttribute {DRIVER}/partition4x" in answer.error
    assert cluster.fm_active() == []
    assert cluster.cdi_spec(claim) is None


def test_a_gpu_fault_takes_its_partitions_out_of_the_slice_and_back(
    cluster: DraCluster,
) -> None:
    group = cluster.vfio_group(5)
    group.unlink()  # /dev/vfio/<group> gone: the GPU cannot be handed to a VM
    cluster.wait(lambda: not cluster.devices() & WITH_GPU_5, 10, "GPU 5's devices to leave")
    assert "partition-1" in cluster.devices()  # its neighbours stay
    group.write_text("")
    cluster.wait(lambda: cluster.devices() >= WITH_GPU_5, 10, "GPU 5's devices to come back")


def test_a_kubelet_restart_registers_the_driver_again(cluster: DraCluster) -> None:
    before = cluster.kubelet.registrations
    cluster.kubelet.restart()
    cluster.kubelet.wait_registered(DRIVER, 10, after=before)
    cluster.wait(lambda: ready(cluster)[0] == 200, 10, "ready again")
    claim = cluster.create_claim(partition_claim(2))
    assert cluster.prepare(claim).error == ""
    assert cluster.unprepare(claim) == ""


def test_an_api_server_outage_touches_nothing_prepared_and_readyz_says_why(
    cluster: DraCluster,
) -> None:
    claim = cluster.create_claim(partition_claim(4))
    assert cluster.prepare(claim).error == ""
    active, spec = cluster.fm_active(), cluster.cdi_spec(claim)
    cluster.api_down()
    group = cluster.vfio_group(5)
    group.unlink()  # the node changes while the API server cannot hear of it

    def says_why() -> bool:
        status, body = ready(cluster)
        problems = body.get("problems")
        return status == 503 and any(
            "ResourceSlices not published" in p
            for p in problems or []  # type: ignore[attr-defined]
        )

    cluster.wait(says_why, 10, "/readyz to name the API server")
    assert cluster.fm_active() == active and cluster.cdi_spec(claim) == spec
    assert cluster.devices() >= WITH_GPU_5  # the stale pool, untouched meanwhile
    cluster.api_up()
    cluster.wait(lambda: not cluster.devices() & WITH_GPU_5, 20, "the pool republished")
    cluster.wait(lambda: ready(cluster)[0] == 200, 10, "ready again")
    assert cluster.fm_active() == active and cluster.cdi_spec(claim) == spec
    group.write_text("")
    assert cluster.unprepare(claim) == ""


def test_a_plugin_sigkill_keeps_prepared_partitions_and_cleans_up_forgotten_claims(
    cluster: DraCluster,
) -> None:
    kept = cluster.create_claim(partition_claim(4), name="kept")
    gone = cluster.create_claim(partition_claim(2), name="gone")
    assert cluster.prepare(kept).error == "" and cluster.prepare(gone).error == ""
    kept_id = int(cluster.allocated(kept)[0].removeprefix("partition-"))
    gone_id = int(cluster.allocated(gone)[0].removeprefix("partition-"))
    assert cluster.fm_active() == sorted([kept_id, gone_id])
    cluster.kill_daemon()
    cluster.delete_claim(gone)  # deleted while the driver was down: nobody will unprepare it
    cluster.start_daemon()
    cluster.wait(lambda: cluster.fm_active() == [kept_id], 20, "the forgotten claim cleaned up")
    assert cluster.cdi_spec(gone) is None and cluster.cdi_spec(kept) is not None
    assert ops(cluster, "deactivate") == 1  # the forgotten one only, never the prepared one
    assert cluster.prepare(kept).cdi_device_ids == [f"nvswitch-dp.io/partition={kept.uid}"]
    assert cluster.unprepare(kept) == ""  # prepared by the killed process
    cluster.wait(lambda: cluster.fm_active() == [], 10, "the kept partition deactivated")
    assert cluster.cdi_spec(kept) is None
