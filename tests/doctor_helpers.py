"""A fake HGX H200 node for ``nvswitch-dp doctor``'s tests: /proc, /sys, /dev,
fabricmanager.cfg and a PATH of stand-in programs under one temporary directory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from nvswitch_dp.doctor import CheckResult, FmAnswer, Roots, run_checks
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.types import FmGpu, FmPartition, FmReport

H200 = platform("hgx-h200")
MODULE_MAP = H200.module_map()
GPU_IDS = {"10de:2335": "H200 SXM 141GB"}
FIRST_GPU = MODULE_MAP[1]
# What a Debian node has on its PATH for the fixes; a test removes some to see the fixes
# change.
NODE_COMMANDS = ("lspci", "update-grub", "modprobe", "systemctl", "journalctl", "nvidia-smi")


def h200_report() -> FmReport:
    return FmReport(
        tuple(
            FmPartition(pid, pid == 1, tuple(FmGpu(m, links, links) for m in modules))
            for pid, modules, links in H200.rows
        )
    )


@dataclass
class FakeNode:
    """A node's /proc, /sys, /dev, fabricmanager.cfg and PATH under one directory."""

    base: Path
    cmdline: str = "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on iommu=pt"
    cpu_vendor: str = "GenuineIntel"
    modules: tuple[str, ...] = ("vfio_pci", "vfio_iommu_type1", "vfio")
    builtin: tuple[str, ...] = ()
    iommu: bool = True
    hugepages: dict[str, int] = field(default_factory=lambda: {"1048576kB": 512, "2048kB": 0})
    fm_config: str | None = "# Fabric Manager\nFABRIC_MODE=1\nFM_CMD_PORT_NUMBER=6666\n"
    gpu_driver: dict[str, str | None] = field(default_factory=dict)  # address -> driver
    group_extra: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)
    missing_dev: tuple[str, ...] = ()  # group numbers without /dev/vfio/<n>
    gpu_device: str | None = "0x2335"  # None: no GPU at all
    commands: tuple[str, ...] = NODE_COMMANDS

    @property
    def roots(self) -> Roots:
        return Roots(
            proc=self.base / "proc",
            sysfs=self.base / "sys",
            dev=self.base / "dev",
            fm_config=self.base / "fabricmanager.cfg",
            path=str(self.base / "bin"),
        )

    def build(self) -> Roots:
        r = self.roots
        (r.proc).mkdir(parents=True)
        (r.proc / "cmdline").write_text(self.cmdline + "\n")
        (r.proc / "cpuinfo").write_text(f"processor\t: 0\nvendor_id\t: {self.cpu_vendor}\n")
        (r.proc / "modules").write_text(
            "".join(f"{m} 16384 0 - Live 0x0000000000000000\n" for m in self.modules)
        )
        bin_dir = self.base / "bin"
        bin_dir.mkdir()
        for name in self.commands:
            (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
            (bin_dir / name).chmod(0o755)
        for m in self.builtin:
            (r.sysfs / "module" / m / "parameters").mkdir(parents=True)
        for size, n in self.hugepages.items():
            pool = r.sysfs / "kernel" / "mm" / "hugepages" / f"hugepages-{size}"
            pool.mkdir(parents=True)
            (pool / "nr_hugepages").write_text(f"{n}\n")
        if self.fm_config is not None:
            r.fm_config.write_text(self.fm_config)
        (r.sysfs / "bus" / "pci" / "devices").mkdir(parents=True)
        (r.sysfs / "kernel" / "iommu_groups").mkdir(parents=True, exist_ok=True)
        (r.dev / "vfio").mkdir(parents=True)
        (r.dev / "vfio" / "vfio").touch()
        if self.iommu:
            (r.sysfs / "class" / "iommu" / "dmar0").mkdir(parents=True)
        for number, address in enumerate(sorted(MODULE_MAP.values()), start=40):
            if self.gpu_device is None:
                break
            driver = self.gpu_driver.get(address, "vfio-pci")
            self._function(address, "0x10de", self.gpu_device, "0x030200", driver, str(number))
            if str(number) not in self.missing_dev and self.iommu:
                (r.dev / "vfio" / str(number)).touch()
        for gpu, (address, pci_class, driver) in self.group_extra.items():
            group = os.readlink(r.sysfs / "bus" / "pci" / "devices" / gpu / "iommu_group")
            self._function(address, "0x10de", "0x22a3", pci_class, driver, Path(group).name)
        # An unrelated device that is not a GPU.
        self._function("0000:00:1f.0", "0x8086", "0x1234", "0x060100", "lpc_ich", "1")
        return r

    def _function(
        self, address: str, vendor: str, device: str, pci_class: str, driver: str | None, group: str
    ) -> None:
        sysfs = self.roots.sysfs
        dev = sysfs / "bus" / "pci" / "devices" / address
        dev.mkdir(parents=True)
        (dev / "vendor").write_text(vendor + "\n")
        (dev / "device").write_text(device + "\n")
        (dev / "class").write_text(pci_class + "\n")
        if driver is not None:
            drv = sysfs / "bus" / "pci" / "drivers" / driver
            drv.mkdir(parents=True, exist_ok=True)
            (dev / "driver").symlink_to(drv)
        if self.iommu:
            gdir = sysfs / "kernel" / "iommu_groups" / group
            (gdir / "devices").mkdir(parents=True, exist_ok=True)
            (gdir / "devices" / address).symlink_to(dev)
            (dev / "iommu_group").symlink_to(gdir)


def check(results: list[CheckResult], name: str) -> CheckResult:
    """The one result named ``name``."""
    (found,) = [r for r in results if r.name == name]
    return found


def run(node: FakeNode, *, fm: FmAnswer | None = None, **kw: object) -> list[CheckResult]:
    """Build ``node`` and run every check on it, FM answering with H200's table unless
    ``fm`` says otherwise."""
    roots = node.build()
    module_map = kw.get("module_map", MODULE_MAP)
    assert isinstance(module_map, dict)
    return run_checks(
        roots,
        gpu_device_ids=GPU_IDS,
        module_map=module_map,
        fm=fm if fm is not None else FmAnswer(report=h200_report()),
    )
