"""Hand-built sysfs trees, independent of :mod:`nvswitch_dp.vfio.simulate`.

A second, deliberately plain writer (real directories under ``bus/pci/devices``, absolute
symlinks) so discovery is not only ever tested against the simulator's own layout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nvswitch_dp.vfio.simulate.node import SimulatedNode

# The type of the ``fake_sysfs`` fixture (conftest.py): (platform name, *, name) -> node.
FakeSysfs = Callable[..., SimulatedNode]


def write_function(
    sysfs: Path,
    address: str,
    *,
    vendor: str = "0x10de",
    device: str = "0x2335",
    pci_class: str = "0x030200",
    driver: str | None = "vfio-pci",
    group: int | None = None,
    numa_node: str | None = "0",
) -> Path:
    """Write one PCI function; returns its directory. ``None`` leaves a file/link out."""
    directory = sysfs / "bus" / "pci" / "devices" / address
    directory.mkdir(parents=True)
    (directory / "vendor").write_text(vendor + "\n")
    (directory / "device").write_text(device + "\n")
    (directory / "class").write_text(pci_class + "\n")
    if numa_node is not None:
        (directory / "numa_node").write_text(numa_node + "\n")
    if driver is not None:
        driver_dir = sysfs / "bus" / "pci" / "drivers" / driver
        driver_dir.mkdir(parents=True, exist_ok=True)
        (directory / "driver").symlink_to(driver_dir)
    if group is not None:
        group_dir = sysfs / "kernel" / "iommu_groups" / str(group)
        (group_dir / "devices").mkdir(parents=True, exist_ok=True)
        (group_dir / "devices" / address).symlink_to(directory)
        (directory / "iommu_group").symlink_to(group_dir)
    return directory


FIXTURES = Path(__file__).parent / "fixtures" / "h200-sxm-passthrough"
REAL_ADDRESS = "0000:00:06.0"


def real_like_node(root: Path) -> tuple[Path, Path, Path]:
    """sysfs, dev and proc of the real H200 node of ``tests/fixtures/h200-sxm-passthrough``:
    the attributes discovery reads (one GPU on ``nvidia``, no IOMMU group: a VM without a
    virtual IOMMU) and the nvidia driver's ``information`` file."""
    sysfs, dev, proc = root / "sys", root / "dev", root / "proc"
    facts = dict(
        line.split("=", 1)
        for line in (FIXTURES / "sysfs-gpu.txt").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert (facts["vendor"], facts["device"], facts["iommu_group"]) == ("0x10de", "0x2335", "")
    write_function(
        sysfs,
        REAL_ADDRESS,
        vendor=facts["vendor"],
        device=facts["device"],
        pci_class=facts["class"],
        driver="nvidia",
        group=None,
        numa_node=facts["numa_node"],
    )
    info = proc / "driver" / "nvidia" / "gpus" / REAL_ADDRESS / "information"
    info.parent.mkdir(parents=True)
    info.write_text((FIXTURES / "proc-driver-nvidia.txt").read_text().split("\n", 1)[1])
    (dev / "vfio").mkdir(parents=True)
    return sysfs, dev, proc
