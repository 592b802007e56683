"""Fabric Manager supervision: restarts, reachability, degraded hardware, failed activations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trio
import trio.testing
from node_helpers import R, allocate, inject, ops, running_controller

from nvswitch_dp.controller import AllocationError, PartitionController
from nvswitch_dp.core import FM_RESUME_PATIENCE_S, first_report
from nvswitch_dp.fabric.simulator import SimulatedFabricManager, SimulatorStore, inject_fault
from nvswitch_dp.partitions.node import FAILURE_HOLD_S
from nvswitch_dp.partitions.state import Phase, State
from nvswitch_dp.plugin.pod_resources import partitions_held
from nvswitch_dp.ports import PodDevices
from testkit.harness import DaemonProcess
from testkit.kubelet import KubeletStandIn


async def supervise(controller: PartitionController) -> None:
    controller.supervise()
    await controller.settle()


def state(controller: PartitionController, pid: int) -> State:
    return controller.view().view(pid).state


async def test_after_an_fm_restart_set_activated_names_exactly_the_partitions_in_use(
    tmp_path: Path,
) -> None:
    async with running_controller(tmp_path) as (controller, store):
        await allocate(controller, f"{R}-4x", "partition-1")
        await controller.activate(5)  # pre-warmed by an operator, held by no pod
        inject(store, "restart")
        await supervise(controller)
        sim = store.load()
        assert not sim.awaiting_set_activated
        assert sim.active == {1}
        assert ops(controller, "set_activated", "SUCCESS") == 1
        view = controller.view()
        assert view.view(5).phase is Phase.INACTIVE  # FM dropped it; so do we
        assert view.view(1).state is State.ALLOCATED
        assert view.fabric_problem is None
        controller.machine.check_invariants()


async def test_an_allocate_refused_by_a_restarting_fm_resumes_it_at_once(
    tmp_path: Path,
) -> None:
    async with running_controller(tmp_path) as (controller, store):
        inject(store, "restart")
        with pytest.raises(AllocationError, match="NOT_CONFIGURED"):
            await allocate(controller, f"{R}-1x", "partition-7")
        # The machine asked for set-activated itself, without waiting for the period.
        await controller.settle()
        assert ops(controller, "set_activated", "SUCCESS") == 1
        assert state(controller, 7) is State.FREE
        await allocate(controller, f"{R}-1x", "partition-7")


async def test_an_unreachable_fm_empties_the_pool_but_keeps_partitions_in_use_healthy(
    tmp_path: Path,
) -> None:
    async with running_controller(tmp_path) as (controller, store):
        await allocate(controller, f"{R}-2x", "partition-3")
        inject(store, "unreachable")
        await supervise(controller)
        view = controller.view()
        assert not view.fabric_reachable
        assert controller.metrics.registry.get_sample_value("hgx_h200_fabric_manager_up") == 0
        assert view.healthy(3)
        assert not any(view.healthy(pid) for pid in (2, 4, 5, 11))
        assert ops(controller, "list", "CONNECTION_NOT_VALID") == 1
        assert controller.machine.supervision_delay(10.0) == 1.0  # supervise every second
        inject(store, "reachable")
        await supervise(controller)
        view = controller.view()
        assert view.fabric_reachable
        assert view.healthy(2) and view.healthy(5)


async def test_degraded_nvlinks_and_a_gone_gpu_make_their_partitions_unhealthy(
    tmp_path: Path,
) -> None:
    async with running_controller(tmp_path) as (controller, store):
        await allocate(controller, f"{R}-2x", "partition-4")  # modules 2 and 4
        inject(store, "degrade=4:12", "gone=7")
        await supervise(controller)
        view = controller.view()
        assert view.view(4).state is State.UNHEALTHY
        assert "GPU 4 has 12 of 18 NVLinks" in (view.view(4).fault or "")
        assert "GPU 7 is missing" in (view.view(13).fault or "")
        assert not view.healthy(5)  # modules 5 and 7
        assert view.healthy(6)  # modules 6 and 8
        inject(store, "clear")
        await supervise(controller)
        assert controller.view().healthy(4) and controller.view().healthy(5)


async def test_a_partition_fm_failed_to_activate_waits_out_the_hold(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_controller(tmp_path) as (controller, store):
        inject(store, "nvlink-error=6")
        with pytest.raises(AllocationError, match="NVLINK_ERROR"):
            await allocate(controller, f"{R}-2x", "partition-6")
        await supervise(controller)
        assert "NVLINK_ERROR" in (controller.view().view(6).fault or "")
        assert controller.view().healthy(5)  # the other pair is unaffected
        inject(store, "clear")
        await trio.sleep(FAILURE_HOLD_S - 1)
        await supervise(controller)
        assert not controller.view().healthy(6)
        await trio.sleep(2)
        await supervise(controller)
        assert controller.view().healthy(6)


# -- the fmpm backend, end to end --------------------------------------------------------


def fake_fmpm() -> str:
    path = shutil.which("nvswitch-dp-fmpm-sim", path=str(Path(sys.executable).parent))
    assert path is not None, "nvswitch-dp-fmpm-sim is installed with the package"
    return path


def test_the_daemon_drives_fm_through_fmpm_and_resumes_it_after_a_restart(
    tmp_path: Path,
) -> None:
    state = tmp_path / "fabricmanager.state"
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nfabric_manager:\n  reconcile_interval_seconds: 0.5\n")
    plugin_dir = tmp_path / "device-plugins"
    plugin_dir.mkdir()
    env = {**os.environ, "NVSWITCH_DP_FMPM_SIM_STATE": str(state)}
    args = ["--config", str(config), "--fm-backend", "fmpm", "--fmpm-path", fake_fmpm()]
    args += ["--fm-endpoint", "127.0.0.1"]
    with KubeletStandIn(plugin_dir) as kubelet:
        daemon = DaemonProcess(tmp_path, plugin_dir, extra_args=args, env=env).start()
        try:
            kubelet.wait_registered([f"{R}-{n}x" for n in (1, 2, 4, 8)], timeout=60)
            kubelet.allocate(f"{R}-4x", ["partition-2"])
            assert json.loads(state.read_text())["active"] == [2]
            with pytest.raises(grpc.RpcError) as raised:
                kubelet.allocate(f"{R}-8x", ["partition-0"])
            assert "partition 2" in (raised.value.details() or "")
            subprocess.run(
                [fake_fmpm(), "--state-file", str(state), "--inject", "restart"], check=True
            )

            def resumed() -> bool:
                data = json.loads(state.read_text())
                return not data["awaiting_set_activated"] and data["active"] == [2]

            kubelet.wait_until(resumed, timeout=20)
            status, body = daemon.get("/readyz")
            assert status == 200, body
        finally:
            daemon.terminate()
    assert "set-activated" in daemon.log_text() or "still in use" in daemon.log_text()


# -- FM restarted while the plugin was down -----------------------------------------------


class Pods:
    """A PodResources client whose answers the test sets; None means unreadable."""

    def __init__(self, holdings: list[PodDevices] | None) -> None:
        self.holdings = holdings

    async def list_assigned(self) -> list[PodDevices]:
        if self.holdings is None:
            raise OSError("no such socket")
        return self.holdings


async def test_a_plugin_starting_beside_a_restarted_fm_resumes_it_from_pod_resources(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = SimulatorStore(tmp_path / "fm.state", "hgx-h200")
    sim = store.load()
    sim.active = {1, 6}
    inject_fault(sim, "restart")
    store.save(sim)
    pods = Pods([PodDevices("ml", "vm", "compute", f"{R}-4x", ("partition-1",))])
    report = await first_report(SimulatedFabricManager(store), lambda: partitions_held(pods))
    assert report.active_ids == {1}  # 6 was held by nobody
    assert not store.load().awaiting_set_activated


async def test_without_pod_resources_a_restarted_fm_is_resumed_empty_before_it_dies(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = SimulatorStore(tmp_path / "fm.state", "hgx-h200")
    sim = store.load()
    sim.active = {2}
    inject_fault(sim, "restart")
    store.save(sim)
    begin = trio.current_time()
    report = await first_report(SimulatedFabricManager(store), lambda: partitions_held(Pods(None)))
    assert report.active_ids == frozenset()
    assert FM_RESUME_PATIENCE_S <= trio.current_time() - begin < 60
