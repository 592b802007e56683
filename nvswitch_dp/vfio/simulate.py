"""A faithful fake sysfs and /dev tree of an HGX node, and faults to inject into it.

Used by ``--simulate``, ``doctor --simulate`` and the tests (Intel's ``createTestFiles``
pattern). The tree mirrors the kernel's shape, links included, so code that resolves
links is exercised::

    <root>/sys/devices/pci0000:5c/0000:5c:01.0/                 root port (pcieport)
    <root>/sys/devices/pci0000:5c/0000:5c:01.0/0000:5d:00.0/    the GPU: vendor, device,
        class, numa_node, subsystem_vendor, subsystem_device, driver_override, reset,
        subsystem -> ../../../../bus/pci
        driver -> ../../../../bus/pci/drivers/vfio-pci
        iommu_group -> ../../../../kernel/iommu_groups/<n>
    <root>/sys/bus/pci/devices/<addr> -> ../../../devices/pci0000:../../<addr>
    <root>/sys/bus/pci/drivers/{vfio-pci,nvidia,pcieport}/<addr> -> the device directory
    <root>/sys/kernel/iommu_groups/<n>/devices/<addr> -> the device directory
    <root>/dev/vfio/vfio, <root>/dev/vfio/<n>

Every GPU, NVSwitch (class 0x068000, driver ``nvidia``, when the platform's switches are
PCI functions) and root port has its own IOMMU group, numbered in address order, as on
an HGX board with ACS. ``/dev/vfio/<n>`` exists for each group holding a vfio-pci device.

**Device nodes are regular empty files.** Creating character devices needs
``CAP_MKNOD``; nothing in the plugin opens them (it hands their paths to the kubelet), and
existence is all the health check looks at.

Ownership: every function here writes only under the ``root`` given to
:func:`build_simulated_node` (``<root>/sys`` and ``<root>/dev``, which it deletes and
re-creates). Errors: :class:`SimulationError` for an address or group the tree lacks;
``OSError`` from the file system.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nvswitch_dp.fabric.platforms import Platform

VFIO_DRIVER = "vfio-pci"
_NVIDIA = "10de"
_BRIDGE_VENDOR, _BRIDGE_DEVICE = "1000", "c030"  # Broadcom PEX89000 switch port
_DRIVER_CONTROL_FILES = ("bind", "unbind", "new_id", "remove_id", "uevent")


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
class SimulatedNode:
    """A simulated node on disk: its roots, its module map, and what it was built from."""

    sysfs_root: Path
    dev_root: Path
    module_map: Mapping[int, str]
    functions: Mapping[str, SimFunction] = field(default_factory=dict)

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


# ---------------------------------------------------------------------------- building


def _addr(bus: int, dev: int = 0, fn: int = 0) -> str:
    return f"0000:{bus:02x}:{dev:02x}.{fn}"


def _plan(platform: Platform) -> list[SimFunction]:
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
    endpoints: list[tuple[int, str, str, int, str, int]] = [
        (bus, _NVIDIA, platform.gpu_device_id, 0x030200, VFIO_DRIVER, platform.numa_node(m))
        for m, bus in gpu_buses.items()
    ]
    endpoints += [
        (bus, _NVIDIA, platform.nvswitch_device_id, 0x068000, "nvidia", 0) for bus in switch_buses
    ]
    specs: list[tuple[str, str, str, int, str, int, str]] = []
    for bus, vendor, device, pci_class, driver, numa in endpoints:
        port = _addr(bus - 1, 1)
        host = f"pci0000:{bus - 1:02x}"
        specs.append((port, _BRIDGE_VENDOR, _BRIDGE_DEVICE, 0x060400, "pcieport", numa, host))
        specs.append((_addr(bus), vendor, device, pci_class, driver, numa, f"{host}/{port}"))
    specs.sort()
    if len({s[0] for s in specs}) != len(specs):
        raise SimulationError(f"platform {platform.name}: PCI addresses collide")
    return [
        SimFunction(a, v, d, c, drv, group, numa, parent)
        for group, (a, v, d, c, drv, numa, parent) in enumerate(specs)
    ]


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


def _create_function(sysfs: Path, dev: Path, fn: SimFunction) -> None:
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
        _bind(sysfs, dev, fn.address, fn.driver)


def build_simulated_node(root: Path, platform: Platform) -> SimulatedNode:
    """Write the tree of ``platform`` under ``root`` and describe it.

    Idempotent: ``<root>/sys`` and ``<root>/dev`` are deleted and written afresh, so
    faults injected earlier are gone; anything else under ``root`` is left alone.
    All GPUs start bound to vfio-pci, every group viable, every ``/dev/vfio`` node present.
    """
    root = Path(root)
    sysfs, dev = root / "sys", root / "dev"
    for tree in (sysfs, dev):
        if tree.exists() or tree.is_symlink():
            shutil.rmtree(tree)
    (sysfs / "bus" / "pci" / "devices").mkdir(parents=True)
    (sysfs / "kernel" / "iommu_groups").mkdir(parents=True)
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio" / "vfio").write_text("")
    for module in ("vfio", "vfio_pci", "vfio_iommu_type1", "vfio_pci_core"):
        (sysfs / "module" / module).mkdir(parents=True)
    dmar = sysfs / "devices" / "virtual" / "iommu" / "dmar0"
    dmar.mkdir(parents=True)
    _link(sysfs / "class" / "iommu" / "dmar0", dmar)
    _driver_dir(sysfs, VFIO_DRIVER)

    functions = _plan(platform)
    for fn in functions:
        _create_function(sysfs, dev, fn)
    return SimulatedNode(
        sysfs_root=sysfs,
        dev_root=dev,
        module_map=platform.module_map(),
        functions={fn.address: fn for fn in functions},
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


# ---------------------------------------------------------------------------- faults


def _bind(sysfs: Path, dev: Path, address: str, driver: str) -> None:
    directory = _device_dir(sysfs, address)
    _unbind(sysfs, dev, address)
    driver_dir = _driver_dir(sysfs, driver)
    _link(directory / "driver", driver_dir)
    _link(driver_dir / address, directory)
    if driver == VFIO_DRIVER:
        _sync_group_node(sysfs, dev, _current_group(sysfs, address))


def _unbind(sysfs: Path, dev: Path, address: str) -> None:
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


def bind(node: SimulatedNode, address: str, driver: str = VFIO_DRIVER) -> None:
    """Bind the function at ``address`` to ``driver`` (after unbinding it from any other).

    Binding to vfio-pci creates ``/dev/vfio/<group>`` as the kernel does. Inverse of
    :func:`unbind`.
    """
    _bind(node.sysfs_root, node.dev_root, address, driver)


def unbind(node: SimulatedNode, address: str, to: str | None = None) -> None:
    """Unbind the function at ``address``; then bind it to ``to`` (e.g. ``"nvidia"``) if given.

    When the group's last vfio-pci device leaves, ``/dev/vfio/<group>`` goes, as in the
    kernel. Inverse: :func:`bind` (``bind(node, address)`` returns it to vfio-pci).
    """
    _unbind(node.sysfs_root, node.dev_root, address)
    if to is not None:
        _bind(node.sysfs_root, node.dev_root, address, to)


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
    _create_function(sysfs, node.dev_root, fn)
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
    _unbind(sysfs, dev, address)
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
    _create_function(node.sysfs_root, node.dev_root, fn)
