"""Preflight checks for an HGX node: ``nvswitch-dp doctor``.

General layout (pure core, I/O at the edge):

* **Readers** (``read_*``) take a root directory (``/proc``, ``/sys``, ``/dev``, FM's
  config file) and return plain values. Tests point them at fake trees.
* :class:`NodeFacts` holds everything read; :func:`read_facts` fills it.
* **Checks** (``check_*``) are pure functions ``NodeFacts -> CheckResult``: a name, a
  :class:`Status`, a detail saying what was found, and a fix (the command or
  configuration change) whenever the status is not PASS.
* :func:`run_checks` = read + check; :func:`format_report` and :func:`exit_code` turn the
  results into what the command prints and returns. :func:`doctor_main` is the command.

The checks follow the original design's "System Configuration" with the hardware facts
corrected: H200 SXM is ``10de:2335``; ``fmpm`` is a command reaching FM on TCP
127.0.0.1:6666 (no port 8080); Shared NVSwitch mode is ``FABRIC_MODE=1``.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import os
import re
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvswitch_dp.fabric.types import FabricManagerError, FmReport
from nvswitch_dp.node_args import add_node_arguments, load_node_config
from nvswitch_dp.vfio.discovery import (
    VFIO_DRIVER,
    PciGpu,
    VfioSnapshot,
    decide_vfio_problem,
    discover_gpus,
    member_blocks_viability,
    read_vfio_snapshot,
)
from nvswitch_dp.vfio.inventory import (
    INVENTORY_FILE,
    InventoryFileError,
    NodeInventory,
    load_inventory,
    resolve_module_map,
)

DEFAULT_FM_CONFIG = Path("/usr/share/nvidia/nvswitch/fabricmanager.cfg")
VFIO_MODULES = ("vfio_pci", "vfio_iommu_type1")
_IOMMU_FLAGS = re.compile(r"(?:^|\s)(intel_iommu=on|amd_iommu=on|iommu=pt|iommu=on)(?=\s|$)")
_FM_KEY_VALUE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")

ListPartitions = Callable[[], FmReport | Awaitable[FmReport]]


class Status(enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check. ``fix`` is empty exactly when ``status`` is PASS."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS


@dataclass(frozen=True, slots=True)
class Roots:
    """Where the readers look; the real node's paths by default."""

    proc: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    dev: Path = Path("/dev")
    fm_config: Path = DEFAULT_FM_CONFIG


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """A GPU matching the configured IDs and its VFIO state (from :mod:`nvswitch_dp.vfio`)."""

    gpu: PciGpu
    vfio: VfioSnapshot

    @property
    def address(self) -> str:
        return self.gpu.address


@dataclass(frozen=True, slots=True)
class FmAnswer:
    """What asking FM for its partition list gave: a report, an error, or not asked."""

    report: FmReport | None = None
    error: str | None = None
    error_code: int | None = None

    @property
    def asked(self) -> bool:
        return self.report is not None or self.error is not None


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """Everything the checks look at. Built by :func:`read_facts`, or by hand in tests."""

    cmdline: str = ""
    loaded_modules: frozenset[str] = frozenset()
    builtin_modules: frozenset[str] = frozenset()
    iommu_devices: tuple[str, ...] = ()  # /sys/class/iommu entries
    iommu_groups: int = 0  # entries in /sys/kernel/iommu_groups
    hugepages: Mapping[str, int] = field(default_factory=dict)  # "2048kB" -> nr_hugepages
    fm_config_path: str = str(DEFAULT_FM_CONFIG)
    fm_config: Mapping[str, str] | None = None  # None: the file could not be read
    gpu_device_ids: Mapping[str, str] = field(default_factory=dict)
    gpus: tuple[GpuFacts, ...] = ()
    module_map: Mapping[int, str] = field(default_factory=dict)
    fm: FmAnswer = field(default_factory=FmAnswer)
    inventory: NodeInventory | None = None  # prepare-node's record; None: no file
    inventory_problem: str | None = None  # the file exists but cannot be read


# ---------------------------------------------------------------------------- readers


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def read_cmdline(proc_root: Path) -> str:
    """The kernel command line (``/proc/cmdline``); empty when unreadable."""
    return (_read_text(proc_root / "cmdline") or "").strip()


def read_loaded_modules(proc_root: Path) -> frozenset[str]:
    """Names of loaded kernel modules, from ``/proc/modules``."""
    text = _read_text(proc_root / "modules") or ""
    return frozenset(line.split()[0] for line in text.splitlines() if line.strip())


def read_builtin_modules(sysfs_root: Path, names: Iterable[str] = VFIO_MODULES) -> frozenset[str]:
    """Which of ``names`` have ``/sys/module/<name>`` (loaded or built into the kernel)."""
    return frozenset(n for n in names if (sysfs_root / "module" / n).is_dir())


def _entries(path: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in path.iterdir()))
    except OSError:
        return ()


def read_hugepages(sysfs_root: Path) -> dict[str, int]:
    """``nr_hugepages`` per page size, from ``/sys/kernel/mm/hugepages``."""
    pools: dict[str, int] = {}
    base = sysfs_root / "kernel" / "mm" / "hugepages"
    for name in _entries(base):
        if not name.startswith("hugepages-"):
            continue
        text = _read_text(base / name / "nr_hugepages")
        try:
            pools[name.removeprefix("hugepages-")] = int((text or "0").strip())
        except ValueError:
            pools[name.removeprefix("hugepages-")] = 0
    return pools


def parse_fm_config(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``fabricmanager.cfg``; comments and blanks ignored."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = _FM_KEY_VALUE.match(line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def read_fm_config(path: Path) -> dict[str, str] | None:
    text = _read_text(path)
    return None if text is None else parse_fm_config(text)


def read_gpus(
    sysfs_root: Path, dev_root: Path, gpu_device_ids: Mapping[str, str]
) -> tuple[GpuFacts, ...]:
    """Every GPU in ``gpu_device_ids`` under ``sysfs_root``, with its VFIO snapshot.

    Errors: ``ValueError`` for a malformed ``gpu_device_ids`` key (from discovery).
    """
    return tuple(
        GpuFacts(gpu, read_vfio_snapshot(sysfs_root, dev_root, gpu.address))
        for gpu in discover_gpus(sysfs_root, dev_root, gpu_device_ids)
    )


def read_facts(
    roots: Roots,
    *,
    gpu_device_ids: Mapping[str, str],
    module_map: Mapping[int, str],
    fm: FmAnswer | None = None,
    inventory_path: Path | None = None,
) -> NodeFacts:
    """Read the node under ``roots`` and the node inventory at ``inventory_path`` (when
    given) (synchronous file I/O only)."""
    inventory, inventory_problem = None, None
    if inventory_path is not None:
        try:
            inventory = load_inventory(inventory_path)
        except (InventoryFileError, OSError) as exc:
            inventory_problem = str(exc)
    return NodeFacts(
        inventory=inventory,
        inventory_problem=inventory_problem,
        cmdline=read_cmdline(roots.proc),
        loaded_modules=read_loaded_modules(roots.proc),
        builtin_modules=read_builtin_modules(roots.sysfs),
        iommu_devices=_entries(roots.sysfs / "class" / "iommu"),
        iommu_groups=len(_entries(roots.sysfs / "kernel" / "iommu_groups")),
        hugepages=read_hugepages(roots.sysfs),
        fm_config_path=str(roots.fm_config),
        fm_config=read_fm_config(roots.fm_config),
        gpu_device_ids=dict(gpu_device_ids),
        gpus=read_gpus(roots.sysfs, roots.dev, gpu_device_ids),
        module_map=dict(module_map),
        fm=fm if fm is not None else FmAnswer(),
    )


# ----------------------------------------------------------------------------- checks

FIX_IOMMU = (
    'enable VT-d / AMD-Vi in the BIOS, add "intel_iommu=on iommu=pt" (Intel) or '
    '"amd_iommu=on iommu=pt" (AMD) to GRUB_CMDLINE_LINUX in /etc/default/grub, then '
    "`sudo update-grub && sudo reboot`"
)
FIX_VFIO_MODULES = (
    "`sudo modprobe vfio-pci && sudo modprobe vfio_iommu_type1`; to load them at boot: "
    "`printf 'vfio-pci\\nvfio_iommu_type1\\n' | sudo tee /etc/modules-load.d/vfio.conf`"
)
FIX_HUGEPAGES = (
    "reserve hugepages for the VMs' memory, at boot (preferred): add "
    '"default_hugepagesz=1G hugepagesz=1G hugepages=<N>" to the kernel command line; or now: '
    "`echo 2048 | sudo tee /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages`"
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
    return CheckResult("iommu", Status.FAIL, detail, FIX_IOMMU)


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
        "vfio-modules", Status.FAIL, f"not loaded: {', '.join(missing)}", FIX_VFIO_MODULES
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
    """Every configured GPU is on vfio-pci, in a viable IOMMU group, with its /dev/vfio node."""
    ids = sorted(facts.gpu_device_ids)
    if not facts.gpus:
        return CheckResult(
            "gpus-vfio",
            Status.FAIL,
            f"no PCI device with ID {', '.join(ids) or '(none configured)'} found",
            "check vfio.gpu_device_ids in the config against `lspci -nn -d 10de:` "
            "(H200 SXM 141GB is 10de:2335, H100 SXM5 80GB is 10de:2330)",
        )
    problems = [(g, p) for g in facts.gpus if (p := gpu_problem(g)) is not None]
    if not problems:
        groups = sorted({g.vfio.iommu_group for g in facts.gpus if g.vfio.iommu_group is not None})
        return CheckResult(
            "gpus-vfio",
            Status.PASS,
            f"{len(facts.gpus)} GPU(s) on vfio-pci, IOMMU groups "
            f"{', '.join(map(str, groups))} viable",
        )
    if facts.iommu_groups == 0:
        # Binding cannot help before the IOMMU is on: the iommu check says how, once.
        return CheckResult(
            "gpus-vfio",
            Status.FAIL,
            f"{len(facts.gpus)} GPU(s) ({', '.join(_found_ids(facts))}) cannot be passed "
            "to a VM: the node has no IOMMU groups",
            "turn the IOMMU on first (see the iommu check): binding cannot help before; "
            f"then bind the {' '.join(_found_ids(facts))} GPU(s) at "
            f"{', '.join(g.address for g in facts.gpus)} with "
            "`nvswitch-dp prepare-node --bind-vfio`",
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
        fixes.append(FIX_IOMMU)
    if not fixes:
        fixes.append("mount the host's /dev/vfio into the container (read-only is enough)")
    return CheckResult(
        "gpus-vfio",
        Status.FAIL,
        f"{len(problems)} of {len(facts.gpus)} GPU(s) unusable: "
        + "; ".join(p for _, p in problems),
        "; ".join(fixes),
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
    return CheckResult("hugepages", Status.WARN, f"no hugepages reserved ({sizes})", FIX_HUGEPAGES)


def check_fm_mode(facts: NodeFacts) -> CheckResult:
    """``fabricmanager.cfg`` sets ``FABRIC_MODE=1`` (Shared NVSwitch multitenancy)."""
    fix_mode = (
        f"set FABRIC_MODE=1 in {facts.fm_config_path}, then "
        "`sudo systemctl restart nvidia-fabricmanager` (with no VM running)"
    )
    if facts.fm_config is None:
        return CheckResult(
            "fm-shared-nvswitch-mode",
            Status.WARN,
            f"cannot read {facts.fm_config_path}; FM mode unknown",
            "pass --fm-config with the path of fabricmanager.cfg (inside the driver "
            "container when Fabric Manager runs there)",
        )
    mode = facts.fm_config.get("FABRIC_MODE")
    if mode == "1":
        where = facts.fm_config.get("FM_CMD_UNIX_SOCKET_PATH") or (
            f"{facts.fm_config.get('FM_CMD_BIND_INTERFACE', '127.0.0.1')}:"
            f"{facts.fm_config.get('FM_CMD_PORT_NUMBER', '6666')}"
        )
        return CheckResult(
            "fm-shared-nvswitch-mode",
            Status.PASS,
            f"FABRIC_MODE=1 (Shared NVSwitch) in {facts.fm_config_path}; FM listens on {where}",
        )
    meaning = {"0": "bare metal / full passthrough", "2": "vGPU"}.get(mode or "", "unknown")
    shown = "FABRIC_MODE not set (default 0)" if mode is None else f"FABRIC_MODE={mode}"
    return CheckResult(
        "fm-shared-nvswitch-mode",
        Status.FAIL,
        f"{shown} ({meaning}) in {facts.fm_config_path}; partitions need FABRIC_MODE=1",
        fix_mode,
    )


FIX_FM_REACHABLE = (
    "`systemctl status nvidia-fabricmanager` and `journalctl -u nvidia-fabricmanager`; "
    "check that `fmpm -l` answers on the node, that fabric_manager.endpoint matches "
    "FM_CMD_BIND_INTERFACE/FM_CMD_PORT_NUMBER (TCP 127.0.0.1:6666 by default) or "
    "FM_CMD_UNIX_SOCKET_PATH, and that the pod uses hostNetwork for TCP"
)


def check_fm_reachable(facts: NodeFacts) -> CheckResult:
    """Fabric Manager answers "list partitions" and reports at least one partition."""
    answer = facts.fm
    if not answer.asked:
        return CheckResult(
            "fm-reachable", Status.WARN, "not checked (no Fabric Manager client)", FIX_FM_REACHABLE
        )
    if answer.report is None:
        detail = f"Fabric Manager did not answer: {answer.error}"
        fix = FIX_FM_REACHABLE
        if answer.error_code == -8:  # NOT_CONFIGURED
            fix = (
                "FM is initialising, or was restarted with --restart and waits for the "
                "active partition list: start the plugin (it sends it), or within 60 s "
                "`fmpm --set-activated-list <ids>`"
            )
        return CheckResult("fm-reachable", Status.FAIL, detail, fix)
    report = answer.report
    if not report.partitions:
        return CheckResult(
            "fm-reachable",
            Status.FAIL,
            "Fabric Manager answered with no partitions",
            "Fabric Manager lists partitions only in Shared NVSwitch mode: set FABRIC_MODE=1 "
            "and restart it",
        )
    sizes = sorted({len(p.gpus) for p in report.partitions})
    active = sorted(report.active_ids)
    return CheckResult(
        "fm-reachable",
        Status.PASS,
        f"{len(report.partitions)} partitions, sizes {', '.join(f'{s}x' for s in sizes)}; "
        f"active: {', '.join(map(str, active)) or 'none'}",
    )


FIX_MODULE_MAP = (
    "with the GPUs still on the nvidia driver, run `nvswitch-dp prepare-node` (it records "
    "every GPU's module ID in <state-dir>/node-inventory.json, which the daemon reads when "
    "module_map is not set; `nvswitch-dp prepare-node --print-module-map` prints a "
    "module_map: block instead); by "
    "hand: `nvidia-smi -q | grep -iE '^GPU |module id'` (driver 580 prints 'Module Id', "
    "older ones 'Module ID') and set module_map to `<module ID>: \"0000:<bus>:00.0\"` "
    "(nvidia-smi's 8-digit domain 00000000 becomes 0000)"
)


def effective_module_map(facts: NodeFacts) -> tuple[dict[int, str], str]:
    """The module map the daemon would use and where it comes from: the configuration's
    ``module_map``, else the node inventory, else nothing."""
    if facts.module_map:
        return dict(facts.module_map), "module_map"
    if facts.inventory is not None and facts.inventory.gpus:
        return facts.inventory.module_map(), "node inventory"
    return {}, "nothing"


def check_module_map(facts: NodeFacts) -> CheckResult:
    """Every module FM reports maps to a PCI address that is a discovered GPU, one to one,
    through ``module_map`` or the node inventory, and the two do not contradict each
    other or the node."""
    gpu_addresses = {g.address for g in facts.gpus}
    module_map, source = effective_module_map(facts)
    problems: list[str] = []
    reported: set[int] = set()
    if facts.inventory_problem is not None and not facts.module_map:
        problems.append(facts.inventory_problem)
    elif not module_map:
        problems.append("no module_map in the configuration and no node inventory")
    present = {g.address: g.gpu.key for g in facts.gpus}
    problems += resolve_module_map(facts.module_map, facts.inventory, present).problems
    if facts.fm.report is not None:
        reported = {g.physical_id for p in facts.fm.report.partitions for g in p.gpus}
        missing = sorted(reported - set(module_map))
        if missing and module_map:
            problems.append(
                f"modules {', '.join(map(str, missing))} have no address in the {source}"
            )
    not_gpus = sorted(
        f"{m} -> {a}" for m, a in module_map.items() if a.lower() not in gpu_addresses
    )
    if not_gpus:
        problems.append(f"not a discovered GPU: {', '.join(not_gpus)}")
    by_address: dict[str, list[int]] = {}
    for module, address in module_map.items():
        by_address.setdefault(address.lower(), []).append(module)
    shared = [
        f"{a} ({', '.join(map(str, sorted(ms)))})" for a, ms in by_address.items() if len(ms) > 1
    ]
    if shared:
        problems.append(f"address used by several modules: {', '.join(shared)}")
    if problems:
        return CheckResult("module-map", Status.FAIL, "; ".join(problems), FIX_MODULE_MAP)
    if facts.fm.report is None:
        return CheckResult(
            "module-map",
            Status.WARN,
            f"{len(module_map)} entries ({source}), all discovered GPUs; not compared with "
            "FM's modules (Fabric Manager not reached)",
            FIX_FM_REACHABLE,
        )
    extra = sorted(set(module_map) - reported)
    if extra:
        return CheckResult(
            "module-map",
            Status.WARN,
            f"modules {', '.join(map(str, extra))} are mapped ({source}) but FM reports no "
            "such module",
            "remove them from module_map, or check that FM sees every GPU "
            "(`fmpm -l`, NVLink or GPU failures at FM start)",
        )
    return CheckResult(
        "module-map",
        Status.PASS,
        f"all {len(reported)} modules FM reports map to discovered GPUs ({source})",
    )


CHECKS: tuple[Callable[[NodeFacts], CheckResult], ...] = (
    check_iommu,
    check_vfio_modules,
    check_gpus_vfio,
    check_hugepages,
    check_fm_mode,
    check_fm_reachable,
    check_module_map,
)


def evaluate(facts: NodeFacts) -> list[CheckResult]:
    """Every check, in order, over ``facts`` (pure)."""
    return [check(facts) for check in CHECKS]


def _answer_from(call: Callable[[], FmReport]) -> FmAnswer:
    try:
        return FmAnswer(report=call())
    except FabricManagerError as exc:
        return FmAnswer(error=str(exc), error_code=exc.code)
    except OSError as exc:
        return FmAnswer(error=f"{type(exc).__name__}: {exc}")


def ask_fabric_manager(list_partitions: ListPartitions, timeout: float = 30.0) -> FmAnswer:
    """Call ``list_partitions`` once; an async callable runs in its own ``trio.run``.

    Must not be called from inside a Trio run (use :func:`ask_fabric_manager_async`).
    """

    def call() -> FmReport:
        result = list_partitions()
        if inspect.isawaitable(result):
            import trio

            awaitable = result

            async def wait() -> FmReport:
                with trio.fail_after(timeout):
                    return await awaitable

            try:
                return trio.run(wait)
            except trio.TooSlowError:
                raise TimeoutError(f"no answer within {timeout:g} s") from None
        return result

    return _answer_from(call)


async def ask_fabric_manager_async(list_partitions: ListPartitions) -> FmAnswer:
    """Like :func:`ask_fabric_manager`, from inside a Trio run."""
    try:
        result = list_partitions()
        report = await result if inspect.isawaitable(result) else result
    except FabricManagerError as exc:
        return FmAnswer(error=str(exc), error_code=exc.code)
    except OSError as exc:
        return FmAnswer(error=f"{type(exc).__name__}: {exc}")
    return FmAnswer(report=report)


def run_checks(
    roots: Roots = Roots(),
    *,
    gpu_device_ids: Mapping[str, str],
    module_map: Mapping[int, str],
    list_partitions: ListPartitions | None = None,
    fm: FmAnswer | None = None,
    inventory_path: Path | None = None,
) -> list[CheckResult]:
    """Read the node under ``roots``, ask FM once (if a lister is given), run every check.

    ``fm`` takes an answer obtained elsewhere (e.g. :func:`ask_fabric_manager_async`);
    it wins over ``list_partitions``.
    """
    if fm is None and list_partitions is not None:
        fm = ask_fabric_manager(list_partitions)
    facts = read_facts(
        roots,
        gpu_device_ids=gpu_device_ids,
        module_map=module_map,
        fm=fm,
        inventory_path=inventory_path,
    )
    return evaluate(facts)


_MARK = {Status.PASS: "PASS", Status.WARN: "WARN", Status.FAIL: "FAIL"}


def format_report(results: Sequence[CheckResult]) -> str:
    """Human-readable report: one line per check, the fix indented below it."""
    lines = []
    for r in results:
        lines.append(f"[{_MARK[r.status]}] {r.name}: {r.detail}")
        if r.fix:
            lines.append(f"       fix: {r.fix}")
    counts = {s: sum(1 for r in results if r.status is s) for s in Status}
    lines.append(
        f"{counts[Status.PASS]} passed, {counts[Status.WARN]} warning(s), "
        f"{counts[Status.FAIL]} failed"
    )
    return "\n".join(lines) + "\n"


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 when nothing failed (warnings allowed), 1 otherwise."""
    return 1 if any(r.status is Status.FAIL for r in results) else 0


# ---------------------------------------------------------------------------- command


def doctor_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nvswitch-dp doctor",
        description="Check that this node is ready for the device plugin.",
    )
    add_node_arguments(p, proc_help="default: /proc")
    p.add_argument(
        "--fm-config", metavar="FILE", default=str(DEFAULT_FM_CONFIG), help="fabricmanager.cfg"
    )
    p.add_argument("--simulate", metavar="PLATFORM", help="check a simulated node instead")
    p.add_argument("--no-fm", action="store_true", help="do not contact Fabric Manager")
    return p


def _simulated_roots(base: Path, platform_name: str) -> tuple[Roots, dict[int, str], str]:
    """A simulated node under ``base``: the vfio simulator's sysfs and /dev, plus a
    /proc, hugepages and an FM config in Shared NVSwitch mode."""
    from nvswitch_dp.fabric.platforms import platform
    from nvswitch_dp.vfio.simulate import build_simulated_node

    plat = platform(platform_name)
    node = build_simulated_node(base / "node", plat)
    proc = base / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cmdline").write_text("BOOT_IMAGE=/vmlinuz ro intel_iommu=on iommu=pt\n")
    (proc / "modules").write_text(
        "".join(f"{m} 16384 0 - Live 0x0000000000000000\n" for m in (*VFIO_MODULES, "vfio"))
    )
    sysfs = Path(node.sysfs_root)
    pool = sysfs / "kernel" / "mm" / "hugepages" / "hugepages-1048576kB"
    if not (pool / "nr_hugepages").exists():
        pool.mkdir(parents=True, exist_ok=True)
        (pool / "nr_hugepages").write_text("512\n")
    fm_config = base / "fabricmanager.cfg"
    fm_config.write_text(
        "FABRIC_MODE=1\nFM_CMD_BIND_INTERFACE=127.0.0.1\nFM_CMD_PORT_NUMBER=6666\n"
    )
    roots = Roots(proc=proc, sysfs=sysfs, dev=Path(node.dev_root), fm_config=fm_config)
    return roots, dict(node.module_map), f"10de:{plat.gpu_device_id}"


def _fm_lister(config: Any) -> ListPartitions:
    from nvswitch_dp.fabric.client import build_fabric_client

    client = build_fabric_client(config)
    return client.list_partitions


def doctor_main(
    argv: list[str] | None = None, *, list_partitions: ListPartitions | None = None
) -> int:
    """``nvswitch-dp doctor``: print the report, return the exit status.

    0: no check failed; 1: a check failed; 2: bad arguments or configuration.
    ``list_partitions`` replaces the FM client the configuration names (tests).
    """
    from nvswitch_dp.config import ConfigError

    args = doctor_parser().parse_args(argv)
    try:
        config = load_node_config(args)
    except (ConfigError, OSError) as exc:
        print(f"nvswitch-dp doctor: configuration error: {exc}", file=sys.stderr)
        return 2

    lister_error: str | None = None
    inventory_path: Path | None = None
    with tempfile.TemporaryDirectory(prefix="nvswitch-dp-doctor-") as tmp:
        if args.simulate:
            from nvswitch_dp.fabric.platforms import platform_names

            if args.simulate not in platform_names():
                print(
                    f"nvswitch-dp doctor: unknown platform {args.simulate!r}; known: "
                    f"{', '.join(platform_names())}",
                    file=sys.stderr,
                )
                return 2
            roots, module_map, gpu_id = _simulated_roots(Path(tmp), args.simulate)
            gpu_ids: Mapping[str, str] = {gpu_id: args.simulate}
            if list_partitions is None and not args.no_fm:
                from nvswitch_dp.fabric.simulator import SimulatedFabricManager, SimulatorStore

                store = SimulatorStore(Path(tmp) / "fabricmanager.state", args.simulate)
                list_partitions = SimulatedFabricManager(store).list_partitions
        else:
            roots = Roots(
                proc=Path(args.proc_root),
                sysfs=Path(args.sysfs_root or config.vfio.sysfs_root),
                dev=Path(args.dev_root or config.vfio.dev_root),
                fm_config=Path(args.fm_config),
            )
            module_map = dict(config.module_map)
            gpu_ids = dict(config.vfio.gpu_device_ids)
            inventory_path = Path(args.state_dir or config.state_dir) / INVENTORY_FILE
            if list_partitions is None and not args.no_fm:
                try:
                    list_partitions = _fm_lister(config)
                except (ImportError, OSError, ValueError) as exc:
                    lister_error = (
                        f"cannot set up the {config.fabric_manager.backend} client: {exc}"
                    )
        timeout = float(config.fabric_manager.timeout_seconds) * 2
        fm = None
        if list_partitions is not None and not args.no_fm:
            fm = ask_fabric_manager(list_partitions, timeout=timeout)
        elif lister_error is not None:
            fm = FmAnswer(error=lister_error)
        results = run_checks(
            roots,
            gpu_device_ids=gpu_ids,
            module_map=module_map,
            fm=fm,
            inventory_path=inventory_path,
        )
    sys.stdout.write(format_report(results))
    return exit_code(results)
