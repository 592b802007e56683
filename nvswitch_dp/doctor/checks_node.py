"""The node's checks: GPUs present, IOMMU, VFIO modules, GPUs on vfio-pci, hugepages.

Each check is a pure function ``NodeFacts -> CheckResult``. Which check depends on which
is declared once, in ``report.CHECKS``; a check here judges only its own fact and never
repeats the fix of a check it depends on (that one is skipped instead).

The IDs are the hardware's, corrected from the original design: H200 SXM is
``10de:2335`` (``10de:2330`` is the H100 SXM5 80GB).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from nvswitch_dp.doctor.advice import command_note, kernel_parameters_fix
from nvswitch_dp.doctor.facts import VFIO_MODULES, CheckResult, GpuFacts, NodeFacts, Status
from nvswitch_dp.vfio.discovery import VFIO_DRIVER, decide_vfio_problem, member_blocks_viability
from nvswitch_dp.vfio.pci_ids import GPU_DEVICE_IDS

_IOMMU_FLAGS = re.compile(r"(?:^|\s)(intel_iommu=on|amd_iommu=on|iommu=pt|iommu=on)(?=\s|$)")
# CPU vendor -> (the BIOS feature, the kernel parameters that turn the IOMMU on).
_IOMMU_BY_VENDOR = {
    "GenuineIntel": ("VT-d", "intel_iommu=on iommu=pt"),
    "AuthenticAMD": ("AMD-Vi", "amd_iommu=on iommu=pt"),
}
GIB_POOL = "1048576kB"
MIB2_POOL = "2048kB"


def check_gpus(facts: NodeFacts) -> CheckResult:
    """GPUs with a configured ID are on the PCI bus. Every other check needs this one: on
    a node without them, nothing else is worth fixing."""
    ids = ", ".join(sorted(facts.gpu_device_ids)) or "(none configured)"
    if set(facts.gpu_device_ids) == set(GPU_DEVICE_IDS):
        ids = f"the {len(GPU_DEVICE_IDS)} built-in ones"
    if facts.gpus:
        models = Counter(f"{g.gpu.key} ({g.gpu.name})" for g in facts.gpus)
        drivers = Counter(g.gpu.driver or "no driver" for g in facts.gpus)
        return CheckResult(
            "gpus",
            Status.PASS,
            f"{', '.join(f'{n} x {m}' for m, n in sorted(models.items()))}; drivers: "
            f"{', '.join(f'{d} {n}' for d, n in sorted(drivers.items()))}",
        )
    if facts.other_nvidia_gpus:
        found = Counter(facts.other_nvidia_gpus.values())
        names = ", ".join(
            f"{n} x {key} ({GPU_DEVICE_IDS.get(key, 'not in the built-in table')})"
            for key, n in sorted(found.items())
        )
        return CheckResult(
            "gpus",
            Status.FAIL,
            f"no GPU with a configured ID ({ids}); NVIDIA GPUs found: {names}",
            f"if these are the GPUs to serve, add {', '.join(sorted(found))} to "
            "vfio.gpu_device_ids in the configuration (the list replaces the built-in one)",
        )
    lspci = "; `lspci -nn -d 10de:` lists what the kernel sees" if "lspci" in facts.commands else ""
    return CheckResult(
        "gpus",
        Status.FAIL,
        "no NVIDIA GPU on this node (no PCI function of vendor 10de with a display class "
        f"in sysfs; configured IDs: {ids})",
        "run nvswitch-dp on an HGX node only (the DaemonSet's nodeSelector "
        "nvswitch-dp.io/hgx=true); if this node has GPUs, the kernel does not see them: "
        f"check seating, power and the BIOS{lspci}",
    )


def iommu_fix(facts: NodeFacts) -> str:
    """How to turn the IOMMU on, for this CPU's vendor when ``/proc/cpuinfo`` names it."""
    if _IOMMU_FLAGS.search(facts.cmdline):
        feature = _IOMMU_BY_VENDOR.get(facts.cpu_vendor, ("VT-d / AMD-Vi", ""))[0]
        return (
            f"the kernel command line already asks for the IOMMU: enable {feature} in "
            "the BIOS setup, then reboot"
        )
    known = _IOMMU_BY_VENDOR.get(facts.cpu_vendor)
    if known is not None:
        feature, parameters = known
        return f"enable {feature} in the BIOS, then " + kernel_parameters_fix(facts, parameters)
    return (
        "enable VT-d (Intel) or AMD-Vi (AMD) in the BIOS, then "
        + kernel_parameters_fix(facts, "intel_iommu=on iommu=pt")
        + ' (on AMD: "amd_iommu=on iommu=pt")'
    )


def check_iommu(facts: NodeFacts) -> CheckResult:
    """The IOMMU is on: the kernel made IOMMU groups (and the command line asked for it)."""
    flags = _IOMMU_FLAGS.findall(facts.cmdline)
    asked = f"kernel command line has {' '.join(flags)}" if flags else "no IOMMU flag on cmdline"
    if facts.iommu_groups > 0:
        units = f", {len(facts.iommu_devices)} IOMMU unit(s)" if facts.iommu_devices else ""
        return CheckResult(
            "iommu", Status.PASS, f"{facts.iommu_groups} IOMMU groups{units}; {asked}"
        )
    if flags:
        detail = f"{asked} but the kernel created no IOMMU groups (disabled in the BIOS?)"
    else:
        detail = f"{asked} and no IOMMU groups in /sys/kernel/iommu_groups"
    return CheckResult("iommu", Status.FAIL, detail, iommu_fix(facts))


def check_vfio_modules(facts: NodeFacts) -> CheckResult:
    """vfio_pci and vfio_iommu_type1 are loaded (``/proc/modules``) or built in."""
    present = facts.loaded_modules | facts.builtin_modules
    missing = [m for m in VFIO_MODULES if m not in present]
    if not missing:
        how = [
            f"{m} ({'loaded' if m in facts.loaded_modules else 'built in'})" for m in VFIO_MODULES
        ]
        return CheckResult("vfio-modules", Status.PASS, ", ".join(how))
    return CheckResult(
        "vfio-modules",
        Status.FAIL,
        f"not loaded: {', '.join(missing)}",
        "`sudo modprobe vfio-pci && sudo modprobe vfio_iommu_type1`"
        f"{command_note(facts, 'modprobe')}; to load them at boot: "
        "`printf 'vfio-pci\\nvfio_iommu_type1\\n' | sudo tee /etc/modules-load.d/vfio.conf`",
    )


def _blocks_group(gpu: GpuFacts) -> bool:
    return any(member_blocks_viability(m) for m in gpu.vfio.group_members)


def gpu_problem(gpu: GpuFacts) -> str | None:
    """Why this GPU cannot be passed to a VM, or ``None`` (the daemon's own verdict)."""
    return decide_vfio_problem(gpu.vfio)


def _bind_fix(ids: Sequence[str], addresses: Sequence[str]) -> str:
    """How to move ``addresses`` (GPUs of the models ``ids``, as found) to vfio-pci."""
    first = addresses[0] if addresses else "<address>"
    return (
        "`nvswitch-dp prepare-node --bind-vfio` (it records the module IDs first, binds "
        "each GPU and the rest of its IOMMU group, and refuses a GPU still in use; "
        "`--dry-run` shows every write); by hand, per GPU, with the module map read "
        f"first: `echo vfio-pci | sudo tee /sys/bus/pci/devices/{first}/driver_override; "
        f"echo {first} | sudo tee /sys/bus/pci/devices/{first}/driver/unbind; "
        f"echo {first} | sudo tee /sys/bus/pci/drivers_probe`; at every boot: "
        f'"vfio-pci.ids={",".join(ids)}" on the kernel command line, with the nvidia '
        "driver kept from claiming them first (`softdep nvidia pre: vfio-pci`)"
    )


def _found_ids(facts: NodeFacts) -> list[str]:
    """The ``vendor:device`` IDs of the GPUs found (never the configuration's whole list)."""
    return sorted({g.gpu.key for g in facts.gpus})


def check_gpus_vfio(facts: NodeFacts) -> CheckResult:
    """Every configured GPU is on vfio-pci, in a viable IOMMU group, with its /dev/vfio node.

    Judged only once ``gpus``, ``iommu`` and ``vfio-modules`` pass (``report.CHECKS``):
    binding cannot help before the IOMMU is on.
    """
    if not facts.gpus:
        return CheckResult.skipped("gpus-vfio", ["gpus"])
    problems = [(g, p) for g in facts.gpus if (p := gpu_problem(g)) is not None]
    if not problems:
        groups = sorted({g.vfio.iommu_group for g in facts.gpus if g.vfio.iommu_group is not None})
        return CheckResult(
            "gpus-vfio",
            Status.PASS,
            f"{len(facts.gpus)} GPU(s) on vfio-pci, IOMMU groups "
            f"{', '.join(map(str, groups))} viable",
        )
    unbound = [g.address for g, _ in problems if g.vfio.present and g.vfio.driver != VFIO_DRIVER]
    fixes = []
    if unbound:
        fixes.append(_bind_fix(_found_ids(facts), unbound))
    if any(_blocks_group(g) for g, _ in problems):
        fixes.append(
            "bind every other function in the GPU's IOMMU group to vfio-pci too "
            "(`ls /sys/kernel/iommu_groups/<group>/devices`), or move the GPU to a slot "
            "with its own group"
        )
    if any(g.vfio.present and g.vfio.iommu_group is None for g, _ in problems):
        fixes.append(iommu_fix(facts))
    if not fixes:
        fixes.append("mount the host's /dev/vfio into the container (read-only is enough)")
    return CheckResult(
        "gpus-vfio",
        Status.FAIL,
        f"{len(problems)} of {len(facts.gpus)} GPU(s) unusable: "
        + "; ".join(p for _, p in problems),
        "; ".join(fixes),
    )


def hugepages_fix(facts: NodeFacts) -> str:
    """How to reserve hugepages, in one page size: 1 GiB whenever the kernel offers that
    pool (large VMs map fewer pages), else 2 MiB. Both ways given, at boot and now, name
    the same size: the kernel parameters and the sysfs pool agree."""
    if GIB_POOL in facts.hugepages or MIB2_POOL not in facts.hugepages:
        pages = "1 GiB hugepages, <N> = GiB of guest memory for this node's VMs"
        boot, pool = "default_hugepagesz=1G hugepagesz=1G hugepages=<N>", GIB_POOL
    else:
        pages = "2 MiB hugepages (this kernel offers no 1 GiB pool), <N> = MiB of guest memory / 2"
        boot, pool = "hugepagesz=2M hugepages=<N>", MIB2_POOL
    return (
        f"reserve {pages}; at boot (preferred: contiguous memory is easiest to find then): "
        + kernel_parameters_fix(facts, boot)
        + "; or now (the kernel may reserve fewer when memory is fragmented: read the file "
        f"back): `echo <N> | sudo tee /sys/kernel/mm/hugepages/hugepages-{pool}/nr_hugepages`"
    )


def check_hugepages(facts: NodeFacts) -> CheckResult:
    """Some hugepages are reserved. WARN, not FAIL: the plugin works without them, VMs suffer."""
    reserved = {size: n for size, n in facts.hugepages.items() if n > 0}
    if reserved:
        total_kb = sum(
            int(s.removesuffix("kB")) * n for s, n in reserved.items() if s[:-2].isdigit()
        )
        pools = ", ".join(f"{n} x {s}" for s, n in sorted(reserved.items()))
        return CheckResult(
            "hugepages", Status.PASS, f"{pools} ({total_kb / (1 << 20):.1f} GiB reserved)"
        )
    sizes = ", ".join(sorted(facts.hugepages)) or "no hugepage pools"
    return CheckResult(
        "hugepages", Status.WARN, f"no hugepages reserved ({sizes})", hugepages_fix(facts)
    )
