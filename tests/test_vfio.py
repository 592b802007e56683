"""PCI ID table, GPU discovery, the module-map join, VFIO health, and the simulated tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sysfs_helpers import FakeSysfs, write_function

from nvswitch_dp.fabric.platforms import PLATFORMS, platform
from nvswitch_dp.vfio.discovery import (
    GroupMember,
    InventoryError,
    PciGpu,
    VfioSnapshot,
    build_inventory,
    decide_vfio_problem,
    discover_gpus,
    vfio_problem,
)
from nvswitch_dp.vfio.pci_ids import (
    GPU_DEVICE_IDS,
    NVSWITCH_DEVICE_IDS,
    device_key,
    normalize_device_key,
)
from nvswitch_dp.vfio.simulate import faults
from nvswitch_dp.vfio.simulate.node import SimulatedNode, SimulationError

H200 = {"10de:2335": "H200 SXM 141GB"}

# ---------------------------------------------------------------------------- PCI IDs


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("10de:2330", "H100 SXM5 80GB"),
        ("10de:2331", "H100 PCIe"),
        ("10de:2335", "H200 SXM 141GB"),
        ("10de:2337", "H100 SXM5 64GB"),
        ("10de:2338", "H100 SXM5 96GB"),
        ("10de:2339", "H100 SXM5 94GB"),
        ("10de:233b", "H200 NVL"),
        ("10de:2329", "H20"),
        ("10de:232c", "H20 HBM3e"),
        ("10de:2324", "H800"),
        ("10de:2901", "B200"),
        ("10de:2909", "HGX B200"),
        ("10de:20b0", "A100 SXM4 40GB"),
        ("10de:20b2", "A100 SXM4 80GB"),
    ],
)
def test_gpu_table_names_every_known_id(key: str, name: str) -> None:
    assert GPU_DEVICE_IDS[key] == name


def test_nvswitches_are_not_gpus() -> None:
    assert set(NVSWITCH_DEVICE_IDS) == {"10de:1af1", "10de:22a3"}
    assert not set(NVSWITCH_DEVICE_IDS) & set(GPU_DEVICE_IDS)


@pytest.mark.parametrize("text", ["10de:2335", "10DE:2335", "0x10de:0x2335", " 10de:2335\n"])
def test_device_keys_normalize(text: str) -> None:
    assert normalize_device_key(text) == "10de:2335"


@pytest.mark.parametrize("text", ["10de", "10de:23350", "10de-2335", "xyzw:2335", ""])
def test_malformed_device_keys_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="vendor:device"):
        normalize_device_key(text)


def test_device_key_reads_sysfs_text() -> None:
    assert device_key("0x10DE\n", "0x2335\n") == "10de:2335"


# ---------------------------------------------------------------------------- discovery


def test_discovers_the_eight_h200s_of_a_simulated_board(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    gpus = discover_gpus(node.sysfs_root, node.dev_root, GPU_DEVICE_IDS)
    plat = platform("hgx-h200")
    assert [g.address for g in gpus] == sorted(plat.module_map().values())
    assert {g.name for g in gpus} == {"H200 SXM 141GB"}
    assert {g.key for g in gpus} == {"10de:2335"}
    assert {g.driver for g in gpus} == {"vfio-pci"}
    assert len({g.iommu_group for g in gpus}) == 8
    by_address = {g.address: g for g in gpus}
    for module, address in plat.module_map().items():
        assert by_address[address].numa_node == plat.numa_node(module)
        assert by_address[address].iommu_group == node.gpu_group(module)


def test_bus_entries_are_links_into_the_device_tree(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    entry = node.sysfs_root / "bus" / "pci" / "devices" / node.module_map[1]
    assert entry.is_symlink()
    assert (node.sysfs_root / "devices") in entry.resolve().parents


@pytest.mark.parametrize("name", sorted(PLATFORMS))
def test_every_platform_discovers_and_maps_all_its_gpus(fake_sysfs: FakeSysfs, name: str) -> None:
    node = fake_sysfs(name)
    gpus = discover_gpus(node.sysfs_root, node.dev_root, GPU_DEVICE_IDS)
    assert len(gpus) == platform(name).gpu_count
    inventory = build_inventory(node.module_map, gpus)
    assert sorted(inventory.gpus) == list(range(1, platform(name).gpu_count + 1))
    assert inventory.unmapped == ()
    assert [vfio_problem(node.sysfs_root, node.dev_root, g) for g in gpus] == [None] * len(gpus)


def test_only_configured_ids_are_discovered(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    assert discover_gpus(node.sysfs_root, node.dev_root, {"10de:2330": "H100"}) == ()
    upper = discover_gpus(node.sysfs_root, node.dev_root, {"10DE:2335": "mine"})
    assert {g.name for g in upper} == {"mine"}


def test_bad_device_ids_raise(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    with pytest.raises(ValueError, match="vendor:device"):
        discover_gpus(node.sysfs_root, node.dev_root, {"h200": "x"})


def test_other_functions_are_ignored(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    write_function(sysfs, "0000:5d:00.0", group=1)
    write_function(sysfs, "0000:00:02.0", vendor="0x8086", device="0x2335", pci_class="0x030000")
    write_function(sysfs, "0000:5d:00.1", pci_class="0x040300", driver="snd_hda_intel")
    write_function(sysfs, "0000:05:00.0", device="0x22a3", pci_class="0x068000", driver="nvidia")
    write_function(sysfs, "0000:3a:00.0", device="0x2330")  # an H100 where only H200s count
    gpus = discover_gpus(sysfs, tmp_path / "dev", {**H200, "10de:22a3": "switch"})
    assert [g.address for g in gpus] == ["0000:5d:00.0"]


@pytest.mark.parametrize(
    ("numa", "expected"), [("-1", None), ("0", 0), ("1", 1), (None, None), ("junk", None)]
)
def test_numa_node(tmp_path: Path, numa: str | None, expected: int | None) -> None:
    write_function(tmp_path, "0000:5d:00.0", numa_node=numa)
    (gpu,) = discover_gpus(tmp_path, tmp_path, H200)
    assert gpu.numa_node == expected


def test_vga_class_counts_and_unbound_gpus_are_still_found(tmp_path: Path) -> None:
    write_function(tmp_path, "0000:5d:00.0", pci_class="0x030000", driver=None)
    (gpu,) = discover_gpus(tmp_path, tmp_path, H200)
    assert gpu.driver is None
    assert gpu.iommu_group is None


def test_driver_on_a_real_node_is_read_through_links(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    faults.unbind(node, node.module_map[3], to="nvidia")
    gpus = {g.address: g for g in discover_gpus(node.sysfs_root, node.dev_root, H200)}
    assert gpus[node.module_map[3]].driver == "nvidia"


def test_missing_sysfs_finds_nothing(tmp_path: Path) -> None:
    assert discover_gpus(tmp_path / "nope", tmp_path, H200) == ()


# ---------------------------------------------------------------------------- inventory


def _gpu(address: str, name: str = "H200 SXM 141GB") -> PciGpu:
    return PciGpu(address, "10de", "2335", name, "vfio-pci", 1, 0)


def test_inventory_joins_modules_to_gpus() -> None:
    a, b = _gpu("0000:5d:00.0"), _gpu("0000:3a:00.0")
    inventory = build_inventory({1: "0000:5D:00.0", 2: "0000:3a:00.0"}, [a, b])
    assert inventory.gpus == {1: a, 2: b}
    assert inventory.warnings == ()
    assert inventory.missing == {}


def test_a_mapped_address_without_a_gpu_is_an_error_naming_module_and_address() -> None:
    with pytest.raises(InventoryError, match=r"module 2: no configured GPU at 0000:3a:00\.0"):
        build_inventory({1: "0000:5d:00.0", 2: "0000:3a:00.0"}, [_gpu("0000:5d:00.0")])


def test_lenient_inventory_records_missing_gpus() -> None:
    inventory = build_inventory(
        {1: "0000:5d:00.0", 2: "0000:3a:00.0"}, [_gpu("0000:5d:00.0")], strict=False
    )
    assert set(inventory.gpus) == {1}
    assert "0000:3a:00.0" in inventory.missing[2]
    assert any("module 2" in w for w in inventory.warnings)


def test_unmapped_gpus_are_warnings() -> None:
    extra = _gpu("0000:9a:00.0")
    inventory = build_inventory({1: "0000:5d:00.0"}, [_gpu("0000:5d:00.0"), extra])
    assert inventory.unmapped == (extra,)
    assert inventory.warnings == (
        "GPU 0000:9a:00.0 (H200 SXM 141GB) is in no module_map entry and will not be served",
    )


def test_two_modules_on_one_address_is_an_error() -> None:
    with pytest.raises(InventoryError, match="already module 1"):
        build_inventory({1: "0000:5d:00.0", 2: "0000:5D:00.0"}, [_gpu("0000:5d:00.0")])


# ---------------------------------------------------------------------------- VFIO: pure

A = "0000:5d:00.0"
HEALTHY = VfioSnapshot(
    address=A,
    present=True,
    driver="vfio-pci",
    iommu_group=7,
    group_node_exists=True,
    container_node_exists=True,
)


def _with(**changes: object) -> VfioSnapshot:
    import dataclasses

    return dataclasses.replace(HEALTHY, **changes)  # type: ignore[arg-type]


def _member(driver: str | None, pci_class: int | None = 0x040300) -> GroupMember:
    return GroupMember("0000:5d:00.1", driver, pci_class)


@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        (HEALTHY, None),
        (VfioSnapshot(A, present=False), f"{A}: device is gone from the PCI bus"),
        (_with(driver="nvidia"), f"{A}: bound to nvidia, not vfio-pci"),
        (_with(driver=None), f"{A}: bound to no driver, not vfio-pci"),
        (_with(iommu_group=None), f"{A}: has no IOMMU group (is the IOMMU enabled?)"),
        (_with(group_node_exists=False), f"{A}: /dev/vfio/7 is missing"),
        (_with(container_node_exists=False), f"{A}: /dev/vfio/vfio is missing"),
        (
            _with(group_members=(_member("snd_hda_intel"),)),
            f"{A}: IOMMU group 7 is not viable: 0000:5d:00.1 is bound to snd_hda_intel, "
            "not vfio-pci",
        ),
        (_with(group_members=(_member("vfio-pci"),)), None),
        (_with(group_members=(_member("pci-stub"),)), None),
        (_with(group_members=(_member(None),)), None),  # unbound functions are viable
        (_with(group_members=(_member("pcieport", 0x060400),)), None),  # bridges are ignored
        (_with(group_members=(_member("yenta_cardbus", 0x060700),)), None),
        (_with(group_members=(_member("nvidia", None),)), "not viable"),
        # The first problem wins: the driver is checked before the group node.
        (_with(driver="nvidia", group_node_exists=False), "bound to nvidia"),
        (_with(iommu_group=None, group_node_exists=False), "no IOMMU group"),
    ],
)
def test_vfio_decision(snapshot: VfioSnapshot, expected: str | None) -> None:
    problem = decide_vfio_problem(snapshot)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None
        assert expected in problem


def test_every_blocking_member_is_named() -> None:
    members = (
        GroupMember("0000:5d:00.1", "snd_hda_intel", 0x040300),
        GroupMember("0000:5d:00.2", "xhci_hcd", 0x0C0330),
        GroupMember("0000:5c:01.0", "pcieport", 0x060400),
    )
    problem = decide_vfio_problem(_with(group_members=members))
    assert problem is not None
    assert "0000:5d:00.1 is bound to snd_hda_intel" in problem
    assert "0000:5d:00.2 is bound to xhci_hcd" in problem
    assert "0000:5c:01.0" not in problem


# ---------------------------------------------------------------------------- VFIO: real tree


def _problem(node: SimulatedNode, module: int = 1) -> str | None:
    return vfio_problem(node.sysfs_root, node.dev_root, node.module_map[module])


def test_healthy_node_has_no_problems(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    gpus = discover_gpus(node.sysfs_root, node.dev_root, H200)
    assert [vfio_problem(node.sysfs_root, node.dev_root, g) for g in gpus] == [None] * 8


def test_unbinding_to_nvidia_and_back(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    address, group = node.module_map[1], node.gpu_group(1)
    faults.unbind(node, address, to="nvidia")
    assert _problem(node) == f"{address}: bound to nvidia, not vfio-pci"
    # The kernel drops the group node with its last vfio-pci device.
    assert not (node.dev_root / "vfio" / str(group)).exists()
    assert not (node.sysfs_root / "bus/pci/drivers/vfio-pci" / address).exists()
    assert (node.sysfs_root / "bus/pci/drivers/nvidia" / address).is_symlink()
    faults.bind(node, address)
    assert _problem(node) is None
    assert (node.dev_root / "vfio" / str(group)).exists()


def test_unbinding_to_no_driver(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    faults.unbind(node, node.module_map[2])
    assert _problem(node, 2) == f"{node.module_map[2]}: bound to no driver, not vfio-pci"
    assert _problem(node, 1) is None


def test_missing_group_node(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    group = node.gpu_group(4)
    faults.remove_vfio_group(node, group)
    assert _problem(node, 4) == f"{node.module_map[4]}: /dev/vfio/{group} is missing"
    faults.restore_vfio_group(node, group)
    assert _problem(node, 4) is None


def test_missing_container_node(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    (node.dev_root / "vfio" / "vfio").unlink()
    assert _problem(node) == f"{node.module_map[1]}: /dev/vfio/vfio is missing"


def test_a_foreign_function_makes_the_group_not_viable(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    group = node.gpu_group(1)
    foreign = faults.add_foreign_function(node, group)
    assert foreign == node.module_map[1][:-1] + "1"  # the GPU's own slot, function 1
    assert _problem(node) == (
        f"{node.module_map[1]}: IOMMU group {group} is not viable: "
        f"{foreign} is bound to snd_hda_intel, not vfio-pci"
    )
    assert _problem(node, 2) is None
    faults.remove_foreign_function(node, foreign)
    assert _problem(node) is None


def test_a_bridge_in_the_group_is_fine(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    bridge = faults.add_function(
        node,
        node.gpu_group(1),
        vendor="1000",
        device="c030",
        pci_class=0x060400,
        driver="pcieport",
    )
    assert _problem(node) is None
    # Binding the extra function to vfio-pci too would also be fine; nvidia is not.
    faults.bind(node, bridge, "nvidia")
    assert _problem(node) is None  # still a bridge


def test_a_vanished_gpu_and_its_return(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    address, group = node.module_map[5], node.gpu_group(5)
    gpu = next(
        g for g in discover_gpus(node.sysfs_root, node.dev_root, H200) if g.address == address
    )
    faults.remove_device(node, address)
    assert vfio_problem(node.sysfs_root, node.dev_root, gpu) == (
        f"{address}: device is gone from the PCI bus"
    )
    assert not (node.dev_root / "vfio" / str(group)).exists()
    assert not (node.sysfs_root / "kernel" / "iommu_groups" / str(group)).exists()
    assert len(discover_gpus(node.sysfs_root, node.dev_root, H200)) == 7
    with pytest.raises(InventoryError, match=f"module 5: no configured GPU at {address}"):
        build_inventory(node.module_map, discover_gpus(node.sysfs_root, node.dev_root, H200))
    faults.restore_device(node, address)
    assert vfio_problem(node.sysfs_root, node.dev_root, gpu) is None


# ---------------------------------------------------------------------------- simulated tree


def test_tree_links_point_where_the_kernel_points(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    sysfs, address = node.sysfs_root, node.module_map[1]
    device = (sysfs / "bus" / "pci" / "devices" / address).resolve()
    group = node.gpu_group(1)
    assert (device / "driver").resolve() == (sysfs / "bus/pci/drivers/vfio-pci").resolve()
    assert (device / "iommu_group").resolve() == (sysfs / f"kernel/iommu_groups/{group}").resolve()
    assert (device / "subsystem").resolve() == (sysfs / "bus/pci").resolve()
    assert (sysfs / f"kernel/iommu_groups/{group}/devices/{address}").resolve() == device
    assert (sysfs / f"bus/pci/drivers/vfio-pci/{address}").resolve() == device
    for link in (device / "driver", device / "iommu_group"):
        assert not os.readlink(link).startswith("/")  # relative, as sysfs has them
    assert (device / "vendor").read_text() == "0x10de\n"
    assert (device / "device").read_text() == "0x2335\n"
    assert (device / "class").read_text() == "0x030200\n"
    assert (node.dev_root / "vfio" / "vfio").is_file()
    assert (node.dev_root / "vfio" / str(group)).is_file()


def test_nvswitches_are_simulated_with_the_nvidia_driver(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    switches = [fn for fn in node.functions.values() if (fn.vendor, fn.device) == ("10de", "22a3")]
    assert len(switches) == 4
    for fn in switches:
        device = node.sysfs_root / "bus" / "pci" / "devices" / fn.address
        assert (device / "class").read_text() == "0x068000\n"
        assert os.readlink(device / "driver").endswith("/nvidia")
        assert not (node.dev_root / "vfio" / str(fn.iommu_group)).exists()
    groups = [fn.iommu_group for fn in node.functions.values()]
    assert len(groups) == len(set(groups))  # every function in its own group


def test_b200_switches_are_not_pci_functions(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs("hgx-b200")
    assert not [fn for fn in node.functions.values() if fn.pci_class == 0x068000]


def test_building_again_resets_faults(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    faults.unbind(node, node.module_map[1], to="nvidia")
    faults.add_foreign_function(node, node.gpu_group(2))
    again = fake_sysfs()
    assert again == node
    assert _problem(again, 1) is None
    assert _problem(again, 2) is None


def test_faults_on_unknown_addresses_raise(fake_sysfs: FakeSysfs) -> None:
    node = fake_sysfs()
    with pytest.raises(SimulationError):
        faults.unbind(node, "0000:01:00.0")
    with pytest.raises(SimulationError):
        faults.add_foreign_function(node, 999)
    with pytest.raises(SimulationError):
        faults.remove_vfio_group(node, 999)
    with pytest.raises(SimulationError):
        faults.restore_device(node, "0000:01:00.0")
    with pytest.raises(SimulationError):
        node.group_of("0000:01:00.0")


def test_a_node_value_built_by_hand_still_drives_faults(fake_sysfs: FakeSysfs) -> None:
    built = fake_sysfs()
    node = SimulatedNode(built.sysfs_root, built.dev_root, built.module_map)  # no functions
    assert node.gpu_group(1) == built.gpu_group(1)
    faults.unbind(node, node.module_map[1], to="nvidia")
    assert _problem(node) is not None
    faults.bind(node, node.module_map[1])
    assert _problem(node) is None
