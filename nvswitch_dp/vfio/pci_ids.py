"""PCI vendor/device IDs of the GPUs and NVSwitches this plugin knows, with their names.

Pure data. Debian's packaged ``pci.ids`` is too old to know the H200, so the project ships
its own table (shared/reference/fabric-manager.md). The daemon uses
:data:`GPU_DEVICE_IDS` only as the default of ``vfio.gpu_device_ids``; configuration
replaces it. Keys are ``"vvvv:dddd"``: lower-case hex, no ``0x``, as
:func:`device_key` builds them from sysfs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

NVIDIA_VENDOR_ID = "10de"

GPU_DEVICE_IDS: Mapping[str, str] = MappingProxyType(
    {
        "10de:20b0": "A100 SXM4 40GB",
        "10de:20b2": "A100 SXM4 80GB",
        "10de:2324": "H800",
        "10de:2329": "H20",
        "10de:232c": "H20 HBM3e",
        "10de:2330": "H100 SXM5 80GB",
        "10de:2331": "H100 PCIe",
        "10de:2335": "H200 SXM 141GB",
        "10de:2337": "H100 SXM5 64GB",
        "10de:2338": "H100 SXM5 96GB",
        "10de:2339": "H100 SXM5 94GB",
        "10de:233b": "H200 NVL",
        "10de:2901": "B200",
        "10de:2909": "HGX B200",
    }
)
"""GPUs: ``"10de:dddd"`` -> marketing name. The default of ``vfio.gpu_device_ids``."""

NVSWITCH_DEVICE_IDS: Mapping[str, str] = MappingProxyType(
    {
        "10de:1af1": "NVSwitch gen 2 (A100 systems)",
        "10de:22a3": "NVSwitch gen 3 (H100/H200 systems)",
    }
)
"""NVSwitches (PCI class 0x0680). Never served; the simulator and doctor name them."""

# PCI base class and subclass (the top 16 bits of the 24-bit class code).
GPU_CLASSES = frozenset({0x0302, 0x0300})  # 3D controller (HGX GPUs), VGA controller
BRIDGE_CLASSES = frozenset({0x0604, 0x0607})  # PCI-to-PCI and CardBus bridges
NVSWITCH_CLASS = 0x0680  # "other bridge"


def is_bridge(pci_class: int | None) -> bool:
    """Whether the 24-bit class code ``pci_class`` is a PCI-to-PCI or CardBus bridge;
    ``None`` (unreadable) is not.

    The kernel looks at the header type (a bridge's is not "normal"); the class stands
    for it here, in discovery, in the binding plan and in the simulated tree alike.
    """
    return pci_class is not None and (pci_class >> 8) in BRIDGE_CLASSES


_KEY = re.compile(r"^(?:0x)?([0-9a-f]{4}):(?:0x)?([0-9a-f]{4})$")


def device_key(vendor: str, device: str) -> str:
    """``"10de:2335"`` from sysfs ``vendor``/``device`` text such as ``"0x10de\\n"``."""
    return f"{parse_pci_id(vendor)}:{parse_pci_id(device)}"


def normalize_device_key(text: str) -> str:
    """``"10DE:2335"`` or ``"0x10de:0x2335"`` -> ``"10de:2335"``.

    Errors: ``ValueError`` when ``text`` is not two 4-digit hex numbers joined by ``:``.
    """
    match = _KEY.match(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a PCI vendor:device ID like '10de:2335'")
    return f"{match.group(1)}:{match.group(2)}"


def default_gpu_device_ids() -> dict[str, str]:
    """A fresh, mutable copy of :data:`GPU_DEVICE_IDS`."""
    return dict(GPU_DEVICE_IDS)


def parse_pci_id(text: str) -> str:
    """``"0x10DE\\n"`` -> ``"10de"``: one 16-bit ID as 4 lower-case hex digits.

    Errors: ``ValueError`` when ``text`` is not a hex number of at most 4 digits.
    """
    value = text.strip().lower().removeprefix("0x")
    if not re.fullmatch(r"[0-9a-f]{1,4}", value):
        raise ValueError(f"{text!r} is not a 16-bit hex PCI ID")
    return value.rjust(4, "0")


_PCI_ADDRESS = re.compile(r"^([0-9a-f]{4,8}):([0-9a-f]{2}):([01][0-9a-f])\.([0-7])$", re.IGNORECASE)


def normalize_pci_address(text: str) -> str:
    """``"00000000:5D:00.0"`` (nvidia-smi's form) -> ``"0000:5d:00.0"`` (sysfs's form).

    The domain is printed as sysfs prints it (``%04x``: at least 4 digits, more for the
    32-bit domains of VMD and some hypervisors, ``"00010000:..."`` -> ``"10000:..."``).

    Errors: ``ValueError`` unless ``text`` is ``domain:bb:dd.f`` (hex, a 4 to 8 digit
    domain, device <= 1f, function <= 7).
    """
    match = _PCI_ADDRESS.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a PCI address like '0000:5d:00.0'")
    domain, bus, device, function = match.groups()
    return f"{int(domain, 16):04x}:{bus.lower()}:{device.lower()}.{function}"
