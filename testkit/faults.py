"""The fault campaign: seeded random faults against the real daemon, invariants after each.

The daemon runs as a process (``nvswitch-dp run --simulate hgx-h200``) with the
``simulator`` or the ``fmpm`` Fabric Manager backend (``fmpm`` runs the
``nvswitch-dp-fmpm-sim`` fake); the grpcio :class:`KubeletStandIn` and
:class:`PodResourcesStandIn` play the kubelet, and the REST API with a token file plays
the operator. A seeded generator draws one :class:`Step` at a time:

* kubelet: Allocate of what the kubelet sees Healthy (or of anything), Allocate cut off by
  a short client deadline or a closed channel while activations are slow, duplicate and
  garbage device IDs, kubelet restarts, PodResources unreadable for a while, pods ending;
* Fabric Manager: restart (``--restart`` mode), unreachable and back, slow activations,
  NVLink errors, degraded links, a partition activated behind the daemon's back
  (``fmpm -a`` by hand), list answers cut short (garbled) for a while, and two
  overlapping partitions active in FM's state at once (impossible in FM: the campaign
  writes the state; that pair is not counted as check 1 while both stay active, and the
  node must converge out of it);
* the daemon: SIGKILL (idle, or in the middle of an Allocate) and restart, SIGTERM
  (must exit 0 within :data:`SIGTERM_DEADLINE_S`, sent once the process catches SIGTERM:
  before that, during its exec and interpreter start, the kernel's default action ends
  it) and restart;
* the operator: activate, deactivate (with and without force), drain, undrain;
* ``settle``: every fault cleared, then the convergence and serving checks.

After every step (see :meth:`Campaign.check_invariants`):

1. no two overlapping partitions are active in FM (FM's truth: its state file);
2. every partition a pod holds is active in FM: an Allocate that answered OK, whose pod
   is in PodResources and has not ended, unless the campaign forced it off through REST;
   a plain REST deactivate of it must be refused;
3. at ``settle`` (after the faults clear) everything converges within one supervision
   period plus the release grace (plus :attr:`CampaignSettings.slack`, plus what is left
   of a slow activation started before the clear: FM takes that long whatever follows):
   nothing activating, deactivating or unsettled (an FM call whose outcome is unknown:
   legitimate on the way, not at the end), nothing blocked with nothing occupying its blocker,
   nothing unhealthy without a cause, nothing active in FM that no pod holds and the
   operator did not pre-warm, REST and the kubelet's ListAndWatch agreeing with FM
   (:func:`convergence_problems`, pure); the time it took is measured;
4. the daemon serves: ``/healthz`` answers 200 after every step; at ``settle`` every
   resource is registered with a live ListAndWatch stream, ``/readyz`` is 200 and a fresh
   Allocate of a free partition works. An Allocate or REST call that does not answer
   within its deadline is a violation (a hung daemon), never a hang of the campaign.

Bad requests (duplicate IDs answered OK, garbage IDs granted) and an unclean SIGTERM exit
are violations too. Each :class:`Violation` carries the step, the seed and what was seen,
and the steps since the last ``settle`` (a replayable script: :func:`parse_script`).

Ownership: a :class:`Campaign` owns the daemon process, the stand-ins and the FM state
under its work directory, and FM subprocesses a killed daemon left behind (waited for,
then killed by PID). Every wait has a deadline. Only Unix sockets and 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc

from nvswitch_dp.fabric.fmpm_sim import state_lock
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.simulator import FabricSimulator, SimulatorStore, inject_fault
from nvswitch_dp.fabric.types import FabricManagerError
from testkit.harness import DaemonProcess
from testkit.kubelet import (
    HEALTHY,
    KubeletStandIn,
    NotRegisteredError,
    PodResourcesStandIn,
    load_api,
    unix_address,
)

PLATFORM = "hgx-h200"
PREFIX = "nvidia.com/gpu-h200"
BACKENDS = ("simulator", "fmpm")
TOKEN = "fault-campaign-token"
NAMESPACE = "campaign"
ALLOCATE_DEADLINE_S = 10.0  # an Allocate still unanswered after this is a hung daemon
REST_DEADLINE_S = 10.0
START_DEADLINE_S = 30.0  # daemon start (FM reachable) to every resource registered
SIGTERM_DEADLINE_S = 3.0
SIGTERM_HANDLER_DEADLINE_S = 10.0  # exec to the daemon catching SIGTERM (imports included)
ORPHAN_DEADLINE_S = 10.0  # FM subprocesses of a killed daemon: waited for this long
FAULT_HOLD_S = 65.0  # the daemon holds a partition out for 60 s after a failed activation
SLOW_ACTIVATIONS_S = (0.5, 1.0, 1.5, 2.5, 3.0)


# -- the partition table ------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """FM's partition table of the platform: ID -> GPU modules (what the daemon serves)."""

    modules: Mapping[int, frozenset[int]]

    @classmethod
    def of(cls, platform_name: str = PLATFORM) -> Table:
        return cls({pid: frozenset(mods) for pid, mods, _ in platform(platform_name).rows})

    def size(self, pid: int) -> int:
        return len(self.modules[pid])

    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted({len(m) for m in self.modules.values()}))

    def of_size(self, size: int) -> list[int]:
        return sorted(pid for pid, mods in self.modules.items() if len(mods) == size)

    def overlap(self, a: int, b: int) -> bool:
        return a != b and bool(self.modules[a] & self.modules[b])

    def all_modules(self) -> list[int]:
        return sorted(set().union(*self.modules.values()))


def resource(size: int) -> str:
    return f"{PREFIX}-{size}x"


def device(pid: int) -> str:
    return f"partition-{pid}"


def overlapping_pairs(table: Table, active: set[int] | frozenset[int]) -> list[tuple[int, int]]:
    """Pairs of active partitions sharing a GPU (check 1). Pure."""
    ids = sorted(active)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :] if table.overlap(a, b)]


# -- steps --------------------------------------------------------------------------------

# Every daemon of the campaign runs under this descriptor limit (container soft limits
# of 1,024 are common; this is lower), so the REST floods press on it.
FD_LIMIT = 256
FLOOD_CONNECTIONS = (100, 300, 600)
FLOOD_RECOVERY_S = 5.0
# An Allocate naming one device this many times is about 4 MB on the wire.
HUGE_REPEAT = 300_000

STEP_KINDS = (
    "allocate",  # SIZE:IDS[|IDS...]  one container per |-separated group
    "allocate-deadline",  # SIZE:IDS@SECONDS  client deadline
    "allocate-close",  # SIZE:IDS@SECONDS  channel closed after SECONDS
    "allocate-dup",  # SIZE:IDS[|IDS]  a device twice in one request
    "allocate-garbage",  # SIZE:IDS  unknown or malformed IDs
    "allocate-huge",  # SIZE:ID  that one device named HUGE_REPEAT times (about 4 MB)
    "rest-flood",  # CONNECTIONS/SIZE:IDS  idle REST connections held during that Allocate
    "daemon-hup",  # ""  SIGHUP: the daemon must keep serving
    "pod-end",  # POD
    "daemon-kill",  # "" (idle) or SIZE:IDS@SECONDS (SIGKILL while that Allocate runs)
    "daemon-term",  # ""
    "fm",  # an FM fault spec: restart, unreachable, reachable, slow-activation=S, ...
    "fm-behind",  # PARTITION activated in FM by hand
    "fm-overlap",  # A,B  two overlapping partitions made active in FM's state together
    "kubelet-restart",
    "pods-down",
    "pods-up",
    "rest-activate",  # PARTITION
    "rest-deactivate",  # PARTITION
    "rest-force-deactivate",  # PARTITION
    "rest-drain",  # MODULE
    "rest-undrain",  # MODULE
    "settle",
)


@dataclass(frozen=True)
class Step:
    """One campaign step: a kind from :data:`STEP_KINDS` and its argument (text)."""

    kind: str
    arg: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {self.kind!r}; expected one of {STEP_KINDS}")

    def __str__(self) -> str:
        return f"{self.kind}={self.arg}" if self.arg else self.kind


def parse_script(text: str) -> list[Step]:
    """Steps from ``kind[=arg];kind[=arg];...`` (what violations print). ``ValueError``."""
    steps = []
    for part in (p.strip() for p in text.split(";")):
        if part:
            kind, _, arg = part.partition("=")
            steps.append(Step(kind, arg))
    return steps


@dataclass(frozen=True)
class AllocationSpec:
    """The argument of the allocate steps: resource size, containers' device IDs, seconds."""

    size: int
    containers: tuple[tuple[str, ...], ...]
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> AllocationSpec:
        head, _, seconds = text.partition("@")
        size, sep, ids = head.partition(":")
        if not sep or not size.endswith("x"):
            raise ValueError(f"bad allocation {text!r}: expected SIZEx:ID,ID[|ID][@SECONDS]")
        containers = tuple(tuple(group.split(",")) for group in ids.split("|"))
        return cls(int(size[:-1]), containers, float(seconds) if seconds else 0.0)

    def __str__(self) -> str:
        ids = "|".join(",".join(group) for group in self.containers)
        return f"{self.size}x:{ids}" + (f"@{self.seconds:g}" if self.seconds else "")


# -- the campaign's model of the world ----------------------------------------------------


@dataclass
class Pod:
    """A pod the campaign admitted: Allocate answered OK and PodResources lists it."""

    name: str
    resource: str
    containers: tuple[tuple[str, ...], ...]
    partitions: frozenset[int]


@dataclass
class Model:
    """What the campaign knows it did: the facts the invariants are checked against."""

    pods: dict[str, Pod] = field(default_factory=dict)
    prewarmed: set[int] = field(default_factory=set)  # operator-activated, held by no pod
    drained: set[int] = field(default_factory=set)
    unreachable: bool = False
    slow: float = 0.0
    # An FM activation started while ``slow`` was set takes that long, whatever came
    # after: the latest time one of them may still end (monotonic seconds).
    slow_calls_end: float = 0.0
    nvlink_errors: set[int] = field(default_factory=set)
    degraded: bool = False
    garbled: bool = False  # FM's list answers arrive cut short
    # Two overlapping partitions the campaign made active in FM behind everyone's back
    # (FM itself never allows it): not the daemon's doing, so not an overlap violation
    # while both stay active; the daemon must say so and converge.
    injected_overlap: frozenset[int] = frozenset()
    overlap_since_settle: bool = False  # an overlap was injected since the last settle
    pods_down: bool = False
    # A failed activation keeps a partition Unhealthy for a while (until this time).
    hold_until: dict[int, float] = field(default_factory=dict)
    pod_counter: int = 0

    @property
    def held(self) -> dict[int, str]:
        """Partition -> the pod holding it."""
        return {pid: pod.name for pod in self.pods.values() for pid in pod.partitions}

    def faults_active(self) -> bool:
        return (
            self.unreachable
            or self.garbled
            or bool(self.slow or self.nvlink_errors or self.degraded)
        )


# -- checks (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """Everything :func:`convergence_problems` judges, read at one moment."""

    fm_active: frozenset[int]
    fm_awaiting_set_activated: bool
    rest_partitions: tuple[Mapping[str, Any], ...]  # GET /v1/partitions
    readyz_status: int
    kubelet: Mapping[str, Mapping[str, str]]  # resource -> device -> health
    streams: Mapping[str, bool]  # resource -> registered with a live stream


def convergence_problems(table: Table, model: Model, seen: Observation, now: float) -> list[str]:
    """Why the node has not converged (empty when it has): check 3 and the state part of 4.

    Pure. ``now`` is compared with :attr:`Model.hold_until` (monotonic seconds).
    """
    problems: list[str] = []
    held = model.held
    active = seen.fm_active
    occupied = set(active) | set(held)
    if seen.fm_awaiting_set_activated:
        problems.append("FM still waits for set-activated")
    for a, b in overlapping_pairs(table, active):
        problems.append(f"partitions {a} and {b} overlap and are both active in FM")
    for pid in sorted(set(held) - active):
        problems.append(f"partition {pid} held by pod {held[pid]} is inactive in FM")
    for pid in sorted(active - set(held) - model.prewarmed):
        problems.append(f"partition {pid} is active in FM, held by no pod, not pre-warmed")
    by_id = {int(p["id"]): p for p in seen.rest_partitions}
    if set(by_id) != set(table.modules):
        problems.append(f"REST lists partitions {sorted(by_id)}, FM's table has others")
    for pid, p in sorted(by_id.items()):
        if pid not in table.modules:
            continue
        state, phase = p.get("state"), p.get("phase")
        if phase not in ("inactive", "active") or state in ("activating", "deactivating"):
            problems.append(f"partition {pid} is {state} (phase {phase})")
        if (phase == "active") != (pid in active):
            fm = "active" if pid in active else "inactive"
            problems.append(f"partition {pid}: REST phase {phase}, FM has it {fm}")
        if bool(p.get("in_use")) != (pid in held):
            problems.append(
                f"partition {pid}: REST in_use={p.get('in_use')}, "
                + (f"pod {held[pid]} holds it" if pid in held else "no pod holds it")
            )
        overlaps_occupied = [o for o in sorted(occupied) if table.overlap(pid, o)]
        if state == "blocked":
            blocker = p.get("blocked_by")
            if blocker not in occupied:
                problems.append(
                    f"partition {pid} is blocked by {blocker}, which no pod holds and FM "
                    "has inactive"
                )
        if pid not in occupied and overlaps_occupied and (p.get("healthy") or state == "free"):
            problems.append(
                f"partition {pid} is offered ({state}) though partition "
                f"{overlaps_occupied[0]} is occupied"
            )
        if state == "unhealthy":
            drained = table.modules[pid] & model.drained
            held_out = model.hold_until.get(pid, 0.0) > now
            if not drained and not held_out:
                problems.append(
                    f"partition {pid} is unhealthy ({p.get('fault')}) with no cause left"
                )
        if pid not in occupied and not overlaps_occupied and state in ("blocked", "allocated"):
            problems.append(f"partition {pid} is {state} with nothing occupying a GPU of it")
        health = HEALTHY if p.get("healthy") else "Unhealthy"
        size = table.size(pid)
        listed = seen.kubelet.get(resource(size), {}).get(device(pid))
        if listed != health:
            problems.append(f"partition {pid}: kubelet sees {listed}, REST says {health}")
    for size in table.sizes():
        if not seen.streams.get(resource(size), False):
            problems.append(f"{resource(size)} has no live ListAndWatch registration")
    if seen.readyz_status != 200:
        problems.append(f"/readyz answers {seen.readyz_status}")
    return problems


# -- violations and results ---------------------------------------------------------------

CHECKS = {
    "overlap": "1. overlapping partitions active in FM",
    "held": "2. a partition a pod holds deactivated without force",
    "convergence": "3. no convergence within the bound after faults cleared",
    "serving": "4. the daemon stopped serving the kubelet or REST",
    "request": "bad request granted",
    "shutdown": "SIGTERM did not exit 0 in time",
}


@dataclass(frozen=True)
class Violation:
    """One broken invariant: where (step, seed, backend), which check, what was seen."""

    backend: str
    seed: int
    step: int
    check: str
    detail: str
    trail: tuple[str, ...]  # steps since the last settle, this one last

    def __str__(self) -> str:
        script = ";".join(self.trail)
        return (
            f"[{self.backend} seed={self.seed} step={self.step}] {CHECKS[self.check]}: "
            f"{self.detail}\n    steps since the last settle: {script}"
        )


@dataclass
class CampaignResult:
    """What one campaign run found."""

    backend: str
    seed: int
    steps: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    convergence_s: list[float] = field(default_factory=list)
    orphaned_fm_processes: int = 0  # alive right after a SIGKILL of the daemon
    # ... and still alive once the next daemon had started (it should have killed them).
    fm_processes_outliving_restart: int = 0
    seconds: float = 0.0

    @property
    def worst_convergence_s(self) -> float | None:
        return max(self.convergence_s) if self.convergence_s else None


@dataclass(frozen=True)
class CampaignSettings:
    """Daemon timings the campaign configures and the bound it checks convergence against."""

    reconcile_s: float = 1.0
    grace_s: float = 2.0
    # Allowed beyond reconcile + grace: the release watcher's own period (grace / 3) and
    # FM calls (a fake fmpm process takes ~0.25 s on a busy 2-core machine).
    slack_s: float = 2.0

    @property
    def bound_s(self) -> float:
        return self.reconcile_s + self.grace_s


# -- Fabric Manager from outside ----------------------------------------------------------


def fake_fmpm_path() -> str:
    """The installed ``nvswitch-dp-fmpm-sim`` beside this interpreter. ``FileNotFoundError``."""
    path = shutil.which("nvswitch-dp-fmpm-sim", path=str(Path(sys.executable).parent))
    if path is None:
        raise FileNotFoundError(
            f"nvswitch-dp-fmpm-sim is not installed in {Path(sys.executable).parent}; "
            "run pip install -e . in the virtualenv"
        )
    return path


class FabricTruth:
    """FM's state file: what FM really has active, and where faults are injected.

    The ``simulator`` backend's daemon reads and writes the file without the lock; a
    write of ours retries when the file changed between our read and our write (each
    save replaces the file, so its inode changes).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = SimulatorStore(path, PLATFORM)

    def read(self) -> FabricSimulator:
        return self.store.load()

    def _inode(self) -> int | None:
        try:
            return self.path.stat().st_ino
        except FileNotFoundError:
            return None

    def change(self, apply: Callable[[FabricSimulator], None]) -> None:
        """Read, ``apply``, write back; FM's typed errors from ``apply`` propagate."""
        with state_lock(self.path):
            for _ in range(20):
                before = self._inode()
                sim = self.store.load()
                apply(sim)
                if self._inode() == before:
                    self.store.save(sim)
                    return
            raise RuntimeError(f"{self.path} kept changing under the campaign")

    def inject(self, spec: str) -> None:
        self.change(lambda sim: inject_fault(sim, spec))


# -- the kubelet's calls, on channels of our own -----------------------------------------


class AllocateOutcome:
    """An Allocate's answer: ``ok`` with the response, or the gRPC code and details."""

    def __init__(self, response: Any = None, code: str = "OK", details: str = "") -> None:
        self.response = response
        self.code = code
        self.details = details

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    def __str__(self) -> str:
        return self.code if self.ok else f"{self.code}: {self.details}"


def _allocate_request(containers: Sequence[Sequence[str]]) -> Any:
    pb = load_api().deviceplugin
    return pb.AllocateRequest(
        container_requests=[pb.ContainerAllocateRequest(devices_ids=list(c)) for c in containers]
    )


def _rpc_outcome(exc: grpc.RpcError) -> AllocateOutcome:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else repr(exc)
    return AllocateOutcome(code=code.name if code is not None else "UNKNOWN", details=details)


# -- the campaign -------------------------------------------------------------------------


class Campaign:
    """One backend's campaign on one simulated node under ``workdir``.

    Use as a context manager (starts the stand-ins and the daemon, stops everything on
    exit), then :meth:`run`. ``log`` receives one line per step when given.
    Errors: ``TimeoutError`` when the first start does not register; later trouble of
    the daemon is recorded as violations, not raised.
    """

    def __init__(
        self,
        workdir: Path,
        backend: str,
        seed: int,
        *,
        settings: CampaignSettings | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.workdir = workdir
        self.backend = backend
        self.seed = seed
        self.settings = settings or CampaignSettings()
        self.rng = random.Random(seed)
        self.log = log
        self.table = Table.of()
        self.model = Model()
        self.result = CampaignResult(backend, seed)
        self.plugin_dir = workdir / "device-plugins"
        self.pod_socket = workdir / "pod-resources" / "kubelet.sock"
        self.kubelet = KubeletStandIn(self.plugin_dir)
        self.pods = PodResourcesStandIn(self.pod_socket, kubelet=self.kubelet)
        self.daemon: DaemonProcess | None = None
        self.api_up = False
        self.orphans: set[tuple[int, str]] = set()  # (PID, start time): no PID reuse
        # Orphans of a kill not yet looked at after the next daemon started.
        self._orphans_to_check: set[tuple[int, str]] = set()
        self.trail: list[str] = []
        self.step_index = 0
        self._reported: set[str] = set()
        # Held partitions whose forced deactivation failed: still the pod's (noted in reports).
        self.force_failed: set[int] = set()
        token = workdir / "token"
        config = workdir / "config.yaml"
        fm_state = workdir / "fm" / "fabricmanager.state"
        self.args = [
            "--config", str(config),
            "--pod-resources-socket", str(self.pod_socket),
            "--release-grace", f"{self.settings.grace_s:g}",
        ]  # fmt: skip
        self.env: dict[str, str] | None = None
        if backend == "fmpm":
            self.args += ["--fm-backend", "fmpm", "--fmpm-path", fake_fmpm_path()]
            self.args += ["--fm-endpoint", "127.0.0.1"]
            self.env = {**os.environ, "NVSWITCH_DP_FMPM_SIM_STATE": str(fm_state)}
            self.fm = FabricTruth(fm_state)
        else:
            self.fm = FabricTruth(workdir / "state" / "fabricmanager.state")
        self._token_path = token
        self._config_path = config

    # -- lifecycle

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self._token_path.write_text(TOKEN)
        self._config_path.write_text(
            "version: v1\n"
            "fabric_manager:\n"
            f"  reconcile_interval_seconds: {self.settings.reconcile_s:g}\n"
            "  timeout_seconds: 5\n"
            "vfio:\n  health_interval_seconds: 1\n"
            f"api:\n  token_file: {self._token_path}\n  requests_per_second: 0\n"
        )
        self.kubelet.start()
        self.pods.start()
        self._spawn()
        if not self._wait_started(START_DEADLINE_S):
            assert self.daemon is not None
            raise TimeoutError(f"the daemon did not start:\n{self.daemon.log_text()[-4000:]}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self._stop_daemon()
            self._reap_orphans()
        finally:
            self.pods.stop()
            self.kubelet.stop()

    def _spawn(self) -> None:
        self.daemon = DaemonProcess(
            self.workdir,
            self.plugin_dir,
            extra_args=self.args,
            env=self.env,
            command_prefix=["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"],
        ).start()
        self.api_up = False

    def _wait_started(self, timeout: float) -> bool:
        """Every resource registered since the daemon started and the API up, in time."""
        daemon = self.daemon
        assert daemon is not None
        since = daemon.started_at
        wanted = [resource(n) for n in self.table.sizes()]

        def fresh() -> bool:
            if daemon.process is not None and daemon.process.poll() is not None:
                return True  # exited: stop waiting, the caller finds out
            plugins = self.kubelet.registered()
            return all(
                r in plugins
                and plugins[r].registered_at > since
                and not self._stream_ended(r)
                and self._devices(r)
                for r in wanted
            )

        try:
            self.kubelet.wait_until(fresh, timeout, what="the daemon's registration")
            if daemon.process is not None and daemon.process.poll() is not None:
                return False
            daemon.wait_api(timeout=max(1.0, timeout / 2))
        except (TimeoutError, RuntimeError):
            return False
        self.api_up = True
        self._check_orphans_after_start()
        return True

    def _check_orphans_after_start(self) -> None:
        # A daemon kills the FM subprocesses its killed predecessor left before its first
        # FM call, so none may be running once it serves.
        survivors = {p for p in self._orphans_to_check if _pid_alive(p)}
        self._orphans_to_check.clear()
        if survivors:
            self.result.fm_processes_outliving_restart += len(survivors)
            self._say(f"FM subprocesses of a killed daemon still run: {sorted(survivors)}")

    def _devices(self, name: str) -> dict[str, str]:
        try:
            return self.kubelet.devices(name)
        except NotRegisteredError:
            return {}

    def _stream_ended(self, name: str) -> bool:
        try:
            return self.kubelet.stream_ended(name)
        except NotRegisteredError:
            return True

    def _alive(self) -> bool:
        return (
            self.daemon is not None
            and self.daemon.process is not None
            and self.daemon.process.poll() is None
        )

    def _children(self) -> set[tuple[int, str]]:
        """The daemon's child processes now (its fmpm runs), as (PID, start time)."""
        if not self._alive():
            return set()
        assert self.daemon is not None and self.daemon.process is not None
        pid = self.daemon.process.pid
        children: set[tuple[int, str]] = set()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                for child in text.split():
                    started = _start_time(int(child))
                    if started is not None:
                        children.add((int(child), started))
        return children

    def _kill_daemon(self) -> None:
        if self.daemon is None or self.daemon.process is None:
            return
        children = self._children()
        if self.daemon.process.poll() is None:
            self.daemon.process.send_signal(signal.SIGKILL)
        self.daemon.process.wait(timeout=10)
        survivors = {c for c in children if _pid_alive(c)}
        self.result.orphaned_fm_processes += len(survivors)
        self.orphans |= survivors
        self._orphans_to_check |= survivors
        self.api_up = False

    def _stop_daemon(self) -> None:
        if self.daemon is None or self.daemon.process is None:
            return
        if self.daemon.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # terminate() killed it
                self.daemon.terminate(timeout=SIGTERM_DEADLINE_S + 2)
        self.api_up = False

    def _reap_orphans(self) -> None:
        """Wait for FM subprocesses a killed daemon left; kill those still running."""
        deadline = time.monotonic() + ORPHAN_DEADLINE_S
        while self.orphans and time.monotonic() < deadline:
            self.orphans = {p for p in self.orphans if _pid_alive(p)}
            time.sleep(0.05)
        for pid, _ in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.orphans.clear()
        self._orphans_to_check.clear()

    # -- recording

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log(f"[{self.backend} {self.step_index:5d}] {line}")

    def violate(self, check: str, detail: str, *, key: str | None = None) -> None:
        """Record a violation (once per ``key`` while it lasts, when ``key`` is given)."""
        if key is not None:
            if key in self._reported:
                return
            self._reported.add(key)
        violation = Violation(
            self.backend, self.seed, self.step_index, check, detail, tuple(self.trail)
        )
        self.result.violations.append(violation)
        self._say(f"VIOLATION {CHECKS[check]}: {detail}")

    def _fault(self, kind: str) -> None:
        self.result.faults[kind] += 1

    # -- running

    def run(
        self,
        steps: int,
        *,
        script: Sequence[Step] | None = None,
        deadline: float | None = None,
    ) -> CampaignResult:
        """Run ``steps`` generated steps (or ``script``), then a final settle.

        ``deadline`` (monotonic) stops early, after the step in progress.
        """
        begin = time.monotonic()
        plan = list(script) if script is not None else None
        total = len(plan) if plan is not None else steps
        for index in range(total):
            if deadline is not None and time.monotonic() > deadline:
                break
            self.step_index = index + 1
            step = plan[index] if plan is not None else self.next_step()
            self.trail.append(str(step))
            self.execute(step)
            self.check_invariants()
            self.result.steps += 1
            if step.kind == "settle":
                self.trail = []
        if self.result.steps == 0 or self.trail:  # the last step was not a settle
            self.step_index += 1
            self.trail.append("settle")
            self.execute(Step("settle"))
            self.check_invariants()
        self.result.seconds = time.monotonic() - begin
        return self.result

    # -- the generator

    def _healthy_devices(self, size: int) -> list[int]:
        try:
            devices = self.kubelet.devices(resource(size))
        except NotRegisteredError:
            return []
        return sorted(int(d.split("-")[1]) for d, h in devices.items() if h == HEALTHY)

    def _pick_allocation(self, *, scheduler: bool = True) -> AllocationSpec:
        rng = self.rng
        size = rng.choice(self.table.sizes())
        # The kubelet offers Healthy devices no pod of its own holds; the rest of the
        # time anything, a container restart's re-Allocate of a held one included.
        held = self.model.held
        pool = [p for p in self._healthy_devices(size) if p not in held] if scheduler else []
        if not pool:
            pool = self.table.of_size(size)
        count = 2 if size == 1 and len(pool) > 1 and rng.random() < 0.3 else 1
        chosen = rng.sample(pool, count)
        return AllocationSpec(size, (tuple(device(p) for p in chosen),))

    def next_step(self) -> Step:
        """Draw the next step from the seeded generator, given what the model knows."""
        rng, model = self.rng, self.model
        held = sorted(model.held)
        weights: dict[str, float] = {
            "allocate": 22,
            "allocate-deadline": 5,
            "allocate-close": 3,
            "allocate-dup": 2,
            "allocate-garbage": 2,
            "allocate-huge": 1 if self.api_up else 0,
            "rest-flood": 1.5 if self.api_up else 0,
            "daemon-hup": 1 if self.api_up else 0,
            "pod-end": 12 if model.pods else 0,
            "daemon-kill": 3,
            "daemon-term": 1 if self.api_up else 4,
            "fm-restart": 3,
            "fm-unreachable": 0 if model.unreachable else 2,
            "fm-reachable": 4 if model.unreachable else 0,
            "fm-slow": 4,
            "fm-fast": 3 if model.slow else 0,
            "fm-nvlink": 2,
            "fm-degrade": 1,
            "fm-garbled": 0 if model.garbled else 1.5,
            "fm-ungarbled": 4 if model.garbled else 0,
            "fm-behind": 1,
            "fm-overlap": 1 if self.api_up and self._overlap_candidates() else 0,
            "kubelet-restart": 3,
            "pods-down": 0 if model.pods_down else 3,
            "pods-up": 5 if model.pods_down else 0,
            "rest-activate": 4,
            "rest-deactivate": 4,
            "rest-force-deactivate": 2 if held else 0,
            "rest-drain": 1.5,
            "rest-undrain": 3 if model.drained else 0,
            "settle": 8,
        }
        names = list(weights)
        choice = rng.choices(names, [weights[n] for n in names])[0]
        pids = sorted(self.table.modules)
        if choice == "allocate":
            spec = self._pick_allocation(scheduler=rng.random() < 0.8)
            return Step("allocate", str(spec))
        if choice in ("allocate-deadline", "allocate-close"):
            spec = self._pick_allocation()
            slow = model.slow or 1.0
            spec = AllocationSpec(
                spec.size, spec.containers, round(rng.uniform(0.2, 0.8) * slow, 2)
            )
            return Step(choice, str(spec))
        if choice == "allocate-dup":
            size = rng.choice(self.table.sizes())
            pid = device(rng.choice(self.table.of_size(size)))
            containers = ((pid, pid),) if rng.random() < 0.6 else ((pid,), (pid,))
            return Step("allocate-dup", str(AllocationSpec(size, containers)))
        if choice == "allocate-garbage":
            size = rng.choice(self.table.sizes())
            other = rng.choice([p for p in pids if self.table.size(p) != size])
            garbage = rng.choice(
                ["partition-99", "partition-", "partition-x", "gpu-1", "partition--1",
                 "partition-1-gpu-1", device(other), "partition-007", " partition-7"]
            )  # fmt: skip
            return Step("allocate-garbage", f"{size}x:{garbage}")
        if choice == "allocate-huge":
            size = rng.choice(self.table.sizes())
            pid = device(rng.choice(self.table.of_size(size)))
            return Step(choice, str(AllocationSpec(size, ((pid,),))))
        if choice == "rest-flood":
            spec = self._pick_allocation()
            return Step(choice, f"{rng.choice(FLOOD_CONNECTIONS)}/{spec}")
        if choice == "pod-end":
            return Step("pod-end", rng.choice(sorted(model.pods)))
        if choice == "daemon-kill":
            if rng.random() < 0.5:
                spec = self._pick_allocation()
                slow = model.slow or 1.0
                spec = AllocationSpec(
                    spec.size, spec.containers, round(rng.uniform(0.1, 0.9) * slow, 2)
                )
                return Step("daemon-kill", str(spec))
            return Step("daemon-kill")
        if choice == "daemon-term":
            return Step("daemon-term")
        if choice == "fm-overlap":
            a, b = rng.choice(self._overlap_candidates())
            return Step(choice, f"{a},{b}")
        if choice.startswith("fm-") and choice != "fm-behind":
            modules = self.table.all_modules()
            fault = {
                "fm-restart": "restart",
                "fm-unreachable": "unreachable",
                "fm-reachable": "reachable",
                "fm-slow": f"slow-activation={rng.choice(SLOW_ACTIVATIONS_S):g}",
                "fm-fast": "slow-activation=0",
                "fm-nvlink": f"nvlink-error={rng.choice(pids)}",
                "fm-degrade": f"degrade={rng.choice(modules)}:{rng.randint(4, 16)}",
                "fm-garbled": "garbled",
                "fm-ungarbled": "ungarbled",
            }[choice]
            return Step("fm", fault)
        if choice == "fm-behind":
            return Step("fm-behind", str(rng.choice(pids)))
        if choice in ("rest-activate", "rest-deactivate"):
            pool = held + sorted(model.prewarmed) if rng.random() < 0.5 else []
            return Step(choice, str(rng.choice(pool or pids)))
        if choice == "rest-force-deactivate":
            return Step(choice, str(rng.choice(held)))
        if choice == "rest-drain":
            return Step(choice, str(rng.choice(self.table.all_modules())))
        if choice == "rest-undrain":
            return Step(choice, str(rng.choice(sorted(model.drained))))
        return Step(choice)

    # -- executing a step

    def execute(self, step: Step) -> None:
        """Do one step and update the model with what it did."""
        kind, arg = step.kind, step.arg
        if kind.startswith("allocate"):
            self._allocate_step(kind, AllocationSpec.parse(arg))
        elif kind == "rest-flood":
            connections, _, spec = arg.partition("/")
            self._fault("REST connection flood")
            with self._flood(int(connections)):
                self._allocate_step("allocate", AllocationSpec.parse(spec))
        elif kind == "daemon-hup":
            self._fault("daemon SIGHUP")
            self._daemon_hup()
        elif kind == "pod-end":
            self._end_pod(arg, why="ended")
        elif kind == "daemon-kill":
            self._fault("daemon SIGKILL")
            self._daemon_kill(AllocationSpec.parse(arg) if arg else None)
        elif kind == "daemon-term":
            self._fault("daemon SIGTERM")
            self._daemon_term()
        elif kind == "fm":
            self._fm_fault(arg)
        elif kind == "fm-behind":
            self._fault("FM activation behind the daemon's back")
            self._fm_behind(int(arg))
        elif kind == "fm-overlap":
            self._fault("FM reports overlapping partitions active")
            self._fm_overlap(*(int(x) for x in arg.split(",")))
        elif kind == "kubelet-restart":
            self._fault("kubelet restart")
            self.pods.stop()
            self.kubelet.restart()
            if not self.model.pods_down:
                self.pods.start()
            self._say("kubelet restarted")
        elif kind == "pods-down":
            self._fault("PodResources unreadable")
            self.pods.stop()
            self.model.pods_down = True
            self._say("PodResources down")
        elif kind == "pods-up":
            self._pods_up()
        elif kind.startswith("rest-"):
            self._rest_step(kind, int(arg))
        elif kind == "settle":
            self._settle()

    def _pods_up(self) -> None:
        if self.model.pods_down:
            self.pods.start()
            self.model.pods_down = False
            self._say("PodResources up")

    # kubelet

    def _socket(self, size: int) -> Path | None:
        """The plugin socket of a registered resource (waiting a moment for it)."""
        name = resource(size)
        wait = 2.0 if self.api_up else 0.3
        deadline = time.monotonic() + wait
        while True:
            plugin = self.kubelet.registered().get(name)
            if plugin is not None and plugin.socket_path.exists():
                return plugin.socket_path
            if time.monotonic() > deadline or not self._alive():
                return None
            time.sleep(0.05)

    def call_allocate(
        self,
        spec: AllocationSpec,
        *,
        timeout: float = ALLOCATE_DEADLINE_S,
        close_after: float | None = None,
        during: Callable[[], None] | None = None,
    ) -> AllocateOutcome | None:
        """Allocate on a channel of our own; None when the resource is not registered.

        ``close_after``: close the channel that many seconds into the call (then
        ``during`` runs, if given, before the channel is closed).
        """
        socket = self._socket(spec.size)
        if socket is None:
            return None
        api = load_api()
        channel = grpc.insecure_channel(
            unix_address(socket), options=[("grpc.use_local_subchannel_pool", 1)]
        )
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=2)
            except grpc.FutureTimeoutError:
                return None
            stub = api.deviceplugin_grpc.DevicePluginStub(channel)
            request = _allocate_request(spec.containers)
            if close_after is None:
                try:
                    return AllocateOutcome(stub.Allocate(request, timeout=timeout))
                except grpc.RpcError as exc:
                    return _rpc_outcome(exc)
            future = stub.Allocate.future(request, timeout=timeout)
            try:
                return AllocateOutcome(future.result(timeout=close_after))
            except grpc.FutureTimeoutError:
                pass
            except grpc.RpcError as exc:
                return _rpc_outcome(exc)
            if during is not None:
                during()
            channel.close()
            try:
                return AllocateOutcome(future.result(timeout=1))
            except grpc.FutureCancelledError:
                return AllocateOutcome(code="CANCELLED", details="the channel was closed")
            except grpc.RpcError as exc:
                return _rpc_outcome(exc)
            except grpc.FutureTimeoutError:
                return AllocateOutcome(code="CANCELLED", details="no answer after the close")
        finally:
            channel.close()

    def _ensure_slow(self) -> None:
        if not self.model.slow:
            self._fm_fault(f"slow-activation={self.rng.choice((1.0, 2.0))}")

    def _allocate_step(self, kind: str, spec: AllocationSpec) -> None:
        requested = [pid for group in spec.containers for pid in _ids(group)]
        if kind == "allocate-deadline":
            self._fault("Allocate cut by a client deadline")
            self._ensure_slow()
            outcome = self.call_allocate(spec, timeout=spec.seconds)
        elif kind == "allocate-close":
            self._fault("Allocate cut by a closed channel")
            self._ensure_slow()
            outcome = self.call_allocate(spec, close_after=spec.seconds)
        elif kind == "allocate-huge":
            self._fault("huge duplicate Allocate")
            (device_id,) = spec.containers[0]
            requested = list(_ids((device_id,))) * 2  # a device twice, at least
            huge = AllocationSpec(spec.size, ((device_id,) * HUGE_REPEAT,))
            outcome = self.call_allocate(huge)
        else:
            if kind == "allocate-dup":
                self._fault("duplicate device IDs")
            elif kind == "allocate-garbage":
                self._fault("garbage device IDs")
            outcome = self.call_allocate(spec)
        self._say(f"{kind} {spec}: {outcome if outcome is not None else 'not registered'}")
        if outcome is None:
            return
        if outcome.code == "DEADLINE_EXCEEDED" and kind not in ("allocate-deadline",):
            self.violate(
                "serving",
                f"Allocate {spec} did not answer within {ALLOCATE_DEADLINE_S:g} s",
            )
            return
        if outcome.ok and kind == "allocate-garbage":
            self.violate("request", f"Allocate of garbage {spec} answered OK")
            return
        if outcome.ok and len(requested) != len(set(requested)):
            granted = [
                dict(c.envs).get("NVSWITCH_DP_PARTITION_IDS", "")
                for c in outcome.response.container_responses
            ]
            self.violate(
                "request",
                f"Allocate {spec} with a device twice answered OK: "
                f"NVSWITCH_DP_PARTITION_IDS={granted}",
            )
            # Admit it once, as the kubelet would record it: the partitions are in use.
        if outcome.ok:
            self._admit(spec, outcome)
        else:
            for pid in requested:
                if "NVLINK_ERROR" in outcome.details or "GENERIC_ERROR" in outcome.details:
                    self.model.hold_until[pid] = time.monotonic() + FAULT_HOLD_S

    def _admit(self, spec: AllocationSpec, outcome: AllocateOutcome) -> None:
        """An OK Allocate: the kubelet records the pod in PodResources."""
        self.model.pod_counter += 1
        name = f"pod-{self.model.pod_counter}"
        partitions = frozenset(pid for group in spec.containers for pid in _ids(group))
        for i, group in enumerate(spec.containers):
            self.pods.assign(
                NAMESPACE, name, f"c{i}", resource(spec.size), list(dict.fromkeys(group))
            )
        for pid in partitions:
            self.model.prewarmed.discard(pid)
        pod = Pod(name, resource(spec.size), spec.containers, partitions)
        self.model.pods[name] = pod
        self._say(f"admitted {name} holding {sorted(partitions)}")

    def _end_pods_holding(self, pid: int, *, why: str) -> None:
        for name in sorted(n for n, pod in self.model.pods.items() if pid in pod.partitions):
            self._end_pod(name, why=why)

    def _end_pod(self, name: str, *, why: str) -> None:
        pod = self.model.pods.pop(name, None)
        if pod is None:
            return
        self.pods.unassign(NAMESPACE, name)
        self.force_failed -= pod.partitions
        self._say(f"{name} {why}; it held {sorted(pod.partitions)}")

    # daemon

    def _restart_daemon(self) -> None:
        self.model.prewarmed.clear()  # a restarted daemon releases what no pod holds
        self._spawn()
        sim = self.fm.read()
        if self.model.unreachable or self.model.garbled:
            return  # it waits for FM; the next settle finds out whether it comes up
        if self._injected_overlap_present():
            self._overlap_refusal()
        if sim.awaiting_set_activated and self.model.pods_down:
            return  # it waits for PodResources to resume FM (up to 30 s)
        if not self._wait_started(START_DEADLINE_S):
            self._daemon_failed("did not register and serve REST after a restart")

    def _injected_overlap_present(self) -> bool:
        injected = self.model.injected_overlap
        return bool(injected) and injected <= set(self.fm.read().active)

    def _overlap_refusal(self) -> None:
        """A daemon started while FM has the injected overlap must refuse to start: exit 1
        with one line naming both partitions (issue 16). Then the operator's fix: the
        partition of the pair no pod holds is deactivated by hand, and the daemon started
        again."""
        daemon = self.daemon
        assert daemon is not None and daemon.process is not None
        a, b = sorted(self.model.injected_overlap)
        try:
            code = daemon.process.wait(timeout=START_DEADLINE_S)
        except subprocess.TimeoutExpired:
            code = None
        # Only this process's lines: a refusal of an earlier overlap (an earlier daemon in
        # the same directory) is in the shared log too.
        own_lines = daemon.own_log_text().splitlines()
        refusals = [line for line in own_lines if "cannot start:" in line]
        said = any(f"{a} and {b}" in line for line in refusals)
        if code != 1 or len(refusals) != 1 or not said:
            self.violate(
                "serving",
                f"FM has overlapping partitions {a} and {b} active at start: expected exit 1 "
                f"and one 'cannot start' line naming both, got exit {code} and {refusals}",
            )
            self._kill_daemon()
        held = set(self.model.held)
        spare = b if a in held else a
        self.fm.change(lambda sim: sim.active.discard(spare))
        self.model.injected_overlap = frozenset()
        self._say(f"the daemon refused FM's overlap {a}/{b}; fmpm -d {spare} by hand")
        self._spawn()
        if not self._wait_started(START_DEADLINE_S):
            self._daemon_failed("did not start once the overlap was resolved")

    def _daemon_failed(self, what: str) -> None:
        assert self.daemon is not None
        tail = self.daemon.log_text()[-1500:]
        self.violate("serving", f"the daemon {what}; log tail:\n{tail}")
        self._kill_daemon()
        self._spawn()
        self._wait_started(START_DEADLINE_S)

    def _daemon_kill(self, spec: AllocationSpec | None) -> None:
        if spec is not None and self._alive():
            self._ensure_slow()
            outcome = self.call_allocate(spec, close_after=spec.seconds, during=self._kill_daemon)
            self._say(f"SIGKILL during Allocate {spec} ({outcome})")
            if outcome is not None and outcome.ok:
                self._admit(spec, outcome)
        self._kill_daemon()
        self._say("daemon killed; restarting")
        self._restart_daemon()

    def _await_sigterm_handler(self, process: subprocess.Popen[bytes]) -> bool:
        """Wait until ``process`` catches SIGTERM (or has exited); False if it never did.

        Before that the kernel's default action ends it with status -15, and no program
        can help that during its own exec and interpreter start; from then on a SIGTERM
        must end it with 0 (the daemon installs its handler before it waits for FM).
        """
        deadline = time.monotonic() + SIGTERM_HANDLER_DEADLINE_S
        while process.poll() is None and not _catches_sigterm(process.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    @contextlib.contextmanager
    def _flood(self, connections: int) -> Iterator[None]:
        """``connections`` idle TCP connections to the REST port, held for the block (the
        daemon resets those beyond its cap; under the campaign's descriptor limit that is
        most of them)."""
        held: list[socket.socket] = []
        try:
            if self.daemon is not None:
                for _ in range(connections):
                    try:
                        held.append(
                            socket.create_connection(("127.0.0.1", self.daemon.port), timeout=1)
                        )
                    except OSError:
                        break  # the backlog is full: flooded enough
            self._say(f"REST flood: {len(held)} connections open")
            yield
        finally:
            for sock in held:
                sock.close()
        # The daemon frees a slot when it reads the close: REST serves again soon after.
        deadline = time.monotonic() + FLOOD_RECOVERY_S
        while self.daemon is not None and self._alive():
            try:
                self.daemon.get("/healthz")
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.violate(
                        "serving",
                        f"REST did not serve within {FLOOD_RECOVERY_S:g} s after a flood "
                        f"ended: {exc}",
                    )
                    return
                time.sleep(0.05)

    def _daemon_hup(self) -> None:
        if self.daemon is None or self.daemon.process is None:
            return
        process = self.daemon.process
        if process.poll() is not None:
            return
        if not self._await_sigterm_handler(process):
            return  # still importing: its handlers are not installed yet
        process.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        if process.poll() is not None:
            self.violate("serving", f"SIGHUP ended the daemon (status {process.returncode})")
            self._spawn()
            self._wait_started(START_DEADLINE_S)
        else:
            self._say("SIGHUP: still serving")

    def _daemon_term(self) -> None:
        if self.daemon is None or self.daemon.process is None:
            return
        process = self.daemon.process
        started = self.api_up
        if process.poll() is None and not self._await_sigterm_handler(process):
            self.violate(
                "shutdown",
                f"no SIGTERM handler {SIGTERM_HANDLER_DEADLINE_S:g} s after the daemon started",
            )
        if process.poll() is None:
            begin = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=SIGTERM_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.violate(
                    "shutdown",
                    f"still running {SIGTERM_DEADLINE_S:g} s after SIGTERM "
                    f"({'serving' if started else 'before it served'})",
                )
                self._kill_daemon()
            else:
                took = time.monotonic() - begin
                self._say(f"SIGTERM: exit {code} after {took:.2f} s")
                if code != 0:
                    self.violate(
                        "shutdown",
                        f"exit status {code} after SIGTERM "
                        f"({'serving' if started else 'before its first FM report'}, "
                        f"FM {'unreachable' if self.model.unreachable else 'reachable'})",
                    )
        self.api_up = False
        self._restart_daemon()

    # Fabric Manager

    def _fm_fault(self, spec: str) -> None:
        name = spec.partition("=")[0]
        if spec != "slow-activation=0" and name not in ("reachable", "clear"):
            self._fault(f"FM {name}")
        self.fm.inject(spec)
        model = self.model
        if name in ("slow-activation", "clear"):
            model.slow_calls_end = max(model.slow_calls_end, time.monotonic() + model.slow)
        if name == "unreachable":
            model.unreachable = True
        elif name == "reachable":
            model.unreachable = False
        elif name == "slow-activation":
            model.slow = float(spec.partition("=")[2])
        elif name == "nvlink-error":
            model.nvlink_errors.add(int(spec.partition("=")[2]))
        elif name == "degrade":
            model.degraded = True
        elif name in ("garbled", "ungarbled"):
            model.garbled = name == "garbled"
        elif name == "restart":
            model.prewarmed.clear()  # set-activated names what pods hold
        elif name == "clear":
            # A failed activation keeps its partition out for a while after the fault.
            for pid in model.nvlink_errors:
                model.hold_until[pid] = time.monotonic() + FAULT_HOLD_S
            model.unreachable, model.slow, model.degraded = False, 0.0, False
            model.garbled = False
            model.nvlink_errors.clear()
        self._say(f"FM fault {spec}")

    def _overlap_candidates(self) -> list[tuple[int, int]]:
        """Pairs of overlapping partitions that FM has inactive, no pod holds, and whose
        GPUs nothing else uses (so the injected overlap involves nobody's VM)."""
        if self.model.injected_overlap:
            return []
        try:
            active = set(self.fm.read().active)
        except (OSError, ValueError):
            return []
        busy = active | set(self.model.held) | self.model.prewarmed
        free = [p for p in sorted(self.table.modules) if not any(
            self.table.overlap(p, o) or p == o for o in busy)]  # fmt: skip
        return [(a, b) for a in free for b in free if a < b and self.table.overlap(a, b)]

    def _fm_overlap(self, a: int, b: int) -> None:
        """Make ``a`` and ``b`` active in FM together, which FM itself never does."""
        self.fm.change(lambda sim: sim.active.update({a, b}))
        self.model.injected_overlap = frozenset({a, b})
        self.model.overlap_since_settle = True
        self._say(f"FM state: partitions {a} and {b} both active (impossible in FM)")

    def _fm_behind(self, pid: int) -> None:
        try:
            self.fm.change(lambda sim: sim.activate(pid))
        except FabricManagerError as exc:
            self._say(f"fmpm -a {pid} by hand: {exc}")
        else:
            self._say(f"fmpm -a {pid} by hand: activated")

    # operator

    def rest(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """One REST call with the token; (status, JSON or text). (0, reason) if no answer."""
        assert self.daemon is not None
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        request = urllib.request.Request(
            self.daemon.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=REST_DEADLINE_S) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (OSError, TimeoutError) as exc:
            return 0, str(exc)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _rest_step(self, kind: str, target: int) -> None:
        if not self.api_up:
            self._say(f"{kind} {target}: API not up, skipped")
            return
        held = self.model.held
        if kind == "rest-activate":
            status, body = self.rest("POST", f"/v1/partitions/{target}/activate")
            if status == 200:
                if target not in held:
                    self.model.prewarmed.add(target)
            elif isinstance(body, dict) and "NVLINK_ERROR" in str(body.get("detail")):
                self.model.hold_until[target] = time.monotonic() + FAULT_HOLD_S
        elif kind in ("rest-deactivate", "rest-force-deactivate"):
            force = kind == "rest-force-deactivate"
            body_in = {"force": True} if force else {}
            status, body = self.rest("POST", f"/v1/partitions/{target}/deactivate", body_in)
            if status == 200:
                if target in held and not force:
                    self.violate(
                        "held",
                        f"REST deactivate of partition {target} (held by {held[target]}) "
                        "without force answered 200",
                    )
                    self._end_pods_holding(target, why="lost its partition")
                elif target in held:
                    self._end_pods_holding(
                        target, why="lost its partition to a forced deactivation"
                    )
                self.model.prewarmed.discard(target)
            elif force and target in held:
                self.force_failed.add(target)
        elif kind == "rest-drain":
            status, body = self.rest("POST", f"/v1/gpus/{target}/drain")
            if status == 200:
                self.model.drained.add(target)
        else:
            status, body = self.rest("POST", f"/v1/gpus/{target}/undrain")
            if status == 200:
                self.model.drained.discard(target)
        detail = body.get("detail") if isinstance(body, dict) else body
        self._say(f"{kind} {target}: {status} {detail if status != 200 else ''}")
        if status == 0:
            self.violate("serving", f"REST {kind} {target} got no answer: {body}")
        elif status >= 500 and status not in (502, 503):  # 502/503: FM refused / away
            self.violate("serving", f"REST {kind} {target} answered {status}: {detail}")

    # -- checks

    def check_invariants(self) -> None:
        """Checks 1 and 2, and that the daemon lives and answers /healthz."""
        sim = self.fm.read()
        active = frozenset(sim.active)
        injected = self.model.injected_overlap
        if injected and not injected <= active:
            self.model.injected_overlap = injected = frozenset()  # resolved
        pairs = [p for p in overlapping_pairs(self.table, active) if set(p) != injected]
        for a, b in pairs:
            self.violate(
                "overlap",
                f"partitions {a} and {b} share a GPU and are both active in FM "
                f"(active: {sorted(active)})",
                key=f"overlap {a} {b}",
            )
        self._reported -= {
            k for k in self._reported if k.startswith("overlap") and
            tuple(int(x) for x in k.split()[1:]) not in pairs
        }  # fmt: skip
        for pid, pod in sorted(self.model.held.items()):
            if pid not in active and pid in self.model.held:
                after = " after a forced deactivation failed" if pid in self.force_failed else ""
                self.violate(
                    "held",
                    f"partition {pid}, held by {pod} (its Allocate answered OK), is inactive "
                    f"in FM{after} (active: {sorted(active)})",
                )
                self._end_pods_holding(pid, why="lost its partition")
        process = self.daemon.process if self.daemon is not None else None
        if process is not None and process.poll() is not None:
            self._daemon_failed(f"exited with {process.returncode}")
            return
        if not self.api_up and self._alive():
            assert self.daemon is not None
            with contextlib.suppress(OSError, ValueError):
                self.api_up = self.daemon.get("/healthz")[0] == 200
        elif self.api_up:
            status, body = self.rest("GET", "/healthz")
            if status != 200:
                self.violate("serving", f"/healthz answered {status}: {body}")
            self._check_held_in_use()

    def _check_held_in_use(self) -> None:
        """Check 2, the daemon's side: what a pod holds it counts in use (else a plain
        deactivate, or set-activated after an FM restart, would take it from the pod)."""
        status, body = self.rest("GET", "/v1/partitions")
        if status != 200 or not isinstance(body, dict):
            self.violate("serving", f"GET /v1/partitions answered {status}: {body}")
            return
        views = {int(p["id"]): p for p in body["partitions"]}
        for pid, pod in sorted(self.model.held.items()):
            view = views.get(pid)
            if view is not None and not view.get("in_use"):
                after = " after a forced deactivation failed" if pid in self.force_failed else ""
                self.violate(
                    "held",
                    f"partition {pid}, held by {pod} (its Allocate answered OK), is not in use "
                    f"in the daemon{after}: state {view.get('state')}, phase {view.get('phase')}",
                    key=f"not in use {pid} {pod}",
                )

    def observe(self) -> Observation:
        """Read FM, REST and the kubelet stand-in once."""
        sim = self.fm.read()
        status, body = self.rest("GET", "/v1/partitions")
        partitions = tuple(body["partitions"]) if status == 200 and isinstance(body, dict) else ()
        readyz = self.rest("GET", "/readyz")[0]
        kubelet: dict[str, dict[str, str]] = {}
        streams: dict[str, bool] = {}
        for size in self.table.sizes():
            name = resource(size)
            try:
                kubelet[name] = self.kubelet.devices(name)
                streams[name] = not self.kubelet.stream_ended(name)
            except NotRegisteredError:
                streams[name] = False
        return Observation(
            frozenset(sim.active), sim.awaiting_set_activated, partitions, readyz, kubelet, streams
        )

    def _settle(self) -> None:
        """Clear every fault, wait for convergence (check 3), then check serving (4)."""
        self._fm_fault("clear")
        self._pods_up()
        if not self.api_up and self._injected_overlap_present():
            self._overlap_refusal()  # it waited for FM, then found the overlap
        if self.orphans:
            self._reap_orphans()
        if not self.api_up and not self._wait_started(START_DEADLINE_S):
            self._daemon_failed("did not come up once FM and PodResources were back")
        if self.rng.random() < 0.5:
            for module in sorted(self.model.drained):
                self._rest_step("rest-undrain", module)
        settings = self.settings
        begin = time.monotonic()
        # A slow activation still in flight ends when it ends; convergence starts then.
        in_flight = max(0.0, self.model.slow_calls_end - begin)
        # An injected overlap is let go one partition at a time: the book holds one of
        # the pair (it never has two overlapping partitions active), and takes up the
        # other from the next list once the first is released (N6, N11): two rounds.
        overlap = settings.bound_s if self.model.overlap_since_settle else 0.0
        self.model.overlap_since_settle = False
        limit = settings.bound_s + settings.slack_s + in_flight + overlap
        problems: list[str] = []  # the latest non-empty reading
        pending_at = 0.0  # when that reading was taken, seconds after the faults cleared
        converged_after: float | None = None
        while time.monotonic() - begin < limit + 10.0:
            seen = convergence_problems(self.table, self.model, self.observe(), time.monotonic())
            if not seen:
                converged_after = time.monotonic() - begin
                break
            problems, pending_at = seen, time.monotonic() - begin
            time.sleep(0.05)
        if converged_after is not None:
            self.result.convergence_s.append(converged_after)
            self._say(f"settle: converged after {converged_after:.2f} s")
        if converged_after is None or converged_after > limit:
            late = (
                f"converged only after {converged_after:.2f} s"
                if converged_after is not None
                else f"not converged after {limit + 10:.0f} s"
            )
            slow = f" + {in_flight:.2f} s of slow activations in flight" if in_flight else ""
            self.violate(
                "convergence",
                f"{late} (bound {settings.bound_s:g} s + {settings.slack_s:g} s slack{slow}); "
                f"still seen {pending_at:.2f} s after the faults cleared: "
                + "; ".join(problems[:12]),
            )
        if converged_after is None:
            # Stuck: only a restart of the daemon gets it going again. Continue from there.
            self._kill_daemon()
            self._restart_daemon()
            self._await_convergence(limit + 10.0)
        self._fresh_allocate()

    def _await_convergence(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not convergence_problems(self.table, self.model, self.observe(), time.monotonic()):
                return
            time.sleep(0.1)

    def _fresh_allocate(self) -> None:
        """Check 4: a free partition is allocated at once (then a pod holds it)."""
        seen = self.observe()
        free = [
            int(p["id"])
            for p in seen.rest_partitions
            if p.get("state") == "free" and p.get("healthy")
        ]
        if not free:
            self._say("settle: no free partition to allocate")
            return
        pid = self.rng.choice(sorted(free))
        spec = AllocationSpec(self.table.size(pid), ((device(pid),),))
        outcome = self.call_allocate(spec)
        self._say(f"settle: fresh Allocate {spec}: {outcome}")
        if outcome is None or not outcome.ok:
            self.violate("serving", f"a fresh Allocate of free {device(pid)} failed: {outcome}")
            return
        self._admit(spec, outcome)


def _ids(group: Sequence[str]) -> list[int]:
    """Partition IDs of well-formed device IDs in ``group`` (garbage is skipped)."""
    ids = []
    for text in group:
        head, _, number = text.partition("-")
        if head == "partition" and number.isdigit() and str(int(number)) == number:
            ids.append(int(number))
    return ids


def _start_time(pid: int) -> str | None:
    """A process's start time (``/proc/PID/stat`` field 22); None if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler (``SigCgt`` in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _pid_alive(process: tuple[int, str]) -> bool:
    """Whether that very process (not a later one with its PID) still runs."""
    return _start_time(process[0]) == process[1]


def run_campaign(
    workdir: Path,
    backend: str,
    seed: int,
    steps: int,
    *,
    script: Sequence[Step] | None = None,
    settings: CampaignSettings | None = None,
    log: Callable[[str], None] | None = None,
    deadline: float | None = None,
) -> CampaignResult:
    """Start a node under ``workdir``, run the campaign, stop everything; the result."""
    with Campaign(workdir, backend, seed, settings=settings, log=log) as campaign:
        return campaign.run(steps, script=script, deadline=deadline)
