"""A Fabric Manager that runs here: FM's partition rules and error codes, no hardware.

Two layers, like the rest of the project:

* :class:`FabricSimulator` is pure: a platform's table, the active set, FM's restart mode
  and injected faults, with FM's answers (return codes) to list, activate, deactivate
  and set-activated. It can be saved to and loaded from JSON.
* :class:`SimulatedFabricManager` is the backend the daemon uses: it keeps the
  simulator's state in a file (FM is a separate process whose state outlives the
  plugin), loads it before and saves it after every call, and adds the activation delay.

Rules followed (shared/reference/fabric-manager.md): activating an active partition, or
one sharing a GPU with an active partition, is IN_USE; deactivating an inactive one is
UNINITIALIZED; in restart mode list/activate/deactivate are NOT_CONFIGURED until
set-activated arrives, and if it has not arrived :data:`RESTART_WINDOW_S` after the restart
FM exits: everything is CONNECTION_NOT_VALID until FM is restarted again. Time comes from
the simulator's ``clock`` (wall clock by default, injectable for tests): the restart time is
kept in the state file, so the window runs across processes.

Faults are injected with :func:`inject_fault` from a short text spec (the fake ``fmpm``'s
``--inject`` and the demo use the same words).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from nvswitch_dp.fabric.platforms import Platform, platform
from nvswitch_dp.fabric.types import (
    FabricManagerError,
    FmBadParam,
    FmConnectionNotValid,
    FmGpu,
    FmInUse,
    FmNotConfigured,
    FmNotSupported,
    FmNvlinkError,
    FmPartition,
    FmReport,
    FmUninitialized,
)

STATE_VERSION = 1
RESTART_WINDOW_S = 60.0  # FM exits if set-activated has not come this long after --restart

Clock = Callable[[], float]


@dataclass
class Faults:
    """Faults injected by tests and the demo, kept with FM's state."""

    unreachable: bool = False
    activation_delay_s: float = 0.0
    nvlink_error_partitions: set[int] = field(default_factory=set)
    degraded_links: dict[int, int] = field(default_factory=dict)  # module -> links up
    gone_modules: set[int] = field(default_factory=set)
    # FM's list answer arrives cut short (a truncated pipe, a crashing client library):
    # fmpm prints half its JSON; the in-process simulator's list fails the same way.
    garbled_list: bool = False


@dataclass
class FabricSimulator:
    """FM's partition state machine for one platform. Pure; raises FM's typed errors."""

    platform: Platform
    active: set[int] = field(default_factory=set)
    awaiting_set_activated: bool = False
    faults: Faults = field(default_factory=Faults)
    # Wall-clock time of the last ``--restart`` (None: FM was started normally).
    restarted_at: float | None = None
    clock: Clock = field(default=time.time, compare=False, repr=False)

    def _rows(self) -> dict[int, tuple[tuple[int, ...], int]]:
        return {pid: (mods, links) for pid, mods, links in self.platform.rows}

    @property
    def gone(self) -> bool:
        """FM exited because nobody sent set-activated within the restart window."""
        return (
            self.awaiting_set_activated
            and self.restarted_at is not None
            and self.clock() - self.restarted_at > RESTART_WINDOW_S
        )

    def _check_reachable(self, operation: str) -> None:
        if self.faults.unreachable:
            raise FmConnectionNotValid(operation, "cannot connect to Fabric Manager")
        if self.gone:
            raise FmConnectionNotValid(
                operation,
                f"Fabric Manager exited: no set-activated within {RESTART_WINDOW_S:.0f}s "
                "of its restart",
            )

    def _check_configured(self, operation: str) -> None:
        if self.awaiting_set_activated:
            raise FmNotConfigured(operation, "Fabric Manager restarted; waiting for set-activated")

    def report(self) -> FmReport:
        self._check_reachable("list partitions")
        self._check_configured("list partitions")
        partitions = []
        for pid, (mods, links) in sorted(self._rows().items()):
            gpus = tuple(
                FmGpu(
                    physical_id=m,
                    max_nvlinks=links,
                    nvlinks_available=min(links, self.faults.degraded_links.get(m, links)),
                    nvlink_line_rate_mbps=self.platform.line_rate_mbps if links else 0,
                )
                for m in mods
                if m not in self.faults.gone_modules
            )
            partitions.append(FmPartition(pid, pid in self.active, gpus))
        return FmReport(tuple(partitions))

    def activate(self, partition_id: int) -> None:
        op = f"activate partition {partition_id}"
        self._check_reachable(op)
        self._check_configured(op)
        rows = self._rows()
        if partition_id not in rows:
            raise FmBadParam(op, "no such partition")
        mods = set(rows[partition_id][0])
        if partition_id in self.active:
            raise FmInUse(op, "partition is already active")
        for other in self.active:
            if mods & set(rows[other][0]):
                raise FmInUse(op, f"GPUs are in active partition {other}")
        if partition_id in self.faults.nvlink_error_partitions or mods & self.faults.gone_modules:
            raise FmNvlinkError(op, "NVLink training failed")
        self.active.add(partition_id)

    def deactivate(self, partition_id: int) -> None:
        op = f"deactivate partition {partition_id}"
        self._check_reachable(op)
        self._check_configured(op)
        if partition_id not in self._rows():
            raise FmBadParam(op, "no such partition")
        if partition_id not in self.active:
            raise FmUninitialized(op, "partition is not active")
        self.active.discard(partition_id)

    def set_activated(self, partition_ids: Sequence[int]) -> None:
        op = "set activated partitions"
        self._check_reachable(op)
        rows = self._rows()
        ids = set(partition_ids)
        unknown = ids - rows.keys()
        if unknown:
            raise FmBadParam(op, f"no such partition {min(unknown)}")
        self.active = ids
        self.awaiting_set_activated = False

    def restart(self) -> None:
        """FM restarted with ``--restart``: state kept, operations refused until set.

        Also brings back an FM that exited after a missed restart window; the window
        starts again now.
        """
        self.awaiting_set_activated = True
        self.restarted_at = self.clock()

    def unsupported_partitions(self) -> list[tuple[int, tuple[int, ...]]]:
        """``fmGetUnsupportedFabricPartitions``: always empty on H100/H200-generation boards."""
        op = "list unsupported partitions"
        self._check_reachable(op)
        self._check_configured(op)
        return []

    def nvlink_failed_devices(self) -> list[str]:
        """``fmGetNvlinkFailedDevices``: always empty on HGX H100 (NVLinks train in hardware).

        The header says the call is not supported when FM runs in ``--restart`` mode.
        """
        op = "get NVLink failed devices"
        self._check_reachable(op)
        if self.restarted_at is not None:
            raise FmNotSupported(op, "not supported in restart mode")
        return []

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "platform": self.platform.name,
            "active": sorted(self.active),
            "awaiting_set_activated": self.awaiting_set_activated,
            "restarted_at": self.restarted_at,
            "faults": {
                "unreachable": self.faults.unreachable,
                "activation_delay_s": self.faults.activation_delay_s,
                "nvlink_error_partitions": sorted(self.faults.nvlink_error_partitions),
                "degraded_links": {str(k): v for k, v in self.faults.degraded_links.items()},
                "gone_modules": sorted(self.faults.gone_modules),
                "garbled_list": self.faults.garbled_list,
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], clock: Clock = time.time) -> FabricSimulator:
        if data.get("version") != STATE_VERSION:
            raise ValueError(
                f"simulator state version {data.get('version')!r} is not {STATE_VERSION}"
            )
        f = data.get("faults", {})
        return cls(
            platform=platform(data["platform"]),
            active=set(data.get("active", [])),
            awaiting_set_activated=bool(data.get("awaiting_set_activated", False)),
            restarted_at=(
                None if data.get("restarted_at") is None else float(data["restarted_at"])
            ),
            clock=clock,
            faults=Faults(
                unreachable=bool(f.get("unreachable", False)),
                activation_delay_s=float(f.get("activation_delay_s", 0.0)),
                nvlink_error_partitions=set(f.get("nvlink_error_partitions", [])),
                degraded_links={int(k): int(v) for k, v in f.get("degraded_links", {}).items()},
                gone_modules=set(f.get("gone_modules", [])),
                garbled_list=bool(f.get("garbled_list", False)),
            ),
        )


FAULT_SPECS = (
    "unreachable",
    "reachable",
    "restart",
    "slow-activation=SECONDS",
    "nvlink-error=PARTITION",
    "degrade=MODULE:LINKS",
    "gone=MODULE",
    "garbled",
    "ungarbled",
    "clear",
)


def inject_fault(sim: FabricSimulator, spec: str) -> None:
    """Apply one fault given as text (one of :data:`FAULT_SPECS`) to ``sim``. Pure.

    ``restart`` is FM restarted with ``--restart`` (see :meth:`FabricSimulator.restart`);
    ``clear`` removes every injected fault but keeps the partition state and restart mode.
    Errors: ``ValueError`` naming the accepted forms when ``spec`` is not one of them.
    """
    name, _, arg = spec.strip().partition("=")
    try:
        if name == "unreachable" and not arg:
            sim.faults.unreachable = True
        elif name == "reachable" and not arg:
            sim.faults.unreachable = False
        elif name == "restart" and not arg:
            sim.restart()
        elif name == "clear" and not arg:
            sim.faults = Faults()
        elif name == "slow-activation":
            seconds = float(arg)
            if not seconds >= 0:
                raise ValueError("seconds must be >= 0")
            sim.faults.activation_delay_s = seconds
        elif name == "nvlink-error":
            sim.faults.nvlink_error_partitions.add(int(arg))
        elif name == "degrade":
            module, sep, links = arg.partition(":")
            if not sep:
                raise ValueError("expected MODULE:LINKS")
            sim.faults.degraded_links[int(module)] = int(links)
        elif name == "gone":
            sim.faults.gone_modules.add(int(arg))
        elif name in ("garbled", "ungarbled") and not arg:
            sim.faults.garbled_list = name == "garbled"
        else:
            raise ValueError("unknown fault")
    except ValueError as exc:
        raise ValueError(
            f"bad fault {spec!r} ({exc}); expected one of: {', '.join(FAULT_SPECS)}"
        ) from None


class SimulatorStore:
    """The simulator's state file: FM's state outlives the plugin, as the real one does.

    Writes are atomic (write to a temporary file, then rename), so a daemon and a fake
    ``fmpm`` process can share one file.
    """

    def __init__(self, path: Path, platform_name: str, clock: Clock = time.time) -> None:
        self.path = path
        self.platform_name = platform_name
        self.clock = clock

    def load(self) -> FabricSimulator:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return FabricSimulator(platform(self.platform_name), clock=self.clock)
        sim = FabricSimulator.from_json(data, clock=self.clock)
        if sim.platform.name != self.platform_name:
            raise ValueError(
                f"{self.path} holds a {sim.platform.name} fabric, not {self.platform_name}; "
                "remove it or pick that platform"
            )
        return sim

    def save(self, sim: FabricSimulator) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".fm-state-")
        with os.fdopen(fd, "w") as out:
            json.dump(sim.to_json(), out, indent=1)
        os.replace(tmp, self.path)


class SimulatedFabricManager:
    """The ``simulator`` FM backend (implements ``FabricManagerClient``).

    Ownership: owns nothing but its store path; every call reads and writes the file.
    Errors: FM's typed errors from :class:`FabricSimulator`.
    """

    name = "simulator"

    def __init__(self, store: SimulatorStore) -> None:
        self.store = store

    async def list_partitions(self) -> FmReport:
        sim = self.store.load()
        report = sim.report()  # unreachable and NOT_CONFIGURED answer first, as in fmpm
        if sim.faults.garbled_list:
            raise FabricManagerError("list partitions", "answer cut short (injected: garbled)")
        return report

    async def activate(self, partition_id: int) -> None:
        sim = self.store.load()
        sim.activate(partition_id)
        # FM trains NVLinks before it answers; the delay comes before the state is saved
        # so that a concurrent list sees the partition inactive until then.
        if sim.faults.activation_delay_s:
            await trio.sleep(sim.faults.activation_delay_s)
            sim2 = self.store.load()
            sim2.activate(partition_id)
            sim = sim2
        self.store.save(sim)

    async def deactivate(self, partition_id: int) -> None:
        sim = self.store.load()
        sim.deactivate(partition_id)
        self.store.save(sim)

    async def set_activated(self, partition_ids: Sequence[int]) -> None:
        sim = self.store.load()
        sim.set_activated(partition_ids)
        self.store.save(sim)
