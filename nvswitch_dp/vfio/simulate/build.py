"""Building a simulated node's tree from a platform, and reading one back from its marker.

The tree mirrors the kernel's shape, links included, so code that resolves links is
exercised::

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
    <root>/sys/nvswitch-dp-simulated-node.json                  the marker (node.py)
    <root>/dev/vfio/vfio, <root>/dev/vfio/<n>
    <root>/dev/nvidiactl, <root>/dev/nvidia<minor>              once a GPU was on nvidia
    <root>/proc/driver/nvidia/gpus/<addr>/information           while a GPU is on nvidia
    <root>/proc/<pid>/{comm,fd/<n>}                             see faults.hold_open

Every GPU, NVSwitch (class 0x068000, driver ``nvidia``, when the platform's switches are
PCI functions) and root port has its own IOMMU group, numbered in address order, as on
an HGX board with ACS. ``/dev/vfio/<n>`` exists for each group holding a vfio-pci device.
(A real node binds NVSwitches to ``nvidia-nvswitch``, ``NVSWITCH_DRIVER_NAME`` in NVIDIA's
open-gpu-kernel-modules; the tree keeps them on ``nvidia``, which its users expect, and the
simulated ``nvidia`` driver's ID table matches them for that reason only.)

Ownership: :func:`build_simulated_node` deletes and re-creates ``<root>/sys``,
``<root>/dev`` and ``<root>/proc``, and writes nothing else; :func:`load_simulated_node`
only reads. Errors: :class:`~nvswitch_dp.vfio.simulate.node.SimulationError` for a
platform whose PCI addresses collide and for a bad marker; ``OSError`` from the file
system.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from nvswitch_dp.fabric.platforms import PLATFORMS, Platform
from nvswitch_dp.vfio.discovery import NVIDIA_DRIVER, VFIO_DRIVER
from nvswitch_dp.vfio.pci_ids import NVIDIA_VENDOR_ID
from nvswitch_dp.vfio.simulate.node import (
    SimFunction,
    SimIdentity,
    SimulatedNode,
    SimulationError,
    marker,
    marker_identities,
    read_marker,
    write_marker,
)
from nvswitch_dp.vfio.simulate.tree import (
    MODULE_CLOSURE,
    create_function,
    driver_dir,
    insert_modules,
    link,
)

_BRIDGE_VENDOR, _BRIDGE_DEVICE = "1000", "c030"  # Broadcom PEX89000 switch port


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
        (bus, NVIDIA_VENDOR_ID, platform.gpu_device_id, 0x030200, gpu_driver, platform.numa_node(m))
        for m, bus in gpu_buses.items()
    ]
    endpoints += [
        (bus, NVIDIA_VENDOR_ID, platform.nvswitch_device_id, 0x068000, NVIDIA_DRIVER, 0)
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


def _write_empty_tree(root: Path, *, vfio_loaded: bool) -> None:
    """``<root>/{sys,dev,proc}`` afresh, with the buses, drivers and modules of a booted
    node and no PCI function yet."""
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
    insert_modules(sysfs, dev, MODULE_CLOSURE["nvidia"])
    if vfio_loaded:
        insert_modules(sysfs, dev, MODULE_CLOSURE["vfio_pci"])
    dmar = sysfs / "devices" / "virtual" / "iommu" / "dmar0"
    dmar.mkdir(parents=True)
    link(sysfs / "class" / "iommu" / "dmar0", dmar)
    driver_dir(sysfs, "pcieport")  # built into the kernel


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
    _write_empty_tree(root, vfio_loaded=vfio_loaded)
    identities = _identities(platform)
    # The marker first: binding a GPU to nvidia reads its identity from it.
    write_marker(root / "sys", marker(platform.name, gpu_driver, identities.values(), {}))
    functions = _plan(platform, gpu_driver)
    node = SimulatedNode(
        sysfs_root=root / "sys",
        dev_root=root / "dev",
        module_map=platform.module_map(),
        functions={fn.address: fn for fn in functions},
        proc_root=root / "proc",
        identities=identities,
        platform_name=platform.name,
    )
    for fn in functions:
        create_function(node, fn)
    return node


def load_simulated_node(sysfs_root: Path) -> SimulatedNode | None:
    """The simulated node whose sysfs root is ``sysfs_root``, read from its marker;
    ``None`` when there is no marker (a real sysfs, or a hand-built tree).

    ``dev_root`` and ``proc_root`` are the builder's siblings of ``sysfs_root``;
    ``functions`` are re-planned from the recorded platform, so the value equals the one
    :func:`build_simulated_node` returned.

    Errors: :class:`~nvswitch_dp.vfio.simulate.node.SimulationError` for a marker that is
    not JSON, of another format or version, or names an unknown platform.
    """
    sysfs = Path(sysfs_root)
    content = read_marker(sysfs)
    if content is None:
        return None
    name = content.get("platform")
    if not isinstance(name, str) or name not in PLATFORMS:
        raise SimulationError(f"simulated-node marker names unknown platform {name!r}")
    identities = marker_identities(content)
    functions = _plan(PLATFORMS[name], content.get("gpu_driver"))
    return SimulatedNode(
        sysfs_root=sysfs,
        dev_root=sysfs.parent / "dev",
        module_map=dict(sorted((i.module_id, a) for a, i in identities.items())),
        functions={fn.address: fn for fn in functions},
        proc_root=sysfs.parent / "proc",
        identities=identities,
        platform_name=name,
    )
