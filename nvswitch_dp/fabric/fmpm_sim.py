"""A fake ``fmpm``: NVIDIA's partition-manager program, answering from the FM simulator.

    python -m nvswitch_dp.fabric.fmpm_sim [--state-file F] [--hostname H] -l
    python -m nvswitch_dp.fabric.fmpm_sim [--state-file F] -a ID | -d ID
    python -m nvswitch_dp.fabric.fmpm_sim [--state-file F] --set-activated-list 1,2,3
    python -m nvswitch_dp.fabric.fmpm_sim [--state-file F] --get-nvlink-failed-devices
    python -m nvswitch_dp.fabric.fmpm_sim [--state-file F] --list-unsupported-partitions
    python -m nvswitch_dp.fabric.fmpm_sim --state-file F --inject SPEC [--inject SPEC ...]

It behaves as the public ``fmpm.cpp`` (NVIDIA/Fabric-Manager-Client, 1.0.1) does: the same
flags and argument checks, JSON printed as JsonCpp's ``StyledWriter`` prints it (3-space
indent, ``" : "``, keys in byte order, short scalar arrays on one line, a final newline),
``Failed to <operation>. fmReturn: <N>`` on stdout and exit status ``N & 0xff`` on failure,
``Failed to connect to Fabric Manager instance.`` when FM cannot be reached.

FM's state is the simulator's state file (:class:`SimulatorStore`): ``--state-file`` or
``$NVSWITCH_DP_FMPM_SIM_STATE``; the platform of a new file comes from
``$NVSWITCH_DP_FMPM_SIM_PLATFORM`` (default ``hgx-h200``). ``--inject`` is ours, not
fmpm's: it applies faults (:data:`~nvswitch_dp.fabric.simulator.FAULT_SPECS`) to the state
file and exits 0, so tests and the demo can break FM from outside. An injected activation
delay really sleeps (that is the point of it); nothing else waits.

Deliberately not copied from the tool: its ``--set-activated-list`` parser spins forever on
a duplicate ID and (in 1.0.1) never counts the IDs it parses; this fake sends the list it
was given.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nvswitch_dp.fabric.simulator import (
    FabricSimulator,
    SimulatorStore,
    inject_fault,
)
from nvswitch_dp.fabric.types import FabricManagerError, FmReport, FmReturn

VERSION = "1.0.1"
STATE_ENV = "NVSWITCH_DP_FMPM_SIM_STATE"
PLATFORM_ENV = "NVSWITCH_DP_FMPM_SIM_PLATFORM"
DEFAULT_PLATFORM = "hgx-h200"
FM_MAX_FABRIC_PARTITIONS = 64

# ``version`` fields as FM fills them: sizeof(struct) | (struct version << 24), from
# nv_fm_types.h (partition list v2 carries version number 1).
PARTITION_LIST_VERSION = 131852 | (1 << 24)
UNSUPPORTED_LIST_VERSION = 4616 | (1 << 24)
NVLINK_FAILED_VERSION = 10428 | (1 << 24)

HELP = """\
-l : List partitions
-a <Partition ID> : Activate partition
-d <Partition ID> : Deactivate partition
--hostname : hostname or IP address (TCP socket) of Fabric Manager.
     If this option is not specified, the default is 127.0.0.1
     Requires FM_CMD_BIND_INTERFACE=<IP of Fabric Manager> in Fabric Manager configuration
--unix-domain-socket : UNIX domain socket path for Fabric Manager connection
     If this option is specified, UNIX domain socket will be used instead of hostname or IP \
(TCP socket).
     Requires FM_CMD_UNIX_SOCKET_PATH=<UNIX domain socket> in Fabric manager configuration.
--get-nvlink-failed-devices : Query all NVLink failed devices
--list-unsupported-partitions : Query all unsupported fabric partitions
--set-activated-list <Partition IDs> : Set a list of currently activated fabric partitions.
     Comma separated, no space! Used for Fabric Manager Resiliency Mode.
     Requires FABRIC_MODE_RESTART=1 for Fabric Manager resiliency restart mode.
-v : Show version
(simulator only) --state-file <path> : Fabric Manager state file (or $NVSWITCH_DP_FMPM_SIM_STATE)
(simulator only) --inject <fault> : unreachable|reachable|restart|slow-activation=SECONDS|
     nvlink-error=PARTITION|degrade=MODULE:LINKS|gone=MODULE|garbled|ungarbled|clear
"""


# --- JsonCpp StyledWriter ----------------------------------------------------------------


class _StyledWriter:
    """A port of JsonCpp's ``Json::StyledWriter`` (json_writer.cpp), comments left out."""

    right_margin = 74
    indent_size = 3

    def __init__(self) -> None:
        self.doc = ""
        self.indent_string = ""
        self.child_values: list[str] = []
        self.add_child_values = False

    def write(self, root: Any) -> str:
        self.write_value(root)
        return self.doc + "\n"

    def push_value(self, text: str) -> None:
        if self.add_child_values:
            self.child_values.append(text)
        else:
            self.doc += text

    def write_indent(self) -> None:
        if self.doc:
            last = self.doc[-1]
            if last == " ":  # already indented: a value right after '"key" : '
                return
            if last != "\n":
                self.doc += "\n"
        self.doc += self.indent_string

    def write_with_indent(self, text: str) -> None:
        self.write_indent()
        self.doc += text

    def write_value(self, value: Any) -> None:
        if value is None:
            self.push_value("null")
        elif isinstance(value, bool):
            self.push_value("true" if value else "false")
        elif isinstance(value, int):
            self.push_value(str(value))
        elif isinstance(value, str):
            self.push_value(json.dumps(value))
        elif isinstance(value, list):
            self.write_array(value)
        elif isinstance(value, dict):
            if not value:
                self.push_value("{}")
                return
            self.write_with_indent("{")
            self.indent_string += " " * self.indent_size
            # Json::Value keeps members in a std::map ordered by byte comparison.
            keys = sorted(value, key=lambda k: k.encode())
            for i, key in enumerate(keys):
                self.write_with_indent(json.dumps(key))
                self.doc += " : "
                self.write_value(value[key])
                if i + 1 < len(keys):
                    self.doc += ","
            self.indent_string = self.indent_string[: -self.indent_size]
            self.write_with_indent("}")
        else:
            raise TypeError(f"cannot write {type(value).__name__} as JSON")

    def write_array(self, value: list[Any]) -> None:
        if not value:
            self.push_value("[]")
            return
        if self.is_multiline_array(value):
            self.write_with_indent("[")
            self.indent_string += " " * self.indent_size
            has_child_value = bool(self.child_values)
            for i, child in enumerate(value):
                if has_child_value:
                    self.write_with_indent(self.child_values[i])
                else:
                    self.write_indent()
                    self.write_value(child)
                if i + 1 < len(value):
                    self.doc += ","
            self.indent_string = self.indent_string[: -self.indent_size]
            self.write_with_indent("]")
        else:
            self.doc += "[ " + ", ".join(self.child_values) + " ]"

    def is_multiline_array(self, value: list[Any]) -> bool:
        multiline = len(value) * 3 >= self.right_margin
        self.child_values = []
        for child in value:
            if multiline:
                break
            multiline = isinstance(child, list | dict) and bool(child)
        if not multiline:
            self.add_child_values = True
            for child in value:
                self.write_value(child)
            self.add_child_values = False
            length = 4 + (len(value) - 1) * 2 + sum(len(c) for c in self.child_values)
            multiline = length >= self.right_margin
        return multiline


def styled_json(value: Any) -> str:
    """``value`` as ``Json::StyledWriter::write`` prints it (trailing newline included)."""
    return _StyledWriter().write(value)


# --- fmpm's answers ----------------------------------------------------------------------


def partition_list_json(report: FmReport) -> dict[str, Any]:
    """``fmFabricPartitionList_t`` as fmpm's ``listPartitions`` builds its JSON."""
    return {
        "version": PARTITION_LIST_VERSION,
        "numPartitions": len(report.partitions),
        "maxNumPartitions": report.max_partitions,
        "partitionInfo": [
            {
                "partitionId": p.partition_id,
                "isActive": int(p.is_active),
                "numGpus": len(p.gpus),
                "gpuInfo": [
                    {
                        "physicalId": g.physical_id,
                        "uuid": g.uuid,
                        "pciBusId": g.pci_bus_id,
                        "numNvLinksAvailable": g.nvlinks_available,
                        "maxNumNvLinks": g.max_nvlinks,
                        "nvlinkLineRateMBps": g.nvlink_line_rate_mbps,
                    }
                    for g in p.gpus
                ],
            }
            for p in report.partitions
        ],
    }


def unsupported_list_json(rows: Sequence[tuple[int, tuple[int, ...]]]) -> dict[str, Any]:
    return {
        "version": UNSUPPORTED_LIST_VERSION,
        "numPartitions": len(rows),
        "partitionInfo": [
            {"partitionId": pid, "numGpus": len(mods), "gpuPhysicalIds": list(mods)}
            for pid, mods in rows
        ],
    }


def nvlink_failed_json() -> dict[str, Any]:
    return {
        "version": NVLINK_FAILED_VERSION,
        "numGpus": 0,
        "numSwitches": 0,
        "gpuInfo": [],
        "switchInfo": [],
    }


# --- argument parsing, as fmpm.cpp's main() does it --------------------------------------


class _Exit(Exception):
    def __init__(self, status: int, stdout: str = "", stderr: str = "") -> None:
        super().__init__(status)
        self.status = status
        self.stdout = stdout
        self.stderr = stderr


def _stoul(text: str) -> int:
    """``std::stoul`` truncated to ``unsigned int``; a non-number aborts fmpm."""
    match = re.match(r"\s*([+-]?)(\d+)", text)
    if not match:
        raise _Exit(
            -6,
            stderr="terminate called after throwing an instance of 'std::invalid_argument'\n"
            "  what():  stoul\n",
        )
    value = int(match.group(2))
    if match.group(1) == "-":
        value = -value
    return value % (1 << 32)


def _parse_id_list(text: str) -> list[int]:
    """``parsePartitionIdlistString``: strtok on ',' then atoi, range 0..63, dups dropped."""
    ids: list[int] = []
    for token in (t for t in text.split(",") if t):
        match = re.match(r"\s*([+-]?\d+)", token)
        pid = int(match.group(1)) if match else 0
        if not 0 <= pid < FM_MAX_FABRIC_PARTITIONS:
            raise _Exit(
                FmReturn.BADPARAM & 0xFF, f"Invalid partition Id {pid % (1 << 32)} was given.\n"
            )
        if pid not in ids:
            ids.append(pid)
    return ids


class _Args:
    operation = "help"
    partition_id = 0
    ids: list[int]
    state_file: str | None = None
    injects: list[str]

    def __init__(self) -> None:
        self.ids = []
        self.injects = []


def _parse_args(argv: Sequence[str]) -> _Args:
    if not argv or list(argv) == ["-h"]:
        raise _Exit(0, HELP)
    args = _Args()
    i = 0

    def value(missing_status: int, message: str) -> str:
        nonlocal i
        if i + 1 < len(argv):
            i += 1
            return argv[i]
        raise _Exit(missing_status, stderr=message)

    while i < len(argv):
        arg = argv[i]
        if arg == "-l":
            args.operation = "list"
        elif arg == "-a":
            args.operation = "activate"
            args.partition_id = _stoul(value(1, "Error: -a option requires partition ID.\n"))
            if args.partition_id >= FM_MAX_FABRIC_PARTITIONS:
                raise _Exit(FmReturn.BADPARAM & 0xFF, "Invalid Partition ID.\n")
        elif arg == "-d":
            args.operation = "deactivate"
            args.partition_id = _stoul(
                value(FmReturn.BADPARAM & 0xFF, "Error: -d option requires partition ID.\n")
            )
        elif arg == "--set-activated-list":
            args.operation = "set-activated"
            args.ids = _parse_id_list(
                value(
                    1,
                    "Error: --set-activated-list option requires list of partition IDs.\n",
                )
            )
        elif arg == "--get-nvlink-failed-devices":
            args.operation = "nvlink-failed"
        elif arg == "--list-unsupported-partitions":
            args.operation = "unsupported"
        elif arg == "--hostname":
            value(1, "Error: --hostname option requires user specified IP or hostname.\n")
        elif arg == "--unix-domain-socket":
            value(1, "Error: --unix-domain-socket option requires user specified socket value.\n")
        elif arg == "-v":
            raise _Exit(0, VERSION + "\n")
        elif arg == "--state-file":
            args.state_file = value(2, "Error: --state-file requires a path.\n")
        elif arg == "--inject":
            args.injects.append(value(2, "Error: --inject requires a fault.\n"))
        else:
            raise _Exit(FmReturn.BADPARAM & 0xFF, stderr="Invalid argument.\n\n")
        i += 1
    return args


# --- running one operation ---------------------------------------------------------------


@contextlib.contextmanager
def state_lock(path: Path) -> Iterator[None]:
    """FM serialises its API calls; concurrent fake processes take a lock file instead
    (``<state file>.lock``; whoever changes the state file from outside takes it too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_FAILURE_TEXT = {
    "list": "get partition list",
    "activate": "activate partition",
    "deactivate": "deactivate partition",
    "set-activated": "set activated partitions",
    "nvlink-failed": "NVLink failed devices",  # sic: fmpm prints "Failed to NVLink failed devices"
    "unsupported": "list unsupported partitions",
}


def _operate(store: SimulatorStore, args: _Args) -> str:
    """Do ``args.operation`` against the state file; FM errors propagate."""
    with state_lock(store.path):
        sim = store.load()
        if args.operation == "list":
            text = styled_json(partition_list_json(sim.report()))
            if sim.faults.garbled_list:  # cut short, as a truncated pipe would leave it
                return text[: len(text) // 2]
            return text
        if args.operation == "unsupported":
            return styled_json(unsupported_list_json(sim.unsupported_partitions()))
        if args.operation == "nvlink-failed":
            sim.nvlink_failed_devices()
            return styled_json(nvlink_failed_json())
        if args.operation == "deactivate":
            sim.deactivate(args.partition_id)
        elif args.operation == "set-activated":
            sim.set_activated(args.ids)
        else:
            sim.activate(args.partition_id)
        delay = sim.faults.activation_delay_s if args.operation == "activate" else 0.0
        if not delay:
            store.save(sim)
            return ""
    # FM trains NVLinks before it answers; the partition shows active only afterwards, and
    # FM checks again then, as another client may have taken the GPUs meanwhile.
    time.sleep(delay)
    with state_lock(store.path):
        sim = store.load()
        sim.activate(args.partition_id)
        store.save(sim)
    return ""


def run(argv: Sequence[str], env: dict[str, str]) -> tuple[int, str, str]:
    """One fake fmpm run: ``(exit status, stdout, stderr)``. Touches only the state file."""
    try:
        args = _parse_args(argv)
    except _Exit as done:
        return done.status, done.stdout, done.stderr
    path = args.state_file or env.get(STATE_ENV)
    if not path:
        return (
            FmReturn.CONNECTION_NOT_VALID & 0xFF,
            "Failed to connect to Fabric Manager instance.\n",
            f"fmpm_sim: no FM state: pass --state-file or set {STATE_ENV}\n",
        )
    store = SimulatorStore(Path(path), env.get(PLATFORM_ENV, DEFAULT_PLATFORM))
    try:
        if args.injects:
            with state_lock(store.path):
                sim = store.load()
                for spec in args.injects:
                    inject_fault(sim, spec)
                store.save(sim)
            return 0, "", ""
        sim = store.load()
    except (ValueError, KeyError) as exc:
        return 2, "", f"fmpm_sim: {exc}\n"
    if _unreachable(sim):
        return (
            FmReturn.CONNECTION_NOT_VALID & 0xFF,
            "Failed to connect to Fabric Manager instance.\n",
            "",
        )
    if args.operation == "help":  # connected, nothing asked: fmpm exits 0 silently
        return 0, "", ""
    try:
        return 0, _operate(store, args), ""
    except FabricManagerError as exc:
        text = _FAILURE_TEXT[args.operation]
        return exc.code & 0xFF, f"Failed to {text}. fmReturn: {exc.code}\n", ""


def _unreachable(sim: FabricSimulator) -> bool:
    return sim.faults.unreachable or sim.gone


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``nvswitch-dp-fmpm-sim``); returns the exit status."""
    status, out, err = run(sys.argv[1:] if argv is None else argv, dict(os.environ))
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.stdout.flush()
    if status < 0:
        # fmpm died of an uncaught C++ exception (SIGABRT); a shell would show 128 + 6.
        return 128 - status
    return status


if __name__ == "__main__":
    sys.exit(main())
