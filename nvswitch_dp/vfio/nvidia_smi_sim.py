"""A simulated ``nvidia-smi``: ``-q`` for the GPUs of a simulated node bound to nvidia.

    python -m nvswitch_dp.vfio.nvidia_smi_sim --sysfs-root <root>/sys -q
    NVSWITCH_DP_SIM_SYSFS=<root>/sys python -m nvswitch_dp.vfio.nvidia_smi_sim -q
    <root>/bin/nvidia-smi -q              (written by install_nvidia_smi)

The node is the one :func:`~nvswitch_dp.vfio.simulate.build_simulated_node` wrote: the
GPU identities (module ID, UUID, serial, minor) come from its marker, everything PCI from
its sysfs, read afresh on each run. Like the real program (through NVML), it sees only the
GPUs bound to the ``nvidia`` driver *now*: a GPU on vfio-pci or unbound is invisible.

The text follows ``nvidia-smi -q`` of driver 580.159.04 captured on a real H200 SXM
(``shared/reference/hardware/h200-sxm-passthrough/nvidia-smi-q.txt``): the same header
lines, ``Attached GPUs``, one block per GPU opening with ``GPU 00000000:5D:00.0`` (8-digit
domain, upper-case hex, as the program prints bus IDs), keys indented 4 spaces a level and
padded so that every ``:`` is in column 55, GPUs in PCI bus order, a blank line after each.
Each block has the sections from ``Product Name`` to the end of ``PCI`` (with the whole
``Platform Info`` block and its ``Module Id``), then ``Fan Speed``, ``Performance State``,
``Compute Mode``, ``Fabric``, ``Processes`` and ``Capabilities``; the clock, memory, ECC,
temperature and power sections are left out (live readings nothing here consumes). Values
no simulation knows are the captured GPU's; the product name and architecture follow the
platform; ``Virtualization Mode`` is ``None``, as on a bare-metal host (the capture was
taken inside a VM, where it reads ``Pass-Through``).

Exit status, from NVIDIA's ``nvidia-smi`` manual (RETURN VALUE): 0 success; 2 an invalid
argument or flag (here: anything but ``-q`` and ``--sysfs-root``, or no tree given);
6 "a query to find an object was unsuccessful", with ``No devices were found`` on stdout,
when no GPU is on nvidia; 9 the NVIDIA driver is not loaded (no marker, or no
``<sys>/module/nvidia``), with the program's "couldn't communicate with the NVIDIA driver"
message; 255 any other error (an unreadable marker).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from nvswitch_dp.vfio.discovery import NVIDIA_DRIVER
from nvswitch_dp.vfio.simulate.build import load_simulated_node
from nvswitch_dp.vfio.simulate.node import (
    CUDA_VERSION,
    DRIVER_VERSION,
    VBIOS_VERSION,
    SimIdentity,
    SimulatedNode,
    SimulationError,
    current_driver,
    device_link,
    product_name,
    read_hex_attribute,
)

SYSFS_ENV = "NVSWITCH_DP_SIM_SYSFS"
EXIT_OK = 0
EXIT_INVALID_ARGUMENT = 2
EXIT_NOT_FOUND = 6
EXIT_DRIVER_NOT_LOADED = 9
EXIT_OTHER = 255
NO_DEVICES = "No devices were found"
DRIVER_NOT_LOADED = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
USAGE = (
    "usage: nvidia-smi [--sysfs-root DIR] -q\n"
    "  the simulated nvidia-smi answers -q only; the simulated node's sysfs root comes "
    f"from --sysfs-root or ${SYSFS_ENV}\n"
)
KEY_WIDTH = 55  # the column of every ':' in the captured output

_ARCHITECTURES = {
    "hgx-h200": "Hopper",
    "hgx-h100": "Hopper",
    "hgx-h800": "Hopper",
    "hgx-h20": "Hopper",
    "hgx-b200": "Blackwell",
    "hgx-a100-16": "Ampere",
}
# Part numbers and inforom versions were read on the H200 only.
_H200_PARTS = {"board": "692-2G520-0282-000", "gpu": "2335-895-A1"}


def _kv(depth: int, key: str, value: object) -> str:
    return f"{'    ' * depth}{key}".ljust(KEY_WIDTH) + f": {value}"


def _title(depth: int, title: str) -> str:
    return f"{'    ' * depth}{title}"


def bus_id(address: str) -> str:
    """``"0000:5d:00.0"`` -> ``"00000000:5D:00.0"``, as nvidia-smi prints a bus ID."""
    domain, bus, slot_fn = address.split(":")
    return f"{int(domain, 16):08X}:{bus.upper()}:{slot_fn.upper()}"


def render_gpu(identity: SimIdentity, platform_name: str, device_dir: Path) -> list[str]:
    """The lines of one GPU's block, its PCI facts read from ``device_dir`` (sysfs), in
    the order the captured output has its sections."""
    return [
        f"GPU {bus_id(identity.address)}",
        *_product_lines(platform_name),
        *_board_lines(identity, platform_name),
        *_mode_lines(),
        *_pci_lines(identity.address, device_dir),
        *_state_lines(),
        "",
    ]


def _location(address: str) -> tuple[int, int, int]:
    """``(domain, bus, device)`` of the PCI address ``"0000:5d:00.0"``."""
    domain, bus, slot_fn = address.split(":")
    return int(domain, 16), int(bus, 16), int(slot_fn.split(".")[0], 16)


def _product_lines(platform_name: str) -> list[str]:
    """From ``Product Name`` to ``Driver Model``: what the product is and its modes."""
    return [
        _kv(1, "Product Name", product_name(platform_name)),
        _kv(1, "Product Brand", "NVIDIA"),
        _kv(1, "Product Architecture", _ARCHITECTURES.get(platform_name, "N/A")),
        _kv(1, "Display Mode", "Requested functionality has been deprecated"),
        _kv(1, "Display Attached", "Yes"),
        _kv(1, "Display Active", "Disabled"),
        _kv(1, "Persistence Mode", "Enabled"),
        _kv(1, "Addressing Mode", "None"),
        _title(1, "MIG Mode"),
        _kv(2, "Current", "Disabled"),
        _kv(2, "Pending", "Disabled"),
        _kv(1, "Accounting Mode", "Disabled"),
        _kv(1, "Accounting Mode Buffer Size", 4000),
        _title(1, "Driver Model"),
        _kv(2, "Current", "N/A"),
        _kv(2, "Pending", "N/A"),
    ]


def _board_lines(identity: SimIdentity, platform_name: str) -> list[str]:
    """From ``Serial Number`` to ``Inforom BBX Object Flush``: this GPU and its board."""
    _, bus, slot = _location(identity.address)
    h200 = platform_name == "hgx-h200"
    parts = _H200_PARTS if h200 else {"board": "N/A", "gpu": "N/A"}
    return [
        _kv(1, "Serial Number", identity.serial),
        _kv(1, "GPU UUID", identity.uuid),
        _kv(1, "GPU PDI", f"0x{identity.module_id:016x}"),
        _kv(1, "Minor Number", identity.minor),
        _kv(1, "VBIOS Version", VBIOS_VERSION.upper()),
        _kv(1, "MultiGPU Board", "No"),
        _kv(1, "Board ID", f"0x{(bus << 8) | slot:x}"),
        _kv(1, "Board Part Number", parts["board"]),
        _kv(1, "GPU Part Number", parts["gpu"]),
        _kv(1, "FRU Part Number", "N/A"),
        _title(1, "Platform Info"),
        _kv(2, "Chassis Serial Number", "N/A"),
        _kv(2, "Slot Number", "N/A"),
        _kv(2, "Tray Index", "N/A"),
        _kv(2, "Host ID", "N/A"),
        _kv(2, "Peer Type", "N/A"),
        _kv(2, "Module Id", identity.module_id),
        _kv(2, "GPU Fabric GUID", "N/A"),
        _title(1, "Inforom Version"),
        _kv(2, "Image Version", "G520.0282.02.02" if h200 else "N/A"),
        _kv(2, "OEM Object", 2.1),
        _kv(2, "ECC Object", 7.16),
        _kv(2, "Power Management Object", "N/A"),
        _title(1, "Inforom BBX Object Flush"),
        _kv(2, "Latest Timestamp", "N/A"),
        _kv(2, "Latest Duration", "N/A"),
    ]


def _mode_lines() -> list[str]:
    """From ``GPU Operation Mode`` to ``IBMNPU``: modes no simulation changes."""
    return [
        _title(1, "GPU Operation Mode"),
        _kv(2, "Current", "N/A"),
        _kv(2, "Pending", "N/A"),
        _kv(1, "GPU C2C Mode", "Disabled"),
        _title(1, "GPU Virtualization Mode"),
        _kv(2, "Virtualization Mode", "None"),
        _kv(2, "Host VGPU Mode", "N/A"),
        _kv(2, "vGPU Heterogeneous Mode", "N/A"),
        _kv(1, "GPU Recovery Action", "None"),
        _kv(1, "GSP Firmware Version", DRIVER_VERSION),
        _title(1, "IBMNPU"),
        _kv(2, "Relaxed Ordering Mode", "N/A"),
    ]


def _pci_lines(address: str, device_dir: Path) -> list[str]:
    """The ``PCI`` section: location from ``address``, IDs and class from sysfs."""
    domain, bus, slot = _location(address)
    vendor = read_hex_attribute(device_dir, "vendor")
    device = read_hex_attribute(device_dir, "device")
    sub_vendor = read_hex_attribute(device_dir, "subsystem_vendor")
    sub_device = read_hex_attribute(device_dir, "subsystem_device")
    pci_class = read_hex_attribute(device_dir, "class")
    return [
        _title(1, "PCI"),
        _kv(2, "Bus", f"0x{bus:02X}"),
        _kv(2, "Device", f"0x{slot:02X}"),
        _kv(2, "Domain", f"0x{domain:04X}"),
        _kv(2, "Base Classcode", f"0x{pci_class >> 16:X}"),
        _kv(2, "Sub Classcode", f"0x{(pci_class >> 8) & 0xFF:X}"),
        _kv(2, "Device Id", f"0x{device:04X}{vendor:04X}"),
        _kv(2, "Bus Id", bus_id(address)),
        _kv(2, "Sub System Id", f"0x{sub_device:04X}{sub_vendor:04X}"),
        _title(2, "GPU Link Info"),
        _title(3, "PCIe Generation"),
        _kv(4, "Max", 5),
        _kv(4, "Current", 5),
        _kv(4, "Device Current", 5),
        _kv(4, "Device Max", 5),
        _kv(4, "Host Max", "N/A"),
        _title(3, "Link Width"),
        _kv(4, "Max", "16x"),
        _kv(4, "Current", "16x"),
        _title(2, "Bridge Chip"),
        _kv(3, "Type", "N/A"),
        _kv(3, "Firmware", "N/A"),
        _kv(2, "Replays Since Reset", 0),
        _kv(2, "Replay Number Rollovers", 0),
        _kv(2, "Tx Throughput", "0 KB/s"),
        _kv(2, "Rx Throughput", "0 KB/s"),
        _kv(2, "Atomic Caps Outbound", "N/A"),
        _kv(2, "Atomic Caps Inbound", "N/A"),
    ]


def _state_lines() -> list[str]:
    """From ``Fan Speed`` to ``Capabilities``: the GPU's idle state, no fabric, no process."""
    return [
        _kv(1, "Fan Speed", "N/A"),
        _kv(1, "Performance State", "P0"),
        _kv(1, "Compute Mode", "Default"),
        _title(1, "Fabric"),
        _kv(2, "State", "N/A"),
        _kv(2, "Status", "N/A"),
        _kv(2, "CliqueId", "N/A"),
        _kv(2, "ClusterUUID", "N/A"),
        _title(2, "Health"),
        _kv(3, "Summary", "N/A"),
        _kv(3, "Bandwidth", "N/A"),
        _kv(3, "Route Recovery in progress", "N/A"),
        _kv(3, "Route Unhealthy", "N/A"),
        _kv(3, "Access Timeout Recovery", "N/A"),
        _kv(3, "Incorrect Configuration", "N/A"),
        _kv(3, "Partition Assigned", "N/A"),
        _kv(1, "Processes", "None"),
        _title(1, "Capabilities"),
        _kv(2, "EGM", "disabled"),
    ]


def gpus_on_nvidia(node: SimulatedNode) -> list[SimIdentity]:
    """The node's GPUs bound to nvidia now, in PCI bus order (NVML's enumeration order)."""
    return [
        identity
        for address, identity in sorted(node.identities.items())
        if current_driver(node.sysfs_root, address) == NVIDIA_DRIVER
    ]


def render(node: SimulatedNode, now: float) -> str | None:
    """``nvidia-smi -q`` of ``node`` at time ``now``; ``None`` when no GPU is on nvidia."""
    gpus = gpus_on_nvidia(node)
    if not gpus:
        return None
    lines = [
        "",
        "==============NVSMI LOG==============",
        "",
        _kv(0, "Timestamp", time.asctime(time.localtime(now))),
        _kv(0, "Driver Version", DRIVER_VERSION),
        _kv(0, "CUDA Version", CUDA_VERSION),
        "",
        _kv(0, "Attached GPUs", len(gpus)),
    ]
    for identity in gpus:
        lines += render_gpu(
            identity, node.platform_name, device_link(node.sysfs_root, identity.address)
        )
    return "\n".join(lines) + "\n"


def run(argv: Sequence[str], env: Mapping[str, str], now: float) -> tuple[int, str, str]:
    """One invocation: (exit status, stdout, stderr). Reads the tree; writes nothing."""
    query = False
    sysfs: str | None = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-q", "--query"):
            query = True
        elif arg == "--sysfs-root" and args:
            sysfs = args.pop(0)
        elif arg.startswith("--sysfs-root="):
            sysfs = arg.partition("=")[2]
        else:
            return EXIT_INVALID_ARGUMENT, "", f"nvidia-smi: invalid argument {arg!r}\n{USAGE}"
    if not query:
        return EXIT_INVALID_ARGUMENT, "", USAGE
    sysfs = sysfs or env.get(SYSFS_ENV)
    if not sysfs:
        return EXIT_INVALID_ARGUMENT, "", f"nvidia-smi: no simulated node given\n{USAGE}"
    try:
        node = load_simulated_node(Path(sysfs))
    except SimulationError as exc:
        return EXIT_OTHER, "", f"nvidia-smi: {exc}\n"
    if node is None:
        return EXIT_DRIVER_NOT_LOADED, DRIVER_NOT_LOADED + "\n", f"({sysfs}: no simulated node)\n"
    if not (node.sysfs_root / "module" / NVIDIA_DRIVER).is_dir():
        return EXIT_DRIVER_NOT_LOADED, DRIVER_NOT_LOADED + "\n", ""
    text = render(node, now)
    if text is None:
        return EXIT_NOT_FOUND, NO_DEVICES + "\n", ""
    return EXIT_OK, text, ""


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    status, out, err = run(sys.argv[1:] if argv is None else argv, os.environ, time.time())
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.stdout.flush()
    return status


_WRAPPER = """\
#!{python}
# nvidia-smi of the simulated node at {sysfs}; written by install_nvidia_smi
# (nvswitch_dp.vfio.nvidia_smi_sim). Answers -q only.
import sys

sys.path.insert(0, {package_parent!r})
from nvswitch_dp.vfio.nvidia_smi_sim import main

sys.exit(main(["--sysfs-root", {sysfs!r}, *sys.argv[1:]]))
"""


def install_nvidia_smi(node: SimulatedNode) -> Path:
    """Write ``<root>/bin/nvidia-smi`` for ``node`` (``<root>`` = the sysfs root's parent):
    an executable Python script (``#!`` this interpreter, no shell) that runs :func:`main`
    with the node's sysfs root baked in. Give it to code as ``--nvidia-smi <path>``.

    Idempotent (rewrites the file). Errors: ``OSError`` from the file system.
    """
    import nvswitch_dp

    sysfs = Path(node.sysfs_root).absolute()
    path = sysfs.parent / "bin" / "nvidia-smi"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".nvidia-smi.tmp")
    tmp.write_text(
        _WRAPPER.format(
            python=sys.executable,
            sysfs=str(sysfs),
            package_parent=str(Path(nvswitch_dp.__file__).resolve().parent.parent),
        )
    )
    tmp.chmod(0o755)
    tmp.replace(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
