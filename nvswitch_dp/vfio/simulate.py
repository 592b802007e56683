"""A faithful fake sysfs, /dev and /proc tree of an HGX node, the kernel's driver-binding
rules over it, and faults to inject into it.

Used by ``--simulate``, ``doctor --simulate``, the demo and the tests (Intel's
``createTestFiles`` pattern). The tree mirrors the kernel's shape, links included, so code
that resolves links is exercised::

    <root>/sys/devices/pci0000:5c/0000:5c:01.0/                 root port (pcieport)
    <root>/sys/devices/pci0000:5c/0000:5c:01.0/0000:5d:00.0/    the GPU: vendor, device,
        class, numa_node, subsystem_vendor, subsystem_device, driver_override, reset,
        subsystem -> ../../../../bus/pci
        driver -> ../../../../bus/pci/drivers/vfio-pci
        iommu_group -> ../../../../kernel/iommu_groups/<n>
    <root>/sys/bus/pci/devices/<addr> -> ../../../devices/pci0000:../../<addr>
    <root>/sys/bus/pci/drivers/{vfio-pci,nvidia,pcieport}/<addr> -> the device directory
    <root>/sys/bus/pci/drivers/<d>/{bind,unbind,new_id,remove_id,uevent}
    <root>/sys/bus/pci/{drivers_probe,drivers_autoprobe}
    <root>/sys/kernel/iommu_groups/<n>/devices/<addr> -> the device directory
    <root>/sys/module/{nvidia,vfio,vfio_pci,vfio_pci_core,vfio_iommu_type1}
    <root>/sys/nvswitch-dp-simulated-node.json                  the marker (below)
    <root>/dev/vfio/vfio, <root>/dev/vfio/<n>
    <root>/dev/nvidiactl, <root>/dev/nvidia<minor>              once a GPU was on nvidia
    <root>/proc/driver/nvidia/gpus/<addr>/information           while a GPU is on nvidia
    <root>/proc/<pid>/{comm,fd/<n>}                             see hold_open

Every GPU, NVSwitch (class 0x068000, driver ``nvidia``, when the platform's switches are
PCI functions) and root port has its own IOMMU group, numbered in address order, as on
an HGX board with ACS. ``/dev/vfio/<n>`` exists for each group holding a vfio-pci device.
(A real node binds NVSwitches to ``nvidia-nvswitch``, ``NVSWITCH_DRIVER_NAME`` in NVIDIA's
open-gpu-kernel-modules; the tree keeps them on ``nvidia``, which its users expect, and the
simulated ``nvidia`` driver's ID table matches them for that reason only.)

**Device nodes are regular empty files.** Creating character devices needs
``CAP_MKNOD``; nothing in the plugin opens them (it hands their paths to the kubelet), and
existence is all the health check looks at.

**What only the GPU knows.** Module ID, UUID, serial and device minor of each GPU are
facts of the firmware and the driver, not of sysfs. :func:`build_simulated_node` draws
them deterministically from the platform (:class:`SimIdentity`) and writes them, with the
platform's name, to the marker file :data:`SIMULATION_MARKER` at the sysfs root, so a
later process given only a sysfs root can tell that the tree is simulated
(:func:`load_simulated_node`) and serve them (the simulated ``nvidia-smi``,
:mod:`nvswitch_dp.vfio.nvidia_smi_sim`). The marker also holds the one piece of kernel
state sysfs does not show: the dynamic IDs added through ``new_id`` (real ``new_id`` is
write-only). Format, version 1::

    {"format": "nvswitch-dp-simulated-node", "version": 1, "platform": "hgx-h200",
     "gpu_driver": "nvidia",
     "gpus": [{"address": "0000:18:00.0", "module_id": 4, "minor": 3,
               "uuid": "GPU-…", "serial": "1650000000004"}, …],
     "dynamic_ids": {"vfio-pci": [[4318, 9013, 4294967295, 4294967295, 0, 0]]}}

**The nvidia driver's own nodes** follow the NVIDIA driver, not the tree's builder:
``/proc/driver/nvidia/gpus/<addr>/information`` is created by the driver's probe and
removed with the device (``nv_procfs_add_gpu``/``nv_procfs_remove_gpu``), its text exactly
as ``nv_procfs_read_gpu_info`` prints it (tabs included; checked against the capture in
``shared/reference/hardware/h200-sxm-passthrough/proc-driver-nvidia.txt``, whose first
line is the capture's header, not the file's). ``/dev/nvidia<minor>`` and
``/dev/nvidiactl`` are *not* made by the kernel: the distribution's udev rule runs
``nvidia-create-device-nodes``/``nvidia-modprobe`` on ``ACTION=="add|bind"`` and nothing
removes them, so here they appear when a GPU binds to ``nvidia`` and stay after it leaves
(opening such a stale node on a real node fails; existence proves nothing about binding).

Ownership: every function here writes only under the ``root`` given to
:func:`build_simulated_node` (``<root>/sys``, ``<root>/dev`` and ``<root>/proc``, which it
deletes and re-creates). Errors: :class:`SimulationError` for an address, group or
process the tree lacks; ``OSError`` from the file system; :class:`SimulatedKernel` raises
``OSError`` with the kernel's errno, as the real attribute writes do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvswitch_dp.fabric.platforms import PLATFORMS, Platform

VFIO_DRIVER = "vfio-pci"
NVIDIA_DRIVER = "nvidia"
SIMULATION_MARKER = "nvswitch-dp-simulated-node.json"
"""File name of the marker, directly under the simulated sysfs root."""
MARKER_FORMAT = "nvswitch-dp-simulated-node"
MARKER_VERSION = 1

# What the captured H200 reported (shared/reference/hardware/h200-sxm-passthrough); every
# simulated platform reports these, as only the H200 was ever read.
DRIVER_VERSION = "580.159.04"
CUDA_VERSION = "13.0"
VBIOS_VERSION = "96.00.a5.00.1a"
_DMA_BITS = 52
# NVML's product names. Only the H200's was captured; the others are the names NVML gives
# those boards, kept so a simulated H100 does not call itself an H200.
PRODUCT_NAMES: Mapping[str, str] = {
    "hgx-h200": "NVIDIA H200",
    "hgx-h100": "NVIDIA H100 80GB HBM3",
    "hgx-h800": "NVIDIA H800",
    "hgx-h20": "NVIDIA H20",
    "hgx-b200": "NVIDIA B200",
    "hgx-a100-16": "NVIDIA A100-SXM4-40GB",
}

_NVIDIA = "10de"
_BRIDGE_VENDOR, _BRIDGE_DEVICE = "1000", "c030"  # Broadcom PEX89000 switch port
_DRIVER_CONTROL_FILES = ("bind", "unbind", "new_id", "remove_id", "uevent")
_VFIO_MODULES = ("vfio", "vfio_pci", "vfio_pci_core", "vfio_iommu_type1")
_UNSET = Path("\0unset")  # SimulatedNode.proc_root not given: derived from sysfs_root


class SimulationError(Exception):
    """The simulated tree has no such address or group (or cannot take the change)."""


@dataclass(frozen=True, slots=True)
class SimFunction:
    """One PCI function of the simulated node as first built (restore uses it)."""

    address: str
    vendor: str  # "10de"
    device: str  # "2335"
    pci_class: int  # 0x030200
    driver: str | None
    iommu_group: int
    numa_node: int
    parent: str  # directory under <sys>/devices holding the function's directory


@dataclass(frozen=True, slots=True)
class SimIdentity:
    """What a simulated GPU's firmware and driver know about it, and sysfs does not.

    ``module_id``: the HGX baseboard position (FM's name for the GPU); ``uuid``:
    ``"GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"``, drawn from platform and module;
    ``serial``: 13 digits, ``1650000000000 + module_id`` (the captured H200's shape);
    ``minor``: the ``/dev/nvidia<minor>`` number, ``module_id - 1``.
    """

    address: str
    module_id: int
    uuid: str
    serial: str
    minor: int


@dataclass(frozen=True, slots=True)
class SimulatedNode:
    """A simulated node on disk: its roots, its module map, and what it was built from.

    ``proc_root`` defaults to ``<sysfs_root>/../proc`` (the builder's layout) when not
    given. ``identities`` maps a GPU's address to its :class:`SimIdentity`; empty in a
    node value built by hand (the marker on disk still has them).
    """

    sysfs_root: Path
    dev_root: Path
    module_map: Mapping[int, str]
    functions: Mapping[str, SimFunction] = field(default_factory=dict)
    proc_root: Path = _UNSET
    identities: Mapping[str, SimIdentity] = field(default_factory=dict)
    platform_name: str = ""

    def __post_init__(self) -> None:
        if self.proc_root == _UNSET:
            object.__setattr__(self, "proc_root", Path(self.sysfs_root).parent / "proc")

    def group_of(self, address: str) -> int:
        """The IOMMU group of the function at ``address``: read from the tree, else (for a
        removed function) the group it was built in."""
        try:
            return _current_group(self.sysfs_root, address)
        except SimulationError:
            pass
        try:
            return self.functions[address].iommu_group
        except KeyError:
            raise SimulationError(f"no PCI function {address} in the simulated node") from None

    def gpu_group(self, module_id: int) -> int:
        """The IOMMU group of the GPU with FM module ID ``module_id``."""
        return self.group_of(self.module_map[module_id])


def product_name(platform_name: str) -> str:
    """The product name NVML reports for the GPUs of ``platform_name`` ("NVIDIA H200")."""
    return PRODUCT_NAMES.get(platform_name, "NVIDIA Graphics Device")


# ---------------------------------------------------------------------------- building


def _addr(bus: int, dev: int = 0, fn: int = 0) -> str:
    return f"0000:{bus:02x}:{dev:02x}.{fn}"


def _plan(platform: Platform, gpu_driver: str | None = VFIO_DRIVER) -> list[SimFunction]:
    """Root port + endpoint for each GPU and NVSwitch; groups numbered in address order."""
    gpu_buses = dict(enumerate(platform.module_buses, start=1))
    used = set(gpu_buses.values()) | {b - 1 for b in gpu_buses.values()}
    switch_buses: list[int] = []
    candidate = 0x04
    count = platform.nvswitch_count if platform.nvswitch_device_id else 0
    while len(switch_buses) < count:
        if candidate not in used and candidate - 1 not in used:
            switch_buses.append(candidate)
            used |= {candidate, candidate - 1}
        candidate += 1
        if candidate > 0xFF:
            raise SimulationError("no free PCI buses for the NVSwitches")

    # (endpoint bus, vendor, device, class, driver, numa)
    endpoints: list[tuple[int, str, str, int, str | None, int]] = [
        (bus, _NVIDIA, platform.gpu_device_id, 0x030200, gpu_driver, platform.numa_node(m))
        for m, bus in gpu_buses.items()
    ]
    endpoints += [
        (bus, _NVIDIA, platform.nvswitch_device_id, 0x068000, NVIDIA_DRIVER, 0)
        for bus in switch_buses
    ]
    specs: list[tuple[str, str, str, int, str | None, int, str]] = []
    for bus, vendor, device, pci_class, driver, numa in endpoints:
        port = _addr(bus - 1, 1)
        host = f"pci0000:{bus - 1:02x}"
        specs.append((port, _BRIDGE_VENDOR, _BRIDGE_DEVICE, 0x060400, "pcieport", numa, host))
        specs.append((_addr(bus), vendor, device, pci_class, driver, numa, f"{host}/{port}"))
    specs.sort(key=lambda s: s[0])
    if len({s[0] for s in specs}) != len(specs):
        raise SimulationError(f"platform {platform.name}: PCI addresses collide")
    return [
        SimFunction(a, v, d, c, drv, group, numa, parent)
        for group, (a, v, d, c, drv, numa, parent) in enumerate(specs)
    ]


def _gpu_uuid(platform_name: str, module_id: int) -> str:
    digest = hashlib.sha256(f"nvswitch-dp/{platform_name}/module-{module_id}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def _identities(platform: Platform) -> dict[str, SimIdentity]:
    return {
        address: SimIdentity(
            address=address,
            module_id=module,
            uuid=_gpu_uuid(platform.name, module),
            serial=str(1650000000000 + module),
            minor=module - 1,
        )
        for module, address in platform.module_map().items()
    }


def _link(link: Path, target: Path) -> None:
    """A relative symlink ``link -> target``, as sysfs has them; replaces what is there."""
    if link.is_symlink() or link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def _driver_dir(sysfs: Path, driver: str) -> Path:
    d = sysfs / "bus" / "pci" / "drivers" / driver
    if not d.is_dir():
        d.mkdir(parents=True)
        for name in _DRIVER_CONTROL_FILES:
            (d / name).write_text("")
    return d


def _create_function(sysfs: Path, dev: Path, fn: SimFunction, proc: Path | None = None) -> None:
    directory = sysfs / "devices" / fn.parent / fn.address
    directory.mkdir(parents=True, exist_ok=True)
    attributes = {
        "vendor": f"0x{fn.vendor}",
        "device": f"0x{fn.device}",
        "class": f"0x{fn.pci_class:06x}",
        "numa_node": str(fn.numa_node),
        "subsystem_vendor": f"0x{fn.vendor}",
        "subsystem_device": "0x0000",
        "driver_override": "(null)",
        "enable": "1",
    }
    for name, value in attributes.items():
        (directory / name).write_text(value + "\n")
    if (fn.pci_class >> 8) not in (0x0604, 0x0607):
        (directory / "reset").write_text("")
    _link(directory / "subsystem", sysfs / "bus" / "pci")
    _link(sysfs / "bus" / "pci" / "devices" / fn.address, directory)
    group_dir = sysfs / "kernel" / "iommu_groups" / str(fn.iommu_group)
    if not group_dir.is_dir():
        (group_dir / "devices").mkdir(parents=True)
        (group_dir / "type").write_text("DMA\n")
    _link(group_dir / "devices" / fn.address, directory)
    _link(directory / "iommu_group", group_dir)
    if fn.driver is not None:
        _bind(sysfs, dev, fn.address, fn.driver, proc)


def _load_vfio_modules(sysfs: Path, dev: Path) -> None:
    """What ``modprobe vfio-pci`` leaves behind (vfio's softdep pulls in vfio_iommu_type1)."""
    for module in _VFIO_MODULES:
        (sysfs / "module" / module).mkdir(parents=True, exist_ok=True)
    (dev / "vfio").mkdir(parents=True, exist_ok=True)
    if not (dev / "vfio" / "vfio").exists():
        (dev / "vfio" / "vfio").write_text("")
    _driver_dir(sysfs, VFIO_DRIVER)


def build_simulated_node(
    root: Path,
    platform: Platform,
    *,
    gpu_driver: str | None = VFIO_DRIVER,
    vfio_loaded: bool = True,
) -> SimulatedNode:
    """Write the tree of ``platform`` under ``root`` and describe it.

    Idempotent: ``<root>/sys``, ``<root>/dev`` and ``<root>/proc`` are deleted and written
    afresh, so faults injected earlier are gone; anything else under ``root`` (such as
    ``<root>/bin``) is left alone.

    By default every GPU starts bound to vfio-pci, every group viable, every ``/dev/vfio``
    node present. ``gpu_driver="nvidia"``: every GPU starts on the nvidia driver, as on a
    freshly installed node (with its ``/proc/driver/nvidia`` entry and ``/dev/nvidia<minor>``);
    ``None``: unbound. ``vfio_loaded=False``: the VFIO modules are not loaded yet (no
    ``<sys>/module/vfio*``, no vfio-pci driver directory, no ``/dev/vfio/vfio``).

    Errors: ``ValueError`` for GPUs on vfio-pci without the vfio modules.
    """
    if gpu_driver == VFIO_DRIVER and not vfio_loaded:
        raise ValueError("GPUs cannot start on vfio-pci with the vfio modules not loaded")
    root = Path(root)
    sysfs, dev, proc = root / "sys", root / "dev", root / "proc"
    for tree in (sysfs, dev, proc):
        if tree.exists() or tree.is_symlink():
            shutil.rmtree(tree)
    (sysfs / "bus" / "pci" / "devices").mkdir(parents=True)
    (sysfs / "bus" / "pci" / "drivers_probe").write_text("")
    (sysfs / "bus" / "pci" / "drivers_autoprobe").write_text("1\n")
    (sysfs / "kernel" / "iommu_groups").mkdir(parents=True)
    dev.mkdir(parents=True)
    (proc / "driver" / "nvidia" / "gpus").mkdir(parents=True)
    (sysfs / "module" / "nvidia").mkdir(parents=True)
    if vfio_loaded:
        _load_vfio_modules(sysfs, dev)
    dmar = sysfs / "devices" / "virtual" / "iommu" / "dmar0"
    dmar.mkdir(parents=True)
    _link(sysfs / "class" / "iommu" / "dmar0", dmar)
    _driver_dir(sysfs, NVIDIA_DRIVER)
    _driver_dir(sysfs, "pcieport")

    identities = _identities(platform)
    # The marker first: binding a GPU to nvidia reads its identity from it.
    _write_marker(sysfs, _marker(platform.name, gpu_driver, identities.values(), {}))
    functions = _plan(platform, gpu_driver)
    for fn in functions:
        _create_function(sysfs, dev, fn, proc)
    return SimulatedNode(
        sysfs_root=sysfs,
        dev_root=dev,
        module_map=platform.module_map(),
        functions={fn.address: fn for fn in functions},
        proc_root=proc,
        identities=identities,
        platform_name=platform.name,
    )


# ---------------------------------------------------------------------------- the marker


def _marker(
    platform_name: str,
    gpu_driver: str | None,
    identities: Iterable[SimIdentity],
    dynamic_ids: Mapping[str, list[list[int]]],
) -> dict[str, Any]:
    return {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "platform": platform_name,
        "gpu_driver": gpu_driver,
        "gpus": [
            {
                "address": i.address,
                "module_id": i.module_id,
                "minor": i.minor,
                "uuid": i.uuid,
                "serial": i.serial,
            }
            for i in sorted(identities, key=lambda i: i.module_id)
        ],
        "dynamic_ids": {k: list(v) for k, v in sorted(dynamic_ids.items())},
    }


def _write_marker(sysfs: Path, marker: Mapping[str, Any]) -> None:
    path = sysfs / SIMULATION_MARKER
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    tmp.replace(path)  # atomic: a reader in another process never sees half a marker


def _read_marker(sysfs: Path) -> dict[str, Any] | None:
    try:
        text = (sysfs / SIMULATION_MARKER).read_text()
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(text)
    except ValueError as exc:
        raise SimulationError(f"{sysfs / SIMULATION_MARKER}: not JSON ({exc})") from None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise SimulationError(f"{sysfs / SIMULATION_MARKER}: not a simulated-node marker")
    if marker.get("version") != MARKER_VERSION:
        raise SimulationError(
            f"{sysfs / SIMULATION_MARKER}: marker version {marker.get('version')!r}, "
            f"this code reads version {MARKER_VERSION}"
        )
    return marker


def _marker_identities(marker: Mapping[str, Any]) -> dict[str, SimIdentity]:
    try:
        return {
            g["address"]: SimIdentity(
                address=str(g["address"]),
                module_id=int(g["module_id"]),
                uuid=str(g["uuid"]),
                serial=str(g["serial"]),
                minor=int(g["minor"]),
            )
            for g in marker["gpus"]
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise SimulationError(f"simulated-node marker: bad GPU entry ({exc!r})") from None


def load_simulated_node(sysfs_root: Path) -> SimulatedNode | None:
    """The simulated node whose sysfs root is ``sysfs_root``, read from its marker;
    ``None`` when there is no marker (a real sysfs, or a hand-built tree).

    ``dev_root`` and ``proc_root`` are the builder's siblings of ``sysfs_root``;
    ``functions`` are re-planned from the recorded platform, so the value equals the one
    :func:`build_simulated_node` returned.

    Errors: :class:`SimulationError` for a marker that is not JSON, of another format or
    version, or names an unknown platform.
    """
    sysfs = Path(sysfs_root)
    marker = _read_marker(sysfs)
    if marker is None:
        return None
    name = marker.get("platform")
    if not isinstance(name, str) or name not in PLATFORMS:
        raise SimulationError(f"simulated-node marker names unknown platform {name!r}")
    plat = PLATFORMS[name]
    identities = _marker_identities(marker)
    functions = _plan(plat, marker.get("gpu_driver"))
    return SimulatedNode(
        sysfs_root=sysfs,
        dev_root=sysfs.parent / "dev",
        module_map=dict(sorted((i.module_id, a) for a, i in identities.items())),
        functions={fn.address: fn for fn in functions},
        proc_root=sysfs.parent / "proc",
        identities=identities,
        platform_name=name,
    )


# ---------------------------------------------------------------------------- reading back


def _device_dir(sysfs: Path, address: str) -> Path:
    link = sysfs / "bus" / "pci" / "devices" / address
    if not link.exists():
        raise SimulationError(f"no PCI function {address} in the simulated node")
    return link.resolve()


def _current_driver(sysfs: Path, address: str) -> str | None:
    try:
        return (sysfs / "bus" / "pci" / "devices" / address / "driver").readlink().name
    except OSError:
        return None


def _current_group(sysfs: Path, address: str) -> int:
    link = sysfs / "bus" / "pci" / "devices" / address / "iommu_group"
    try:
        return int(link.readlink().name)
    except (OSError, ValueError):
        raise SimulationError(f"{address} has no IOMMU group") from None


def _group_members(sysfs: Path, group: int) -> list[str]:
    devices = sysfs / "kernel" / "iommu_groups" / str(group) / "devices"
    try:
        return sorted(p.name for p in devices.iterdir())
    except OSError:
        return []


def _sync_group_node(sysfs: Path, dev: Path, group: int) -> None:
    """``/dev/vfio/<group>`` exists exactly while a member is bound to vfio-pci (kernel)."""
    node = dev / "vfio" / str(group)
    if any(_current_driver(sysfs, a) == VFIO_DRIVER for a in _group_members(sysfs, group)):
        node.parent.mkdir(parents=True, exist_ok=True)
        if not node.exists():
            node.write_text("")
    elif node.exists():
        node.unlink()


# ---------------------------------------------------------------------------- nvidia's nodes


def gpu_information(identity: SimIdentity, platform_name: str) -> str:
    """``/proc/driver/nvidia/gpus/<addr>/information`` of a simulated GPU, as
    ``nv_procfs_read_gpu_info`` (open-gpu-kernel-modules ``nv-procfs.c``) prints it."""
    return (
        f"Model: \t\t {product_name(platform_name)}\n"
        f"IRQ:   \t\t {41 + identity.minor}\n"
        f"GPU UUID: \t {identity.uuid}\n"
        f"Video BIOS: \t {VBIOS_VERSION}\n"
        "Bus Type: \t PCIe\n"
        f"DMA Size: \t {_DMA_BITS} bits\n"
        f"DMA Mask: \t 0x{(1 << _DMA_BITS) - 1:x}\n"
        f"Bus Location: \t {identity.address}\n"
        f"Device Minor: \t {identity.minor}\n"
        f"GPU Firmware: \t {DRIVER_VERSION}\n"
        "GPU Excluded:\t No\n"
    )


def _nvidia_probed(sysfs: Path, dev: Path, proc: Path, address: str) -> None:
    """What the nvidia driver's probe (procfs) and the udev bind rule (/dev) add."""
    marker = _read_marker(sysfs)
    if marker is None:
        return
    identity = _marker_identities(marker).get(address)
    if identity is None:  # an NVSwitch or an added function: no GPU identity to show
        return
    gpu_dir = proc / "driver" / "nvidia" / "gpus" / address
    gpu_dir.mkdir(parents=True, exist_ok=True)
    (gpu_dir / "information").write_text(gpu_information(identity, str(marker.get("platform", ""))))
    dev.mkdir(parents=True, exist_ok=True)
    for name in ("nvidiactl", f"nvidia{identity.minor}"):
        if not (dev / name).exists():
            (dev / name).write_text("")


def _nvidia_removed(proc: Path, address: str) -> None:
    """The driver's remove drops the procfs entry; the /dev node stays (see the module doc)."""
    gpu_dir = proc / "driver" / "nvidia" / "gpus" / address
    if gpu_dir.exists():
        shutil.rmtree(gpu_dir)


# ---------------------------------------------------------------------------- faults


def _bind(sysfs: Path, dev: Path, address: str, driver: str, proc: Path | None = None) -> None:
    directory = _device_dir(sysfs, address)
    _unbind(sysfs, dev, address, proc)
    driver_dir = _driver_dir(sysfs, driver)
    _link(directory / "driver", driver_dir)
    _link(driver_dir / address, directory)
    if driver == VFIO_DRIVER:
        _sync_group_node(sysfs, dev, _current_group(sysfs, address))
    elif driver == NVIDIA_DRIVER:
        _nvidia_probed(sysfs, dev, proc or sysfs.parent / "proc", address)


def _unbind(sysfs: Path, dev: Path, address: str, proc: Path | None = None) -> None:
    directory = _device_dir(sysfs, address)
    old = _current_driver(sysfs, address)
    if old is None:
        return
    (directory / "driver").unlink()
    back = sysfs / "bus" / "pci" / "drivers" / old / address
    if back.is_symlink():
        back.unlink()
    if old == VFIO_DRIVER:
        _sync_group_node(sysfs, dev, _current_group(sysfs, address))
    elif old == NVIDIA_DRIVER:
        _nvidia_removed(proc or sysfs.parent / "proc", address)


def bind(node: SimulatedNode, address: str, driver: str = VFIO_DRIVER) -> None:
    """Bind the function at ``address`` to ``driver`` (after unbinding it from any other).

    A fault, not the kernel: no ID table or override is consulted (that is
    :class:`SimulatedKernel`). Binding to vfio-pci creates ``/dev/vfio/<group>`` as the
    kernel does, binding a GPU to nvidia its ``/proc/driver/nvidia`` entry and
    ``/dev/nvidia<minor>``. Inverse of :func:`unbind`.
    """
    _bind(node.sysfs_root, node.dev_root, address, driver, node.proc_root)


def unbind(node: SimulatedNode, address: str, to: str | None = None) -> None:
    """Unbind the function at ``address``; then bind it to ``to`` (e.g. ``"nvidia"``) if given.

    When the group's last vfio-pci device leaves, ``/dev/vfio/<group>`` goes, as in the
    kernel; a GPU leaving nvidia loses its ``/proc/driver/nvidia`` entry. Inverse:
    :func:`bind` (``bind(node, address)`` returns it to vfio-pci).
    """
    _unbind(node.sysfs_root, node.dev_root, address, node.proc_root)
    if to is not None:
        _bind(node.sysfs_root, node.dev_root, address, to, node.proc_root)


def remove_vfio_group(node: SimulatedNode, group: int) -> None:
    """Delete ``/dev/vfio/<group>`` (as if /dev were not mounted, or udev lost it)."""
    path = node.dev_root / "vfio" / str(group)
    if not path.exists():
        raise SimulationError(f"/dev/vfio/{group} does not exist in the simulated node")
    path.unlink()


def restore_vfio_group(node: SimulatedNode, group: int) -> None:
    """Re-create ``/dev/vfio/<group>``. Inverse of :func:`remove_vfio_group`."""
    if not (node.sysfs_root / "kernel" / "iommu_groups" / str(group)).is_dir():
        raise SimulationError(f"no IOMMU group {group} in the simulated node")
    (node.dev_root / "vfio" / str(group)).write_text("")


def add_function(
    node: SimulatedNode,
    group: int,
    *,
    vendor: str = _NVIDIA,
    device: str = "22ba",
    pci_class: int = 0x040300,
    driver: str | None = "snd_hda_intel",
) -> str:
    """Add a PCI function to IOMMU ``group``, beside the group's first member; its address.

    The new function is the lowest unused function number of that member's slot. The
    defaults make an audio function bound to ``snd_hda_intel``.
    Errors: :class:`SimulationError` when the group has no members.
    """
    sysfs = node.sysfs_root
    members = _group_members(sysfs, group)
    if not members:
        raise SimulationError(f"no IOMMU group {group} with members in the simulated node")
    anchor = members[0]
    parent_dir = _device_dir(sysfs, anchor).parent
    slot = anchor.rsplit(".", 1)[0]
    taken = {p.name for p in (sysfs / "bus" / "pci" / "devices").iterdir()}
    free = [f"{slot}.{f}" for f in range(8) if f"{slot}.{f}" not in taken]
    if not free:
        raise SimulationError(f"slot {slot} has no free function number")
    fn = SimFunction(
        address=free[0],
        vendor=vendor,
        device=device,
        pci_class=pci_class,
        driver=driver,
        iommu_group=group,
        numa_node=int((parent_dir / anchor / "numa_node").read_text().strip()),
        parent=str(parent_dir.relative_to(sysfs / "devices")),
    )
    _create_function(sysfs, node.dev_root, fn, node.proc_root)
    return fn.address


def add_foreign_function(node: SimulatedNode, group: int, driver: str = "snd_hda_intel") -> str:
    """Put a function bound to ``driver`` (not vfio-pci) into ``group``: the group stops
    being viable. Returns its address; undo with :func:`remove_foreign_function`."""
    return add_function(node, group, driver=driver)


def remove_device(node: SimulatedNode, address: str) -> None:
    """Hot-unplug the function at ``address``: its directory and every link to it go.

    An emptied IOMMU group disappears, and ``/dev/vfio/<group>`` with its last vfio-pci
    device. Inverse: :func:`restore_device` (for functions the node was built with).
    """
    sysfs, dev = node.sysfs_root, node.dev_root
    directory = _device_dir(sysfs, address)
    group = _current_group(sysfs, address)
    _unbind(sysfs, dev, address, node.proc_root)
    (sysfs / "bus" / "pci" / "devices" / address).unlink()
    group_dir = sysfs / "kernel" / "iommu_groups" / str(group)
    (group_dir / "devices" / address).unlink()
    shutil.rmtree(directory)
    if not _group_members(sysfs, group):
        shutil.rmtree(group_dir)
    _sync_group_node(sysfs, dev, group)


def remove_foreign_function(node: SimulatedNode, address: str) -> None:
    """Take out a function added by :func:`add_foreign_function` or :func:`add_function`."""
    remove_device(node, address)


def restore_device(node: SimulatedNode, address: str) -> None:
    """Plug back a function the node was built with, in its original state and group."""
    try:
        fn = node.functions[address]
    except KeyError:
        raise SimulationError(f"{address} was not part of the simulated node") from None
    if (node.sysfs_root / "bus" / "pci" / "devices" / address).exists():
        raise SimulationError(f"{address} is present; remove it first")
    _create_function(node.sysfs_root, node.dev_root, fn, node.proc_root)


# ---------------------------------------------------------------------------- processes


def hold_open(node: SimulatedNode, pid: int, comm: str, path: str) -> None:
    """Simulate process ``pid`` (named ``comm``) holding ``path`` (e.g. ``"/dev/nvidia0"``)
    open, in the shape real /proc has: ``<proc>/<pid>/comm`` and ``<proc>/<pid>/fd/<n>``,
    a symlink whose target is ``path`` as the process sees it (so it dangles here: read it
    with ``readlink``, never resolve it). A new process gets fds 0-2 on ``/dev/null``
    first; each call adds the next free fd. Undo with :func:`release_open`.
    """
    if pid <= 0:
        raise SimulationError(f"pid {pid} is not a process ID")
    proc_dir = node.proc_root / str(pid)
    fds = proc_dir / "fd"
    if not proc_dir.is_dir():
        fds.mkdir(parents=True)
        for n in range(3):
            (fds / str(n)).symlink_to("/dev/null")
    (proc_dir / "comm").write_text(comm[:15] + "\n")  # the kernel keeps TASK_COMM_LEN - 1
    taken = {int(p.name) for p in fds.iterdir()}
    n = next(i for i in range(len(taken) + 1) if i not in taken)
    (fds / str(n)).symlink_to(path)


def release_open(node: SimulatedNode, pid: int) -> None:
    """Process ``pid`` exits: ``<proc>/<pid>`` goes, with every file it held.

    Errors: :class:`SimulationError` when the simulated /proc has no such process.
    """
    proc_dir = node.proc_root / str(pid)
    if not proc_dir.is_dir():
        raise SimulationError(f"no process {pid} in the simulated /proc")
    shutil.rmtree(proc_dir)


# ---------------------------------------------------------------------------- the kernel

_ANY = 0xFFFFFFFF  # PCI_ANY_ID
_PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class _PciId:
    """One ``struct pci_device_id``: what a driver's ID table (or ``new_id``) matches."""

    vendor: int
    device: int
    subvendor: int = _ANY
    subdevice: int = _ANY
    pci_class: int = 0
    class_mask: int = 0

    def matches(self, dev: _PciDev) -> bool:
        """``pci_match_one_device`` (drivers/pci/pci.h)."""
        return (
            self.vendor in (_ANY, dev.vendor)
            and self.device in (_ANY, dev.device)
            and self.subvendor in (_ANY, dev.subvendor)
            and self.subdevice in (_ANY, dev.subdevice)
            and not ((self.pci_class ^ dev.pci_class) & self.class_mask)
        )

    def as_list(self) -> list[int]:
        return [
            self.vendor,
            self.device,
            self.subvendor,
            self.subdevice,
            self.pci_class,
            self.class_mask,
        ]


@dataclass(frozen=True, slots=True)
class _PciDev:
    """A function's IDs as sysfs shows them, with its override and driver."""

    address: str
    vendor: int
    device: int
    subvendor: int
    subdevice: int
    pci_class: int
    override: str | None
    driver: str | None

    @property
    def is_bridge(self) -> bool:
        # The kernel looks at the header type; class 0x0604/0x0607 stands for it here, as
        # in discovery.
        return (self.pci_class >> 8) in (0x0604, 0x0607)


# Static ID tables of the drivers the tree knows. vfio-pci's own table is one
# override-only entry (PCI_DRIVER_OVERRIDE_DEVICE_VFIO(PCI_ANY_ID, PCI_ANY_ID) in
# drivers/vfio/pci/vfio_pci.c): it matches nothing without driver_override, which
# _matches() handles for every driver.
_ID_TABLES: Mapping[str, tuple[_PciId, ...]] = {
    # nv_pci_table (open-gpu-kernel-modules kernel-open/nvidia/nv-pci-table.c): vendor
    # 10de, class VGA or 3D controller exactly. The NVSwitch entry is the tree's (module doc).
    NVIDIA_DRIVER: (
        _PciId(0x10DE, _ANY, pci_class=0x030000, class_mask=0xFFFFFF),
        _PciId(0x10DE, _ANY, pci_class=0x030200, class_mask=0xFFFFFF),
        _PciId(0x10DE, _ANY, pci_class=0x068000, class_mask=0xFFFF00),
    ),
    # port_pci_ids (drivers/pci/pcie/portdrv.c): PCI-to-PCI bridges, normal and subtractive.
    "pcieport": (
        _PciId(_ANY, _ANY, pci_class=0x060400, class_mask=0xFFFFFF),
        _PciId(_ANY, _ANY, pci_class=0x060401, class_mask=0xFFFFFF),
    ),
    # azx_ids (sound/pci/hda/hda_intel.c): NVIDIA's HD-audio class entry.
    "snd_hda_intel": (_PciId(0x10DE, _ANY, pci_class=0x040300, class_mask=0xFFFFFF),),
    VFIO_DRIVER: (),
}
# Drivers are tried in the order they registered (bus->p->klist_drivers): pcieport is
# built in, nvidia and snd_hda_intel load at boot, vfio-pci later. Others follow by name.
_REGISTRATION_ORDER = ("pcieport", NVIDIA_DRIVER, "snd_hda_intel", VFIO_DRIVER)
# modprobe NAME -> the modules it leaves loaded, dependencies first (vfio's
# MODULE_SOFTDEP("post: vfio_iommu_type1 ...") pulls that one in).
_MODULE_CLOSURE: Mapping[str, tuple[str, ...]] = {
    "vfio": ("vfio", "vfio_iommu_type1"),
    "vfio_iommu_type1": ("vfio", "vfio_iommu_type1"),
    "vfio_pci_core": ("vfio", "vfio_iommu_type1", "vfio_pci_core"),
    "vfio_pci": ("vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci"),
    "nvidia": ("nvidia",),
}
_MODULE_DRIVERS: Mapping[str, str] = {"vfio_pci": VFIO_DRIVER, "nvidia": NVIDIA_DRIVER}


def _os_error(code: int, path: Path | str, detail: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} ({detail})", str(path))


def _hex_fields(text: str, limit: int) -> list[int]:
    """``sscanf(buf, "%x %x ...")``: leading hex fields, stopping at the first that is not."""
    fields: list[int] = []
    for token in text.split()[:limit]:
        try:
            fields.append(int(token, 16))
        except ValueError:
            break
    return fields


class SimulatedKernel:
    """The kernel's PCI driver-binding interface over a simulated tree
    (:class:`~nvswitch_dp.ports.PciKernel`).

    Constructed from the :class:`SimulatedNode` (or :meth:`for_sysfs` with only the sysfs
    root, through the marker). Stateless itself: everything lives in the tree and the
    marker, so any number of instances, in any processes, see the same node.

    Rules, from Linux (v6.x) unless said otherwise; the ``value`` is what a ``write(2)``
    would carry, and an address matches a device's name as ``sysfs_streq`` does (one
    trailing newline ignored, case-sensitive):

    - ``<sys>/bus/pci/devices/<a>/driver_override`` (``driver_override_store``,
      drivers/pci/pci-sysfs.c, via ``driver_set_override`` in drivers/base/driver.c): the
      text up to the first newline becomes the override; ``""`` or ``"\\n"`` clears it,
      and the file then reads ``(null)``. Binds nothing. ``EINVAL`` from a page long.
    - ``<sys>/bus/pci/drivers/<d>/unbind`` (``unbind_store``, drivers/base/bus.c): releases
      the device; ``ENODEV`` when there is no such device or it is not bound to ``<d>``.
    - ``<sys>/bus/pci/drivers_probe`` (``drivers_probe_store`` -> ``device_attach``,
      drivers/base/bus.c and dd.c): an unbound device goes to the first loaded driver,
      in registration order, that matches and whose probe succeeds; none: it stays
      unbound, not an error. A bound device stays as it is. ``ENODEV`` for no such
      device. Matching is ``pci_match_device`` (drivers/pci/pci-driver.c): with
      ``driver_override`` set only that driver matches, and it always does (so a
      not-loaded override driver leaves the device unbound); otherwise a dynamic ID
      (``new_id``) or the static table does: ``nvidia`` takes NVIDIA VGA/3D-class
      functions (and the tree's NVSwitches), ``pcieport`` bridges, and vfio-pci nothing
      but its dynamic IDs.
    - ``<sys>/bus/pci/drivers/<d>/bind`` (``bind_store``, drivers/base/bus.c):
      ``ENODEV`` unless the device exists and ``<d>`` matches it (override respected),
      ``EBUSY`` when it is bound already (to any driver), else the probe's error.
    - ``<sys>/bus/pci/drivers/<d>/new_id`` (``new_id_store``, drivers/pci/pci-driver.c):
      ``"vvvv dddd [ssvv ssdd cccccc mmmmmm]"`` in hex (fewer than two fields:
      ``EINVAL``; an ID the driver matches already: ``EEXIST``); adds a dynamic ID, then
      ``driver_attach`` binds every *unbound* device that now matches. A bound device is
      never taken from its driver. ``remove_id`` (``remove_id_store``) drops one
      (``ENODEV`` if absent) and unbinds nothing.
    - ``<sys>/bus/pci/drivers_autoprobe``: ``"0..."`` turns off, anything else on, the
      probing a newly loaded driver does (``drivers_autoprobe_store``).
    - Probes: vfio-pci refuses a function whose header type is not normal, i.e. a bridge
      (``EINVAL``: ``vfio_pci_core_register_device`` in drivers/vfio/pci/vfio_pci_core.c,
      ``vfio_pci_probe`` in vfio_pci.c before 5.15), and a function without an IOMMU
      group (``EINVAL`` from ``vfio_iommu_group_get`` in drivers/vfio/group.c, unless
      the noiommu mode is on, which this tree never is); since 5.13 ``bind`` reports a probe's
      error, while ``drivers_probe`` and ``new_id`` go on to the next driver or device.
      Binding to vfio-pci creates ``/dev/vfio/<group>``; nvidia's probe creates the GPU's
      ``/proc/driver/nvidia`` entry and its remove takes it away (module docstring).
    - Any other path: ``ENOENT`` when it does not exist (``.../drivers/vfio-pci/bind``
      before vfio-pci is loaded), ``EISDIR`` for a directory, ``EACCES`` for an attribute
      the simulation does not model (kernfs answers ``EACCES`` for an attribute without a
      store), and for a path outside the simulated sysfs.

    :meth:`load_module` is the simulated ``modprobe``: ``vfio-pci`` (or ``vfio_pci``)
    leaves ``vfio``, ``vfio_iommu_type1``, ``vfio_pci_core`` and ``vfio_pci`` under
    ``<sys>/module``, the vfio-pci driver directory and ``/dev/vfio/vfio`` (made by the
    vfio module); a newly registered driver then attaches to the unbound devices it
    matches (``bus_add_driver`` -> ``driver_attach``; for vfio-pci those whose override
    names it). ``vfio_iommu_type1``, ``vfio``, ``vfio_pci_core`` and ``nvidia`` load
    likewise; a loaded module is left alone; any other name raises ``OSError``
    (``ENOENT``) naming it, as ``modprobe: FATAL: Module ... not found`` does.

    Errors: ``OSError`` with the kernel's errno as above; :class:`SimulationError` for a
    ``new_id``/``remove_id`` on a tree without the marker (dynamic IDs live there).
    """

    def __init__(self, node: SimulatedNode) -> None:
        self._node = node

    @classmethod
    def for_sysfs(cls, sysfs_root: Path) -> SimulatedKernel:
        """The kernel of the simulated tree at ``sysfs_root``.

        Errors: :class:`SimulationError` when ``sysfs_root`` holds no marker.
        """
        node = load_simulated_node(sysfs_root)
        if node is None:
            raise SimulationError(f"{sysfs_root} is not a simulated sysfs (no marker)")
        return cls(node)

    @property
    def node(self) -> SimulatedNode:
        return self._node

    # -- the PciKernel port ----------------------------------------------------------

    def write_attribute(self, path: Path, value: str) -> None:
        """Apply one write of ``value`` to the sysfs attribute ``path`` (class docstring)."""
        path = Path(path)
        if not path.exists():
            raise _os_error(errno.ENOENT, path, "no such sysfs attribute")
        target = path.resolve()
        if target.is_dir():
            raise _os_error(errno.EISDIR, path, "a directory, not an attribute")
        try:
            parts = target.relative_to(self._node.sysfs_root.resolve()).parts
        except ValueError:
            raise _os_error(errno.EACCES, path, "not in the simulated sysfs") from None
        if parts == ("bus", "pci", "drivers_probe"):
            self._drivers_probe(path, value)
        elif parts == ("bus", "pci", "drivers_autoprobe"):
            target.write_text("0\n" if value.startswith("0") else "1\n")
        elif (
            len(parts) == 5
            and parts[:3] == ("bus", "pci", "drivers")
            and parts[4]
            in (
                "bind",
                "unbind",
                "new_id",
                "remove_id",
            )
        ):
            driver, attribute = parts[3], parts[4]
            if attribute == "bind":
                self._bind_store(path, driver, value)
            elif attribute == "unbind":
                self._unbind_store(path, driver, value)
            elif attribute == "new_id":
                self._new_id(path, driver, value)
            else:
                self._remove_id(path, driver, value)
        elif target.name == "driver_override" and (target.parent / "vendor").is_file():
            self._driver_override(path, target, value)
        else:
            raise _os_error(errno.EACCES, path, "attribute not writable in the simulation")

    def load_module(self, name: str) -> None:
        """The simulated ``modprobe name`` (class docstring); loaded already: nothing."""
        closure = _MODULE_CLOSURE.get(name.replace("-", "_"))
        if closure is None:
            raise OSError(
                errno.ENOENT,
                f"modprobe: FATAL: Module {name} not found in the simulated node "
                f"(it knows {', '.join(sorted(_MODULE_CLOSURE))})",
            )
        sysfs, dev = self._node.sysfs_root, self._node.dev_root
        for module in closure:
            module_dir = sysfs / "module" / module
            if module_dir.is_dir():
                continue
            module_dir.mkdir(parents=True)
            if module == "vfio":
                (dev / "vfio").mkdir(parents=True, exist_ok=True)
                (dev / "vfio" / "vfio").write_text("")
            driver = _MODULE_DRIVERS.get(module)
            if driver is not None:
                _driver_dir(sysfs, driver)
                if self._autoprobe():
                    self._driver_attach(driver)

    # -- stores ------------------------------------------------------------------------

    def _driver_override(self, path: Path, target: Path, value: str) -> None:
        if len(value.encode()) >= _PAGE_SIZE - 1:
            raise _os_error(errno.EINVAL, path, "override longer than a page")
        text = value.split("\0", 1)[0].split("\n", 1)[0]  # strlen, then up to a newline
        target.write_text(f"{text}\n" if text else "(null)\n")

    def _drivers_probe(self, path: Path, value: str) -> None:
        dev = self._device(path, value)
        if dev.driver is None:
            self._device_attach(dev)

    def _bind_store(self, path: Path, driver: str, value: str) -> None:
        dev = self._device(path, value)
        if not self._matches(driver, dev):
            raise _os_error(errno.ENODEV, path, f"{driver} does not match {dev.address}")
        if dev.driver is not None:
            raise _os_error(errno.EBUSY, path, f"{dev.address} is bound to {dev.driver}")
        failure = self._probe(driver, dev)
        if failure:
            raise _os_error(failure, path, f"{driver} probe of {dev.address} failed")

    def _unbind_store(self, path: Path, driver: str, value: str) -> None:
        dev = self._device(path, value)
        if dev.driver != driver:
            raise _os_error(
                errno.ENODEV, path, f"{dev.address} is bound to {dev.driver}, not {driver}"
            )
        _unbind(self._node.sysfs_root, self._node.dev_root, dev.address, self._node.proc_root)

    def _new_id(self, path: Path, driver: str, value: str) -> None:
        fields = _hex_fields(value, 7)
        if len(fields) < 2:
            raise _os_error(errno.EINVAL, path, f"{value!r} is not 'vendor device' in hex")
        new = _PciId(*fields[:6])
        if len(fields) != 7:
            # The kernel matches a stand-in device carrying the new ID's fields.
            stand_in = _PciDev(
                "", new.vendor, new.device, new.subvendor, new.subdevice, new.pci_class, None, None
            )
            if self._matches(driver, stand_in):
                raise _os_error(errno.EEXIST, path, f"{driver} already matches {value!r}")
        ids = self._dynamic_ids()
        ids.setdefault(driver, []).append(new)
        self._save_dynamic_ids(ids)
        self._driver_attach(driver)

    def _remove_id(self, path: Path, driver: str, value: str) -> None:
        fields = _hex_fields(value, 6)
        if len(fields) < 2:
            raise _os_error(errno.EINVAL, path, f"{value!r} is not 'vendor device' in hex")
        want = _PciId(*fields)
        ids = self._dynamic_ids()
        for i, have in enumerate(ids.get(driver, [])):
            if (
                (have.vendor, have.device) == (want.vendor, want.device)
                and want.subvendor in (_ANY, have.subvendor)
                and want.subdevice in (_ANY, have.subdevice)
                and not ((have.pci_class ^ want.pci_class) & want.class_mask)
            ):
                del ids[driver][i]
                self._save_dynamic_ids(ids)
                return
        raise _os_error(errno.ENODEV, path, f"{driver} has no dynamic ID {value!r}")

    # -- the driver core -----------------------------------------------------------------

    def _device_attach(self, dev: _PciDev) -> None:
        for driver in self._loaded_drivers():
            if self._matches(driver, dev) and not self._probe(driver, dev):
                return

    def _driver_attach(self, driver: str) -> None:
        for address in self._addresses():
            dev = self._read_device(address)
            if dev.driver is None and self._matches(driver, dev):
                self._probe(driver, dev)

    def _matches(self, driver: str, dev: _PciDev) -> bool:
        if dev.override is not None:
            return dev.override == driver  # pci_match_device: only, and always, that one
        dynamic = self._dynamic_ids().get(driver, [])
        return any(i.matches(dev) for i in (*dynamic, *_ID_TABLES.get(driver, ())))

    def _probe(self, driver: str, dev: _PciDev) -> int:
        """Bind ``dev`` to ``driver`` as its probe would; 0, or the probe's errno."""
        if driver == VFIO_DRIVER and dev.is_bridge:
            return errno.EINVAL
        if (
            driver == VFIO_DRIVER
            and not (
                self._node.sysfs_root / "bus" / "pci" / "devices" / dev.address / "iommu_group"
            ).exists()
        ):
            return errno.EINVAL  # vfio_iommu_group_get: no group, and no noiommu mode
        node = self._node
        _bind(node.sysfs_root, node.dev_root, dev.address, driver, node.proc_root)
        return 0

    # -- reading the tree ----------------------------------------------------------------

    def _addresses(self) -> list[str]:
        return sorted(p.name for p in (self._node.sysfs_root / "bus" / "pci" / "devices").iterdir())

    def _device(self, path: Path, value: str) -> _PciDev:
        name = value[:-1] if value.endswith("\n") else value
        if name not in self._addresses():
            raise _os_error(errno.ENODEV, path, f"no PCI device {name!r}")
        return self._read_device(name)

    def _read_device(self, address: str) -> _PciDev:
        directory = self._node.sysfs_root / "bus" / "pci" / "devices" / address

        def number(name: str) -> int:
            try:
                return int((directory / name).read_text().strip(), 16)
            except (OSError, ValueError):
                return 0

        try:
            override: str | None = (directory / "driver_override").read_text().rstrip("\n")
        except OSError:
            override = None
        return _PciDev(
            address=address,
            vendor=number("vendor"),
            device=number("device"),
            subvendor=number("subsystem_vendor"),
            subdevice=number("subsystem_device"),
            pci_class=number("class"),
            override=None if override in (None, "(null)") else override,
            driver=_current_driver(self._node.sysfs_root, address),
        )

    def _loaded_drivers(self) -> list[str]:
        try:
            present = {p.name for p in (self._node.sysfs_root / "bus/pci/drivers").iterdir()}
        except OSError:
            return []
        first = [d for d in _REGISTRATION_ORDER if d in present]
        return first + sorted(present - set(first))

    def _autoprobe(self) -> bool:
        try:
            text = (self._node.sysfs_root / "bus" / "pci" / "drivers_autoprobe").read_text()
        except OSError:
            return True
        return not text.startswith("0")

    def _dynamic_ids(self) -> dict[str, list[_PciId]]:
        marker = _read_marker(self._node.sysfs_root)
        if marker is None:
            return {}
        try:
            return {
                driver: [_PciId(*(int(x) for x in entry)) for entry in entries]
                for driver, entries in dict(marker.get("dynamic_ids", {})).items()
            }
        except (TypeError, ValueError) as exc:
            raise SimulationError(f"simulated-node marker: bad dynamic_ids ({exc})") from None

    def _save_dynamic_ids(self, ids: Mapping[str, list[_PciId]]) -> None:
        sysfs = self._node.sysfs_root
        marker = _read_marker(sysfs)
        if marker is None:
            raise SimulationError(f"{sysfs} has no marker to keep dynamic IDs in")
        marker["dynamic_ids"] = {d: [i.as_list() for i in v] for d, v in sorted(ids.items()) if v}
        _write_marker(sysfs, marker)
