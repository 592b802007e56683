"""The mechanics every change to a simulated tree goes through, whoever asks for it (the
builder, a fault, the simulated kernel): creating a PCI function with its links, a driver
taking or releasing a function, and what loading a module leaves behind.

These apply no kernel rule (no ID table, no override, no probe refusal): deciding *whether*
a driver may bind is :mod:`nvswitch_dp.vfio.simulate.kernel`'s; a fault binds regardless.
What binding *does* follows the kernel and the NVIDIA driver:

- ``/dev/vfio/<group>`` exists exactly while a member of the group is bound to vfio-pci.
- **The nvidia driver's own nodes** follow the NVIDIA driver, not the tree's builder:
  ``/proc/driver/nvidia/gpus/<addr>/information`` is created by the driver's probe and
  removed with the device (``nv_procfs_add_gpu``/``nv_procfs_remove_gpu``), its text
  exactly as ``nv_procfs_read_gpu_info`` prints it (tabs included; checked against the
  capture in ``shared/reference/hardware/h200-sxm-passthrough/proc-driver-nvidia.txt``,
  whose first line is the capture's header, not the file's). ``/dev/nvidia<minor>`` and
  ``/dev/nvidiactl`` are *not* made by the kernel: the distribution's udev rule runs
  ``nvidia-create-device-nodes``/``nvidia-modprobe`` on ``ACTION=="add|bind"`` and
  nothing removes them, so here they appear when a GPU binds to ``nvidia`` and stay after
  it leaves (opening such a stale node on a real node fails; existence proves nothing
  about binding).
- **Device nodes are regular empty files.** Creating character devices needs
  ``CAP_MKNOD``; nothing in the plugin opens them (it hands their paths to the kubelet),
  and existence is all the health check looks at.

Ownership: writes only under the node's ``sysfs_root``, ``dev_root`` and ``proc_root``.
Errors: :class:`~nvswitch_dp.vfio.simulate.node.SimulationError` for an address the tree
lacks; ``OSError`` from the file system.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from nvswitch_dp.vfio.discovery import NVIDIA_DRIVER, VFIO_DRIVER
from nvswitch_dp.vfio.pci_ids import is_bridge
from nvswitch_dp.vfio.simulate.node import (
    DRIVER_VERSION,
    VBIOS_VERSION,
    SimFunction,
    SimIdentity,
    SimulatedNode,
    current_driver,
    current_group,
    device_dir,
    device_link,
    group_members,
    marker_identities,
    product_name,
    read_marker,
)

_DRIVER_CONTROL_FILES = ("bind", "unbind", "new_id", "remove_id", "uevent")
_DMA_BITS = 52

# modprobe NAME -> the modules it leaves loaded, dependencies first (vfio's
# MODULE_SOFTDEP("post: vfio_iommu_type1 ...") pulls that one in).
MODULE_CLOSURE: Mapping[str, tuple[str, ...]] = {
    "vfio": ("vfio", "vfio_iommu_type1"),
    "vfio_iommu_type1": ("vfio", "vfio_iommu_type1"),
    "vfio_pci_core": ("vfio", "vfio_iommu_type1", "vfio_pci_core"),
    "vfio_pci": ("vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci"),
    "nvidia": ("nvidia",),
}
# The PCI driver a module registers, for those that register one.
_MODULE_DRIVERS: Mapping[str, str] = {"vfio_pci": VFIO_DRIVER, "nvidia": NVIDIA_DRIVER}


def link(path: Path, target: Path) -> None:
    """A relative symlink ``path -> target``, as sysfs has them; replaces what is there."""
    if path.is_symlink() or path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent))


def driver_dir(sysfs: Path, driver: str) -> Path:
    """``<sys>/bus/pci/drivers/<driver>`` with its control files, made when missing (the
    driver registering)."""
    d = sysfs / "bus" / "pci" / "drivers" / driver
    if not d.is_dir():
        d.mkdir(parents=True)
        for name in _DRIVER_CONTROL_FILES:
            (d / name).write_text("")
    return d


def insert_modules(sysfs: Path, dev: Path, modules: Iterable[str]) -> list[str]:
    """What loading each of ``modules`` leaves behind: ``<sys>/module/<m>``, for ``vfio``
    the container node ``/dev/vfio/vfio``, for a module with a PCI driver that driver's
    directory. A module loaded already is left alone. Returns the drivers newly
    registered (they attach to devices only if the caller says so)."""
    registered: list[str] = []
    for module in modules:
        module_dir = sysfs / "module" / module
        if module_dir.is_dir():
            continue
        module_dir.mkdir(parents=True)
        if module == "vfio":
            (dev / "vfio").mkdir(parents=True, exist_ok=True)
            (dev / "vfio" / "vfio").write_text("")
        driver = _MODULE_DRIVERS.get(module)
        if driver is not None:
            driver_dir(sysfs, driver)
            registered.append(driver)
    return registered


def create_function(node: SimulatedNode, fn: SimFunction) -> None:
    """Write ``fn``'s directory, attributes and links (its group made if new), bound to
    ``fn.driver`` if it names one."""
    sysfs = node.sysfs_root
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
    if not is_bridge(fn.pci_class):
        (directory / "reset").write_text("")
    link(directory / "subsystem", sysfs / "bus" / "pci")
    link(device_link(sysfs, fn.address), directory)
    group_dir = sysfs / "kernel" / "iommu_groups" / str(fn.iommu_group)
    if not group_dir.is_dir():
        (group_dir / "devices").mkdir(parents=True)
        (group_dir / "type").write_text("DMA\n")
    link(group_dir / "devices" / fn.address, directory)
    link(directory / "iommu_group", group_dir)
    if fn.driver is not None:
        attach_driver(node, fn.address, fn.driver)


def attach_driver(node: SimulatedNode, address: str, driver: str) -> None:
    """``driver`` takes the function at ``address`` (released from any other first), with
    the side effects of the module docstring."""
    sysfs = node.sysfs_root
    directory = device_dir(sysfs, address)
    detach_driver(node, address)
    driver_directory = driver_dir(sysfs, driver)
    link(directory / "driver", driver_directory)
    link(driver_directory / address, directory)
    if driver == VFIO_DRIVER:
        sync_group_node(node, current_group(sysfs, address))
    elif driver == NVIDIA_DRIVER:
        _nvidia_probed(node, address)


def detach_driver(node: SimulatedNode, address: str) -> None:
    """The function at ``address`` leaves its driver, if it has one."""
    sysfs = node.sysfs_root
    directory = device_dir(sysfs, address)
    old = current_driver(sysfs, address)
    if old is None:
        return
    (directory / "driver").unlink()
    back = sysfs / "bus" / "pci" / "drivers" / old / address
    if back.is_symlink():
        back.unlink()
    if old == VFIO_DRIVER:
        sync_group_node(node, current_group(sysfs, address))
    elif old == NVIDIA_DRIVER:
        _nvidia_removed(node.proc_root, address)


def sync_group_node(node: SimulatedNode, group: int) -> None:
    """``/dev/vfio/<group>`` exists exactly while a member is bound to vfio-pci (kernel)."""
    sysfs = node.sysfs_root
    group_node = node.dev_root / "vfio" / str(group)
    if any(current_driver(sysfs, a) == VFIO_DRIVER for a in group_members(sysfs, group)):
        group_node.parent.mkdir(parents=True, exist_ok=True)
        if not group_node.exists():
            group_node.write_text("")
    elif group_node.exists():
        group_node.unlink()


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


def _nvidia_gpu_dir(proc: Path, address: str) -> Path:
    return proc / "driver" / "nvidia" / "gpus" / address


def _nvidia_probed(node: SimulatedNode, address: str) -> None:
    """What the nvidia driver's probe (procfs) and the udev bind rule (/dev) add."""
    content = read_marker(node.sysfs_root)
    if content is None:
        return
    identity = marker_identities(content).get(address)
    if identity is None:  # an NVSwitch or an added function: no GPU identity to show
        return
    gpu_dir = _nvidia_gpu_dir(node.proc_root, address)
    gpu_dir.mkdir(parents=True, exist_ok=True)
    platform_name = str(content.get("platform", ""))
    (gpu_dir / "information").write_text(gpu_information(identity, platform_name))
    dev = node.dev_root
    dev.mkdir(parents=True, exist_ok=True)
    for name in ("nvidiactl", f"nvidia{identity.minor}"):
        if not (dev / name).exists():
            (dev / name).write_text("")


def _nvidia_removed(proc: Path, address: str) -> None:
    """The driver's remove drops the procfs entry; the /dev node stays (module docstring)."""
    gpu_dir = _nvidia_gpu_dir(proc, address)
    if gpu_dir.exists():
        shutil.rmtree(gpu_dir)
