"""CDI spec files of DRA mode, checked against the rules of the published CDI spec.

``check_cdi_spec`` below is written from cncf-tags/container-device-interface SPEC.md
and its version rules (``specs-go/version.go``): what a runtime's CDI library refuses
when it loads a spec file, so a spec that passes here loads in containerd and CRI-O.
"""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvswitch_dp.dra.cdi import (
    CDI_VERSION,
    KIND,
    CdiDirectory,
    CdiMount,
    CdiSpecError,
    cdi_spec,
    qualified_device_id,
    spec_file_name,
)
from nvswitch_dp.dra.uid import InvalidClaimUid, is_claim_uid, validate_claim_uid
from nvswitch_dp.partitions.layout import ContainerGrant, DeviceNode

UID = "3f2a9c1e-0b7d-4c55-9e21-6a8f0d4b7c10"
UID2 = "0c1d2e3f-4a5b-4c6d-8e7f-901234567890"  # starts with a digit: needs CDI >= 0.5.0

# --------------------------------------------------------------- the CDI rules

# Released spec versions, oldest first (SPEC.md "Released versions").
CDI_VERSIONS = ["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0"]
_SPEC_KEYS = {"cdiVersion", "kind", "annotations", "devices", "containerEdits"}
_DEVICE_KEYS = {"name", "annotations", "containerEdits"}
_EDIT_KEYS = {
    "env", "deviceNodes", "mounts", "hooks", "additionalGIDs", "intelRdt", "netDevices",
}  # fmt: skip
_NODE_KEYS = {
    "path", "hostPath", "type", "major", "minor", "fileMode", "permissions", "uid", "gid",
}  # fmt: skip
_MOUNT_KEYS = {"hostPath", "containerPath", "type", "options"}


def _vendor_or_class_ok(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?", name))


def _device_name_ok(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?", name))


def minimum_version(spec: dict[str, Any]) -> str:
    """The lowest CDI version whose features the spec uses (version.go's rules)."""
    devices = spec["devices"]
    edits = [spec.get("containerEdits", {})] + [d.get("containerEdits", {}) for d in devices]
    if any(e.get("netDevices") for e in edits):
        return "1.1.0"
    if any(e.get("intelRdt") or e.get("additionalGIDs") for e in edits):
        return "0.7.0"
    if spec.get("annotations") or any(d.get("annotations") for d in devices):
        return "0.6.0"
    if "." in spec["kind"].split("/", 1)[1]:
        return "0.6.0"
    if any(d["name"][:1].isdigit() for d in devices):
        return "0.5.0"
    if any(n.get("hostPath") for e in edits for n in e.get("deviceNodes", [])):
        return "0.5.0"
    if any(m.get("type") for e in edits for m in e.get("mounts", [])):
        return "0.4.0"
    return "0.3.0"


def check_cdi_spec(spec: dict[str, Any]) -> None:
    """Raise AssertionError where a CDI library would refuse to load ``spec``."""
    assert set(spec) <= _SPEC_KEYS, f"unknown fields {set(spec) - _SPEC_KEYS}"
    assert spec["cdiVersion"] in CDI_VERSIONS
    required = minimum_version(spec)
    assert CDI_VERSIONS.index(spec["cdiVersion"]) >= CDI_VERSIONS.index(required), (
        f"content needs {required}, spec says {spec['cdiVersion']}"
    )
    vendor, _, klass = spec["kind"].partition("/")
    assert vendor and klass and "/" not in klass, spec["kind"]
    assert _vendor_or_class_ok(vendor) and _vendor_or_class_ok(klass), spec["kind"]
    assert spec["devices"], "a spec needs at least one device"
    names = [d["name"] for d in spec["devices"]]
    assert len(set(names)) == len(names)
    for device in spec["devices"]:
        assert set(device) <= _DEVICE_KEYS
        assert _device_name_ok(device["name"]), device["name"]
        edits = device["containerEdits"]
        assert set(edits) <= _EDIT_KEYS
        assert any(edits.get(k) for k in _EDIT_KEYS), "empty device edits"
        for var in edits.get("env", []):
            assert isinstance(var, str) and var.find("=") > 0, var
        for node in edits.get("deviceNodes", []):
            assert set(node) <= _NODE_KEYS
            assert node["path"]
            assert node.get("type", "") in {"", "b", "c", "u", "p"}
            perms = node.get("permissions", "")
            assert perms in {"", "none"} or not perms.strip("rwm"), perms
        for mount in edits.get("mounts", []):
            assert set(mount) <= _MOUNT_KEYS
            assert mount["hostPath"] and mount["containerPath"]


def parse_qualified(device_id: str) -> tuple[str, str, str]:
    """The CDI parser's split of ``vendor/class=name``."""
    qualifier, _, name = device_id.partition("=")
    vendor, _, klass = qualifier.partition("/")
    assert _vendor_or_class_ok(vendor) and _vendor_or_class_ok(klass) and _device_name_ok(name)
    return vendor, klass, name


def test_the_checker_refuses_what_a_cdi_library_refuses() -> None:
    good = cdi_spec(UID2, grant())
    check_cdi_spec(good)
    too_old = {**good, "cdiVersion": "0.4.0"}  # hostPath and a digit-first name need 0.5.0
    unknown = {**good, "cdiVersion": "0.9.0"}
    extra = {**good, "vendorField": 1}
    bad_kind = {**good, "kind": "nvswitch-dp.io/partition/x"}
    for spec in (too_old, unknown, extra, bad_kind):
        with pytest.raises(AssertionError):
            check_cdi_spec(spec)


# --------------------------------------------------------------- the spec


ADDRESSES = "0000:db:00.0,0000:ba:00.0,0000:ab:00.0,0000:9a:00.0"


def grant(groups: tuple[int, ...] = (61, 62, 63, 64)) -> ContainerGrant:
    devices = [DeviceNode("/dev/vfio/vfio", "/dev/vfio/vfio")]
    devices += [DeviceNode(f"/dev/vfio/{g}", f"/dev/vfio/{g}") for g in groups]
    envs = {
        "PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X": ADDRESSES,
        "NVSWITCH_DP_PARTITION_IDS": "4",
        "NVSWITCH_DP_PARTITION_MODULES": "5:6:7:8",
    }
    annotations = {"nvswitch-dp.io/partition-ids": "4"}
    return ContainerGrant(tuple(devices), envs, annotations)


def test_spec_for_a_4x_partition() -> None:
    spec = cdi_spec(UID, grant())
    check_cdi_spec(spec)
    assert spec["cdiVersion"] == CDI_VERSION == "0.5.0"
    assert spec["kind"] == KIND == "nvswitch-dp.io/partition"
    (device,) = spec["devices"]
    assert device["name"] == UID
    edits = device["containerEdits"]
    assert [n["path"] for n in edits["deviceNodes"]] == [
        "/dev/vfio/vfio", "/dev/vfio/61", "/dev/vfio/62", "/dev/vfio/63", "/dev/vfio/64",
    ]  # fmt: skip
    assert all(n["permissions"] == "rw" for n in edits["deviceNodes"])
    assert edits["env"] == [
        f"PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X={ADDRESSES}",
        "NVSWITCH_DP_PARTITION_IDS=4",
        "NVSWITCH_DP_PARTITION_MODULES=5:6:7:8",
    ]
    assert "annotations" not in spec and "annotations" not in device
    assert "mounts" not in edits
    assert json.loads(json.dumps(spec)) == spec


def test_the_version_is_the_lowest_the_content_needs() -> None:
    # A UID starting with a letter and no hostPath would be 0.3.0 content; ours always
    # carries hostPath (the container path and the host path may differ), hence 0.5.0.
    assert minimum_version(cdi_spec(UID, grant())) == CDI_VERSION
    assert minimum_version(cdi_spec(UID2, grant())) == CDI_VERSION


def test_host_paths_are_kept_apart_from_container_paths() -> None:
    g = ContainerGrant(
        (DeviceNode("/dev/vfio/vfio", "/host/dev/vfio/vfio"), DeviceNode("/dev/vfio/7", "/x/7")),
        {},
        {},
    )
    spec = cdi_spec(UID, g)
    check_cdi_spec(spec)
    nodes = spec["devices"][0]["containerEdits"]["deviceNodes"]
    assert [(n["path"], n["hostPath"]) for n in nodes] == [
        ("/dev/vfio/vfio", "/host/dev/vfio/vfio"),
        ("/dev/vfio/7", "/x/7"),
    ]
    assert "env" not in spec["devices"][0]["containerEdits"]


def test_mounts_are_read_only_bind_mounts() -> None:
    mount = CdiMount(
        "/var/lib/kubelet/plugins/gpu.nvswitch-dp.io/meta/m.json",
        "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/c/gpu0/gpu.nvswitch-dp.io-metadata.json",
    )
    spec = cdi_spec(UID, grant(), mounts=[mount])
    check_cdi_spec(spec)
    (m,) = spec["devices"][0]["containerEdits"]["mounts"]
    assert m["hostPath"] == mount.host_path and m["containerPath"] == mount.container_path
    assert "ro" in m["options"] and "bind" in m["options"]
    assert "type" not in m  # would raise the version to 0.4.0 for nothing


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (ContainerGrant((), {}, {}), "no device nodes"),
        (ContainerGrant((DeviceNode("dev/vfio/1", "/dev/vfio/1"),), {}, {}), "not absolute"),
        (ContainerGrant((DeviceNode("/dev/vfio/1", "vfio/1"),), {}, {}), "not absolute"),
        (
            ContainerGrant(
                (DeviceNode("/dev/vfio/1", "/a"), DeviceNode("/dev/vfio/1", "/b")), {}, {}
            ),
            "appears twice",
        ),
        (ContainerGrant(grant().devices, {"A=B": "c"}, {}), "invalid environment variable"),
        (ContainerGrant(grant().devices, {"": "c"}, {}), "invalid environment variable"),
    ],
)
def test_grants_that_cannot_be_a_spec_are_refused(bad: ContainerGrant, message: str) -> None:
    with pytest.raises(CdiSpecError, match=message):
        cdi_spec(UID, bad)


def test_relative_mount_paths_are_refused() -> None:
    with pytest.raises(CdiSpecError, match="not absolute"):
        cdi_spec(UID, grant(), mounts=[CdiMount("meta.json", "/x/meta.json")])


# --------------------------------------------------------------- claim UIDs


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "../../etc/cron.d/x",
        "3f2a9c1e-0b7d-4c55-9e21-6a8f0d4b7c10/..",
        "3F2A9C1E-0B7D-4C55-9E21-6A8F0D4B7C10",
        "{3f2a9c1e-0b7d-4c55-9e21-6a8f0d4b7c10}",
        "3f2a9c1e0b7d4c559e216a8f0d4b7c10",
        "3f2a9c1e-0b7d-4c55-9e21-6a8f0d4b7c10\n",
        "claim-1",
    ],
)
def test_bad_uids_are_refused_everywhere(uid: str, tmp_path: Path) -> None:
    cdi = CdiDirectory(tmp_path / "cdi")
    for call in (
        lambda: validate_claim_uid(uid),
        lambda: qualified_device_id(uid),
        lambda: spec_file_name(uid),
        lambda: cdi_spec(uid, grant()),
        lambda: cdi.write(uid, grant()),
        lambda: cdi.remove(uid),
    ):
        with pytest.raises(InvalidClaimUid, match="lower-case UUID"):
            call()
    assert not (tmp_path / "cdi").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@given(st.uuids())
def test_every_uuid_is_a_valid_cdi_device_name(value: uuid.UUID) -> None:
    uid = str(value)
    assert validate_claim_uid(uid) == uid
    assert parse_qualified(qualified_device_id(uid)) == ("nvswitch-dp.io", "partition", uid)
    check_cdi_spec(cdi_spec(uid, grant()))


@given(st.text(max_size=40))
def test_only_uuids_pass(text: str) -> None:
    try:
        canonical = str(uuid.UUID(text))
    except ValueError:
        canonical = None
    assert is_claim_uid(text) is (canonical == text)


# --------------------------------------------------------------- the directory


def test_write_names_the_file_and_returns_the_qualified_id(tmp_path: Path) -> None:
    cdi = CdiDirectory(tmp_path / "run" / "cdi")  # created on the first write
    device_id = cdi.write(UID, grant())
    assert device_id == f"nvswitch-dp.io/partition={UID}"
    path = tmp_path / "run" / "cdi" / f"nvswitch-dp.io-partition_{UID}.json"
    assert cdi.spec_path(UID) == path
    assert json.loads(path.read_text()) == cdi_spec(UID, grant())
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(cdi.path) == [path.name]  # no temporary file left
    assert cdi.claim_uids() == {UID}


def test_rewrite_replaces_and_remove_is_idempotent(tmp_path: Path) -> None:
    cdi = CdiDirectory(tmp_path)
    cdi.write(UID, grant((1,)))
    cdi.write(UID2, grant((2,)))
    cdi.write(UID, grant((3, 4)))
    spec = json.loads(cdi.spec_path(UID).read_text())
    paths = [n["path"] for n in spec["devices"][0]["containerEdits"]["deviceNodes"]]
    assert paths == ["/dev/vfio/vfio", "/dev/vfio/3", "/dev/vfio/4"]
    assert cdi.claim_uids() == {UID, UID2}
    cdi.remove(UID)
    cdi.remove(UID)
    cdi.remove("9d7a2a52-7a43-4f0e-9a35-1b8d2c0e6f11")  # never written
    assert cdi.claim_uids() == {UID2}
    assert json.loads(cdi.spec_path(UID2).read_text()) == cdi_spec(UID2, grant((2,)))


def test_a_missing_directory_has_no_claims(tmp_path: Path) -> None:
    cdi = CdiDirectory(tmp_path / "absent")
    assert cdi.claim_uids() == set()
    cdi.remove(UID)
    assert cdi.discard_partial_writes() == 0


def test_other_files_in_the_directory_are_left_alone(tmp_path: Path) -> None:
    others = {
        "nvidia.com-gpu.yaml": "cdiVersion: 0.5.0\n",
        "nvswitch-dp.io-partition_not-a-uid.json": "{}",
        f"nvswitch-dp.io-partition_{UID}.yaml": "{}",
        f"other.io-partition_{UID}.json": "{}",
    }
    for name, text in others.items():
        (tmp_path / name).write_text(text)
    cdi = CdiDirectory(tmp_path)
    cdi.write(UID2, grant())
    assert cdi.claim_uids() == {UID2}
    cdi.remove(UID2)
    assert sorted(os.listdir(tmp_path)) == sorted(others)


def test_a_failed_replace_keeps_the_old_spec_and_leaves_no_temporary(tmp_path: Path) -> None:
    cdi = CdiDirectory(tmp_path)
    # A directory in the spec's place makes the rename fail (EISDIR) after the write.
    blocker = cdi.spec_path(UID)
    blocker.mkdir()
    (blocker / "keep").write_text("x")
    with pytest.raises(OSError):
        cdi.write(UID, grant())
    assert sorted(os.listdir(tmp_path)) == [blocker.name]
    assert (blocker / "keep").read_text() == "x"


def test_an_invalid_grant_writes_nothing(tmp_path: Path) -> None:
    cdi = CdiDirectory(tmp_path)
    cdi.write(UID, grant())
    before = cdi.spec_path(UID).read_bytes()
    with pytest.raises(CdiSpecError):
        cdi.write(UID, ContainerGrant((), {}, {}))
    assert cdi.spec_path(UID).read_bytes() == before
    assert os.listdir(tmp_path) == [cdi.spec_path(UID).name]


def test_partial_writes_are_discarded_and_never_read_as_specs(tmp_path: Path) -> None:
    cdi = CdiDirectory(tmp_path)
    cdi.write(UID, grant())
    leftover = tmp_path / f".nvswitch-dp.io-partition_{UID2}.json.k3j2.tmp"
    leftover.write_text('{"cdiVersion": "0.5.0", "ki')  # what a killed writer leaves
    foreign = tmp_path / ".other.tmp"
    foreign.write_text("")
    # Runtimes read only *.json / *.yaml: the leftover's extension is .tmp.
    assert leftover.suffix == ".tmp"
    assert cdi.claim_uids() == {UID}
    assert cdi.discard_partial_writes() == 1
    assert sorted(os.listdir(tmp_path)) == sorted([foreign.name, cdi.spec_path(UID).name])
