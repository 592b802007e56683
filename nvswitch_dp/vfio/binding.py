"""Moving GPUs to ``vfio-pci``: the plan, the checks before it, and its execution.

The kernel's own recipe (Documentation/ABI/testing/sysfs-bus-pci, ``driver_override``)
moves one function at a time, and takes it from a driver that already holds it, which
``new_id`` never does::

    echo vfio-pci     > /sys/bus/pci/devices/<a>/driver_override
    echo <a>          > /sys/bus/pci/drivers/<current driver>/unbind
    echo <a>          > /sys/bus/pci/drivers_probe

An IOMMU group is handed to a VM whole, so a GPU's group moves whole or not at all: its
NVIDIA functions go with it; bridges (the kernel lets them stay) and functions already on
``vfio-pci``, ``pci-stub`` or no driver stay. A group is refused, never half moved, when it
holds an NVSwitch (Fabric Manager needs it on the host), a function of another vendor on
a host driver (a NIC or a drive sharing the group without ACS), or a GPU a process holds
open, or when it is no group at all (the IOMMU is off).

Halves, as in :mod:`nvswitch_dp.vfio.discovery`:

- :func:`plan_binding` is pure: from what sysfs shows (:class:`FunctionState`) to a
  :class:`BindPlan` of modules to load and writes to make, or refusals.
- :func:`read_group_states`, :func:`find_open_holders` and :func:`read_device_minor`
  read sysfs and ``/proc``; :func:`execute_plan` makes the writes through a
  :class:`~nvswitch_dp.ports.PciKernel` (the real sysfs, or a simulated kernel).

Interrupted at any line (the process killed, a write failing), a rerun finds each
function where the kernel left it (still bound, unbound with the override set, or on
vfio-pci) and plans only what is left: the plan is idempotent.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvswitch_dp.ports import PciKernel
from nvswitch_dp.vfio.discovery import (
    VFIO_DRIVER,
    VIABLE_DRIVERS,
    PciGpu,
    read_attribute,
    read_function,
)
from nvswitch_dp.vfio.pci_ids import NVIDIA_VENDOR_ID, NVSWITCH_CLASS, is_bridge

# The modules vfio-pci needs; the names /sys/module shows them under.
VFIO_MODULES = ("vfio_pci", "vfio_iommu_type1")
MODPROBE_TIMEOUT_S = 60.0
# A node has tens of thousands of open files at most; a scan reads each link once.
MAX_SCANNED_PROCESSES = 1_000_000


@dataclass(frozen=True, slots=True)
class FunctionState:
    """A PCI function of a GPU's IOMMU group, as sysfs shows it now."""

    address: str
    driver: str | None
    pci_class: int | None
    iommu_group: int | None
    is_gpu: bool  # a configured GPU (moved for its own sake)
    override: str | None = None  # driver_override; None for "(null)"
    vendor: str | None = NVIDIA_VENDOR_ID  # "10de"


@dataclass(frozen=True, slots=True)
class Write:
    """One sysfs write: ``value`` into the attribute at ``path``."""

    path: Path
    value: str

    def shell(self) -> str:
        """How an operator would type it (for ``--dry-run``; never executed)."""
        return f"echo {self.value} > {self.path}"


@dataclass(frozen=True, slots=True)
class Move:
    """One function going from ``from_driver`` to vfio-pci, and why it must."""

    address: str
    from_driver: str | None
    reason: str
    writes: tuple[Write, ...]


@dataclass(frozen=True, slots=True)
class BindPlan:
    """What binding every configured GPU to vfio-pci takes.

    ``refusals`` name the GPUs left where they are and why (the others are planned).
    ``modules`` are loaded first, then each :class:`Move` in order. ``already`` counts the
    GPUs on vfio-pci already.
    """

    modules: tuple[str, ...]
    moves: tuple[Move, ...]
    refusals: tuple[str, ...]
    already: int
    refused: tuple[str, ...] = ()  # the GPU addresses the refusals name

    @property
    def changes_nothing(self) -> bool:
        return not self.modules and not self.moves


def _class(fn: FunctionState) -> int | None:
    return None if fn.pci_class is None else fn.pci_class >> 8


def _writes(sysfs_root: Path, fn: FunctionState) -> tuple[Write, ...]:
    pci = sysfs_root / "bus" / "pci"
    writes = []
    if fn.override != VFIO_DRIVER:
        writes.append(Write(pci / "devices" / fn.address / "driver_override", VFIO_DRIVER))
    if fn.driver is not None:
        writes.append(Write(pci / "drivers" / fn.driver / "unbind", fn.address))
    writes.append(Write(pci / "drivers_probe", fn.address))
    return tuple(writes)


def _group_refusal(members: Sequence[FunctionState], held: Mapping[str, str]) -> str | None:
    """Why this IOMMU group must stay where it is, naming the functions; ``None`` when it
    may move. Pure."""
    group = next((m.iommu_group for m in members if m.iommu_group is not None), None)
    if group is None or any(m.is_gpu and m.iommu_group is None for m in members):
        # vfio-pci refuses a device without a group (outside noiommu mode), and no VM
        # could be given one.
        return (
            "has no IOMMU group (the IOMMU is off, or this is a VM without a virtual "
            "IOMMU); enable the IOMMU before binding to vfio-pci"
        )
    switches = [m.address for m in members if _class(m) == NVSWITCH_CLASS]
    if switches:
        return (
            f"IOMMU group {group} also holds NVSwitch {', '.join(switches)}, which Fabric "
            "Manager needs on the host (check ACS in the BIOS)"
        )
    several = sum(m.is_gpu for m in members) > 1
    busy = [
        f"{m.address}: {held[m.address]}" if several else held[m.address]
        for m in members
        if m.address in held and m.driver != VFIO_DRIVER
    ]
    if busy:
        return f"in use: {'; '.join(busy)}; stop it first, then run again"
    foreign = [
        f"{m.address} on {m.driver}"
        for m in members
        if not m.is_gpu
        and m.driver not in VIABLE_DRIVERS
        and m.driver is not None
        and not is_bridge(m.pci_class)
        and m.vendor != NVIDIA_VENDOR_ID
    ]
    if foreign:
        return (
            f"IOMMU group {group} also holds {', '.join(foreign)}, which would have to leave "
            "the host with the GPU; move them to vfio-pci yourself if that is meant, or "
            "enable ACS so that each GPU has its own group"
        )
    return None


def plan_binding(
    sysfs_root: Path,
    groups: Mapping[str, Sequence[FunctionState]],
    missing_modules: Iterable[str],
    held: Mapping[str, str] | None = None,
) -> BindPlan:
    """The plan that puts every GPU of ``groups`` (GPU address -> every function of its
    IOMMU group, the GPU included) on vfio-pci with a viable group.

    A group is moved whole or not at all. Refused, with a line in ``refusals`` naming its
    GPUs and their addresses in ``refused``: a GPU without an IOMMU group, a group
    holding an NVSwitch, a group with a function in ``held`` (address -> who holds it
    open, or why that cannot be told), and a group holding a function of another vendor
    on a host driver (a NIC or an NVMe drive behind the same switch without ACS: never
    taken from the host unasked). NVIDIA functions of the group (a GPU's audio function)
    move with it; bridges, unbound and pci-stub functions stay. Pure.
    """
    held = held or {}
    moves: list[Move] = []
    refusals: list[str] = []
    refused: list[str] = []
    seen: set[str] = set()
    already = 0
    for gpu_address, members in sorted(groups.items()):
        if gpu_address in seen:
            continue  # planned with a GPU of the same group
        if not any(m.address == gpu_address for m in members):
            refusals.append(f"{gpu_address}: gone from the PCI bus")
            refused.append(gpu_address)
            continue
        ordered = sorted(members, key=lambda m: m.address)
        gpus = [m.address for m in ordered if m.is_gpu]
        seen.update(gpus)
        why = _group_refusal(ordered, held)
        if why is not None:
            refusals.append(f"{', '.join(gpus)}: {why}")
            refused += gpus
            continue
        already += sum(m.is_gpu and m.driver == VFIO_DRIVER for m in ordered)
        group = ordered[0].iommu_group
        for member in ordered:
            if member.driver == VFIO_DRIVER or is_bridge(member.pci_class):
                continue  # there already, or the kernel lets it stay
            if not member.is_gpu and (member.driver in VIABLE_DRIVERS or member.driver is None):
                continue  # pci-stub or unbound: the group stays viable
            reason = (
                "configured GPU"
                if member.is_gpu
                else f"in IOMMU group {group} with GPU {', '.join(gpus)}"
            )
            moves.append(Move(member.address, member.driver, reason, _writes(sysfs_root, member)))
    modules = tuple(missing_modules) if moves else ()
    return BindPlan(modules, tuple(moves), tuple(refusals), already, tuple(refused))


# ---------------------------------------------------------------------------- readers


def read_override(sysfs_root: Path, address: str) -> str | None:
    """``driver_override`` of the function; ``None`` when unset ("(null)") or unreadable."""
    text = read_attribute(sysfs_root / "bus" / "pci" / "devices" / address / "driver_override")
    return None if text in (None, "", "(null)") else text


def read_group_states(sysfs_root: Path, gpus: Iterable[PciGpu]) -> dict[str, list[FunctionState]]:
    """GPU address -> the state of every function of its IOMMU group (just the GPU when
    it has no group; an empty list when it is gone)."""
    gpu_addresses = {g.address for g in gpus}
    groups: dict[str, list[FunctionState]] = {}
    for address in sorted(gpu_addresses):
        function = read_function(sysfs_root, address)
        if function is None:
            groups[address] = []
            continue
        members = [address]
        if function.iommu_group is not None:
            directory = sysfs_root / "kernel" / "iommu_groups" / str(function.iommu_group)
            try:
                members = sorted(p.name for p in (directory / "devices").iterdir())
            except OSError:
                members = [address]
        states = []
        for member in members:
            fn = read_function(sysfs_root, member)
            if fn is None:
                continue
            states.append(
                FunctionState(
                    address=fn.address,
                    driver=fn.driver,
                    pci_class=fn.pci_class,
                    iommu_group=fn.iommu_group,
                    is_gpu=fn.address in gpu_addresses,
                    override=read_override(sysfs_root, fn.address),
                    vendor=fn.vendor_id,
                )
            )
        groups[address] = states
    return groups


def missing_vfio_modules(sysfs_root: Path) -> tuple[str, ...]:
    """Which of :data:`VFIO_MODULES` have no ``/sys/module/<name>`` (not loaded)."""
    return tuple(m for m in VFIO_MODULES if not (sysfs_root / "module" / m).is_dir())


def read_device_minor(proc_root: Path, address: str) -> int | None:
    """The GPU's ``/dev/nvidia<minor>`` number, from the nvidia driver's
    ``/proc/driver/nvidia/gpus/<address>/information`` ("Device Minor: 0"); ``None``
    when the driver does not list the GPU."""
    text = read_attribute(proc_root / "driver" / "nvidia" / "gpus" / address / "information")
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "device minor":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


@dataclass(frozen=True, slots=True)
class OpenHolders:
    """Processes holding any of the scanned paths open, and what could not be read."""

    holders: Mapping[str, tuple[str, ...]]  # path -> "pid 1234 (qemu)"
    unreadable: int  # processes whose open files could not be listed (permission)


def find_open_holders(proc_root: Path, paths: Iterable[str]) -> OpenHolders:
    """Scan ``<proc>/<pid>/fd/*`` for links to ``paths`` (``/dev/nvidia0``, ...).

    A process that exits during the scan is skipped; one whose ``fd`` directory cannot be
    read (EACCES: not root, or no CAP_SYS_PTRACE over it) is counted in ``unreadable``.
    """
    wanted = set(paths)
    found: dict[str, list[str]] = {}
    unreadable = 0
    try:
        entries = [e for e in os.scandir(proc_root) if e.name.isdigit()]
    except OSError:
        return OpenHolders({}, 0)
    for entry in entries[:MAX_SCANNED_PROCESSES]:
        fd_dir = Path(entry.path) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue  # exited
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target in wanted:
                comm = read_attribute(Path(entry.path) / "comm") or "?"
                found.setdefault(target, []).append(f"pid {entry.name} ({comm})")
                break
    return OpenHolders({p: tuple(h) for p, h in found.items()}, unreadable)


# ---------------------------------------------------------------------------- execution


class SysfsKernel:
    """:class:`~nvswitch_dp.ports.PciKernel` of a real node: writes go to sysfs, where the
    kernel acts on them; modules load through ``modprobe`` (no shell).

    Errors: ``OSError`` from the write, with the kernel's errno; :meth:`load_module`
    raises ``OSError`` naming the module and what ``modprobe`` said.
    """

    def __init__(self, modprobe: str = "modprobe") -> None:
        self.modprobe = modprobe

    def write_attribute(self, path: Path, value: str) -> None:
        # One write(2) of the whole value, as `echo ... > attr` does: the kernel's store
        # functions take what a single write hands them.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def load_module(self, name: str) -> None:
        try:
            result = subprocess.run(
                [self.modprobe, name],
                capture_output=True,
                text=True,
                timeout=MODPROBE_TIMEOUT_S,
                check=False,
            )
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"cannot load {name}: {self.modprobe} not found") from None
        except subprocess.TimeoutExpired:
            raise OSError(
                errno.ETIMEDOUT, f"cannot load {name}: modprobe ran over {MODPROBE_TIMEOUT_S:g} s"
            ) from None
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip()[:500]
            raise OSError(
                errno.EIO, f"cannot load {name}: modprobe exited {result.returncode}: {said}"
            )


def _current_driver(sysfs_root: Path, address: str) -> str | None:
    function = read_function(sysfs_root, address)
    return None if function is None else function.driver


def execute_plan(
    plan: BindPlan, kernel: PciKernel, sysfs_root: Path, say: Callable[[str], None]
) -> str | None:
    """Load the plan's modules, then make each move's writes and read the binding back.

    Stops at the first failure and returns what failed (the function, the write, the
    kernel's answer) so that nothing runs past a surprise; ``None`` when every function
    ended on vfio-pci. ``say`` receives one line per step done. The plan's refusals are the
    caller's to report: they have no moves.
    """
    for module in plan.modules:
        try:
            kernel.load_module(module)
        except OSError as exc:
            return (
                f"{exc.strerror or exc}; load {', '.join(plan.modules)} on the host "
                "(`modprobe vfio-pci vfio_iommu_type1`, and for every boot "
                "/etc/modules-load.d/vfio.conf) and run again"
            )
        say(f"loaded kernel module {module}")
    for move in plan.moves:
        for write in move.writes:
            try:
                kernel.write_attribute(write.path, write.value)
            except OSError as exc:
                unbound_already = (
                    exc.errno == errno.ENODEV
                    and write.path.name == "unbind"
                    and _current_driver(sysfs_root, move.address) is None
                )
                if not unbound_already:
                    return f"{move.address}: `{write.shell()}` failed: {exc.strerror or exc}"
        now = _current_driver(sysfs_root, move.address)
        if now != VFIO_DRIVER:
            return (
                f"{move.address}: bound to {now or 'no driver'} after drivers_probe, not "
                f"{VFIO_DRIVER} (is the vfio-pci module loaded?)"
            )
        say(f"{move.address}: {move.from_driver or 'no driver'} -> {VFIO_DRIVER} ({move.reason})")
    return None
