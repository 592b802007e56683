"""The simulated node's kernel: driver binding by the kernel's rules, the nvidia driver's
/proc and /dev nodes, simulated processes holding devices, the marker, and the simulated
``nvidia-smi -q`` checked against the real H200 capture."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from nvswitch_dp.fabric.platforms import PLATFORMS, platform
from nvswitch_dp.ports import PciKernel
from nvswitch_dp.vfio.binding import find_open_holders, read_device_minor
from nvswitch_dp.vfio.identity import parse_nvidia_smi_q
from nvswitch_dp.vfio.nvidia_smi_sim import (
    DRIVER_NOT_LOADED,
    EXIT_DRIVER_NOT_LOADED,
    EXIT_INVALID_ARGUMENT,
    EXIT_NOT_FOUND,
    NO_DEVICES,
    SYSFS_ENV,
    install_nvidia_smi,
    run,
)
from nvswitch_dp.vfio.simulate import SimulatedKernel, build_simulated_node, load_simulated_node
from nvswitch_dp.vfio.simulate.faults import bind, hold_open, release_open, unbind
from nvswitch_dp.vfio.simulate.node import SIMULATION_MARKER, SimulatedNode, SimulationError

FIXTURES = Path(__file__).parent / "fixtures" / "h200-sxm-passthrough"
NOW = 1796408834.0  # any fixed time
UUID = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

Build = Callable[..., SimulatedNode]


@pytest.fixture
def build(tmp_path: Path) -> Build:
    """``build(gpu_driver=..., vfio_loaded=..., platform_name=...)``: a fresh node."""

    def make(
        platform_name: str = "hgx-h200",
        *,
        gpu_driver: str | None = "vfio-pci",
        vfio_loaded: bool = True,
    ) -> SimulatedNode:
        return build_simulated_node(
            tmp_path / "node",
            platform(platform_name),
            gpu_driver=gpu_driver,
            vfio_loaded=vfio_loaded,
        )

    return make


# ---------------------------------------------------------------------------- helpers


def _pci(node: SimulatedNode) -> Path:
    return node.sysfs_root / "bus" / "pci"


def _driver(node: SimulatedNode, address: str) -> str | None:
    try:
        return (_pci(node) / "devices" / address / "driver").readlink().name
    except OSError:
        return None


def _override(node: SimulatedNode, address: str) -> str:
    return (_pci(node) / "devices" / address / "driver_override").read_text()


def _info(node: SimulatedNode, address: str) -> Path:
    return node.proc_root / "driver" / "nvidia" / "gpus" / address / "information"


def _write(kernel: SimulatedKernel, node: SimulatedNode, relative: str, value: str) -> None:
    kernel.write_attribute(node.sysfs_root / relative, value)


def _bridge(node: SimulatedNode) -> str:
    """The root port above module 1's GPU."""
    gpu_dir = (_pci(node) / "devices" / node.module_map[1]).resolve()
    return gpu_dir.parent.name


def _move_to_vfio(kernel: SimulatedKernel, node: SimulatedNode, address: str) -> None:
    old = _driver(node, address)
    _write(kernel, node, f"bus/pci/devices/{address}/driver_override", "vfio-pci\n")
    if old is not None:
        _write(kernel, node, f"bus/pci/drivers/{old}/unbind", address + "\n")
    _write(kernel, node, "bus/pci/drivers_probe", address + "\n")


# ---------------------------------------------------------------------------- building


def test_defaults_are_unchanged_gpus_on_vfio_pci_with_the_modules_loaded(build: Build) -> None:
    node = build()
    assert {_driver(node, a) for a in node.module_map.values()} == {"vfio-pci"}
    for module in ("vfio", "vfio_pci", "vfio_pci_core", "vfio_iommu_type1"):
        assert (node.sysfs_root / "module" / module).is_dir()
    assert (node.dev_root / "vfio" / "vfio").is_file()
    assert node.proc_root == node.sysfs_root.parent / "proc"
    assert not list((node.proc_root / "driver" / "nvidia" / "gpus").iterdir())


def test_a_fresh_node_has_its_gpus_on_nvidia_and_no_vfio(build: Build) -> None:
    node = build(gpu_driver="nvidia", vfio_loaded=False)
    assert {_driver(node, a) for a in node.module_map.values()} == {"nvidia"}
    assert not list((node.sysfs_root / "module").glob("vfio*"))
    assert not (_pci(node) / "drivers" / "vfio-pci").exists()
    assert not (node.dev_root / "vfio").exists()
    for module, address in node.module_map.items():
        assert read_device_minor(node.proc_root, address) == module - 1
        assert (node.dev_root / f"nvidia{module - 1}").is_file()
    assert (node.dev_root / "nvidiactl").is_file()


def test_gpus_cannot_start_on_an_unloaded_vfio_pci(build: Build) -> None:
    with pytest.raises(ValueError, match="vfio modules not loaded"):
        build(vfio_loaded=False)


def test_identities_are_deterministic_and_shaped_like_the_real_ones(build: Build) -> None:
    node = build()
    assert set(node.identities) == set(node.module_map.values())
    for module, address in node.module_map.items():
        identity = node.identities[address]
        assert (identity.address, identity.module_id, identity.minor) == (
            address,
            module,
            module - 1,
        )
        assert UUID.match(identity.uuid)
        assert identity.serial == f"16500000000{module:02d}"
        assert len(identity.serial) == len("1650000000001")  # the capture's serial
    assert build().identities == node.identities  # same platform, same identities
    other = build("hgx-h100").identities
    assert {i.uuid for i in other.values()}.isdisjoint(i.uuid for i in node.identities.values())
    assert len({i.uuid for i in node.identities.values()}) == 8


@pytest.mark.parametrize("gpu_driver", ["vfio-pci", "nvidia", None])
def test_the_marker_round_trips(build: Build, gpu_driver: str | None) -> None:
    node = build(gpu_driver=gpu_driver)
    assert (node.sysfs_root / SIMULATION_MARKER).is_file()
    assert load_simulated_node(node.sysfs_root) == node


def test_no_marker_means_a_real_sysfs(tmp_path: Path) -> None:
    assert load_simulated_node(tmp_path) is None
    with pytest.raises(SimulationError, match="no marker"):
        SimulatedKernel.for_sysfs(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ('{"format": "other"}', "not a simulated-node marker"),
        ('{"format": "nvswitch-dp-simulated-node", "version": 99}', "version 99"),
        (
            '{"format": "nvswitch-dp-simulated-node", "version": 1, "platform": "x", "gpus": []}',
            "unknown platform",
        ),
    ],
)
def test_a_bad_marker_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / SIMULATION_MARKER).write_text(text)
    with pytest.raises(SimulationError, match=message):
        load_simulated_node(tmp_path)


# ---------------------------------------------------------------------------- binding rules


def test_override_unbind_probe_moves_a_gpu_from_nvidia_to_vfio_pci(build: Build) -> None:
    node = build(gpu_driver="nvidia")
    kernel = SimulatedKernel(node)
    address, group = node.module_map[1], node.gpu_group(1)
    _write(kernel, node, f"bus/pci/devices/{address}/driver_override", "vfio-pci\n")
    assert _override(node, address) == "vfio-pci\n"
    assert _driver(node, address) == "nvidia"  # an override binds nothing
    _write(kernel, node, "bus/pci/drivers/nvidia/unbind", address)
    assert _driver(node, address) is None
    assert not _info(node, address).exists()
    assert not (node.dev_root / "vfio" / str(group)).exists()
    _write(kernel, node, "bus/pci/drivers_probe", address + "\n")
    assert _driver(node, address) == "vfio-pci"
    assert (node.dev_root / "vfio" / str(group)).is_file()
    assert (_pci(node) / "drivers" / "vfio-pci" / address).resolve() == (
        _pci(node) / "devices" / address
    ).resolve()
    assert _driver(node, node.module_map[2]) == "nvidia"  # nothing else moved


def test_without_an_override_drivers_probe_gives_the_gpu_back_to_nvidia(build: Build) -> None:
    node = build()
    kernel = SimulatedKernel(node)
    address, group = node.module_map[3], node.gpu_group(3)
    _write(kernel, node, f"bus/pci/devices/{address}/driver_override", "\n")
    _write(kernel, node, "bus/pci/drivers/vfio-pci/unbind", address)
    assert not (node.dev_root / "vfio" / str(group)).exists()
    _write(kernel, node, "bus/pci/drivers_probe", address)
    assert _driver(node, address) == "nvidia"
    assert read_device_minor(node.proc_root, address) == 2


@pytest.mark.parametrize(
    ("written", "reads"),
    [
        ("vfio-pci\n", "vfio-pci\n"),
        ("vfio-pci", "vfio-pci\n"),
        ("nvidia\nrest", "nvidia\n"),
        ("pci-stub\0junk", "pci-stub\n"),
        ("\n", "(null)\n"),
        ("", "(null)\n"),
        ("\0", "(null)\n"),
    ],
)
def test_driver_override_store(build: Build, written: str, reads: str) -> None:
    node = build()
    kernel = SimulatedKernel(node)
    address = node.module_map[1]
    _write(kernel, node, f"bus/pci/devices/{address}/driver_override", "something\n")
    kernel.write_attribute(_pci(node) / "devices" / address / "driver_override", written)
    assert _override(node, address) == reads
    assert _driver(node, address) == "vfio-pci"


def test_drivers_probe_leaves_a_bound_device_where_it_is(build: Build) -> None:
    node = build(gpu_driver="nvidia")
    kernel = SimulatedKernel(node)
    address = node.module_map[1]
    _write(kernel, node, f"bus/pci/devices/{address}/driver_override", "vfio-pci")
    _write(kernel, node, "bus/pci/drivers_probe", address)
    assert _driver(node, address) == "nvidia"


def test_new_id_binds_only_unbound_devices_and_nvidia_registered_first_wins(
    build: Build,
) -> None:
    node = build(gpu_driver="nvidia")
    kernel = SimulatedKernel(node)
    free, taken, later = node.module_map[1], node.module_map[2], node.module_map[3]
    _write(kernel, node, "bus/pci/drivers/nvidia/unbind", free)
    _write(kernel, node, "bus/pci/drivers/vfio-pci/new_id", "10de 2335\n")
    assert _driver(node, free) == "vfio-pci"
    assert _driver(node, taken) == "nvidia"  # never taken from another driver
    with pytest.raises(OSError) as again:
        _write(kernel, node, "bus/pci/drivers/vfio-pci/new_id", "10de 2335")
    assert again.value.errno == errno.EEXIST
    # Unbound later, with no override, the GPU matches both; nvidia registered first.
    _write(kernel, node, "bus/pci/drivers/nvidia/unbind", later)
    _write(kernel, node, "bus/pci/drivers_probe", later)
    assert _driver(node, later) == "nvidia"
    # The dynamic ID outlives this kernel value: it is in the marker.
    kernel2 = SimulatedKernel.for_sysfs(node.sysfs_root)
    _write(kernel2, node, "bus/pci/drivers/vfio-pci/remove_id", "10de 2335")
    with pytest.raises(OSError) as gone:
        _write(kernel2, node, "bus/pci/drivers/vfio-pci/remove_id", "10de 2335")
    assert gone.value.errno == errno.ENODEV
    assert _driver(node, free) == "vfio-pci"  # remove_id unbinds nothing


def test_new_id_respects_another_drivers_override(build: Build) -> None:
    node = build(gpu_driver=None)
    kernel = SimulatedKernel(node)
    kept = node.module_map[4]
    _write(kernel, node, f"bus/pci/devices/{kept}/driver_override", "nvidia")
    _write(kernel, node, "bus/pci/drivers/vfio-pci/new_id", "10de 2335")
    assert _driver(node, kept) is None
    assert {_driver(node, a) for m, a in node.module_map.items() if m != 4} == {"vfio-pci"}


def test_bind_store_binds_one_unbound_matching_device(build: Build) -> None:
    node = build(gpu_driver="nvidia")
    kernel = SimulatedKernel(node)
    address = node.module_map[5]
    _write(kernel, node, "bus/pci/drivers/nvidia/unbind", address)
    _write(kernel, node, "bus/pci/drivers/nvidia/bind", address + "\n")
    assert _driver(node, address) == "nvidia"
    assert _info(node, address).is_file()


ERRORS: list[tuple[str, str | None, str, str, int]] = [
    # (name, gpu_driver, path relative to sysfs with {a} for module 1's GPU, value, errno)
    (
        "unbind from the wrong driver",
        "nvidia",
        "bus/pci/drivers/vfio-pci/unbind",
        "{a}",
        errno.ENODEV,
    ),
    ("unbind an unbound device", None, "bus/pci/drivers/nvidia/unbind", "{a}", errno.ENODEV),
    (
        "unbind an unknown device",
        "nvidia",
        "bus/pci/drivers/nvidia/unbind",
        "0000:01:00.0",
        errno.ENODEV,
    ),
    ("names are case-sensitive", "nvidia", "bus/pci/drivers/nvidia/unbind", "{A}", errno.ENODEV),
    ("probe an unknown device", "nvidia", "bus/pci/drivers_probe", "0000:01:00.0", errno.ENODEV),
    ("bind without a match", "nvidia", "bus/pci/drivers/vfio-pci/bind", "{a}", errno.ENODEV),
    ("bind a bound device", "vfio-pci", "bus/pci/drivers/nvidia/bind", "{a}", errno.EBUSY),
    ("new_id with one field", "nvidia", "bus/pci/drivers/vfio-pci/new_id", "10de", errno.EINVAL),
    ("new_id not hex", "nvidia", "bus/pci/drivers/vfio-pci/new_id", "nvidia gpu", errno.EINVAL),
    ("a read-only attribute", "nvidia", "bus/pci/devices/{a}/vendor", "0x1234", errno.EACCES),
    ("a missing attribute", "nvidia", "bus/pci/devices/{a}/no_such", "1", errno.ENOENT),
    ("a directory", "nvidia", "bus/pci/devices/{a}", "1", errno.EISDIR),
    ("the marker", "nvidia", SIMULATION_MARKER, "[]", errno.EACCES),
    (
        "an override of a page",
        "nvidia",
        "bus/pci/devices/{a}/driver_override",
        "x" * 4095,
        errno.EINVAL,
    ),
]


@pytest.mark.parametrize(
    ("gpu_driver", "relative", "value", "code"),
    [e[1:] for e in ERRORS],
    ids=[e[0] for e in ERRORS],
)
def test_refused_writes_raise_the_kernels_errno(
    build: Build, gpu_driver: str | None, relative: str, value: str, code: int
) -> None:
    node = build(gpu_driver=gpu_driver)
    kernel = SimulatedKernel(node)
    before = {a: _driver(node, a) for a in node.module_map.values()}
    address = node.module_map[1]
    fill = {"a": address, "A": address.upper()}
    with pytest.raises(OSError) as refused:
        _write(kernel, node, relative.format(**fill), value.format(**fill))
    assert refused.value.errno == code
    assert {a: _driver(node, a) for a in node.module_map.values()} == before


def test_a_path_outside_the_simulated_sysfs_is_refused(build: Build, tmp_path: Path) -> None:
    node = build()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    with pytest.raises(OSError) as refused:
        SimulatedKernel(node).write_attribute(elsewhere, "1")
    assert refused.value.errno == errno.EACCES


# ---------------------------------------------------------------------------- modules


def test_without_vfio_pci_loaded_drivers_probe_leaves_the_gpu_unbound(build: Build) -> None:
    node = build(gpu_driver="nvidia", vfio_loaded=False)
    kernel = SimulatedKernel(node)
    address = node.module_map[1]
    _move_to_vfio(kernel, node, address)
    assert _driver(node, address) is None
    with pytest.raises(OSError) as missing:
        _write(kernel, node, "bus/pci/drivers/vfio-pci/bind", address)
    assert missing.value.errno == errno.ENOENT
    # Loading the module registers the driver, which attaches to the device its
    # override names (driver_attach), and to nothing else.
    kernel.load_module("vfio-pci")
    assert _driver(node, address) == "vfio-pci"
    assert (node.dev_root / "vfio" / str(node.gpu_group(1))).is_file()
    assert _driver(node, node.module_map[2]) == "nvidia"


def test_with_autoprobe_off_loading_the_module_binds_nothing_until_drivers_probe(
    build: Build,
) -> None:
    node = build(gpu_driver="nvidia", vfio_loaded=False)
    kernel = SimulatedKernel(node)
    address = node.module_map[1]
    _write(kernel, node, "bus/pci/drivers_autoprobe", "0\n")
    _move_to_vfio(kernel, node, address)
    kernel.load_module("vfio_pci")
    assert _driver(node, address) is None
    _write(kernel, node, "bus/pci/drivers_probe", address)
    assert _driver(node, address) == "vfio-pci"


@pytest.mark.parametrize(
    ("name", "modules", "driver_dir", "container"),
    [
        ("vfio-pci", {"vfio", "vfio_pci", "vfio_pci_core", "vfio_iommu_type1"}, True, True),
        ("vfio_pci", {"vfio", "vfio_pci", "vfio_pci_core", "vfio_iommu_type1"}, True, True),
        ("vfio_iommu_type1", {"vfio", "vfio_iommu_type1"}, False, True),
        ("vfio-pci-core", {"vfio", "vfio_pci_core", "vfio_iommu_type1"}, False, True),
        ("nvidia", set(), False, False),
    ],
)
def test_load_module(
    build: Build, name: str, modules: set[str], driver_dir: bool, container: bool
) -> None:
    node = build(gpu_driver="nvidia", vfio_loaded=False)
    kernel: PciKernel = SimulatedKernel(node)
    kernel.load_module(name)
    kernel.load_module(name)  # loaded already: nothing
    loaded = {p.name for p in (node.sysfs_root / "module").iterdir()}
    assert loaded == {"nvidia", *modules}
    assert (_pci(node) / "drivers" / "vfio-pci").is_dir() == driver_dir
    assert (node.dev_root / "vfio" / "vfio").is_file() == container


def test_an_unknown_module_is_named_in_the_error(build: Build) -> None:
    node = build()
    with pytest.raises(OSError, match="Module vfio-mdev not found") as refused:
        SimulatedKernel(node).load_module("vfio-mdev")
    assert refused.value.errno == errno.ENOENT


# ---------------------------------------------------------------------------- bridges


def test_a_bridge_never_binds_to_vfio_pci(build: Build) -> None:
    node = build()
    kernel = SimulatedKernel(node)
    bridge = _bridge(node)
    assert _driver(node, bridge) == "pcieport"
    _write(kernel, node, f"bus/pci/devices/{bridge}/driver_override", "vfio-pci")
    _write(kernel, node, "bus/pci/drivers/pcieport/unbind", bridge)
    _write(kernel, node, "bus/pci/drivers_probe", bridge)  # the probe refuses: no error
    assert _driver(node, bridge) is None
    with pytest.raises(OSError) as refused:
        _write(kernel, node, "bus/pci/drivers/vfio-pci/bind", bridge)
    assert refused.value.errno == errno.EINVAL  # the probe's error, since Linux 5.13
    _write(kernel, node, "bus/pci/drivers/vfio-pci/new_id", "1000 c030")
    assert _driver(node, bridge) is None
    _write(kernel, node, f"bus/pci/devices/{bridge}/driver_override", "")
    _write(kernel, node, "bus/pci/drivers/vfio-pci/remove_id", "1000 c030")
    _write(kernel, node, "bus/pci/drivers_probe", bridge)
    assert _driver(node, bridge) == "pcieport"


# ---------------------------------------------------------------------------- nvidia's nodes


def test_the_information_file_has_the_drivers_layout(build: Build) -> None:
    node = build(gpu_driver="nvidia")
    address = node.module_map[8]
    identity = node.identities[address]
    ours = _info(node, address).read_text().splitlines()
    # The capture's first line is the address it was read for, not part of the file.
    theirs = (FIXTURES / "proc-driver-nvidia.txt").read_text().splitlines()[1:]

    def label(line: str) -> str:  # the key and the tabs and space after it
        match = re.match(r"^[^:]+:[ \t]*", line)
        assert match is not None
        return match.group(0)

    assert [label(line) for line in ours] == [label(line) for line in theirs]
    values = {line.split(":", 1)[0]: line[len(label(line)) :] for line in ours}
    assert values["GPU UUID"] == identity.uuid
    assert values["Bus Location"] == address
    assert values["Device Minor"] == "7"
    assert values["Model"] == "NVIDIA H200"
    assert values["DMA Mask"] == "0xfffffffffffff" and values["DMA Size"] == "52 bits"


def test_proc_entry_follows_the_nvidia_binding_and_dev_node_stays(build: Build) -> None:
    node = build()
    kernel = SimulatedKernel(node)
    address = node.module_map[2]
    dev_node = node.dev_root / "nvidia1"
    assert not _info(node, address).exists() and not dev_node.exists()
    unbind(node, address, to="nvidia")  # the fault helper and the kernel agree
    assert read_device_minor(node.proc_root, address) == 1 and dev_node.is_file()
    _move_to_vfio(kernel, node, address)
    assert not _info(node, address).exists()
    assert read_device_minor(node.proc_root, address) is None
    # udev made the node on bind and nothing removes it (module docstring).
    assert dev_node.is_file()
    _write(kernel, node, f"bus/pci/devices/{address}/driver_override", "nvidia")
    _write(kernel, node, "bus/pci/drivers/vfio-pci/unbind", address)
    _write(kernel, node, "bus/pci/drivers_probe", address)
    assert read_device_minor(node.proc_root, address) == 1
    bind(node, address)
    assert not _info(node, address).exists()


def test_switches_get_no_gpu_entry(build: Build) -> None:
    node = build()
    switches = [f.address for f in node.functions.values() if f.pci_class == 0x068000]
    assert switches and all(_driver(node, s) == "nvidia" for s in switches)
    assert not list((node.proc_root / "driver" / "nvidia" / "gpus").iterdir())


# ---------------------------------------------------------------------------- processes


def test_hold_open_has_the_shape_of_real_proc(build: Build) -> None:
    node = build(gpu_driver="nvidia")
    hold_open(node, 4242, "qemu-system-x86_64", "/dev/nvidia0")
    hold_open(node, 4242, "qemu-system-x86_64", "/dev/vfio/vfio")
    hold_open(node, 77, "nvidia-persiste", "/dev/nvidia3")
    fd = node.proc_root / "4242" / "fd"
    assert (node.proc_root / "4242" / "comm").read_text() == "qemu-system-x86\n"  # 15 chars
    assert {n.name: os.readlink(n) for n in fd.iterdir()} == {
        "0": "/dev/null",
        "1": "/dev/null",
        "2": "/dev/null",
        "3": "/dev/nvidia0",
        "4": "/dev/vfio/vfio",
    }
    held = find_open_holders(node.proc_root, ["/dev/nvidia0", "/dev/nvidia3", "/dev/nvidia5"])
    assert dict(held.holders) == {
        "/dev/nvidia0": ("pid 4242 (qemu-system-x86)",),
        "/dev/nvidia3": ("pid 77 (nvidia-persiste)",),
    }
    release_open(node, 4242)
    assert not (node.proc_root / "4242").exists()
    assert set(find_open_holders(node.proc_root, ["/dev/nvidia0"]).holders) == set()
    with pytest.raises(SimulationError, match="no process 4242"):
        release_open(node, 4242)


# ---------------------------------------------------------------------------- nvidia-smi


def _smi(
    node: SimulatedNode, *argv: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    return run(["--sysfs-root", str(node.sysfs_root), *argv], env or {}, NOW)


def test_nvidia_smi_reports_exactly_the_gpus_on_nvidia(build: Build) -> None:
    node = build(gpu_driver="nvidia")
    status, out, err = _smi(node, "-q")
    assert (status, err) == (0, "")
    parsed = parse_nvidia_smi_q(out)
    assert [g.address for g in parsed] == sorted(node.identities)  # PCI bus order
    assert {g.address: (g.module_id, g.uuid, g.serial) for g in parsed} == {
        a: (i.module_id, i.uuid, i.serial) for a, i in node.identities.items()
    }
    kernel = SimulatedKernel(node)
    for module in (1, 4):
        _move_to_vfio(kernel, node, node.module_map[module])
    status, out, _ = _smi(node, "-q")
    assert status == 0
    assert {g.module_id for g in parse_nvidia_smi_q(out)} == {2, 3, 5, 6, 7, 8}
    assert re.search(r"^Attached GPUs +: 6$", out, re.M)


@pytest.mark.parametrize("key", ["Module Id", "Bus Id", "Serial Number", "GPU UUID",
                                 "Product Name", "Minor Number", "Attached GPUs",
                                 "Driver Version", "Timestamp", "Virtualization Mode",
                                 "Sub System Id", "Device Id"])  # fmt: skip
def test_nvidia_smi_lines_have_the_captured_shape(build: Build, key: str) -> None:
    node = build(gpu_driver="nvidia")
    _, out, _ = _smi(node, "-q")
    fixture = (FIXTURES / "nvidia-smi-q.txt").read_text().splitlines()

    def prefix(lines: list[str]) -> str:
        line = next(line for line in lines if line.strip().startswith(key + " "))
        return line[: line.index(": ") + 2]

    assert prefix(out.splitlines()) == prefix(fixture)
    if key == "Module Id":
        assert prefix(out.splitlines()) == fixture[41][: fixture[41].index(": ") + 2]


def test_nvidia_smi_has_the_captured_skeleton(build: Build) -> None:
    node = build(gpu_driver="nvidia")
    _, out, _ = _smi(node, "-q")
    ours, theirs = out.splitlines(), (FIXTURES / "nvidia-smi-q.txt").read_text().splitlines()
    assert ours[:3] == theirs[:3] and ours[6] == theirs[6] == ""
    assert re.fullmatch(r"GPU 00000000:18:00\.0", ours[8])  # upper-case hex, 8-digit domain
    # Every key line of ours is a key line of the capture at the same depth, in order.
    shape = re.compile(r"^( *)([^:]*?) *(?:: .*)?$")

    def keys(lines: list[str]) -> list[tuple[str, str]]:
        found = []
        for line in lines:
            match = shape.match(line)
            if match and line.strip() and not line.startswith("GPU "):
                found.append((match.group(1), match.group(2)))
        return found

    first_gpu = ours[9 : ours.index("", 9)]
    remaining = iter(keys(theirs[9:]))
    for key in keys(first_gpu):
        assert key in remaining, key  # a subsequence of the capture's keys
    for line in first_gpu:
        assert ": " not in line or line.index(": ") == 55, line
    platform_info = first_gpu[first_gpu.index("    Platform Info") :][:8]
    assert [k for _, k in keys(platform_info)] == [k for _, k in keys(theirs[35:43])]


def test_nvidia_smi_with_no_gpu_on_nvidia(build: Build) -> None:
    node = build()
    assert _smi(node, "-q") == (EXIT_NOT_FOUND, NO_DEVICES + "\n", "")


@pytest.mark.parametrize(
    ("argv", "env", "status"),
    [
        (["-L"], {}, EXIT_INVALID_ARGUMENT),
        ([], {}, EXIT_INVALID_ARGUMENT),
        (["-q", "-x"], {}, EXIT_INVALID_ARGUMENT),
        (["-q"], {}, EXIT_INVALID_ARGUMENT),  # no tree given
    ],
)
def test_nvidia_smi_refuses_what_it_does_not_do(
    argv: list[str], env: dict[str, str], status: int
) -> None:
    code, out, err = run(argv, env, NOW)
    assert code == status and out == "" and "usage: nvidia-smi" in err


def test_nvidia_smi_finds_the_tree_in_the_environment(build: Build, tmp_path: Path) -> None:
    node = build(gpu_driver="nvidia")
    status, out, _ = run(["-q"], {SYSFS_ENV: str(node.sysfs_root)}, NOW)
    assert status == 0 and len(parse_nvidia_smi_q(out)) == 8
    status, out, _ = run(["-q"], {SYSFS_ENV: str(tmp_path / "real")}, NOW)
    assert (status, out) == (EXIT_DRIVER_NOT_LOADED, DRIVER_NOT_LOADED + "\n")
    (node.sysfs_root / "module" / "nvidia").rmdir()
    assert _smi(node, "-q")[0] == EXIT_DRIVER_NOT_LOADED


def test_the_installed_wrapper_runs_as_a_real_program(build: Build, tmp_path: Path) -> None:
    node = build("hgx-a100-16", gpu_driver="nvidia")
    path = install_nvidia_smi(node)
    assert path == node.sysfs_root.parent / "bin" / "nvidia-smi"
    assert os.access(path, os.X_OK) and path.read_text().startswith("#!/")
    env = {k: v for k, v in os.environ.items() if k != SYSFS_ENV}
    done = subprocess.run(
        [str(path), "-q"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert done.returncode == 0, done.stderr
    parsed = parse_nvidia_smi_q(done.stdout)
    assert {g.module_id: g.address for g in parsed} == dict(node.module_map)
    assert "NVIDIA A100-SXM4-40GB" in done.stdout
    unbind(node, node.module_map[16])
    again = subprocess.run([str(path), "-q"], capture_output=True, text=True, env=env, timeout=60)
    assert len(parse_nvidia_smi_q(again.stdout)) == 15  # read afresh on each run
    wrong = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == EXIT_INVALID_ARGUMENT


def test_every_platform_builds_on_nvidia_and_round_trips(tmp_path: Path) -> None:
    for name in PLATFORMS:
        node = build_simulated_node(tmp_path / name, platform(name), gpu_driver="nvidia")
        assert load_simulated_node(node.sysfs_root) == node
        _, out, _ = run(["--sysfs-root", str(node.sysfs_root), "-q"], {}, NOW)
        assert {g.module_id for g in parse_nvidia_smi_q(out)} == set(node.module_map)
