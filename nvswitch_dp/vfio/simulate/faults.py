"""Faults to inject into a simulated node, each with its inverse: drivers changed behind
the plugin's back, ``/dev/vfio`` nodes lost, functions added to a group or hot-unplugged,
and processes holding a device open.

A fault is not the kernel: it consults no ID table, override or probe (that is
:class:`~nvswitch_dp.vfio.simulate.kernel.SimulatedKernel`), but what it changes has the
side effects the kernel's change would have (:mod:`nvswitch_dp.vfio.simulate.tree`).

Ownership: every function writes only under the node's ``sysfs_root``, ``dev_root`` and
``proc_root``. Errors: :class:`~nvswitch_dp.vfio.simulate.node.SimulationError` for an
address, group or process the tree lacks; ``OSError`` from the file system.
"""

from __future__ import annotations

import shutil

from nvswitch_dp.vfio.discovery import VFIO_DRIVER
from nvswitch_dp.vfio.pci_ids import NVIDIA_VENDOR_ID
from nvswitch_dp.vfio.simulate.node import (
    SimFunction,
    SimulatedNode,
    SimulationError,
    current_group,
    device_dir,
    device_link,
    function_addresses,
    group_members,
)
from nvswitch_dp.vfio.simulate.tree import (
    attach_driver,
    create_function,
    detach_driver,
    sync_group_node,
)

# ---------------------------------------------------------------------------- drivers and nodes


def bind(node: SimulatedNode, address: str, driver: str = VFIO_DRIVER) -> None:
    """Bind the function at ``address`` to ``driver`` (after unbinding it from any other).

    A fault, not the kernel: no ID table or override is consulted (that is
    :class:`~nvswitch_dp.vfio.simulate.kernel.SimulatedKernel`). Binding to vfio-pci
    creates ``/dev/vfio/<group>`` as the kernel does, binding a GPU to nvidia its
    ``/proc/driver/nvidia`` entry and ``/dev/nvidia<minor>``. Inverse of :func:`unbind`.
    """
    attach_driver(node, address, driver)


def unbind(node: SimulatedNode, address: str, to: str | None = None) -> None:
    """Unbind the function at ``address``; then bind it to ``to`` (e.g. ``"nvidia"``) if given.

    When the group's last vfio-pci device leaves, ``/dev/vfio/<group>`` goes, as in the
    kernel; a GPU leaving nvidia loses its ``/proc/driver/nvidia`` entry. Inverse:
    :func:`bind` (``bind(node, address)`` returns it to vfio-pci).
    """
    detach_driver(node, address)
    if to is not None:
        attach_driver(node, address, to)


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
    vendor: str = NVIDIA_VENDOR_ID,
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
    members = group_members(sysfs, group)
    if not members:
        raise SimulationError(f"no IOMMU group {group} with members in the simulated node")
    anchor = members[0]
    parent_dir = device_dir(sysfs, anchor).parent
    slot = anchor.rsplit(".", 1)[0]
    taken = set(function_addresses(sysfs))
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
    create_function(node, fn)
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
    sysfs = node.sysfs_root
    directory = device_dir(sysfs, address)
    group = current_group(sysfs, address)
    detach_driver(node, address)
    device_link(sysfs, address).unlink()
    group_dir = sysfs / "kernel" / "iommu_groups" / str(group)
    (group_dir / "devices" / address).unlink()
    shutil.rmtree(directory)
    if not group_members(sysfs, group):
        shutil.rmtree(group_dir)
    sync_group_node(node, group)


def remove_foreign_function(node: SimulatedNode, address: str) -> None:
    """Take out a function added by :func:`add_foreign_function` or :func:`add_function`."""
    remove_device(node, address)


def restore_device(node: SimulatedNode, address: str) -> None:
    """Plug back a function the node was built with, in its original state and group."""
    try:
        fn = node.functions[address]
    except KeyError:
        raise SimulationError(f"{address} was not part of the simulated node") from None
    if device_link(node.sysfs_root, address).exists():
        raise SimulationError(f"{address} is present; remove it first")
    create_function(node, fn)


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
