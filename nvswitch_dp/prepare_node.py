"""``nvswitch-dp prepare-node``: read the module IDs, remember them, move the GPUs to vfio-pci.

The one-shot step a node runs before the daemon (the DaemonSet's init container, or a
systemd oneshot on the host)::

    nvswitch-dp prepare-node [--config FILE] [--state-dir DIR] [--sysfs-root DIR]
        [--dev-root DIR] [--proc-root DIR] [--driver-root DIR] [--nvml-library PATH]
        [--nvidia-smi PATH] [--print-module-map | --bind-vfio] [--dry-run]
        [--allow-refused]

1. **Discover.** Every configured GPU (``vfio.gpu_device_ids``) bound to the ``nvidia``
   driver is asked for its module ID, PCI bus ID, UUID and serial: through NVML first
   (:mod:`nvswitch_dp.vfio.nvml`), else by parsing ``nvidia-smi -q``
   (:mod:`nvswitch_dp.vfio.identity`). A GPU without a module ID, or two with one, stop
   the command naming them.
2. **Remember.** What was discovered is merged into ``<state-dir>/node-inventory.json``
   (:mod:`nvswitch_dp.vfio.inventory`), written only when it changed. GPUs already on
   vfio-pci keep the entry they had.
3. **Bind** (``--bind-vfio``): every configured GPU, and every function of its IOMMU
   group that must move too, goes to vfio-pci through ``driver_override``, ``unbind``
   and ``drivers_probe`` (:mod:`nvswitch_dp.vfio.binding`), after the vfio modules are
   loaded; a group moves whole or not at all, and never with a GPU a process still holds
   open (``<proc>/<pid>/fd``), an NVSwitch, or a host device of another vendor. Then
   each GPU's VFIO state is checked as the daemon checks it.

``--print-module-map`` prints a ``module_map:`` block for the configuration and
changes nothing; ``--dry-run`` prints every write it would make and changes nothing. A
second run changes nothing and says so. On a simulated node (a sysfs root built by
:mod:`nvswitch_dp.vfio.simulate`, which says so in its marker file) the writes go to
the simulated kernel and NVML is not asked (it would describe the machine's real GPUs,
if any); everywhere else the writes go to the real sysfs.

Exit status, as ``doctor``: 0 when everything asked for was done (warnings allowed); 1
when something could not be done (discovery failed for a GPU on nvidia, a GPU was
refused, a write failed, a GPU is unusable afterwards); 2 for bad arguments or
configuration. With ``--allow-refused`` (the init container's setting) refused GPUs
alone exit 0: each is named, and the daemon serves the others.

Inconsistencies the daemon itself refuses GPU by GPU (a configured ``module_map``
contradicting the inventory, a GPU on vfio-pci the inventory does not know) are
warnings: the node still serves its other GPUs.

Every outside call is bounded: NVML is given up after :data:`NVML_TIMEOUT_S` (its calls
block in the driver and cannot be interrupted, so they run in a daemon thread), and
``nvidia-smi`` after :data:`NVIDIA_SMI_TIMEOUT_S` or
:data:`~nvswitch_dp.vfio.identity.MAX_SMI_OUTPUT_BYTES` of output, then killed. The
host's ``nvidia-smi`` run from a container sees only the host's NVML on its library
path, never the host's libc.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvswitch_dp.config import ConfigError
from nvswitch_dp.node_args import NodePaths, add_node_arguments, load_node_config, node_paths
from nvswitch_dp.ports import PciKernel
from nvswitch_dp.vfio.binding import (
    BindPlan,
    SysfsKernel,
    execute_plan,
    find_open_holders,
    missing_vfio_modules,
    plan_binding,
    read_device_minor,
    read_group_states,
)
from nvswitch_dp.vfio.discovery import (
    NVIDIA_DRIVER,
    VFIO_DRIVER,
    PciGpu,
    discover_gpus,
    vfio_problem,
)
from nvswitch_dp.vfio.identity import (
    MAX_SMI_OUTPUT_BYTES,
    GpuIdentity,
    IdentityError,
    check_identities,
    parse_nvidia_smi_q,
)
from nvswitch_dp.vfio.inventory import (
    InventoryConflict,
    InventoryFileError,
    NodeInventory,
    load_inventory,
    merge_discovered,
    resolve_module_map,
    save_inventory,
)
from nvswitch_dp.vfio.nvml import NVML_SONAME, NvmlUnavailable, read_identities_nvml

NVIDIA_SMI_TIMEOUT_S = 120.0
NVML_TIMEOUT_S = 120.0
KILL_GRACE_S = 5.0
# Where a driver root (a host's /, or the GPU Operator's /run/nvidia/driver) keeps NVML
# and nvidia-smi, in the order NVIDIA's own container tooling searches them.
_LIBRARY_DIRS = (
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "usr/lib",
    "lib",
)
_BIN_DIRS = ("usr/bin", "bin", "usr/sbin")

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class DiscoveryError(Exception):
    """Module IDs could not be read for GPUs on the nvidia driver; says which and why."""


@dataclass(frozen=True, slots=True)
class Tools:
    """Where NVML and nvidia-smi are. ``nvml_library`` ``None``: the loader's search."""

    nvml_library: Path | None = None
    nvidia_smi: str = "nvidia-smi"
    use_nvml: bool = True  # False on a simulated node: NVML would describe the real GPUs


def find_tools(driver_root: Path | None, nvml_library: str | None, nvidia_smi: str | None) -> Tools:
    """The NVML library and nvidia-smi to use: the flags, else found under
    ``driver_root``, else the system's own (``libnvidia-ml.so.1`` through the loader,
    ``nvidia-smi`` on PATH)."""
    library = Path(nvml_library) if nvml_library else None
    program = Path(nvidia_smi) if nvidia_smi else None
    if driver_root is not None:
        library = library or _first_file(driver_root, _LIBRARY_DIRS, NVML_SONAME)
        program = program or _first_file(driver_root, _BIN_DIRS, "nvidia-smi")
    return Tools(library, str(program) if program else "nvidia-smi")


def _first_file(root: Path, directories: Sequence[str], name: str) -> Path | None:
    return next((root / d / name for d in directories if (root / d / name).exists()), None)


def run_nvidia_smi(tools: Tools, timeout: float = NVIDIA_SMI_TIMEOUT_S) -> str:
    """``nvidia-smi -q``'s output, bounded in time and size (no shell).

    Errors: :class:`DiscoveryError` when the program is missing, runs over ``timeout``,
    prints more than :data:`MAX_SMI_OUTPUT_BYTES`, or exits non-zero (its message kept).
    """
    with tempfile.TemporaryDirectory(prefix="nvswitch-dp-nvml-") as only_nvml:
        env = dict(os.environ)
        if tools.nvml_library is not None:
            # Only NVML joins the program's library path, never the host's whole library
            # directory: the host's libc would replace this container's.
            (Path(only_nvml) / NVML_SONAME).symlink_to(tools.nvml_library)
            env["LD_LIBRARY_PATH"] = only_nvml
        return _run_bounded(tools.nvidia_smi, env, timeout)


def _run_bounded(program: str, env: Mapping[str, str], timeout: float) -> str:
    try:
        process = subprocess.Popen(
            [program, "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except OSError as exc:
        raise DiscoveryError(f"cannot run {program}: {exc.strerror or exc}") from None
    assert process.stdout is not None
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout
    problem = None
    # Not ``with process``: Popen's exit waits for the child without a bound, and a child
    # stuck in the driver (a wedged GPU) outlives even SIGKILL.
    with process.stdout, selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"{program} -q ran over {timeout:g} s"
                break
            if not selector.select(left):
                continue
            chunk = os.read(process.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SMI_OUTPUT_BYTES:
                problem = f"{program} -q printed more than {MAX_SMI_OUTPUT_BYTES} bytes"
                break
        if problem is None:
            try:  # it closed its output: it still gets only what is left of the deadline
                status = process.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                problem = f"{program} -q ran over {timeout:g} s"
        if problem is not None:
            process.kill()
            try:  # a process in uninterruptible sleep (a wedged GPU) outlives SIGKILL
                process.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                problem += f"; it did not exit after SIGKILL (pid {process.pid} left behind)"
    if problem is not None:
        raise DiscoveryError(problem)
    text = b"".join(chunks).decode(errors="replace")
    if status != 0:
        said = " ".join(text.split())[:300]
        raise DiscoveryError(f"{program} -q exited {status}: {said}")
    return text


def read_identities(tools: Tools, say: _Say) -> tuple[GpuIdentity, ...]:
    """Every GPU the driver reports: NVML, else ``nvidia-smi -q``.

    Errors: :class:`DiscoveryError` naming both causes when neither answers.
    """
    if not tools.use_nvml:
        say(f"simulated node: NVML not asked; reading `{tools.nvidia_smi} -q`")
    else:
        try:
            identities = _with_deadline(
                lambda: read_identities_nvml(tools.nvml_library), NVML_TIMEOUT_S
            )
        except NvmlUnavailable as exc:
            say(f"NVML unavailable ({exc}); reading `{tools.nvidia_smi} -q` instead")
        else:
            say(f"modules read with NVML for {len(identities)} GPU(s)")
            return identities
    try:
        identities = parse_nvidia_smi_q(run_nvidia_smi(tools))
    except (DiscoveryError, IdentityError) as exc:
        raise DiscoveryError(f"neither NVML nor nvidia-smi answered: {exc}") from None
    say(f"modules read with {tools.nvidia_smi} -q for {len(identities)} GPU(s)")
    return identities


def _with_deadline(
    call: Callable[[], tuple[GpuIdentity, ...]], timeout: float
) -> tuple[GpuIdentity, ...]:
    """``call()`` in a daemon thread, given up after ``timeout`` seconds.

    NVML's calls block in the driver and cannot be interrupted; a wedged GPU must not
    hang the node's start. A thread given up on is left to finish or to die with the
    process (a daemon thread does not hold the exit). Errors: what ``call`` raises, or
    :class:`~nvswitch_dp.vfio.nvml.NvmlUnavailable` after ``timeout``.
    """
    result: list[tuple[GpuIdentity, ...]] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # carried to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="nvml", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NvmlUnavailable(f"NVML did not answer within {timeout:g} s")
    if failure:
        raise failure[0]
    return result[0]


def identities_of(gpus: Sequence[PciGpu], reported: Sequence[GpuIdentity]) -> list[GpuIdentity]:
    """The identities of ``gpus`` (those on the nvidia driver), checked.

    Errors: :class:`DiscoveryError` for a GPU the driver did not report, or
    (:func:`~nvswitch_dp.vfio.identity.check_identities`) one without a module ID or two
    sharing one.
    """
    by_address = {i.address: i for i in reported}
    missing = [g.address for g in gpus if g.address not in by_address]
    if missing:
        raise DiscoveryError(
            f"GPU {', '.join(missing)} is bound to {NVIDIA_DRIVER} but the driver did not "
            "report it (fallen off the bus? `dmesg | grep -i nvrm`)"
        )
    chosen = [by_address[g.address] for g in gpus]
    try:
        check_identities(chosen)
    except IdentityError as exc:
        raise DiscoveryError(str(exc)) from None
    return chosen


class _Say:
    """Prints progress lines; remembers warnings and problems for the summary."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def __call__(self, line: str) -> None:
        print(line, flush=True)

    def warn(self, line: str) -> None:
        self.warnings.append(line)
        print(f"warning: {line}", flush=True)

    def fail(self, line: str) -> None:
        self.problems.append(line)
        print(f"problem: {line}", file=sys.stderr, flush=True)


def module_map_yaml(module_map: Mapping[int, str], source: str) -> str:
    """A ``module_map:`` block for the configuration file."""
    lines = [f"# module IDs from {source}", "module_map:"]
    lines += [f'  {m}: "{a}"' for m, a in sorted(module_map.items())]
    return "\n".join(lines) + "\n"


def _kernel_for(sysfs_root: Path) -> PciKernel | None:
    """The simulated kernel when ``sysfs_root`` is a simulated node (its marker file says
    so), else ``None``: the real sysfs."""
    from nvswitch_dp.vfio.simulate import SimulatedKernel, load_simulated_node

    node = load_simulated_node(sysfs_root)
    return None if node is None else SimulatedKernel(node)


def prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nvswitch-dp prepare-node",
        description=(
            "Read the GPUs' FM module IDs while they are on the nvidia driver, record them "
            "in the node inventory, and (with --bind-vfio) bind the GPUs to vfio-pci."
        ),
    )
    add_node_arguments(
        p, proc_help="the host's /proc (to find processes holding a GPU open); default /proc"
    )
    p.add_argument(
        "--driver-root",
        metavar="DIR",
        help="where the host's NVIDIA driver is (/ or /run/nvidia/driver, mounted): "
        "libnvidia-ml.so.1 and nvidia-smi are looked up under it",
    )
    p.add_argument("--nvml-library", metavar="PATH", help="libnvidia-ml.so.1 to load")
    p.add_argument(
        "--nvidia-smi",
        metavar="PATH",
        help="the program to run when NVML is unavailable (default: nvidia-smi on PATH)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--print-module-map",
        action="store_true",
        help="print a module_map: block for the configuration, and change nothing",
    )
    what.add_argument(
        "--bind-vfio",
        action="store_true",
        help="bind every configured GPU (and its IOMMU group) to vfio-pci",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (every write) and change nothing"
    )
    p.add_argument(
        "--allow-refused",
        action="store_true",
        help="exit 0 when the only problems are GPUs refused (in use, no IOMMU group, "
        "sharing a group with host devices): each is named, every other GPU is ready, and "
        "the daemon serves those (an init container must not take the node down for one GPU)",
    )
    return p


def prepare_main(argv: list[str] | None = None) -> int:
    """``nvswitch-dp prepare-node``: returns the exit status (module docstring)."""
    args = prepare_parser().parse_args(argv)
    try:
        config = load_node_config(args)
    except (ConfigError, OSError) as exc:
        return _configuration_error(exc)
    paths = node_paths(args, config)
    tools = find_tools(
        Path(args.driver_root) if args.driver_root else None, args.nvml_library, args.nvidia_smi
    )
    simulated_kernel = _kernel_for(paths.sysfs)
    if simulated_kernel is not None:
        tools = dataclasses.replace(tools, use_nvml=False)
    say = _Say()
    try:
        gpus = discover_gpus(paths.sysfs, paths.dev, config.vfio.gpu_device_ids)
    except ValueError as exc:
        return _configuration_error(exc)
    if not gpus:
        ids = ", ".join(sorted(config.vfio.gpu_device_ids))
        say.fail(f"no PCI device with a configured GPU ID ({ids}) under {paths.sysfs}")
        return EXIT_PROBLEM
    _say_found(gpus, say)
    known = _read_inventory(gpus, paths.inventory, tools, say)
    if known is None:
        return EXIT_PROBLEM
    old, inventory, minors = known
    present = {g.address: g.key for g in gpus}
    for line in resolve_module_map(config.module_map, inventory, present).problems:
        say.warn(line)
    if args.print_module_map:
        sys.stdout.write(_module_map_block(inventory, config.module_map, paths.inventory))
        return EXIT_PROBLEM if say.problems else EXIT_OK
    if not _record_inventory(old, inventory, paths.inventory, dry_run=args.dry_run, say=say):
        return EXIT_PROBLEM
    if args.bind_vfio:
        kernel = simulated_kernel or SysfsKernel()
        refused = _bind(gpus, paths, kernel, minors, dry_run=args.dry_run, say=say)
        if refused and args.allow_refused and len(say.problems) == len(refused):
            say(
                f"--allow-refused: {len(refused)} GPU(s) left where they are "
                f"({', '.join(refused)}); the daemon reports them unusable and serves the rest"
            )
            return EXIT_OK
    return EXIT_PROBLEM if say.problems else EXIT_OK


def _configuration_error(exc: Exception) -> int:
    print(f"nvswitch-dp prepare-node: configuration error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def _say_found(gpus: Sequence[PciGpu], say: _Say) -> None:
    """One line: how many GPUs of which models, and how many on each driver."""
    on_nvidia = sum(g.driver == NVIDIA_DRIVER for g in gpus)
    models = ", ".join(sorted({f"{g.key} {g.name}" for g in gpus}))
    say(
        f"{len(gpus)} GPU(s) ({models}): {on_nvidia} on {NVIDIA_DRIVER}, "
        f"{sum(g.driver == VFIO_DRIVER for g in gpus)} on {VFIO_DRIVER}"
    )


def _read_inventory(
    gpus: Sequence[PciGpu], path: Path, tools: Tools, say: _Say
) -> tuple[NodeInventory | None, NodeInventory, dict[str, int]] | None:
    """The inventory on disk (``None``: none, or a damaged one every GPU can rebuild), the
    inventory with what the driver reports now merged in, and the reported device minors
    (:func:`_discover`); ``None`` after a failure (said)."""
    on_nvidia = [g for g in gpus if g.driver == NVIDIA_DRIVER]
    try:
        old = load_inventory(path)
    except (InventoryFileError, OSError) as exc:
        if len(on_nvidia) < len(gpus):
            say.fail(str(exc))
            return None
        # Every GPU is on nvidia: the driver can tell every module again, so nothing the
        # damaged file held is lost by writing it anew.
        say.warn(f"{exc}; every GPU is on {NVIDIA_DRIVER}, so it is written anew")
        old = None
    discovered = _discover(on_nvidia, old, tools, say)
    if discovered is None:
        return None
    inventory, minors = discovered
    return old, inventory, minors


def _module_map_block(
    inventory: NodeInventory, configured: Mapping[int, str], inventory_path: Path
) -> str:
    """``--print-module-map``: the inventory's module map, else the configuration's."""
    if inventory.gpus:
        source = f"the node inventory {inventory_path}, as the NVIDIA driver reported them"
        return module_map_yaml(inventory.module_map(), source)
    return module_map_yaml(configured, "the configuration (no node inventory)")


def _record_inventory(
    old: NodeInventory | None, inventory: NodeInventory, path: Path, *, dry_run: bool, say: _Say
) -> bool:
    """Write ``inventory`` to ``path`` when it differs from ``old`` (``dry_run``: say that it
    would); ``False`` when the write failed (said)."""
    if inventory == old:
        say(f"{path}: unchanged ({len(inventory.gpus)} GPU(s))")
    elif dry_run:
        say(f"would write {path}")
    else:
        try:
            save_inventory(path, inventory)
        except OSError as exc:
            say.fail(f"cannot write {path}: {exc}")
            return False
        say(f"wrote {path} ({len(inventory.gpus)} GPU(s))")
    return True


def _discover(
    on_nvidia: Sequence[PciGpu], old: NodeInventory | None, tools: Tools, say: _Say
) -> tuple[NodeInventory, dict[str, int]] | None:
    """The inventory with what the driver reports now merged in, and the device minors
    the driver reported (address -> N of ``/dev/nvidia<N>``); ``None`` after a failure
    (said). GPUs on vfio-pci keep their entries."""
    if not on_nvidia:
        say(f"no GPU on {NVIDIA_DRIVER}: nothing to read, the inventory stays as it is")
        return old or NodeInventory(), {}
    try:
        found = identities_of(on_nvidia, read_identities(tools, say))
        merge = merge_discovered(old, found, {g.address: g.key for g in on_nvidia})
    except (DiscoveryError, InventoryConflict) as exc:
        say.fail(str(exc))
        return None
    for identity in sorted(found, key=lambda i: i.module_id or 0):
        say(f"  module {identity.module_id}: {identity.address} {identity.uuid or ''}")
    for change in merge.changes:
        say(f"  inventory: {change}")
    minors = {i.address: i.minor for i in found if i.minor is not None}
    return merge.inventory, minors


def _bind(
    gpus: Sequence[PciGpu],
    paths: NodePaths,
    kernel: PciKernel,
    reported_minors: Mapping[str, int],
    *,
    dry_run: bool,
    say: _Say,
) -> tuple[str, ...]:
    """Plan, check and (unless ``dry_run``) make the moves; verify the GPUs after.
    Returns the GPUs the plan refused (each said as a problem).

    GPUs in use are refused (:func:`_held_gpus`).
    """
    sysfs = paths.sysfs
    held = _held_gpus(gpus, paths.proc, reported_minors)
    plan: BindPlan = plan_binding(
        sysfs, read_group_states(sysfs, gpus), missing_vfio_modules(sysfs), held
    )
    for refusal in plan.refusals:
        say.fail(refusal)
    if plan.changes_nothing:
        say(f"nothing to bind: {plan.already} GPU(s) on {VFIO_DRIVER} already")
    elif dry_run:
        _say_plan(plan, say)
        return plan.refused
    else:
        failure = execute_plan(plan, kernel, sysfs, say)
        if failure is not None:
            say.fail(failure)
            return plan.refused
    unusable = [
        p
        for g in gpus
        if g.address not in plan.refused and (p := vfio_problem(sysfs, paths.dev, g.address))
    ]
    for problem in unusable:
        say.fail(problem)
    if not unusable and not plan.refusals:
        say(f"every GPU is on {VFIO_DRIVER} with a viable IOMMU group")
    return plan.refused


def _held_gpus(
    gpus: Sequence[PciGpu], proc: Path, reported_minors: Mapping[str, int]
) -> dict[str, str]:
    """GPU address -> why it counts as in use, for the GPUs on nvidia that do.

    Whether a GPU is in use is read from ``<proc>/*/fd`` for its ``/dev/nvidia<minor>``:
    the minor from the driver's ``/proc/driver/nvidia`` entry, else as the driver reported
    it at discovery; a GPU whose minor is unknown counts as held (never guessed free), and
    so does one when some process's open files cannot be read. A process that opens the
    GPU between this scan and the unbind is not seen: the kernel's unbind then waits for
    it to close the device.
    """
    minors: dict[str, int] = {}
    held: dict[str, str] = {}
    for g in gpus:
        if g.driver != NVIDIA_DRIVER:
            continue
        minor = read_device_minor(proc, g.address)
        minor = minor if minor is not None else reported_minors.get(g.address)
        if minor is None:
            held[g.address] = (
                f"cannot tell whether it is in use: no /proc/driver/nvidia/gpus/{g.address} "
                f"under {proc} and no minor number from the driver (pass the host's /proc "
                "as --proc-root)"
            )
        else:
            minors[g.address] = minor
    if minors:
        scan = find_open_holders(proc, {f"/dev/nvidia{m}" for m in minors.values()})
        for address, minor in minors.items():
            holders = scan.holders.get(f"/dev/nvidia{minor}")
            if holders:
                held[address] = f"/dev/nvidia{minor} is open in {', '.join(holders)}"
            elif scan.unreadable:
                held[address] = (
                    f"cannot tell: the open files of {scan.unreadable} process(es) under "
                    f"{proc} are unreadable (run as root with CAP_SYS_PTRACE and the host's "
                    "/proc as --proc-root)"
                )
    return held


def _say_plan(plan: BindPlan, say: _Say) -> None:
    """``--dry-run``: every module load and write the plan would make, in order."""
    say("would do, in this order:")
    for module in plan.modules:
        say(f"  modprobe {module}")
    for move in plan.moves:
        source = move.from_driver or "no driver"
        say(f"  {move.address}: {source} -> {VFIO_DRIVER} ({move.reason})")
        for write in move.writes:
            say(f"    {write.shell()}")
