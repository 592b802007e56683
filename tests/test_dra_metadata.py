"""KEP-5304 device metadata files (nvswitch_dp.dra.metadata), and Prepare writing them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from dra_node import DRIVER, NODE, allocated_claim, build_node, ref_of

from nvswitch_dp.dra.metadata import (
    API_VERSION,
    CONTAINER_DIR,
    KIND,
    POD_CLAIM_NAME,
    DeviceMetadataFiles,
    MetadataError,
    claim_directory,
    published_attributes,
)
from nvswitch_dp.dra.slices import build_pool
from nvswitch_dp.dra.uid import InvalidClaimUid

UID = "5cef9799-c565-48b8-9cb3-6045632b1ebe"
PCI = "resource.kubernetes.io/pciBusID"


def claim(name: str = "vm-gpus", *, pod_claim: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "vms", "uid": UID}
    if pod_claim is not None:
        meta["annotations"] = {POD_CLAIM_NAME: pod_claim}
    return {"metadata": meta}


def files(root: Path) -> DeviceMetadataFiles:
    attributes = {"gpu-5": {"kind": {"string": "gpu"}, PCI: {"string": "0000:db:00.0"}}}
    return DeviceMetadataFiles(root, driver=DRIVER, pool=NODE, attributes=attributes)


def test_directories_follow_the_protocol() -> None:
    assert str(claim_directory(claim())) == "resourceclaims/vm-gpus"
    assert str(claim_directory(claim(pod_claim="gpus"))) == "resourceclaimtemplates/gpus"
    for bad in ("..", "a/b", ""):
        with pytest.raises(MetadataError):
            claim_directory(claim(bad))


def test_one_file_per_request_mounted_at_the_container_path(tmp_path: Path) -> None:
    store = files(tmp_path)
    mounts = store.write(claim(pod_claim="gpus"), [("gpu0", "gpu-5"), ("gpu1", "gpu-6")])
    container = [m.container_path for m in mounts]
    assert container == [
        f"{CONTAINER_DIR}/resourceclaimtemplates/gpus/{r}/{DRIVER}-metadata.json"
        for r in ("gpu0", "gpu1")
    ]
    first = json.loads(Path(mounts[0].host_path).read_text())
    assert (first["apiVersion"], first["kind"]) == (API_VERSION, KIND)
    assert first["metadata"] == {"name": "vm-gpus", "namespace": "vms", "uid": UID, "generation": 1}
    assert first["podClaimName"] == "gpus"
    (request,) = first["requests"]
    assert request["name"] == "gpu0"
    (device,) = request["devices"]
    assert (device["driver"], device["pool"], device["name"]) == (DRIVER, NODE, "gpu-5")
    assert device["attributes"][PCI] == {"string": "0000:db:00.0"}
    assert Path(mounts[0].host_path).is_relative_to(tmp_path / UID)
    assert store.mounts(UID) == mounts  # read back from disk (after a restart)
    store.remove(UID)
    assert store.mounts(UID) == [] and not (tmp_path / UID).exists()
    store.remove(UID)  # idempotent


def test_direct_claims_have_no_pod_claim_name_and_subrequests_share_a_directory(
    tmp_path: Path,
) -> None:
    mounts = files(tmp_path).write(claim(), [("gpu/high-memory", "gpu-5")])
    (mount,) = mounts
    assert mount.container_path.endswith(f"resourceclaims/vm-gpus/gpu/{DRIVER}-metadata.json")
    data = json.loads(Path(mount.host_path).read_text())
    assert "podClaimName" not in data
    assert data["requests"][0]["name"] == "gpu/high-memory"


def test_a_rewrite_replaces_what_the_claim_had(tmp_path: Path) -> None:
    store = files(tmp_path)
    store.write(claim(), [("a", "gpu-5")])
    assert [Path(m.container_path).parent.name for m in store.write(claim(), [("b", "gpu-5")])] == [
        "b"
    ]


def test_bad_uids_never_name_a_path(tmp_path: Path) -> None:
    bad = claim()
    bad["metadata"]["uid"] = "../../etc"
    with pytest.raises(InvalidClaimUid):
        files(tmp_path).write(bad, [("a", "gpu-5")])
    with pytest.raises(InvalidClaimUid):
        files(tmp_path).mounts("../x")


def test_published_attributes_are_the_slices_own(tmp_path: Path) -> None:
    from dra_helpers import inputs_for

    attributes = published_attributes(build_pool(inputs_for("hgx-h200"), 1))
    assert attributes["gpu-5"][PCI] == {"string": "0000:db:00.0"}
    assert attributes["gpu-5"]["partition4x"] == {"int": 2}
    assert attributes["partition-2"]["modules"] == {"string": "5,6,7,8"}


async def test_prepare_mounts_the_files_and_unprepare_removes_them(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from dra_helpers import inputs_for

    node = await build_node(tmp_path, nursery)
    store = DeviceMetadataFiles(
        tmp_path / "metadata",
        driver=DRIVER,
        pool=NODE,
        attributes=published_attributes(build_pool(inputs_for("hgx-h200", node=NODE), 1)),
    )
    node.driver.metadata = store
    obj = allocated_claim("vm", [(f"gpu{i}", f"gpu-{m}") for i, m in enumerate((5, 6, 7, 8))])
    obj["metadata"]["annotations"] = {POD_CLAIM_NAME: "gpus"}
    node.claims.put(obj)
    ref = ref_of(obj)
    result = await node.driver.prepare_claim(ref)
    assert not result.error
    mounts = node.spec(ref.uid)["devices"][0]["containerEdits"]["mounts"]
    assert [m["containerPath"] for m in mounts] == [
        f"{CONTAINER_DIR}/resourceclaimtemplates/gpus/gpu{i}/{DRIVER}-metadata.json"
        for i in range(4)
    ]
    assert all(m["options"][0] == "ro" for m in mounts)
    pci = [
        json.loads(Path(m["hostPath"]).read_text())["requests"][0]["devices"][0]["attributes"][PCI]
        for m in mounts
    ]
    assert [p["string"] for p in pci] == [
        "0000:db:00.0",
        "0000:ba:00.0",
        "0000:ab:00.0",
        "0000:9a:00.0",
    ]
    # A retried Prepare (answered from the checkpoint) mounts the same files again.
    node.cdi.remove(ref.uid)
    assert not (await node.driver.prepare_claim(ref)).error
    assert node.spec(ref.uid)["devices"][0]["containerEdits"]["mounts"] == mounts
    assert await node.driver.unprepare_claim(ref.uid) == ""
    assert store.mounts(ref.uid) == [] and not node.cdi.spec_path(ref.uid).exists()
