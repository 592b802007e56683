"""The daemon in process: ``run_daemon`` under ``autojump_clock``, its kubelet in the same run.

``await nursery.start(run_daemon, config)`` on a simulated HGX H200 (sysfs and /dev tree,
the simulator FM backend, whose slow activation sleeps on Trio's clock). The kubelet's
device manager and PodResources are :mod:`inprocess_kubelet`: grpclib servers and clients
on trio-asyncio in the test's own Trio run, over real Unix sockets. So supervision,
release, health, registration and shutdown run in virtual time: a test waits for minutes
of the daemon's time in milliseconds, and every time it asserts is the virtual clock's,
the same on any machine.

What works under ``autojump_clock``, and why: the MockClock jumps only when no task can
run and the I/O poll (made with a zero timeout) finds nothing ready. Every socket here
has both ends in this run, and a write lands in the peer's kernel buffer before the
writer blocks, so the poll always sees it: no jump happens while bytes are on their way.
trio-asyncio's loop reads Trio's clock, so grpclib's timeouts (Register's 15 s,
PodResources List's 5 s) are virtual too. inotify events are queued by the kernel during
the test's own ``unlink``/``mknod``, so they are seen the same way. Hypercorn binds
``127.0.0.1:0`` (a numeric host: no resolver thread).

What would not work: the grpcio stand-in (``testkit.kubelet``) runs in its
own threads, which make progress in real time; while the Trio side waits for them no task
is runnable and the poll finds nothing, so the clock jumps and every timeout fires at
once. Nor would anything the daemon ran in a worker thread (the libnvfm backend's calls,
``trio.to_thread``) or in a child process (the fmpm backend): those stay with the
subprocess tests (``test_daemon.py``, ``test_lifecycle.py``), the thin end-to-end layer.

Two places still read a real clock, harmlessly here: grpclib computes a call's deadline
on ``time.monotonic`` and arms it on the loop's (virtual) timer, so a 0.5 s deadline
fires a few real milliseconds early in virtual time; the FM simulator keeps its 60 s
restart window on the wall clock, so under a MockClock FM never exits for want of
set-activated (the tests assert the daemon resumes it well inside the window instead).

No seam in ``run_daemon`` was needed: PodResources is a real grpclib server on the
configured socket (stopped to make it unreadable) and FM is the simulator's state file,
so the daemon builds its own clients exactly as in production.

Signals: ``signal.raise_signal`` runs the C handler at once, which writes to Trio's
wakeup fd, so ``open_signal_receiver`` delivers it in the same run. A safety handler
stands in for the default action (which would kill pytest) and records any SIGTERM that
reaches no receiver, so a daemon that does not watch signals fails the test instead.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio
from grpclib import GRPCError
from grpclib.const import Status
from inprocess_kubelet import (
    STREAM_ENDS,
    WAIT_LIMIT_S,
    Changes,
    InProcessKubelet,
    InProcessPodResources,
)
from node_helpers import ops

from nvswitch_dp.api.app import create_app
from nvswitch_dp.api.schemas import readiness_problems
from nvswitch_dp.cli import simulated
from nvswitch_dp.config import Config, with_overrides
from nvswitch_dp.controller import PartitionController
from nvswitch_dp.core import FM_RESUME_PATIENCE_S, FM_START_BACKOFF_MAX_S
from nvswitch_dp.daemon import STREAM_DRAIN_S, ShutdownError, run_daemon
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.simulator import RESTART_WINDOW_S, SimulatorStore, inject_fault
from nvswitch_dp.partitions.fabric_health import TROUBLE_SUPERVISION_S
from nvswitch_dp.partitions.state import PartitionInUse, Phase, State
from nvswitch_dp.partitions.view import FabricStatus
from nvswitch_dp.plugin.grpc_trio import CLOSE_GRACE_S
from nvswitch_dp.plugin.lifecycle import POLL_S, socket_name
from nvswitch_dp.plugin.pod_resources import release_check_interval
from nvswitch_dp.vfio.simulate.faults import (
    add_foreign_function,
    bind,
    remove_foreign_function,
    remove_vfio_group,
    restore_vfio_group,
    unbind,
)
from nvswitch_dp.vfio.simulate.node import SimulatedNode, device_dir

R = "nvidia.com/gpu-h200"
RESOURCES = [f"{R}-{n}x" for n in (1, 2, 4, 8)]
MODULE_MAP = platform("hgx-h200").module_map()
GRACE = 3.0
RELEASE_CHECK = release_check_interval(GRACE)  # how often PodResources is read
SUPERVISION = 10.0  # fabric_manager.reconcile_interval_seconds (the default is 1)
HEALTH_POLL = 2.0
# Partitions with GPU module 3 in them: 1x, 2x (1,3), 4x (1-4), 8x.
WITH_MODULE_3 = {f"{R}-1x": "partition-9", f"{R}-2x": "partition-3", f"{R}-4x": "partition-1"}


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "fabric_manager.backend": "simulator",
        "fabric_manager.reconcile_interval_seconds": SUPERVISION,
        "plugin.directory": str(tmp_path / "dp"),
        "plugin.pod_resources_socket": str(tmp_path / "pr" / "kubelet.sock"),
        "plugin.release_grace_seconds": GRACE,
        "vfio.health_interval_seconds": HEALTH_POLL,
        "api.listen": "127.0.0.1:0",
    }
    settings.update(overrides)
    return simulated(with_overrides(Config(), settings), "hgx-h200")


@dataclass
class Node:
    """A daemon running in this Trio run, its kubelet, PodResources and simulated hardware."""

    config: Config
    controller: PartitionController
    kubelet: InProcessKubelet
    pods: InProcessPodResources
    daemon: trio.Nursery  # cancel its scope to stop the daemon
    started_at: float

    @property
    def plugin_dir(self) -> Path:
        return Path(self.config.plugin.directory)

    @property
    def store(self) -> SimulatorStore:
        return fm_store(self.config)

    @property
    def hardware(self) -> SimulatedNode:
        return SimulatedNode(
            Path(self.config.vfio.sysfs_root), Path(self.config.vfio.dev_root), MODULE_MAP
        )

    def fm_active(self) -> set[int]:
        return set(self.store.load().active)

    def inject(self, spec: str) -> None:
        fm_inject(self.config, spec)

    def phase(self, pid: int) -> Phase:
        return self.controller.view().view(pid).phase

    def state(self, pid: int) -> State:
        return self.controller.view().view(pid).state

    def sockets(self) -> list[str]:
        return sorted(p.name for p in self.plugin_dir.glob("nvswitch-dp-*.sock"))

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> float:
        """Wait (virtual time) until ``predicate`` holds; return when it first did.

        Checked after every change of the daemon's generation and of what the kubelet
        has seen, so the time returned is exact, not a polling step. ``TimeoutError``
        after ``WAIT_LIMIT_S`` (under autojump a wait that never ends would not hang: it
        would jump from one periodic task to the next for ever).
        """
        with trio.move_on_after(WAIT_LIMIT_S):
            while not predicate():
                await _next_change(self.controller, self.kubelet.changes)
            return trio.current_time()
        seen = {r: self.kubelet.devices(r) for r in RESOURCES}
        raise TimeoutError(f"{what}: not within {WAIT_LIMIT_S:g}s; the kubelet has {seen}")

    async def readyz(self) -> tuple[int, Any]:
        """``GET /readyz`` from the REST app on this daemon's controller (Quart's test
        client: the daemon's own listener has an ephemeral port it does not report)."""
        client = create_app(self.controller, self.controller.metrics, self.config).test_client()
        response = await client.get("/readyz")
        return response.status_code, await response.get_json()

    async def allocate(self, resource: str, *devices: str) -> None:
        await self.kubelet.allocate(resource, list(devices))


async def _next_change(controller: PartitionController, kubelet: Changes) -> None:
    """Until the daemon's generation or the kubelet's record moves from what it is now.

    Both numbers are taken before anything runs, so a change made before a waiting
    task first runs is not missed.
    """
    generation, version = controller.machine.generation, kubelet.version

    async def daemon_changed(race: trio.CancelScope) -> None:
        while controller.machine.generation == generation:
            await controller.wait_changed()
        race.cancel()

    async def kubelet_changed(race: trio.CancelScope) -> None:
        while kubelet.version == version:
            await kubelet.wait()
        race.cancel()

    async with trio.open_nursery() as race:
        race.start_soon(daemon_changed, race.cancel_scope)
        race.start_soon(kubelet_changed, race.cancel_scope)


def fm_store(config: Config) -> SimulatorStore:
    return SimulatorStore(
        Path(config.state_dir) / "fabricmanager.state", config.fabric_manager.simulator_platform
    )


def fm_inject(config: Config, spec: str) -> None:
    store = fm_store(config)
    sim = store.load()
    inject_fault(sim, spec)
    store.save(sim)


@asynccontextmanager
async def kubelet_side(
    config: Config,
) -> AsyncIterator[tuple[InProcessKubelet, InProcessPodResources, trio.Nursery]]:
    """The kubelet and PodResources served, in a trio-asyncio loop of their own."""
    plugin_dir = Path(config.plugin.directory)
    plugin_dir.mkdir(parents=True, exist_ok=True)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        kubelet = InProcessKubelet(plugin_dir, nursery)
        pods = InProcessPodResources(Path(config.plugin.pod_resources_socket), nursery)
        await kubelet.start()
        await pods.start()
        yield kubelet, pods, nursery
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running_node(tmp_path: Path, **overrides: Any) -> AsyncIterator[Node]:
    """The daemon started with ``nursery.start(run_daemon)``, registered with the kubelet."""
    config = make_config(tmp_path, **overrides)
    async with kubelet_side(config) as (kubelet, pods, _), trio.open_nursery() as daemon:
        started_at = trio.current_time()
        controller: PartitionController = await daemon.start(run_daemon, config)
        node = Node(config, controller, kubelet, pods, daemon, started_at)
        await kubelet.wait_registered(RESOURCES)
        # The kubelet has the first list before Register returns to the daemon.
        await node.wait_for(lambda: all(controller.view().registered.values()), "registered")
        yield node
        daemon.cancel_scope.cancel()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def sigterm_reached_nobody() -> Iterator[list[int]]:
    """SIGTERMs no receiver took (instead of the default action: death of pytest)."""
    caught: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    previous = signal.signal(signal.SIGTERM, record)
    try:
        yield caught
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- registration -------------------------------------------------------------------------


async def test_every_resource_registers_on_the_kubelet_socket_with_every_partition(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        assert set(node.kubelet.registered()) == set(RESOURCES)
        assert node.kubelet.devices(f"{R}-8x") == {"partition-0": "Healthy"}
        assert set(node.kubelet.devices(f"{R}-1x")) == {f"partition-{i}" for i in range(7, 15)}
        # Registered at the start's own instant: no backoff, no poll was needed.
        assert [r.at for r in node.kubelet.history] == [node.started_at] * 4
        assert readiness_problems(node.controller.view()) == []
        assert node.sockets() == sorted(socket_name(r) for r in RESOURCES)


async def test_a_b200_node_serves_resources_named_after_its_gpus(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """plugin.resource_prefix auto: the names follow the GPUs sysfs shows (B200 here)."""
    config = with_overrides(make_config(tmp_path), {"module_map": {}})
    config = simulated(config, "hgx-b200")
    async with kubelet_side(config) as (kubelet, _, _), trio.open_nursery() as daemon:
        controller: PartitionController = await daemon.start(run_daemon, config)
        b200 = [f"nvidia.com/gpu-b200-{n}x" for n in (1, 2, 4, 8)]
        assert sorted(controller.layout.resources) == sorted(b200)
        await kubelet.wait_registered(b200)
        daemon.cancel_scope.cancel()


async def test_a_gpu_that_appears_while_fm_is_awaited_at_start_is_served(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Sysfs is read once FM has answered: a GPU bound (or shown) during the wait counts."""
    config = make_config(tmp_path)
    device_file = device_dir(Path(config.vfio.sysfs_root), MODULE_MAP[8]) / "device"
    real = device_file.read_text()
    device_file.write_text("0x0000\n")  # not a GPU we serve, for now
    fm_inject(config, "unreachable")
    async with kubelet_side(config), trio.open_nursery() as daemon:

        async def gpu_and_fm_come() -> None:
            await trio.sleep(30)
            device_file.write_text(real)
            fm_inject(config, "reachable")

        daemon.start_soon(gpu_and_fm_come)
        controller: PartitionController = await daemon.start(run_daemon, config)
        assert 8 not in controller.view().module_faults
        assert set(controller.layout.gpus) == set(MODULE_MAP)
        daemon.cancel_scope.cancel()


async def test_the_daemon_waits_for_a_late_kubelet_and_registers_once_it_serves(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path)
    async with kubelet_side(config) as (kubelet, _, _), trio.open_nursery() as daemon:
        await kubelet.stop()
        controller = await daemon.start(run_daemon, config)
        await trio.sleep(5.0)
        assert kubelet.history == []
        problems = readiness_problems(controller.view())
        assert problems == [f"{r} is not registered with the kubelet" for r in sorted(RESOURCES)]
        late = trio.current_time()
        await kubelet.start()
        await kubelet.wait_registered(RESOURCES)
        with trio.fail_after(POLL_S):  # Register's answer comes after the kubelet's first list
            while readiness_problems(controller.view()):
                await controller.wait_changed()
        assert trio.current_time() - late <= POLL_S
        daemon.cancel_scope.cancel()


async def test_our_socket_removed_serves_and_registers_that_resource_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        resource = f"{R}-4x"
        await node.allocate(resource, "partition-2")
        await trio.sleep(1.0)
        removed, seen = trio.current_time(), len(node.kubelet.history)
        (node.plugin_dir / socket_name(resource)).unlink()
        await node.kubelet.wait_registered([resource], after=seen)
        assert trio.current_time() - removed <= 2 * POLL_S
        again = node.kubelet.history[seen:]
        assert [r.resource for r in again] == [resource]  # the others were left alone
        # State survives: the partition is still in use, its overlaps still out.
        assert node.kubelet.devices(resource)["partition-2"] == "Healthy"
        assert node.kubelet.devices(f"{R}-8x") == {"partition-0": "Unhealthy"}
        assert node.sockets() == sorted(socket_name(r) for r in RESOURCES)


async def test_a_kubelet_restart_re_registers_every_resource(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        await node.allocate(f"{R}-2x", "partition-4")
        node.pods.assign("ml", "vm", "compute", f"{R}-2x", ["partition-4"])

        async def restart() -> None:
            await trio.sleep(1.0)
            restarted, seen = trio.current_time(), len(node.kubelet.history)
            await node.kubelet.restart()
            await node.kubelet.wait_registered(RESOURCES, after=seen)
            assert trio.current_time() - restarted <= 2 * POLL_S

        await restart()
        await trio.sleep(1.0)
        tasks, fds = trio.lowlevel.current_statistics().tasks_living, open_fds()
        for _ in range(10):
            await restart()
        await trio.sleep(1.0)
        # Nothing leaks, on either side of the sockets (both live in this process).
        assert trio.lowlevel.current_statistics().tasks_living == tasks
        assert open_fds() == fds
        assert len(node.kubelet.history) == 4 * 12
        assert node.kubelet.rejected == []
        assert node.sockets() == sorted(socket_name(r) for r in RESOURCES)
        assert node.kubelet.devices(f"{R}-2x")["partition-4"] == "Healthy"  # still in use
        assert node.kubelet.devices(f"{R}-1x")["partition-8"] == "Unhealthy"


# -- supervision --------------------------------------------------------------------------


async def test_an_fm_restart_is_resumed_with_exactly_the_partitions_in_use_within_a_period(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        await node.allocate(f"{R}-4x", "partition-1")
        node.pods.assign("ml", "trainer", "main", f"{R}-4x", ["partition-1"])
        await node.controller.activate(6)  # pre-warmed by an operator: held by no pod
        assert node.fm_active() == {1, 6}
        # Just after the first supervision: the worst case, a whole period to wait.
        await trio.sleep_until(node.started_at + SUPERVISION + 0.001)
        restarted = trio.current_time()
        node.inject("restart")
        resumed = await node.wait_for(
            lambda: not node.store.load().awaiting_set_activated, "FM resumed"
        )
        assert resumed - restarted <= SUPERVISION
        assert node.fm_active() == {1}
        assert ops(node.controller, "set_activated", "SUCCESS") == 1
        await node.wait_for(lambda: node.phase(6) is Phase.INACTIVE, "6 dropped as FM did")
        view = node.controller.view()
        assert view.fabric is FabricStatus.UP
        assert view.view(1).state is State.ALLOCATED
        assert readiness_problems(view) == []


async def test_an_unreachable_fm_is_supervised_every_second_and_readiness_recovers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        await node.allocate(f"{R}-2x", "partition-3")
        node.pods.assign("ml", "vm", "compute", f"{R}-2x", ["partition-3"])
        await trio.sleep_until(node.started_at + SUPERVISION + 0.001)
        node.inject("unreachable")
        seen = await node.wait_for(
            lambda: not node.controller.view().fabric_reachable, "FM seen unreachable"
        )
        assert seen - node.started_at == pytest.approx(2 * SUPERVISION)
        status, body = await node.readyz()
        assert status == 503 and not body["ready"]
        assert [p[:30] for p in body["problems"]] == ["Fabric Manager is unreachable:"]
        # Nothing new is handed out, but the partition in use stays Healthy.
        await node.wait_for(
            lambda: (
                [node.kubelet.healthy(r) for r in RESOURCES]
                == [set(), {"partition-3"}, set(), set()]
            ),
            "only the partition in use left Healthy",
        )
        # While the trouble lasts FM is asked every second, not every period.
        failed = ops(node.controller, "list", "CONNECTION_NOT_VALID")
        await trio.sleep(5 * TROUBLE_SUPERVISION_S + 0.5)
        assert ops(node.controller, "list", "CONNECTION_NOT_VALID") == failed + 5
        node.inject("reachable")
        back = trio.current_time()
        ready = await node.wait_for(
            lambda: readiness_problems(node.controller.view()) == [], "ready again"
        )
        assert ready - back <= TROUBLE_SUPERVISION_S
        assert await node.readyz() == (200, {"ready": True, "problems": []})
        await node.wait_for(lambda: len(node.kubelet.healthy(f"{R}-1x")) == 6, "pool back")
        assert node.fm_active() == {3}


async def test_a_partition_activated_behind_our_back_is_seen_at_supervision_and_released(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        await trio.sleep(0.5)
        sim = node.store.load()
        sim.activate(5)  # an operator's `fmpm -a 5`, or a killed daemon's late child
        node.store.save(sim)
        seen = await node.wait_for(lambda: node.phase(5) is Phase.ACTIVE, "seen active")
        assert seen - node.started_at == pytest.approx(SUPERVISION)
        # Maybe a pod's: its GPUs (5 and 7) leave the pool until N5 decides.
        await node.wait_for(
            lambda: {"partition-11", "partition-13"} & node.kubelet.healthy(f"{R}-1x") == set(),
            "its GPUs out of the pool",
        )
        released = await node.wait_for(lambda: node.fm_active() == set(), "released")
        assert seen + GRACE <= released <= seen + GRACE + RELEASE_CHECK
        await node.wait_for(
            lambda: len(node.kubelet.healthy(f"{R}-1x")) == 8, "its GPUs back in the pool"
        )


async def test_an_fm_restarted_while_we_were_down_is_resumed_from_pod_resources(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path)
    store = fm_store(config)
    sim = store.load()
    sim.activate(1)
    sim.activate(5)
    sim.restart()  # FM restarted while the plugin was down: refuses until set-activated
    store.save(sim)
    async with kubelet_side(config) as (kubelet, pods, _), trio.open_nursery() as daemon:
        pods.assign("ml", "trainer", "main", f"{R}-4x", ["partition-1"])
        controller = await daemon.start(run_daemon, config)
        assert store.load().active == {1}  # 5 was nobody's
        assert controller.view().view(1).state is State.ALLOCATED
        assert controller.view().view(5).phase is Phase.INACTIVE
        await kubelet.wait_registered(RESOURCES)
        daemon.cancel_scope.cancel()


async def test_an_fm_restarted_while_pod_resources_is_unreadable_is_resumed_after_patience(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path)
    store = fm_store(config)
    sim = store.load()
    sim.activate(2)
    sim.restart()
    store.save(sim)
    async with kubelet_side(config) as (kubelet, pods, _), trio.open_nursery() as daemon:
        await pods.stop()
        begun = trio.current_time()
        await daemon.start(run_daemon, config)
        # Naming none rather than let FM exit 60 s after its restart: the patience, the
        # backoff step that crosses it, and one more before first_report lists again.
        waited = trio.current_time() - begun
        assert FM_RESUME_PATIENCE_S <= waited <= FM_RESUME_PATIENCE_S + 2 * FM_START_BACKOFF_MAX_S
        assert waited < RESTART_WINDOW_S
        assert store.load().active == set()
        assert not store.load().awaiting_set_activated
        await kubelet.wait_registered(RESOURCES)
        daemon.cancel_scope.cancel()


# -- release ------------------------------------------------------------------------------


async def test_a_held_partition_is_released_exactly_a_grace_after_pod_resources_drops_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        await node.allocate(f"{R}-4x", "partition-1")
        node.pods.assign("ml", "trainer", "main", f"{R}-4x", ["partition-1"])
        await trio.sleep(5 * GRACE)  # held: many grace periods, nothing touched
        assert node.fm_active() == {1}
        assert node.state(1) is State.ALLOCATED
        await trio.sleep(0.5)  # between two readings
        ended = trio.current_time()
        node.pods.unassign("ml", "trainer")
        released = await node.wait_for(lambda: node.fm_active() == set(), "released")
        # Counted from the first reading without it: after the grace, within one reading.
        assert ended + GRACE <= released <= ended + GRACE + RELEASE_CHECK
        await node.wait_for(
            lambda: node.kubelet.devices(f"{R}-8x") == {"partition-0": "Healthy"},
            "its overlaps back in the pool",
        )
        assert node.state(1) is State.FREE


async def test_nothing_is_released_while_pod_resources_is_unreadable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        await node.allocate(f"{R}-2x", "partition-5")
        node.pods.assign("ml", "vm", "compute", f"{R}-2x", ["partition-5"])
        await trio.sleep(2.5)
        await node.pods.stop()
        node.pods.unassign("ml", "vm")  # the pod ends while nobody can read it
        await trio.sleep(10 * GRACE)
        assert node.fm_active() == {5}
        assert node.controller.view().pod_resources_reachable is False
        assert node.kubelet.devices(f"{R}-2x")["partition-5"] == "Healthy"
        back = trio.current_time()
        await node.pods.start()
        released = await node.wait_for(lambda: node.fm_active() == set(), "released")
        # The clock starts again at the first reading: no credit for the blind minute.
        assert back + GRACE <= released <= back + GRACE + RELEASE_CHECK


async def abandon_allocate(node: Node, how: str, resource: str, *devices: str) -> float:
    """An Allocate the kubelet gives up on after 0.5 s: its gRPC deadline passes (the
    plugin's server cancels the handler), it closes the connection mid-call, or our
    socket is removed (a kubelet restart: the daemon closes that server). Returns the
    latest the call may have ended, after its start."""
    if how == "deadline":
        with pytest.raises(GRPCError) as raised:
            await node.kubelet.allocate(resource, list(devices), deadline=0.5)
        assert raised.value.status is Status.DEADLINE_EXCEEDED
        return 0.5
    if how == "connection closed":
        with trio.move_on_after(0.5) as gave_up:
            await node.allocate(resource, *devices)
        assert gave_up.cancelled_caught
        return 0.5

    async def remove_socket() -> None:
        await trio.sleep(0.5)
        (node.plugin_dir / socket_name(resource)).unlink()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(remove_socket)
        with pytest.raises(STREAM_ENDS):
            await node.allocate(resource, *devices)
    return 0.5 + POLL_S  # the daemon looks for its socket every POLL_S


@pytest.mark.parametrize("how", ["deadline", "connection closed", "our socket removed"])
async def test_a_cancelled_allocate_leaves_nothing_activating_and_is_released_after_grace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    async with running_node(tmp_path) as node:
        node.inject("slow-activation=2")
        begun, seen = trio.current_time(), len(node.kubelet.history)
        latest = await abandon_allocate(node, how, f"{R}-1x", "partition-7", "partition-8")
        # grpclib computes the deadline's remaining time on the real clock and arms it on
        # the loop's (virtual) one: the real milliseconds in between are lost.
        assert 0.45 < trio.current_time() - begun <= latest
        assert {node.phase(7), node.phase(8)} == {Phase.ACTIVATING}
        if how == "our socket removed":  # the kubelet retries once we registered again
            await node.kubelet.wait_registered([f"{R}-1x"], after=seen)
        # A retry of one of them waits for the activation in flight and is answered.
        await node.allocate(f"{R}-1x", "partition-8")
        assert trio.current_time() - begun == pytest.approx(2.0)
        node.pods.assign("ml", "retried", "main", f"{R}-1x", ["partition-8"])
        done = trio.current_time()
        assert {node.phase(7), node.phase(8)} == {Phase.ACTIVE}
        node.controller.machine.check_invariants()
        # 7 went to no pod: released a grace after its activation completed; 8 stays.
        released = await node.wait_for(lambda: node.fm_active() == {8}, "7 released")
        assert done + GRACE <= released <= done + GRACE + RELEASE_CHECK
        assert node.state(7) is State.FREE and node.state(8) is State.ALLOCATED
        await node.wait_for(
            lambda: "partition-9" in node.kubelet.healthy(f"{R}-1x"), "7's pair-mate free"
        )
        assert all(
            v.phase is not Phase.ACTIVATING for v in node.controller.view().partitions.values()
        )


async def test_an_activation_longer_than_the_grace_is_not_released_under_its_pod(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path, **{"plugin.release_grace_seconds": 1.0}) as node:
        node.inject("slow-activation=3")
        begun = trio.current_time()
        await node.allocate(f"{R}-4x", "partition-2")
        assert trio.current_time() - begun == pytest.approx(3.0)
        assert node.state(2) is State.ALLOCATED
        # The kubelet records the assignment a moment after our answer.
        await trio.sleep(0.05)
        node.pods.assign("ml", "trainer", "main", f"{R}-4x", ["partition-2"])
        await trio.sleep(10.0)
        assert node.fm_active() == {2}
        assert node.state(2) is State.ALLOCATED
        with pytest.raises(PartitionInUse):
            await node.controller.deactivate(2)
        assert node.fm_active() == {2}
        # Never deactivated on the way (and then activated again under its pod).
        assert ops(node.controller, "deactivate", "SUCCESS") == 0
        assert ops(node.controller, "activate", "SUCCESS") == 1


# -- health -------------------------------------------------------------------------------


async def test_vfio_group_removed_and_recreated_turns_its_partitions_unhealthy_and_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        hw = node.hardware
        group = node.controller.layout.gpus[3].iommu_group

        def module_3(health: str) -> bool:
            return all(
                node.kubelet.devices(r).get(d) == health for r, d in WITH_MODULE_3.items()
            ) and node.kubelet.devices(f"{R}-8x") == {"partition-0": health}

        await trio.sleep(0.3)  # between two polls
        removed = trio.current_time()
        remove_vfio_group(hw, group)
        seen = await node.wait_for(lambda: module_3("Unhealthy"), "module 3's partitions out")
        assert seen == removed  # inotify: at once, not at the next poll
        assert node.kubelet.devices(f"{R}-2x")["partition-4"] == "Healthy"  # GPUs 2 and 4
        assert f"/dev/vfio/{group} is missing" in node.controller.view().module_faults[3]
        restored = trio.current_time()
        restore_vfio_group(hw, group)
        assert await node.wait_for(lambda: module_3("Healthy"), "back") == restored
        # The GPU leaves vfio-pci: its group node goes with it, so that is seen at once too.
        unbound = trio.current_time()
        unbind(hw, MODULE_MAP[3], to="nvidia")
        assert await node.wait_for(lambda: module_3("Unhealthy"), "unbound") == unbound
        rebound = trio.current_time()
        bind(hw, MODULE_MAP[3])
        assert await node.wait_for(lambda: module_3("Healthy"), "bound again") == rebound
        # A foreign function in the group changes sysfs only: no event, the poll sees it.
        await trio.sleep(0.3)
        joined = trio.current_time()
        foreign = add_foreign_function(hw, group)
        seen = await node.wait_for(lambda: module_3("Unhealthy"), "group not viable")
        assert joined < seen <= joined + HEALTH_POLL
        left = trio.current_time()
        remove_foreign_function(hw, foreign)
        back = await node.wait_for(lambda: module_3("Healthy"), "viable again")
        assert left < back <= left + HEALTH_POLL


# -- shutdown -----------------------------------------------------------------------------


async def test_cancelling_the_daemon_removes_its_sockets_within_the_close_grace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path)
    async with kubelet_side(config) as (kubelet, _, _):
        async with trio.open_nursery() as daemon:
            await daemon.start(run_daemon, config)
            await kubelet.wait_registered(RESOURCES)
            await kubelet.allocate(f"{R}-4x", ["partition-1"])
            cancelled = trio.current_time()
            daemon.cancel_scope.cancel()
        assert trio.current_time() - cancelled <= CLOSE_GRACE_S
        plugin_dir = Path(config.plugin.directory)
        assert sorted(p.name for p in plugin_dir.iterdir()) == ["kubelet.sock"]
        await kubelet.wait_until(lambda: all(r.ended for r in kubelet.history), "streams end")
        assert trio.current_time() - cancelled <= CLOSE_GRACE_S


async def test_sigterm_ends_streams_removes_sockets_and_raises_shutdown(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, sigterm_reached_nobody: list[int]
) -> None:
    config = make_config(tmp_path)
    async with kubelet_side(config) as (kubelet, _, _):
        with pytest.RaisesGroup(ShutdownError, flatten_subgroups=True):
            async with trio.open_nursery() as daemon:
                await daemon.start(run_daemon, config)
                await kubelet.wait_registered(RESOURCES)
                signalled = trio.current_time()
                signal.raise_signal(signal.SIGTERM)
                await trio.sleep(WAIT_LIMIT_S)  # bounded: under autojump for ever never ends
                pytest.fail("the daemon did not end on SIGTERM")
        assert trio.current_time() - signalled <= CLOSE_GRACE_S
        assert sigterm_reached_nobody == []
        assert list(Path(config.plugin.directory).glob("nvswitch-dp-*.sock")) == []
        await kubelet.wait_until(lambda: all(r.ended for r in kubelet.history), "streams end")
        assert trio.current_time() - signalled <= CLOSE_GRACE_S
        # Every stream was ended by the plugin (OK), none cut by the connection closing.
        assert all(r.ended_cleanly for r in kubelet.history)


async def test_sigterm_while_fm_is_unreachable_at_start_ends_the_daemon_cleanly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, sigterm_reached_nobody: list[int]
) -> None:
    config = make_config(tmp_path)
    fm_inject(config, "unreachable")
    async with kubelet_side(config):
        with pytest.RaisesGroup(ShutdownError, flatten_subgroups=True):
            async with trio.open_nursery() as daemon:
                daemon.start_soon(run_daemon, config)
                await trio.sleep(60)  # first_report retries with backoff, for ever
                assert list(Path(config.plugin.directory).glob("nvswitch-dp-*.sock")) == []
                signalled = trio.current_time()
                signal.raise_signal(signal.SIGTERM)
                await trio.sleep(WAIT_LIMIT_S)  # bounded: under autojump for ever never ends
                pytest.fail("the daemon did not end on SIGTERM")
        # It ends after the short pause that lets ListAndWatch streams send their end.
        assert trio.current_time() - signalled == pytest.approx(STREAM_DRAIN_S)
        assert sigterm_reached_nobody == []


async def test_a_daemon_waiting_for_an_unreachable_fm_is_cancelled_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path)
    fm_inject(config, "unreachable")
    async with kubelet_side(config):
        async with trio.open_nursery() as daemon:
            daemon.start_soon(run_daemon, config)
            await trio.sleep(600)
            cancelled = trio.current_time()
            daemon.cancel_scope.cancel()
        assert trio.current_time() == cancelled
        assert list(Path(config.plugin.directory).glob("nvswitch-dp-*.sock")) == []


# -- a plain Allocate, through the whole in-process path ----------------------------------


async def test_allocate_of_a_blocked_partition_fails_naming_the_blocker(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        await node.allocate(f"{R}-4x", "partition-1")
        with pytest.raises(GRPCError) as raised:
            await node.allocate(f"{R}-2x", "partition-3")
        assert raised.value.status is Status.FAILED_PRECONDITION
        assert "partition 1" in (raised.value.message or "")
        assert node.fm_active() == {1}


async def test_allocate_naming_a_device_twice_is_refused_and_activates_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_node(tmp_path) as node:
        with pytest.raises(GRPCError) as raised:
            await node.allocate(f"{R}-2x", "partition-3", "partition-3")
        assert raised.value.status is Status.INVALID_ARGUMENT
        assert "partition-3" in (raised.value.message or "")
        assert node.fm_active() == set()
        assert node.state(3) is State.FREE
