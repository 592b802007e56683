"""The simulated node as a value, the marker file it keeps beside its sysfs, and the
readers of its tree that the other modules of :mod:`nvswitch_dp.vfio.simulate` share.

**What only the GPU knows.** Module ID, UUID, serial and device minor of each GPU are
facts of the firmware and the driver, not of sysfs. The builder draws them
deterministically from the platform (:class:`SimIdentity`) and writes them, with the
platform's name, to the marker file :data:`SIMULATION_MARKER` at the sysfs root, so a
later process given only a sysfs root can tell that the tree is simulated
(:func:`~nvswitch_dp.vfio.simulate.build.load_simulated_node`) and serve them (the
simulated ``nvidia-smi``, :mod:`nvswitch_dp.vfio.nvidia_smi_sim`). The marker also holds
the one piece of kernel state sysfs does not show: the dynamic IDs added through
``new_id`` (real ``new_id`` is write-only). Format, version 1::

    {"format": "nvswitch-dp-simulated-node", "version": 1, "platform": "hgx-h200",
     "gpu_driver": "nvidia",
     "gpus": [{"address": "0000:18:00.0", "module_id": 4, "minor": 3,
               "uuid": "GPU-…", "serial": "1650000000004"}, …],
     "dynamic_ids": {"vfio-pci": [[4318, 9013, 4294967295, 4294967295, 0, 0]]}}

Ownership: :func:`write_marker` writes only the marker (atomically); everything else here
reads. Errors: :class:`SimulationError` for a marker that is not JSON, of another format
or version, or with a bad GPU entry, and for an address or group the tree lacks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIMULATION_MARKER = "nvswitch-dp-simulated-node.json"
"""File name of the marker, directly under the simulated sysfs root."""
MARKER_FORMAT = "nvswitch-dp-simulated-node"
MARKER_VERSION = 1

# What the captured H200 reported (shared/reference/hardware/h200-sxm-passthrough); every
# simulated platform reports these, as only the H200 was ever read.
DRIVER_VERSION = "580.159.04"
CUDA_VERSION = "13.0"
VBIOS_VERSION = "96.00.a5.00.1a"
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
            return current_group(self.sysfs_root, address)
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


# ---------------------------------------------------------------------------- the marker


def marker(
    platform_name: str,
    gpu_driver: str | None,
    identities: Iterable[SimIdentity],
    dynamic_ids: Mapping[str, list[list[int]]],
) -> dict[str, Any]:
    """The marker's content (module docstring), GPUs in module order."""
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


def write_marker(sysfs: Path, content: Mapping[str, Any]) -> None:
    """Replace the marker under ``sysfs`` with ``content``."""
    path = sysfs / SIMULATION_MARKER
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    tmp.replace(path)  # atomic: a reader in another process never sees half a marker


def read_marker(sysfs: Path) -> dict[str, Any] | None:
    """The marker under ``sysfs``, checked for format and version; ``None`` without one."""
    try:
        text = (sysfs / SIMULATION_MARKER).read_text()
    except FileNotFoundError:
        return None
    try:
        content = json.loads(text)
    except ValueError as exc:
        raise SimulationError(f"{sysfs / SIMULATION_MARKER}: not JSON ({exc})") from None
    if not isinstance(content, dict) or content.get("format") != MARKER_FORMAT:
        raise SimulationError(f"{sysfs / SIMULATION_MARKER}: not a simulated-node marker")
    if content.get("version") != MARKER_VERSION:
        raise SimulationError(
            f"{sysfs / SIMULATION_MARKER}: marker version {content.get('version')!r}, "
            f"this code reads version {MARKER_VERSION}"
        )
    return content


def marker_identities(content: Mapping[str, Any]) -> dict[str, SimIdentity]:
    """The GPU identities a marker records, by address."""
    try:
        return {
            g["address"]: SimIdentity(
                address=str(g["address"]),
                module_id=int(g["module_id"]),
                uuid=str(g["uuid"]),
                serial=str(g["serial"]),
                minor=int(g["minor"]),
            )
            for g in content["gpus"]
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise SimulationError(f"simulated-node marker: bad GPU entry ({exc!r})") from None


# ---------------------------------------------------------------------------- reading back


def device_link(sysfs: Path, address: str) -> Path:
    """``<sys>/bus/pci/devices/<address>``: the link to the function's directory."""
    return sysfs / "bus" / "pci" / "devices" / address


def function_addresses(sysfs: Path) -> list[str]:
    """Every PCI function the tree has now, in address order."""
    return sorted(p.name for p in (sysfs / "bus" / "pci" / "devices").iterdir())


def device_dir(sysfs: Path, address: str) -> Path:
    """The directory of the function at ``address`` (its link resolved)."""
    link = device_link(sysfs, address)
    if not link.exists():
        raise SimulationError(f"no PCI function {address} in the simulated node")
    return link.resolve()


def current_driver(sysfs: Path, address: str) -> str | None:
    """The driver the function at ``address`` is bound to; ``None``: unbound or absent."""
    try:
        return (device_link(sysfs, address) / "driver").readlink().name
    except OSError:
        return None


def current_group(sysfs: Path, address: str) -> int:
    """The IOMMU group of the function at ``address``, from its ``iommu_group`` link."""
    link = device_link(sysfs, address) / "iommu_group"
    try:
        return int(link.readlink().name)
    except (OSError, ValueError):
        raise SimulationError(f"{address} has no IOMMU group") from None


def group_members(sysfs: Path, group: int) -> list[str]:
    """The functions of IOMMU ``group``, in address order; none for a group not there."""
    devices = sysfs / "kernel" / "iommu_groups" / str(group) / "devices"
    try:
        return sorted(p.name for p in devices.iterdir())
    except OSError:
        return []


def read_hex_attribute(directory: Path, name: str) -> int:
    """The hex attribute ``name`` of a function's ``directory`` (``0x10de``); 0 when it is
    absent or garbled, as a stand-in reads it."""
    try:
        return int((directory / name).read_text().strip(), 16)
    except (OSError, ValueError):
        return 0
