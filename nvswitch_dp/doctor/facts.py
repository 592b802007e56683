"""What ``nvswitch-dp doctor`` reads from the node, and the readers that read it.

The readers (``read_*``) take a root directory (``/proc``, ``/sys``, ``/dev``, FM's
config file, a ``PATH``) and return plain values; tests point them at fake trees.
:class:`NodeFacts` holds everything read and :func:`read_facts` fills it. Nothing here
decides anything: the checks (``checks_node``, ``checks_fm``) are pure functions of
:class:`NodeFacts`.

Ownership: the readers open and close their files themselves and hold nothing.
Errors: a file or directory that cannot be read reads as absent or empty (the checks say
what is missing); only a malformed ``gpu_device_ids`` key raises (``ValueError``).
"""

from __future__ import annotations

import enum
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nvswitch_dp.fabric.types import FmReport
from nvswitch_dp.vfio.discovery import (
    PciGpu,
    VfioSnapshot,
    discover_gpus,
    read_function,
    read_vfio_snapshot,
)
from nvswitch_dp.vfio.inventory import (
    InventoryFileError,
    NodeInventory,
    load_inventory,
)
from nvswitch_dp.vfio.pci_ids import GPU_CLASSES, NVIDIA_VENDOR_ID, normalize_device_key

DEFAULT_FM_CONFIG = Path("/usr/share/nvidia/nvswitch/fabricmanager.cfg")
VFIO_MODULES = ("vfio_pci", "vfio_iommu_type1")
# The programs a fix may tell the operator to run. A fix names one only when it is on
# this machine's PATH, and otherwise says where to get it or where to run it instead.
KNOWN_COMMANDS = (
    "lspci",
    "update-grub",
    "grubby",
    "grub2-mkconfig",
    "modprobe",
    "systemctl",
    "journalctl",
    "nvidia-smi",
)
_FM_KEY_VALUE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


class Status(enum.Enum):
    """A check's verdict. SKIP: not judged, because a check it depends on failed (or
    Fabric Manager was not asked); the detail names which."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check. ``fix`` is empty exactly when ``status`` is PASS or SKIP:
    a skipped check leaves the fix to the check it waits on."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS

    @classmethod
    def skipped(cls, name: str, failed: Sequence[str]) -> CheckResult:
        """Check ``name`` not judged because the checks ``failed`` (its needs) failed."""
        which = " and ".join(failed)
        return cls(
            name,
            Status.SKIP,
            f"skipped: {which} failed; fix {'that' if len(failed) == 1 else 'those'} first",
        )


@dataclass(frozen=True, slots=True)
class Roots:
    """Where the readers look; the real node's paths by default.

    ``path``: the ``PATH`` searched for the commands a fix may name; ``None`` is this
    process's ``$PATH``.
    """

    proc: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    dev: Path = Path("/dev")
    fm_config: Path = DEFAULT_FM_CONFIG
    path: str | None = None


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """A GPU matching the configured IDs and its VFIO state (from ``nvswitch_dp.vfio``)."""

    gpu: PciGpu
    vfio: VfioSnapshot

    @property
    def address(self) -> str:
        return self.gpu.address


@dataclass(frozen=True, slots=True)
class FmAnswer:
    """What asking FM for its partition list gave: a report, an error, a missing client,
    or nothing (not asked).

    ``client_missing`` says which program or library was looked up where, when the
    configured backend's client is not on the node (FM itself was then never asked).
    ``backend`` and ``client`` (the resolved program or library) are set when known.
    """

    report: FmReport | None = None
    error: str | None = None
    error_code: int | None = None
    client_missing: str | None = None
    backend: str = ""
    client: str = ""

    @property
    def asked(self) -> bool:
        return self.report is not None or self.error is not None


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """Everything the checks look at. Built by :func:`read_facts`, or by hand in tests."""

    cmdline: str = ""
    cpu_vendor: str = ""  # /proc/cpuinfo's vendor_id: "GenuineIntel", "AuthenticAMD"
    loaded_modules: frozenset[str] = frozenset()
    builtin_modules: frozenset[str] = frozenset()
    iommu_devices: tuple[str, ...] = ()  # /sys/class/iommu entries
    iommu_groups: int = 0  # entries in /sys/kernel/iommu_groups
    hugepages: Mapping[str, int] = field(default_factory=dict)  # "2048kB" -> nr_hugepages
    fm_config_path: str = str(DEFAULT_FM_CONFIG)
    fm_config: Mapping[str, str] | None = None  # None: the file could not be read
    gpu_device_ids: Mapping[str, str] = field(default_factory=dict)
    gpus: tuple[GpuFacts, ...] = ()
    # NVIDIA display-class functions whose ID is not configured: address -> "10de:dddd".
    other_nvidia_gpus: Mapping[str, str] = field(default_factory=dict)
    module_map: Mapping[int, str] = field(default_factory=dict)
    fm: FmAnswer = field(default_factory=FmAnswer)
    inventory: NodeInventory | None = None  # prepare-node's record; None: no file
    inventory_problem: str | None = None  # the file exists but cannot be read
    commands: frozenset[str] = frozenset()  # which of KNOWN_COMMANDS are on the PATH


# ---------------------------------------------------------------------------- readers


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _entries(path: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in path.iterdir()))
    except OSError:
        return ()


def read_cmdline(proc_root: Path) -> str:
    """The kernel command line (``/proc/cmdline``); empty when unreadable."""
    return (_read_text(proc_root / "cmdline") or "").strip()


def read_cpu_vendor(proc_root: Path) -> str:
    """The first ``vendor_id`` of ``/proc/cpuinfo`` (``"GenuineIntel"``); empty if none."""
    for line in (_read_text(proc_root / "cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


def read_loaded_modules(proc_root: Path) -> frozenset[str]:
    """Names of loaded kernel modules, from ``/proc/modules``."""
    text = _read_text(proc_root / "modules") or ""
    return frozenset(line.split()[0] for line in text.splitlines() if line.strip())


def read_builtin_modules(sysfs_root: Path, names: Iterable[str] = VFIO_MODULES) -> frozenset[str]:
    """Which of ``names`` have ``/sys/module/<name>`` (loaded or built into the kernel)."""
    return frozenset(n for n in names if (sysfs_root / "module" / n).is_dir())


def read_hugepages(sysfs_root: Path) -> dict[str, int]:
    """``nr_hugepages`` per page size (``"1048576kB"``), from ``/sys/kernel/mm/hugepages``.

    Every pool the kernel offers is listed, reserved or not: which sizes exist decides
    which page size the fix recommends.
    """
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
    """``fabricmanager.cfg`` parsed; ``None`` when it cannot be read."""
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


def read_other_nvidia_gpus(sysfs_root: Path, gpu_device_ids: Mapping[str, str]) -> dict[str, str]:
    """NVIDIA GPUs (display class) whose ID is not in ``gpu_device_ids``: address -> ID.

    Lets the doctor tell "no NVIDIA GPU on this node" from "GPUs of a model the
    configuration does not name", without ``lspci``.
    Errors: ``ValueError`` for a malformed ``gpu_device_ids`` key.
    """
    wanted = {normalize_device_key(k) for k in gpu_device_ids}
    found: dict[str, str] = {}
    for address in _entries(sysfs_root / "bus" / "pci" / "devices"):
        function = read_function(sysfs_root, address)
        if function is None or function.vendor_id != NVIDIA_VENDOR_ID:
            continue
        key = f"{function.vendor_id}:{function.device_id}"
        if (function.pci_class or 0) >> 8 in GPU_CLASSES and key not in wanted:
            found[function.address] = key
    return found


def read_commands(path: str | None, names: Iterable[str] = KNOWN_COMMANDS) -> frozenset[str]:
    """Which of ``names`` are executables on ``path`` (``None``: this process's PATH)."""
    return frozenset(n for n in names if shutil.which(n, path=path) is not None)


def read_facts(
    roots: Roots,
    *,
    gpu_device_ids: Mapping[str, str],
    module_map: Mapping[int, str],
    fm: FmAnswer | None = None,
    inventory_path: Path | None = None,
) -> NodeFacts:
    """Read the node under ``roots`` and the node inventory at ``inventory_path`` (when
    given) (synchronous file I/O only).

    Errors: ``ValueError`` for a malformed ``gpu_device_ids`` key.
    """
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
        cpu_vendor=read_cpu_vendor(roots.proc),
        loaded_modules=read_loaded_modules(roots.proc),
        builtin_modules=read_builtin_modules(roots.sysfs),
        iommu_devices=_entries(roots.sysfs / "class" / "iommu"),
        iommu_groups=len(_entries(roots.sysfs / "kernel" / "iommu_groups")),
        hugepages=read_hugepages(roots.sysfs),
        fm_config_path=str(roots.fm_config),
        fm_config=read_fm_config(roots.fm_config),
        gpu_device_ids=dict(gpu_device_ids),
        gpus=read_gpus(roots.sysfs, roots.dev, gpu_device_ids),
        other_nvidia_gpus=read_other_nvidia_gpus(roots.sysfs, gpu_device_ids),
        module_map=dict(module_map),
        fm=fm if fm is not None else FmAnswer(),
        commands=read_commands(roots.path),
    )
