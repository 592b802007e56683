"""The controller against the FM simulator, with its effect runner running: atomic claims,
idempotent activation, rollback, cancellation, release clocks, reconcile.

Time is Trio's autojump clock (the simulator's slow activation sleeps on it), so seconds of
FM work pass instantly and nothing here depends on the machine's speed. The regression
tests for issue 9's findings 1-4 are marked in their names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from node_helpers import R, allocate, fm_active, inject, running_controller

from nvswitch_dp.controller import AllocationError, PartitionController
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.simulator import SimulatedFabricManager, SimulatorStore
from nvswitch_dp.fabric.types import FmUninitialized
from nvswitch_dp.partitions.refusal import Refusal
from nvswitch_dp.partitions.state import PartitionBlocked, PartitionInUse, Phase, State


def state(controller: PartitionController, pid: int) -> State:
    return controller.view().view(pid).state


async def test_allocation_claims_activates_and_grants_vfio_devices(tmp_path: Path) -> None:
    async with running_controller(tmp_path) as (controller, store):
        allocation = controller.allocate(f"{R}-4x", [["partition-2"]])
        allocation = await controller.wait_allocation(allocation)
        assert state(controller, 2) is State.ALLOCATED
        assert fm_active(store) == [2]
        (grant,) = controller.grants(allocation)
        assert [d.container_path for d in grant.devices] == [
            "/dev/vfio/vfio",
            "/dev/vfio/15",
            "/dev/vfio/16",
            "/dev/vfio/17",
            "/dev/vfio/18",
        ]
        assert grant.envs["PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X"] == ",".join(
            platform("hgx-h200").module_map()[m] for m in (5, 6, 7, 8)
        )


async def test_a_partition_fm_already_has_active_is_adopted_not_refused(tmp_path: Path) -> None:
    async with running_controller(tmp_path) as (controller, store):
        await SimulatedFabricManager(store).activate(5)  # FM has it active behind our back
        await allocate(controller, f"{R}-2x", "partition-5")  # IN_USE, then a list settles it
        assert state(controller, 5) is State.ALLOCATED
        controller.machine.check_invariants()


async def test_an_fm_failure_rolls_back_every_partition_of_the_request(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_controller(tmp_path) as (controller, store):
        inject(store, nvlink_error_partitions={8}, activation_delay_s=1.0)
        with pytest.raises(AllocationError) as raised:
            await allocate(controller, f"{R}-1x", "partition-7", "partition-8")
        assert raised.value.kind is Refusal.FABRIC
        assert "NVLINK_ERROR" in str(raised.value)
        await controller.settle()
        assert fm_active(store) == []  # 7 was activated for this request, then let go
        view = controller.view()
        assert not view.in_use(7) and not view.in_use(8)
        assert view.view(7).state is State.FREE
        assert view.view(8).state is State.UNHEALTHY  # held out after NVLINK_ERROR
        controller.machine.check_invariants()


async def test_overlapping_allocates_racing_on_two_resources_one_wins(tmp_path: Path) -> None:
    async with running_controller(tmp_path) as (controller, store):
        inject(store, activation_delay_s=0.05)
        outcomes: dict[str, str] = {}

        async def race(resource: str, device: str) -> None:
            try:
                await allocate(controller, resource, device)
                outcomes[device] = "won"
            except AllocationError as exc:
                outcomes[device] = str(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(race, f"{R}-4x", "partition-1")
            nursery.start_soon(race, f"{R}-2x", "partition-3")
            nursery.start_soon(race, f"{R}-8x", "partition-0")
        winners = [d for d, outcome in outcomes.items() if outcome == "won"]
        assert len(winners) == 1
        winner = int(winners[0].split("-")[1])
        for device, outcome in outcomes.items():
            if device != winners[0]:
                assert f"partition {winner}" in outcome
        assert fm_active(store) == [winner]
        controller.machine.check_invariants()


async def test_an_allocate_during_activation_waits_for_it(tmp_path: Path) -> None:
    async with running_controller(tmp_path) as (controller, store):
        inject(store, activation_delay_s=0.05)
        first = controller.allocate(f"{R}-1x", [["partition-7"]])
        second = controller.allocate(f"{R}-1x", [["partition-7"]])
        finished: list[str] = []

        async def complete(name: str, allocation: object) -> None:
            await controller.wait_allocation(allocation)  # type: ignore[arg-type]
            finished.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(complete, "second", second)
            nursery.start_soon(complete, "first", first)
        assert sorted(finished) == ["first", "second"]
        assert state(controller, 7) is State.ALLOCATED
        assert fm_active(store) == [7]


async def test_allocate_refusals_name_the_blocker_and_change_nothing(tmp_path: Path) -> None:
    async with running_controller(tmp_path) as (controller, _):
        await allocate(controller, f"{R}-2x", "partition-4")
        before = controller.view()
        with pytest.raises(AllocationError, match="partition 4, which is allocated"):
            controller.allocate(f"{R}-8x", [["partition-0"]])
        # Partition 8 (GPU 2) is blocked by 4: the request is refused as a whole, and
        # partition 7 (GPU 1), free, is not taken either; the same across containers.
        with pytest.raises(AllocationError, match="partition 8 shares a GPU"):
            controller.allocate(f"{R}-1x", [["partition-7", "partition-8"]])
        with pytest.raises(AllocationError, match="partition 8 shares a GPU"):
            controller.allocate(f"{R}-1x", [["partition-9"], ["partition-8"]])
        after = controller.view()
        assert after.partitions == before.partitions
        assert {p for p, v in after.partitions.items() if v.in_use} == {4}


@pytest.mark.parametrize(
    "containers",
    [[["partition-3", "partition-3"]], [["partition-3"], ["partition-3"]]],
    ids=["twice-in-one-container", "in-two-containers"],
)
async def test_finding_4_a_device_named_twice_is_refused_and_changes_nothing(
    tmp_path: Path, containers: list[list[str]]
) -> None:
    async with running_controller(tmp_path) as (controller, store):
        before = controller.view()
        with pytest.raises(AllocationError, match="partition-3") as raised:
            controller.allocate(f"{R}-2x", containers)
        assert raised.value.kind is Refusal.INVALID
        assert controller.view() is before  # not even the generation moved
        assert fm_active(store) == []


async def test_manual_deactivation_of_a_partition_in_use_is_refused(tmp_path: Path) -> None:
    async with running_controller(tmp_path) as (controller, store):
        await allocate(controller, f"{R}-4x", "partition-1")
        with pytest.raises(PartitionInUse):
            await controller.deactivate(1)
        with pytest.raises(PartitionBlocked):
            await controller.activate(3)
        await controller.deactivate(1, force=True)
        assert fm_active(store) == []
        assert state(controller, 1) is State.FREE


async def test_deactivating_what_fm_already_dropped_settles_inactive(tmp_path: Path) -> None:
    async with running_controller(tmp_path) as (controller, store):
        await controller.activate(2)
        await SimulatedFabricManager(store).deactivate(2)
        await controller.deactivate(2)  # FM answers UNINITIALIZED: already inactive
        assert controller.view().view(2).phase is Phase.INACTIVE
        with pytest.raises(FmUninitialized):
            await SimulatedFabricManager(store).deactivate(2)


async def test_finding_1_a_cancelled_allocate_strands_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_controller(tmp_path, grace=5.0) as (controller, store):
        inject(store, activation_delay_s=2.0)
        allocation = controller.allocate(f"{R}-1x", [["partition-7", "partition-8"]])
        with trio.move_on_after(0.5):  # the kubelet's deadline
            await controller.wait_allocation(allocation)
        controller.forget(allocation.request_id)
        # The FM calls belong to the runner: they finish although nobody waits.
        await controller.settle()
        assert fm_active(store) == [7, 8]
        assert {state(controller, p) for p in (7, 8)} == {State.ALLOCATED}
        # A second Allocate of the same device answers at once.
        with trio.fail_after(0.1):
            await allocate(controller, f"{R}-1x", "partition-8")
        # No pod ever got them (the Allocate failed at the kubelet): released after grace.
        for _ in range(4):
            controller.pod_resources(set())
            await trio.sleep(2.0)
        await controller.settle()
        assert fm_active(store) == []
        assert {state(controller, p) for p in (0, 1, 3, 4, 7, 8)} == {State.FREE}
        controller.machine.check_invariants()


async def test_finding_2_the_release_clock_starts_when_the_activation_completes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_controller(tmp_path, grace=1.0) as (controller, store):
        inject(store, activation_delay_s=3.0)
        allocation = controller.allocate(f"{R}-2x", [["partition-3"]])
        # PodResources does not show it yet (the kubelet records it after our answer).
        for _ in range(9):
            await trio.sleep(0.3)
            controller.pod_resources(set())
            assert controller.view().view(3).in_use
        await controller.wait_allocation(allocation)
        controller.forget(allocation.request_id)
        assert state(controller, 3) is State.ALLOCATED
        # Now the kubelet records it; a plain deactivation is refused while it holds it.
        controller.pod_resources({3})
        await trio.sleep(5.0)
        controller.pod_resources({3})
        with pytest.raises(PartitionInUse):
            await controller.deactivate(3)
        assert fm_active(store) == [3]
        # The pod ends: released one grace period after it is first seen gone.
        controller.pod_resources(set())
        await trio.sleep(1.0)
        controller.pod_resources(set())
        await controller.settle()
        assert fm_active(store) == []


async def test_finding_3_a_partition_activated_behind_our_back_is_released(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_controller(tmp_path, grace=2.0) as (controller, store):
        await SimulatedFabricManager(store).activate(2)  # an operator's `fmpm -a 2`
        controller.supervise()
        await controller.settle()
        view = controller.view()
        assert view.in_use(2)  # maybe a pod's: PodResources decides
        assert view.view(5).state is State.BLOCKED
        controller.pod_resources(set())
        await trio.sleep(2.0)
        controller.pod_resources(set())
        await controller.settle()
        assert fm_active(store) == []
        assert state(controller, 5) is State.FREE


async def test_a_held_partition_fm_dropped_stays_held_and_is_activated_again(
    tmp_path: Path,
) -> None:
    async with running_controller(tmp_path) as (controller, store):
        await allocate(controller, f"{R}-4x", "partition-1")
        await SimulatedFabricManager(store).deactivate(1)  # by hand, under a running VM
        controller.supervise()
        await controller.settle()
        controller.supervise()  # the report after the drop activates it again
        await controller.settle()
        assert fm_active(store) == [1]
        assert state(controller, 1) is State.ALLOCATED
        controller.machine.check_invariants()


async def test_reconcile_takes_fm_word_for_settled_partitions(tmp_path: Path) -> None:
    async with running_controller(tmp_path) as (controller, store):
        await controller.activate(6)
        await SimulatedFabricManager(store).deactivate(6)
        await SimulatedFabricManager(store).activate(2)
        controller.supervise()
        await controller.settle()
        view = controller.view()
        assert view.view(6).phase is Phase.INACTIVE
        assert view.view(2).phase is Phase.ACTIVE
        controller.machine.check_invariants()


async def test_a_call_cancelled_by_shutdown_reports_an_unknown_outcome(tmp_path: Path) -> None:
    store = SimulatorStore(tmp_path / "fm.state", "hgx-h200")
    inject(store, activation_delay_s=10.0)
    async with running_controller(tmp_path) as (controller, _):
        allocation = controller.allocate(f"{R}-1x", [["partition-9"]])
        await trio.sleep(0.05)
    # The runner was cancelled in the middle of the call: the outcome is unknown, so the
    # partition is UNKNOWN (occupied) until FM's report settles it; its waiter waits.
    assert controller.machine.result(allocation.request_id).status.value == "pending"
    assert controller.view().view(9).phase is Phase.UNKNOWN
    assert controller.view().view(1).state is State.BLOCKED
    controller.machine.check_invariants()
