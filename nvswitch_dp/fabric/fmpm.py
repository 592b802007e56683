"""The ``fmpm`` backend: Fabric Manager through NVIDIA's partition-manager program.

One ``fmpm`` process per operation, started with an argument list (never a shell). What
the public tool (NVIDIA/Fabric-Manager-Client ``fmpm.cpp``, version 1.0.1) does, and so
what this module relies on:

* ``-l`` prints ``fmFabricPartitionList_t`` as JsonCpp "styled" JSON on stdout
  (:func:`parse_partition_list` reads it, strictly);
* a failed FM call prints ``Failed to <operation>. fmReturn: <N>`` on **stdout** and the
  program exits with N, so a negative ``fmReturn_t`` arrives as exit status ``256 + N``
  (IN_USE, -7, exits 249); a failed connect prints ``Failed to connect to Fabric Manager
  instance.`` without the number, so the exit status is the only source of the code
  (:func:`parse_failure` reads both);
* ``--hostname`` is always passed: the plugin's endpoint is a TCP address;
* ``--set-activated-list`` takes ``1,2,3``: sorted, unique, no spaces (a duplicate made the
  tool's parser spin forever). The empty list is an empty argument: the tool splits it
  with ``strtok``, finds no token and sends ``numPartitions = 0``, which is what FM's
  header asks for when nothing is active.

The parsing functions are pure and tested on literal output; :class:`FmpmFabricManager`
is the I/O around them.

A daemon killed with SIGKILL cannot kill its ``fmpm`` children, and they finish their
operation after it is gone (an ``fmpm -a`` turning a partition active behind the next
daemon's back). So each run is written down in a :class:`ProcessLedger` under the
daemon's state directory while it runs, and the next daemon kills whatever its
predecessor left running before its own first FM call. ``PR_SET_PDEATHSIG`` is not used:
Trio starts processes from a worker thread, the signal follows the death of that
*thread*, and Trio's idle worker threads exit after 10 s, which would kill a slow but
healthy ``fmpm`` run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from nvswitch_dp.fabric.types import (
    FabricManagerError,
    FmGpu,
    FmInUse,
    FmPartition,
    FmReport,
    FmReturn,
    FmTimeout,
    FmUninitialized,
    activated_list_argument,
    error_for,
)

log = logging.getLogger(__name__)

FAILURE_RE = re.compile(r"Failed to (?P<op>[^.\n]*)\.(?: fmReturn: (?P<code>-?\d+))?")

# Exit statuses that stand for a negative fmReturn_t (status = code & 0xff). Headers define
# codes down to -29; anything from -64 up is taken as an FM code, everything else
# (1 = usage error, 128+n from a wrapper shell) is not.
_FM_STATUS_MIN = 256 - 64


class FmpmError(FabricManagerError):
    """``fmpm`` itself failed: not found, not runnable, killed, or answered nonsense.

    Carries GENERIC_ERROR (not transient: retrying does not fix a missing program or a
    malformed answer).
    """

    code = FmReturn.GENERIC_ERROR


class FmpmOutputError(FmpmError):
    """``fmpm -l`` printed something that is not the partition list; names the field."""


@dataclass(frozen=True, slots=True)
class ProcessResult:
    """What one ``fmpm`` run left behind."""

    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str]], Awaitable[ProcessResult]]


# --- pure parsing -------------------------------------------------------------------------


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise FmpmOutputError("list partitions", f"fmpm -l output: {where}.{key} is missing")
    return obj[key]


def _uint(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = _field(obj, key, where)
    # bool is an int in Python; fmpm prints unsigned ints, never true/false.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FmpmOutputError(
            "list partitions",
            f"fmpm -l output: {where}.{key} is {value!r}, not an unsigned integer",
        )
    return value


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _field(obj, key, where)
    if not isinstance(value, str):
        raise FmpmOutputError(
            "list partitions", f"fmpm -l output: {where}.{key} is {value!r}, not a string"
        )
    return value


def _list(obj: Mapping[str, Any], key: str, where: str, count: int) -> list[Any]:
    value = _field(obj, key, where)
    if not isinstance(value, list):
        raise FmpmOutputError("list partitions", f"fmpm -l output: {where}.{key} is not an array")
    if len(value) != count:
        raise FmpmOutputError(
            "list partitions",
            f"fmpm -l output: {where}.{key} has {len(value)} entries but the count says {count}",
        )
    return value


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FmpmOutputError("list partitions", f"fmpm -l output: {where} is not an object")
    return value


def parse_partition_list(text: str) -> FmReport:
    """The :class:`FmReport` in ``fmpm -l`` output. Pure.

    Strict about what the plugin uses: every field must be there with its type
    (``isActive`` an integer 0/1, counts equal to array lengths); keys FM may add later are
    ignored. Errors: :class:`FmpmOutputError` naming the offending field.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FmpmOutputError(
            "list partitions", f"fmpm -l output is not JSON ({exc}): {text[:200]!r}"
        ) from None
    top = _object(data, "top level")
    _uint(top, "version", "top")
    max_partitions = _uint(top, "maxNumPartitions", "top")
    count = _uint(top, "numPartitions", "top")
    partitions = []
    for i, raw in enumerate(_list(top, "partitionInfo", "top", count)):
        where = f"partitionInfo[{i}]"
        part = _object(raw, where)
        pid = _uint(part, "partitionId", where)
        active = _uint(part, "isActive", where)
        if active not in (0, 1):
            raise FmpmOutputError(
                "list partitions", f"fmpm -l output: {where}.isActive is {active}, not 0 or 1"
            )
        gpus = []
        for j, raw_gpu in enumerate(_list(part, "gpuInfo", where, _uint(part, "numGpus", where))):
            gwhere = f"{where}.gpuInfo[{j}]"
            gpu = _object(raw_gpu, gwhere)
            gpus.append(
                FmGpu(
                    physical_id=_uint(gpu, "physicalId", gwhere),
                    max_nvlinks=_uint(gpu, "maxNumNvLinks", gwhere),
                    nvlinks_available=_uint(gpu, "numNvLinksAvailable", gwhere),
                    nvlink_line_rate_mbps=_uint(gpu, "nvlinkLineRateMBps", gwhere),
                    pci_bus_id=_str(gpu, "pciBusId", gwhere),
                    uuid=_str(gpu, "uuid", gwhere),
                )
            )
        partitions.append(FmPartition(pid, bool(active), tuple(gpus)))
    ids = [p.partition_id for p in partitions]
    if len(set(ids)) != len(ids):
        raise FmpmOutputError("list partitions", f"fmpm -l output: duplicate partitionId in {ids}")
    return FmReport(tuple(partitions), max_partitions=max_partitions)


def fm_code_from_status(returncode: int) -> int | None:
    """The ``fmReturn_t`` an ``fmpm`` exit status stands for, or None if it stands for none.

    ``fmpm`` returns the (negative) code from ``main``; the kernel keeps its low byte.
    0 is SUCCESS; statuses 1..191 are not FM codes (1: usage error); a negative
    ``returncode`` is a signal (Python's convention), not an FM code.
    """
    if returncode == 0:
        return FmReturn.SUCCESS
    if _FM_STATUS_MIN <= returncode <= 255:
        return returncode - 256
    return None


def parse_failure(operation: str, result: ProcessResult) -> FabricManagerError:
    """The typed error for a failed ``fmpm`` run (``result.returncode != 0``). Pure.

    The number after ``fmReturn:`` on stdout is FM's own code and wins; without it
    (connect or library-init failure, ``Invalid Partition ID.``) the exit status gives it.
    A run that gives no FM code at all is an :class:`FmpmError`.
    """
    out = result.stdout.strip()
    err = result.stderr.strip()
    detail = "; ".join(s for s in (out, err) if s) or f"fmpm exited with {result.returncode}"
    match = FAILURE_RE.search(result.stdout)
    if match and match.group("code") is not None:
        return error_for(int(match.group("code")), operation, detail)
    if result.returncode < 0:
        return FmpmError(operation, f"fmpm was killed by signal {-result.returncode}: {detail}")
    code = fm_code_from_status(result.returncode)
    if code is None or code == FmReturn.SUCCESS:
        return FmpmError(operation, f"fmpm exited with status {result.returncode}: {detail}")
    return error_for(code, operation, detail)


def command_line(
    command: Sequence[str], endpoint: str, operation: str, partition_ids: Sequence[int] = ()
) -> list[str]:
    """The argument list for one ``fmpm`` run. Pure.

    ``operation`` is ``list``, ``activate``, ``deactivate`` or ``set-activated``.
    Errors: ``ValueError`` for an unknown operation or a partition ID fmpm cannot take.
    """
    for pid in partition_ids:
        if not 0 <= pid < 64:
            raise ValueError(f"partition ID {pid} is outside FM's range 0..63")
    argv = [*command, "--hostname", endpoint]
    if operation == "list":
        return [*argv, "-l"]
    if operation in ("activate", "deactivate"):
        (pid,) = partition_ids
        return [*argv, "-a" if operation == "activate" else "-d", str(pid)]
    if operation == "set-activated":
        # An empty argument is an empty list to fmpm (strtok finds no token).
        ids = ",".join(str(p) for p in activated_list_argument(partition_ids))
        return [*argv, "--set-activated-list", ids]
    raise ValueError(f"unknown fmpm operation {operation!r}")


# --- processes a killed daemon left behind ------------------------------------------------

LEDGER_DIRECTORY = "fmpm-processes"  # under the daemon's state directory
LEFTOVER_EXIT_DEADLINE_S = 2.0  # a SIGKILLed leftover is gone well before this


def process_identity(pid: int, proc: Path = Path("/proc")) -> str | None:
    """``<boot ID>/<start time>`` of process ``pid``: unique for as long as the machine
    runs and across reboots, unlike the PID. None when it is gone, a zombie, or there is
    no ``/proc`` (then nothing is recorded)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        boot_id = (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return None
    # Field 2 (the command) may hold spaces and parentheses: split after the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return f"{boot_id}/{fields[19]}"


class ProcessLedger:
    """The ``fmpm`` processes this daemon runs, one file each under ``directory``.

    A file is named by the PID and holds the process's :func:`process_identity`, its
    owner's identity (the daemon that started it) and its argv. :meth:`record` writes it
    once the process runs, :meth:`forget` removes it once the process has been reaped, so
    after a SIGKILL of the daemon exactly the runs in flight are left.
    :meth:`kill_leftovers` (the next daemon, before its first FM call) kills each one that
    is still that very process and was not started by this daemon.

    Ownership: the files under ``directory``; the directory is created on the first
    record. Errors: ``OSError`` from :meth:`record` when the directory cannot be written
    (the caller logs it and runs ``fmpm`` anyway); the others log and carry on, as a
    leftover that cannot be killed must not stop the daemon.
    """

    def __init__(self, directory: Path, *, proc: Path = Path("/proc")) -> None:
        self.directory = directory
        self._proc = proc
        self._owner: str | None = None

    def _owner_identity(self) -> str | None:
        if self._owner is None:
            self._owner = process_identity(os.getpid(), self._proc)
        return self._owner

    def record(self, pid: int, argv: Sequence[str]) -> None:
        identity = process_identity(pid, self._proc)
        if identity is None:
            return  # already gone (or no /proc): nothing can be left of it
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = {"identity": identity, "owner": self._owner_identity(), "argv": list(argv)}
        path = self.directory / str(pid)
        staging = path.with_name(f".{pid}.tmp")
        staging.write_text(json.dumps(entry))
        staging.replace(path)  # whole or absent, even if we are killed while writing

    def forget(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / str(pid)).unlink()

    def leftovers(self) -> dict[int, list[str]]:
        """Recorded processes of another daemon that still run: PID -> argv. Records of
        processes that are gone (or whose PID now names another process) are removed."""
        found: dict[int, list[str]] = {}
        try:
            paths = list(self.directory.iterdir())
        except FileNotFoundError:
            return found
        except OSError as exc:
            log.warning("cannot read %s: %s", self.directory, exc)
            return found
        for path in paths:
            if not path.name.isdigit():
                with contextlib.suppress(OSError):
                    path.unlink()  # a record cut short while being written
                continue
            pid = int(path.name)
            try:
                entry = json.loads(path.read_text())
                identity, owner, argv = entry["identity"], entry["owner"], entry["argv"]
            except (OSError, ValueError, KeyError, TypeError):
                identity = owner = argv = None
            if owner is not None and owner == self._owner_identity():
                continue  # our own run, in flight right now
            if identity is not None and process_identity(pid, self._proc) == identity:
                found[pid] = [str(a) for a in argv] if isinstance(argv, list) else []
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        return found

    async def kill_leftovers(self, deadline: float = LEFTOVER_EXIT_DEADLINE_S) -> list[int]:
        """SIGKILL every :meth:`leftovers` process, wait (up to ``deadline`` seconds) for
        them to be gone, remove their records; the PIDs killed."""
        killed = []
        for pid, argv in sorted(self.leftovers().items()):
            if _kill_if_same(pid, (self.directory / str(pid)), self._proc):
                log.warning(
                    "killed fmpm process %d, left running by a daemon that was killed: %s",
                    pid,
                    " ".join(argv),
                )
                killed.append(pid)
        with trio.move_on_after(deadline) as scope:
            # Not our children: nothing tells us of their end, so look.
            while any(process_identity(p, self._proc) is not None for p in killed):  # noqa: ASYNC110
                await trio.sleep(0.02)
        if scope.cancelled_caught:
            log.warning("fmpm processes %s still exist after SIGKILL", killed)
        for pid in killed:
            self.forget(pid)
        return killed


def _kill_if_same(pid: int, record: Path, proc: Path) -> bool:
    """SIGKILL ``pid`` if it is still the process ``record`` names; True if signalled.

    Through a pidfd where the kernel has them: the identity is checked on the pidfd's
    process, so a PID reused between the check and the signal is never hit.
    """
    try:
        identity = json.loads(record.read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfds here: check, then signal by PID
        pidfd = None
    try:
        if process_identity(pid, proc) != identity:
            return False
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    except OSError as exc:
        log.warning("cannot kill leftover fmpm process %d: %s", pid, exc)
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


# --- I/O --------------------------------------------------------------------------------


async def run_fmpm(argv: Sequence[str], ledger: ProcessLedger | None = None) -> ProcessResult:
    """Run ``argv`` (no shell) and capture its output; kill it at once when cancelled.

    With a ``ledger``, the process is recorded there while it runs (see
    :class:`ProcessLedger`). Errors: :class:`FmpmError` if the program cannot be started
    (missing, not executable, or the process is out of descriptors, memory or PIDs).
    """

    async def kill(process: trio.Process) -> None:
        # fmpm holds no state worth a graceful exit: FM finishes the operation either way.
        process.kill()

    done: list[Any] = []

    async def run(*, task_status: trio.TaskStatus[trio.Process]) -> None:
        done.append(
            await trio.run_process(
                list(argv),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                deliver_cancel=kill,
                task_status=task_status,
            )
        )

    pid: int | None = None
    not_started: OSError | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                process: trio.Process = await nursery.start(run)
            except OSError as exc:  # not found, not executable, out of fds/memory/pids
                not_started = exc  # raised below, not as the nursery's ExceptionGroup
            else:
                if ledger is not None:
                    # No checkpoint since the start: a cancellation cannot come in between.
                    pid = process.pid
                    try:
                        ledger.record(pid, argv)
                    except OSError as exc:
                        log.warning("cannot record fmpm process %d: %s", pid, exc)
    finally:
        # run_process returns (or raises) only once the process has been reaped.
        if ledger is not None and pid is not None:
            ledger.forget(pid)
    if isinstance(not_started, FileNotFoundError):
        raise FmpmError("run fmpm", f"program {argv[0]!r} not found (set fabric_manager.fmpm_path)")
    if isinstance(not_started, PermissionError):
        raise FmpmError("run fmpm", f"program {argv[0]!r} is not executable")
    if not_started is not None:
        # EMFILE, ENFILE, EAGAIN, ENOMEM: the process never ran, so FM did nothing; the
        # call fails (and is retried by whoever asked), with no traceback per attempt.
        raise FmpmError("run fmpm", f"cannot start {argv[0]!r}: {not_started.strerror}")
    proc = done[0]
    return ProcessResult(
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )


class FmpmFabricManager:
    """The ``fmpm`` FM backend (implements ``FabricManagerClient``).

    ``command`` is the program's argv prefix (``["/usr/bin/fmpm"]``, or
    ``[sys.executable, "-m", "nvswitch_dp.fabric.fmpm_sim", "--state-file", F]`` in tests);
    ``endpoint`` FM's TCP address; ``timeout`` seconds per run (the process is killed
    after it); ``retries`` further attempts for transient codes (TIMEOUT,
    CONNECTION_NOT_VALID, NOT_CONFIGURED) with exponential backoff from ``backoff``
    seconds up to ``backoff_max``. ``runner`` replaces the process runner (tests).
    ``state_dir``: the daemon's state directory; each running ``fmpm`` process is
    recorded under ``<state_dir>/fmpm-processes`` and the first call kills what a killed
    predecessor left running there (:class:`ProcessLedger`). None: nothing recorded.

    Ownership: owns no long-lived resource; each call starts and reaps its own process,
    and the first call kills the leftovers of a killed daemon with the same state dir.
    Errors: FM's typed errors from :func:`parse_failure` (IN_USE and BADPARAM are never
    retried); :class:`~nvswitch_dp.fabric.types.FmTimeout` when a run outlasts
    ``timeout`` (after retries); :class:`FmpmError` for a missing program or a malformed
    answer. An activate that is retried after a timeout and then finds its partition
    already active counts as done (FM did it on the first attempt); likewise a retried
    deactivate that finds the partition inactive.
    """

    name = "fmpm"

    def __init__(
        self,
        command: Sequence[str] = ("fmpm",),
        endpoint: str = "127.0.0.1",
        timeout: float = 10.0,
        retries: int = 2,
        *,
        backoff: float = 0.2,
        backoff_max: float = 5.0,
        runner: Runner | None = None,
        state_dir: Path | None = None,
    ) -> None:
        if not command:
            raise ValueError("fmpm command is empty")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"fmpm timeout must be a positive number of seconds, not {timeout}")
        if retries < 0:
            raise ValueError(f"fmpm retries must be >= 0, not {retries}")
        self.command = list(command)
        self.endpoint = endpoint or "127.0.0.1"
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.ledger = ProcessLedger(state_dir / LEDGER_DIRECTORY) if state_dir else None
        self._run = runner or functools.partial(run_fmpm, ledger=self.ledger)
        self._leftovers_done: trio.Event | None = None

    async def kill_leftovers(self) -> list[int]:
        """Kill the ``fmpm`` runs a killed daemon left: once, in the first call; calls
        made meanwhile wait for it. The PIDs killed."""
        if self.ledger is None:
            return []
        if self._leftovers_done is not None:
            await self._leftovers_done.wait()
            return []
        self._leftovers_done = trio.Event()
        try:
            return await self.ledger.kill_leftovers()
        finally:
            self._leftovers_done.set()

    async def _call(self, operation: str, what: str, ids: Sequence[int] = ()) -> ProcessResult:
        """One operation with timeout and retries; returns the successful run."""
        argv = command_line(self.command, self.endpoint, operation, ids)
        # Before anything of ours reaches FM: a leftover finishing later would change FM
        # behind our back.
        await self.kill_leftovers()
        delay = self.backoff
        attempt = 0
        while True:
            # Stays the answer unless the run finishes inside the timeout.
            error: FabricManagerError = FmTimeout(
                what, f"fmpm did not answer within {self.timeout:g}s"
            )
            with trio.move_on_after(self.timeout):
                result = await self._run(argv)
                if result.returncode == 0:
                    return result
                error = parse_failure(what, result)
            if attempt > 0 and await self._already_done(operation, ids, error):
                return ProcessResult(0, "", "")
            if not error.transient or attempt >= self.retries:
                raise error
            attempt += 1
            log.warning(
                "fmpm %s failed (%s); retry %d/%d in %.2fs",
                what,
                error.code_name,
                attempt,
                self.retries,
                delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def _already_done(
        self, operation: str, ids: Sequence[int], error: FabricManagerError
    ) -> bool:
        """After a retry: did an earlier attempt, cut off by a timeout, do the job?"""
        if operation == "activate" and isinstance(error, FmInUse):
            want = True
        elif operation == "deactivate" and isinstance(error, FmUninitialized):
            want = False
        else:
            return False
        try:
            report = await self.list_partitions()
        except FabricManagerError:
            return False
        return (ids[0] in report.active_ids) is want

    async def list_partitions(self) -> FmReport:
        result = await self._call("list", "list partitions")
        return parse_partition_list(result.stdout)

    async def activate(self, partition_id: int) -> None:
        await self._call("activate", f"activate partition {partition_id}", [partition_id])

    async def deactivate(self, partition_id: int) -> None:
        await self._call("deactivate", f"deactivate partition {partition_id}", [partition_id])

    async def set_activated(self, partition_ids: Sequence[int]) -> None:
        await self._call("set-activated", "set activated partitions", partition_ids)
