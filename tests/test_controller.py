"""The controller against the FM simulator: atomic claims, idempotent activation, rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from nvswitch_dp.controller import AllocationError, GpuSlot, PartitionController
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.simulator import SimulatedFabricManager, SimulatorStore
from nvswitch_dp.fabric.types import FmUninitialized
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.state import PartitionBlocked, PartitionInUse, Phase, State
from nvswitch_dp.partitions.table import PartitionTable

R = "nvidia.com/gpu-h200"


def fm_state(store: SimulatorStore) -> dict[str, object]:
    data: dict[str, object] = json.loads(store.path.read_text())
    return data


async def make_controller(tmp_path: Path) -> tuple[PartitionController, SimulatorStore]:
    store = SimulatorStore(tmp_path / "fm.state", "hgx-h200")
    fabric = SimulatedFabricManager(store)
    report = await fabric.list_partitions()
    from nvswitch_dp.partitions.state import PartitionBook

    book = PartitionBook(PartitionTable.from_report(report))
    h200 = platform("hgx-h200")
    gpus = {m: GpuSlot(m, addr, 10 + m, h200.numa_node(m)) for m, addr in h200.module_map().items()}
    controller = PartitionController(
        book, fabric, gpus, resource_prefix=R, dev_root=Path("/dev"), metrics=Metrics()
    )
    return controller, store


def inject(store: SimulatorStore, **faults: object) -> None:
    sim = store.load()
    for key, value in faults.items():
        setattr(sim.faults, key, value)
    store.save(sim)


async def test_allocation_claims_activates_and_grants_vfio_devices(tmp_path: Path) -> None:
    controller, store = await make_controller(tmp_path)
    plan = controller.begin_allocation(f"{R}-4x", ["partition-2"])
    assert plan.to_activate == [2]
    await controller.complete_allocation(plan)
    assert controller.book.state(2) is State.ALLOCATED
    assert fm_state(store)["active"] == [2]
    grant = controller.grant(plan)
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
    controller, store = await make_controller(tmp_path)
    await SimulatedFabricManager(store).activate(5)  # FM has it active behind our back
    plan = controller.begin_allocation(f"{R}-2x", ["partition-5"])
    await controller.complete_allocation(plan)
    assert controller.book.state(5) is State.ALLOCATED


async def test_an_fm_failure_during_allocate_rolls_everything_back(tmp_path: Path) -> None:
    controller, store = await make_controller(tmp_path)
    inject(store, nvlink_error_partitions={1})
    plan = controller.begin_allocation(f"{R}-4x", ["partition-1"])
    with pytest.raises(AllocationError) as raised:
        await controller.complete_allocation(plan)
    assert raised.value.kind == "fabric"
    assert "NVLINK_ERROR" in str(raised.value)
    assert controller.book.phase(1) is Phase.INACTIVE
    assert not controller.book.in_use(1)
    assert controller.book.available(3)  # its neighbours are back in the pool
    assert fm_state(store)["active"] == []
    controller.book.check_invariants()


async def test_overlapping_allocates_racing_on_two_resources_one_wins(tmp_path: Path) -> None:
    controller, store = await make_controller(tmp_path)
    inject(store, activation_delay_s=0.05)
    outcomes: dict[str, str] = {}

    async def allocate(resource: str, device: str) -> None:
        try:
            plan = controller.begin_allocation(resource, [device])
            await controller.complete_allocation(plan)
            outcomes[device] = "won"
        except AllocationError as exc:
            outcomes[device] = str(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(allocate, f"{R}-4x", "partition-1")
        nursery.start_soon(allocate, f"{R}-2x", "partition-3")
        nursery.start_soon(allocate, f"{R}-8x", "partition-0")
    winners = [d for d, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1
    winner = int(winners[0].split("-")[1])
    for device, outcome in outcomes.items():
        if device != winners[0]:
            assert f"partition {winner}" in outcome
    assert fm_state(store)["active"] == [winner]
    controller.book.check_invariants()


async def test_an_allocate_during_activation_waits_for_it(tmp_path: Path) -> None:
    controller, store = await make_controller(tmp_path)
    inject(store, activation_delay_s=0.05)
    first = controller.begin_allocation(f"{R}-1x", ["partition-7"])
    second = controller.begin_allocation(f"{R}-1x", ["partition-7"])
    assert second.to_await == [7] and not second.to_activate
    finished: list[str] = []

    async def complete(name: str, plan_: object) -> None:
        await controller.complete_allocation(plan_)  # type: ignore[arg-type]
        finished.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(complete, "second", second)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(complete, "first", first)
    assert sorted(finished) == ["first", "second"]
    assert controller.book.state(7) is State.ALLOCATED


async def test_allocate_refusals_name_the_blocker_and_change_nothing(tmp_path: Path) -> None:
    controller, _ = await make_controller(tmp_path)
    await controller.complete_allocation(controller.begin_allocation(f"{R}-2x", ["partition-4"]))
    before = controller.book.views()
    with pytest.raises(AllocationError, match="partition 4, which is allocated"):
        controller.begin_allocation(f"{R}-8x", ["partition-0"])
    # Two partitions in one request that overlap each other: refused as a whole.
    with pytest.raises(AllocationError):
        controller.begin_allocation(f"{R}-1x", ["partition-7", "partition-8"])
    assert controller.book.in_use_ids == {4}
    assert controller.book.views() == before


async def test_manual_deactivation_of_a_partition_in_use_is_refused(tmp_path: Path) -> None:
    controller, store = await make_controller(tmp_path)
    await controller.complete_allocation(controller.begin_allocation(f"{R}-4x", ["partition-1"]))
    with pytest.raises(PartitionInUse):
        await controller.deactivate(1)
    with pytest.raises(PartitionBlocked):
        await controller.activate(3)
    await controller.deactivate(1, force=True)
    assert fm_state(store)["active"] == []
    assert controller.book.state(1) is State.FREE


async def test_deactivating_what_fm_already_dropped_settles_inactive(tmp_path: Path) -> None:
    controller, store = await make_controller(tmp_path)
    await controller.activate(2)
    await SimulatedFabricManager(store).deactivate(2)
    await controller.deactivate(2)  # FM answers UNINITIALIZED: already inactive
    assert controller.book.phase(2) is Phase.INACTIVE
    with pytest.raises(FmUninitialized):
        await SimulatedFabricManager(store).deactivate(2)


async def test_reconcile_takes_fm_word_for_settled_partitions(tmp_path: Path) -> None:
    controller, store = await make_controller(tmp_path)
    await controller.activate(6)
    await SimulatedFabricManager(store).deactivate(6)
    await SimulatedFabricManager(store).activate(2)
    await controller.supervise_once()
    assert controller.book.phase(6) is Phase.INACTIVE
    assert controller.book.phase(2) is Phase.ACTIVE
    controller.book.check_invariants()
