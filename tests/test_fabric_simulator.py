"""The FM simulator: FM's rules, the restart window, injected faults, the state file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.simulator import (
    RESTART_WINDOW_S,
    FabricSimulator,
    Faults,
    SimulatedFabricManager,
    SimulatorStore,
    inject_fault,
)
from nvswitch_dp.fabric.types import (
    FabricManagerError,
    FmBadParam,
    FmConnectionNotValid,
    FmInUse,
    FmNotConfigured,
    FmNotSupported,
    FmNvlinkError,
    FmUninitialized,
)


class FakeClock:
    """Wall clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> FabricSimulator:
    return FabricSimulator(platform("hgx-h200"), clock=clock)


def test_report_is_the_h200_table(sim: FabricSimulator) -> None:
    report = sim.report()
    assert [p.partition_id for p in report.partitions] == list(range(15))
    assert report.partitions[3].module_ids == (1, 3)
    single = report.partitions[7]
    assert single.module_ids == (1,)
    assert single.gpus[0].max_nvlinks == 0
    gpu = report.partitions[0].gpus[0]
    assert (gpu.uuid, gpu.pci_bus_id, gpu.max_nvlinks) == ("", "00000000:00:00.0", 18)


@pytest.mark.parametrize(
    ("active", "activate", "error"),
    [
        ({3}, 3, FmInUse),  # already active
        ({3}, 0, FmInUse),  # all-8 overlaps pair (1,3)
        ({3}, 1, FmInUse),  # 1-4 overlaps (1,3)
        ({3}, 7, FmInUse),  # single module 1
        ({3}, 99, FmBadParam),
        ({0}, 14, FmInUse),
    ],
)
def test_activate_refusals(
    sim: FabricSimulator, active: set[int], activate: int, error: type[FabricManagerError]
) -> None:
    sim.active = set(active)
    with pytest.raises(error):
        sim.activate(activate)
    assert sim.active == active  # an illegal move changes nothing


def test_activate_disjoint_partitions(sim: FabricSimulator) -> None:
    for pid in (3, 4, 2):
        sim.activate(pid)
    assert sim.report().active_ids == {2, 3, 4}


def test_deactivate(sim: FabricSimulator) -> None:
    with pytest.raises(FmUninitialized):
        sim.deactivate(3)
    with pytest.raises(FmBadParam):
        sim.deactivate(15)
    sim.activate(3)
    sim.deactivate(3)
    assert sim.active == set()


def test_restart_refuses_until_set_activated(sim: FabricSimulator, clock: FakeClock) -> None:
    sim.activate(3)
    sim.restart()
    for call in (sim.report, lambda: sim.activate(4), lambda: sim.deactivate(3)):
        with pytest.raises(FmNotConfigured):
            call()
    clock.now += RESTART_WINDOW_S - 1
    sim.set_activated([3, 5])
    assert sim.report().active_ids == {3, 5}
    clock.now += 3600  # the window only matters while FM waits
    assert sim.report().active_ids == {3, 5}


def test_restart_window_missed_means_fm_gone(sim: FabricSimulator, clock: FakeClock) -> None:
    sim.restart()
    clock.now += RESTART_WINDOW_S + 0.5
    assert sim.gone
    for call in (sim.report, lambda: sim.set_activated([]), lambda: sim.activate(3)):
        with pytest.raises(FmConnectionNotValid, match="no set-activated within 60s"):
            call()
    sim.restart()  # the operator restarts FM: a new window
    assert not sim.gone
    with pytest.raises(FmNotConfigured):
        sim.report()
    sim.set_activated([])
    assert sim.report().active_ids == frozenset()


def test_set_activated_rejects_unknown_ids(sim: FabricSimulator) -> None:
    sim.restart()
    with pytest.raises(FmBadParam):
        sim.set_activated([3, 40])
    assert sim.awaiting_set_activated


def test_unsupported_and_nvlink_failed_are_empty(sim: FabricSimulator) -> None:
    assert sim.unsupported_partitions() == []
    assert sim.nvlink_failed_devices() == []
    sim.restart()
    with pytest.raises(FmNotSupported):  # per nv_fm_agent.h, not in --restart mode
        sim.nvlink_failed_devices()
    with pytest.raises(FmNotConfigured):
        sim.unsupported_partitions()


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        ("unreachable", lambda s: s.faults.unreachable),
        ("slow-activation=2.5", lambda s: s.faults.activation_delay_s == 2.5),
        ("nvlink-error=3", lambda s: s.faults.nvlink_error_partitions == {3}),
        ("degrade=5:12", lambda s: s.faults.degraded_links == {5: 12}),
        ("gone=8", lambda s: s.faults.gone_modules == {8}),
        ("restart", lambda s: s.awaiting_set_activated and s.restarted_at == 1_000.0),
    ],
)
def test_inject_fault(sim: FabricSimulator, spec: str, check: object) -> None:
    inject_fault(sim, spec)
    assert callable(check) and check(sim)


@pytest.mark.parametrize(
    "spec", ["", "boom", "slow-activation=x", "slow-activation=-1", "degrade=5", "gone=", "clear=1"]
)
def test_inject_fault_rejects_bad_specs(sim: FabricSimulator, spec: str) -> None:
    with pytest.raises(ValueError, match="expected one of"):
        inject_fault(sim, spec)


def test_fault_effects(sim: FabricSimulator) -> None:
    inject_fault(sim, "degrade=5:12")
    inject_fault(sim, "gone=8")
    inject_fault(sim, "nvlink-error=4")
    report = sim.report()
    gpu5 = next(g for g in report.partitions[2].gpus if g.physical_id == 5)
    assert gpu5.nvlinks_available == 12 and gpu5.nvlinks_degraded
    assert 8 not in report.partitions[0].module_ids
    with pytest.raises(FmNvlinkError):
        sim.activate(6)  # contains module 8
    with pytest.raises(FmNvlinkError):
        sim.activate(4)
    inject_fault(sim, "unreachable")
    with pytest.raises(FmConnectionNotValid):
        sim.report()
    inject_fault(sim, "reachable")
    sim.activate(3)
    inject_fault(sim, "clear")
    assert sim.faults == Faults()
    assert sim.active == {3}  # clearing faults keeps FM's partition state


def test_state_outlives_instances(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "fm" / "fabricmanager.state"
    first = SimulatorStore(path, "hgx-h200", clock=clock)
    sim = first.load()
    sim.activate(3)
    inject_fault(sim, "degrade=1:10")
    sim.restart()
    first.save(sim)

    again = SimulatorStore(path, "hgx-h200", clock=clock).load()
    assert again.active == {3}
    assert again.awaiting_set_activated and again.restarted_at == clock.now
    assert again.faults.degraded_links == {1: 10}
    clock.now += RESTART_WINDOW_S + 1  # the window runs across processes
    assert SimulatorStore(path, "hgx-h200", clock=clock).load().gone


def test_state_file_from_before_the_restart_window_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.state"
    data = {"version": 1, "platform": "hgx-h200", "active": [2], "awaiting_set_activated": True}
    path.write_text(json.dumps(data))
    sim = SimulatorStore(path, "hgx-h200").load()
    assert sim.awaiting_set_activated and sim.restarted_at is None and not sim.gone


def test_store_refuses_another_platform(tmp_path: Path) -> None:
    path = tmp_path / "s"
    SimulatorStore(path, "hgx-b200").save(FabricSimulator(platform("hgx-b200")))
    with pytest.raises(ValueError, match="hgx-b200 fabric"):
        SimulatorStore(path, "hgx-h200").load()


async def test_backend_activation_delay_hides_partition_until_done(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    store = SimulatorStore(tmp_path / "s", "hgx-h200")
    sim = store.load()
    inject_fault(sim, "slow-activation=3")
    store.save(sim)
    fm = SimulatedFabricManager(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fm.activate, 3)
        await trio.sleep(1)
        assert (await fm.list_partitions()).active_ids == frozenset()
    assert (await fm.list_partitions()).active_ids == {3}
    assert trio.current_time() == pytest.approx(3)


async def test_a_garbled_list_cuts_only_a_list_fm_would_have_given(tmp_path: Path) -> None:
    store = SimulatorStore(tmp_path / "fm.state", "hgx-h200")
    fm = SimulatedFabricManager(store)
    sim = store.load()
    inject_fault(sim, "garbled")
    store.save(sim)
    with pytest.raises(FabricManagerError, match="answer cut short"):
        await fm.list_partitions()
    sim = store.load()
    inject_fault(sim, "restart")  # FM in restart mode: NOT_CONFIGURED, not a garbled list
    store.save(sim)
    with pytest.raises(FmNotConfigured):
        await fm.list_partitions()
    sim = store.load()
    inject_fault(sim, "clear")
    store.save(sim)
    await fm.set_activated([])
    assert len((await fm.list_partitions()).partitions) == 15
