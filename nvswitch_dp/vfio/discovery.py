"""Find the node's NVIDIA GPUs in sysfs, map them to FM module IDs, and judge their VFIO state.

Every function here comes in two halves, after NVIDIA's ``health.go``:

- **readers** (``read_*``, :func:`discover_gpus`, :func:`vfio_problem`) do synchronous
  file I/O under a sysfs root and a dev root passed in as arguments (never ``/sys``
  hard-coded), and turn what they find into frozen values. They never raise for a
  device that vanishes mid-walk: hot-unplug is data, not an error.
- **decisions** (:func:`gpu_from_function`, :func:`build_inventory`,
  :func:`decide_vfio_problem`) are pure functions over those values, tested without files.

The sysfs layout read (and mirrored by :mod:`nvswitch_dp.vfio.simulate`)::

    <sysfs>/bus/pci/devices/<addr>            -> ../../../devices/pci0000:xx/.../<addr>
    <sysfs>/devices/.../<addr>/{vendor,device,class,numa_node}
    <sysfs>/devices/.../<addr>/driver         -> .../bus/pci/drivers/<name>   (absent: unbound)
    <sysfs>/devices/.../<addr>/iommu_group    -> .../kernel/iommu_groups/<n>  (absent: no IOMMU)
    <sysfs>/kernel/iommu_groups/<n>/devices/<addr> -> the device directory
    <dev>/vfio/vfio, <dev>/vfio/<n>           the VFIO container and group nodes

Viability follows the kernel (``vfio_dev_viable``): a group can be opened only when every
function in it is unbound, bound to ``vfio-pci``, bound to ``pci-stub``, or is a bridge
(the kernel allows any non-normal header type; class 0x0604/0x0607 stands for that here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nvswitch_dp.vfio.pci_ids import (
    GPU_CLASSES,
    is_bridge,
    normalize_device_key,
    parse_pci_id,
)

log = logging.getLogger(__name__)

VFIO_DRIVER = "vfio-pci"
NVIDIA_DRIVER = "nvidia"
# Drivers the kernel lets share a group with a vfio-pci device (vfio_driver_allowed).
VIABLE_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub"})


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class PciFunction:
    """One PCI function as sysfs shows it; ``None`` where an attribute is absent/unreadable."""

    address: str
    vendor_id: str | None = None  # "10de"
    device_id: str | None = None  # "2335"
    pci_class: int | None = None  # 24-bit class code, 0x030200
    driver: str | None = None
    iommu_group: int | None = None
    numa_node: int | None = None  # sysfs -1 ("unknown") reads as None


@dataclass(frozen=True, slots=True)
class PciGpu:
    """A GPU found in sysfs whose ``vendor:device`` is in the configured table."""

    address: str  # "0000:5d:00.0", lower case, as sysfs names it
    vendor_id: str  # "10de"
    device_id: str  # "2335"
    name: str  # from the table: "H200 SXM 141GB"
    driver: str | None  # "vfio-pci", "nvidia", None when unbound
    iommu_group: int | None  # None when the IOMMU is off
    numa_node: int | None  # None when the kernel reports -1

    @property
    def key(self) -> str:
        """``"10de:2335"``."""
        return f"{self.vendor_id}:{self.device_id}"


class InventoryError(Exception):
    """The module map names a PCI address where discovery found no configured GPU.

    The message names every such module and address, and what was found instead.
    """


@dataclass(frozen=True, slots=True)
class Inventory:
    """Module ID -> GPU, joined from the configured module map and discovery.

    ``unmapped``: GPUs present in sysfs that no module maps (not served; see ``warnings``).
    ``missing``: module -> reason, only filled by ``build_inventory(..., strict=False)``.
    """

    gpus: Mapping[int, PciGpu]
    unmapped: tuple[PciGpu, ...] = ()
    missing: Mapping[int, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GroupMember:
    """Another function in a GPU's IOMMU group, as far as viability cares."""

    address: str
    driver: str | None
    pci_class: int | None


@dataclass(frozen=True, slots=True)
class VfioSnapshot:
    """What :func:`decide_vfio_problem` needs to know about one GPU, read at one moment."""

    address: str
    present: bool  # <sysfs>/bus/pci/devices/<addr> exists
    driver: str | None = None
    iommu_group: int | None = None
    group_node_exists: bool = False  # <dev>/vfio/<group>
    container_node_exists: bool = False  # <dev>/vfio/vfio
    group_members: tuple[GroupMember, ...] = ()  # the group's other functions


# ---------------------------------------------------------------------------- decisions


def gpu_from_function(function: PciFunction, device_ids: Mapping[str, str]) -> PciGpu | None:
    """The function as a :class:`PciGpu` when its ID is in ``device_ids`` and its class is
    a display controller (0x0302xx 3D, 0x0300xx VGA); ``None`` otherwise.

    ``device_ids`` keys must be normalized (``"10de:2335"``).
    """
    fn = function
    if fn.vendor_id is None or fn.device_id is None or fn.pci_class is None:
        return None
    if (fn.pci_class >> 8) not in GPU_CLASSES:
        return None
    key = f"{fn.vendor_id}:{fn.device_id}"
    name = device_ids.get(key)
    if name is None:
        return None
    return PciGpu(
        address=fn.address,
        vendor_id=fn.vendor_id,
        device_id=fn.device_id,
        name=name,
        driver=fn.driver,
        iommu_group=fn.iommu_group,
        numa_node=fn.numa_node,
    )


def build_inventory(
    module_map: Mapping[int, str], gpus: Iterable[PciGpu], *, strict: bool = True
) -> Inventory:
    """Join ``module_map`` (module ID -> PCI address) with the discovered ``gpus``.

    Addresses compare case-insensitively. GPUs no module maps are listed in
    ``unmapped`` with a warning each.

    Errors: with ``strict`` (the default), :class:`InventoryError` naming every module whose
    address has no discovered GPU, or an address two modules share. With
    ``strict=False`` an absent GPU goes to ``Inventory.missing`` and a warning instead
    (a GPU that fell off the bus should not take its healthy neighbours down).
    """
    by_address = {g.address.lower(): g for g in gpus}
    owners: dict[str, int] = {}
    problems: list[str] = []
    for module, address in sorted(module_map.items()):
        addr = address.lower()
        if addr in owners:
            problems.append(f"module {module}: address {addr} is already module {owners[addr]}")
        owners[addr] = module
    if problems:
        raise InventoryError("; ".join(problems))

    mapped: dict[int, PciGpu] = {}
    missing: dict[int, str] = {}
    for module, address in sorted(module_map.items()):
        gpu = by_address.get(address.lower())
        if gpu is None:
            missing[module] = f"module {module}: no configured GPU at {address.lower()}"
        else:
            mapped[module] = gpu
    found = ", ".join(sorted(by_address)) or "none"
    if missing and strict:
        raise InventoryError(f"{'; '.join(missing.values())} (GPUs found: {found})")
    unmapped = tuple(g for a, g in sorted(by_address.items()) if a not in owners)
    warnings = [f"{m} (GPUs found: {found})" for m in missing.values()]
    warnings += [
        f"GPU {g.address} ({g.name}) is in no module_map entry and will not be served"
        for g in unmapped
    ]
    return Inventory(mapped, unmapped, missing, tuple(warnings))


def member_blocks_viability(member: GroupMember) -> bool:
    """Whether this function keeps its IOMMU group from being opened (kernel rules)."""
    if member.driver is None or member.driver in VIABLE_DRIVERS:
        return False
    return not is_bridge(member.pci_class)


def decide_vfio_problem(snapshot: VfioSnapshot) -> str | None:
    """Why this GPU cannot be handed to a VM right now, or ``None`` when it can.

    Checked in order, first problem wins: device gone; not bound to vfio-pci; no IOMMU
    group; ``/dev/vfio/<group>`` missing; ``/dev/vfio/vfio`` missing; group not viable.
    The message starts with the PCI address.
    """
    s = snapshot
    if not s.present:
        return f"{s.address}: device is gone from the PCI bus"
    if s.driver != VFIO_DRIVER:
        return f"{s.address}: bound to {s.driver or 'no driver'}, not {VFIO_DRIVER}"
    if s.iommu_group is None:
        return f"{s.address}: has no IOMMU group (is the IOMMU enabled?)"
    if not s.group_node_exists:
        return f"{s.address}: /dev/vfio/{s.iommu_group} is missing"
    if not s.container_node_exists:
        return f"{s.address}: /dev/vfio/vfio is missing"
    blockers = [m for m in s.group_members if member_blocks_viability(m)]
    if blockers:
        who = ", ".join(f"{m.address} is bound to {m.driver}" for m in blockers)
        return f"{s.address}: IOMMU group {s.iommu_group} is not viable: {who}, not {VFIO_DRIVER}"
    return None


# ---------------------------------------------------------------------------- readers


def read_attribute(path: Path) -> str | None:
    """The text of the sysfs or procfs file ``path``, stripped; ``None`` when it is absent
    or unreadable (a device that vanished is data, not an error)."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _link_name(path: Path) -> str | None:
    try:
        return path.readlink().name
    except OSError:
        return None


def _int(text: str | None, base: int = 10) -> int | None:
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def _hex_id(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return parse_pci_id(text)
    except ValueError:
        return None


def read_function(sysfs_root: Path, address: str) -> PciFunction | None:
    """Read ``<sysfs>/bus/pci/devices/<address>``; ``None`` when it does not exist."""
    base = sysfs_root / "bus" / "pci" / "devices" / address
    if not base.exists():
        return None
    numa = _int(read_attribute(base / "numa_node"))
    group = _link_name(base / "iommu_group")
    return PciFunction(
        address=address.lower(),
        vendor_id=_hex_id(read_attribute(base / "vendor")),
        device_id=_hex_id(read_attribute(base / "device")),
        pci_class=_int(read_attribute(base / "class"), 16),
        driver=_link_name(base / "driver"),
        iommu_group=_int(group),
        numa_node=numa if numa is not None and numa >= 0 else None,
    )


def _entries(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except OSError:
        return []


def discover_gpus(
    sysfs_root: Path, dev_root: Path, device_ids: Mapping[str, str]
) -> tuple[PciGpu, ...]:
    """Every PCI function under ``sysfs_root`` that is a GPU in ``device_ids``, by address.

    ``device_ids`` maps ``"vvvv:dddd"`` (any case, optional ``0x``) to a name. Functions
    that vanish during the walk are skipped. ``dev_root`` is accepted so callers pass
    both roots together (Intel's ``newDevicePlugin(sysfsDir, devfsDir)``); discovery
    itself reads only sysfs, and the ``/dev/vfio`` nodes are judged by :func:`vfio_problem`.

    Errors: ``ValueError`` for a malformed ``device_ids`` key. A missing
    ``bus/pci/devices`` directory yields an empty tuple.
    """
    del dev_root  # see the docstring
    wanted = {normalize_device_key(k): v for k, v in device_ids.items()}
    found: list[PciGpu] = []
    for address in _entries(sysfs_root / "bus" / "pci" / "devices"):
        function = read_function(sysfs_root, address)
        if function is None:
            continue
        gpu = gpu_from_function(function, wanted)
        if gpu is not None:
            found.append(gpu)
        elif function.vendor_id == "10de" and (function.pci_class or 0) >> 8 in GPU_CLASSES:
            log.debug(
                "%s: NVIDIA GPU %s:%s not in vfio.gpu_device_ids; ignored",
                address,
                function.vendor_id,
                function.device_id,
            )
    return tuple(found)


def read_vfio_snapshot(sysfs_root: Path, dev_root: Path, address: str) -> VfioSnapshot:
    """Read what :func:`decide_vfio_problem` needs about the function at ``address``."""
    function = read_function(sysfs_root, address)
    if function is None:
        return VfioSnapshot(address=address, present=False)
    vfio = dev_root / "vfio"
    group = function.iommu_group
    members: list[GroupMember] = []
    group_node = False
    if group is not None:
        group_dir = sysfs_root / "kernel" / "iommu_groups" / str(group) / "devices"
        for other in _entries(group_dir):
            if other.lower() == function.address:
                continue
            members.append(
                GroupMember(
                    address=other,
                    driver=_link_name(group_dir / other / "driver"),
                    pci_class=_int(read_attribute(group_dir / other / "class"), 16),
                )
            )
        group_node = (vfio / str(group)).exists()
    return VfioSnapshot(
        address=function.address,
        present=True,
        driver=function.driver,
        iommu_group=group,
        group_node_exists=group_node,
        container_node_exists=(vfio / "vfio").exists(),
        group_members=tuple(members),
    )


def vfio_problem(sysfs_root: Path, dev_root: Path, gpu: PciGpu | str) -> str | None:
    """Why ``gpu`` (a :class:`PciGpu` or its PCI address) cannot go to a VM now, or ``None``.

    Reads sysfs and ``/dev/vfio`` afresh (nothing cached from discovery), then applies
    :func:`decide_vfio_problem`. Never raises for a missing device: that is a reason.
    """
    address = gpu.address if isinstance(gpu, PciGpu) else gpu
    return decide_vfio_problem(read_vfio_snapshot(sysfs_root, dev_root, address))
