"""What a DRA node offers: pool inputs from the node core (nvswitch_dp.dra.pool)."""

from __future__ import annotations

from pathlib import Path

import trio
from dra_node import DRIVER, NODE, DraNode, build_node

from nvswitch_dp.dra.pool import DRAINED, PoolSource, pool_inputs
from nvswitch_dp.dra.slices import PoolInputs, build_pool

UID = "0b7a4c1e-4f53-4e0c-9f9e-1d0c3a6d7e21"
OTHER = "1c8b5d2f-5a64-4f1d-8a0f-2e1d4b7e8f32"


def inputs(node: DraNode) -> PoolInputs:
    controller = node.controller
    return pool_inputs(
        controller.view(), controller.layout, node_name=NODE, driver=DRIVER, platform="hgx-h200"
    )


def offered(node: DraNode) -> set[str]:
    return {d["name"] for s in build_pool(inputs(node), 1) for d in s["spec"].get("devices") or []}


async def test_a_fresh_node_offers_everything(tmp_path: Path, nursery: trio.Nursery) -> None:
    node = await build_node(tmp_path, nursery)
    pool = inputs(node)
    assert pool.gpu_problems == {} and pool.partition_problems == {}
    assert pool.gpus == node.controller.layout.gpus
    assert len(offered(node)) == 15 + 8


async def test_claimed_partitions_and_their_overlaps_are_left_to_the_counters(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    await node.holder.hold_for_claim(UID, 1)  # GPUs 1-4
    pool = inputs(node)
    assert pool.partition_problems == {} and pool.gpu_problems == {}


async def test_an_unclaimed_active_partition_takes_its_overlaps_out(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    await node.controller.activate(2)  # an operator's pre-warm of GPUs 5-8
    pool = inputs(node)
    table = node.controller.view().table
    assert set(pool.partition_problems) == set(table.overlapping(2))
    assert 2 not in pool.partition_problems  # a claim may take the pre-warmed one over
    assert "partition 2" in pool.partition_problems[0]
    # Once a claim holds it, the scheduler's counters account for it.
    await node.holder.hold_for_claim(UID, 2)
    assert inputs(node).partition_problems == {}


async def test_faulty_and_drained_gpus_leave_with_their_partitions(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    node.controller.set_gpu_fault(3, "/dev/vfio/13 is missing")
    node.controller.drain(8)
    pool = inputs(node)
    assert pool.gpu_problems == {3: "/dev/vfio/13 is missing", 8: DRAINED}
    names = offered(node)
    assert "gpu-3" not in names and "gpu-8" not in names
    assert "partition-1" not in names and "partition-2" not in names  # 1-4 and 5-8
    node.controller.set_gpu_fault(3, None)
    node.controller.undrain(8)
    assert inputs(node).gpu_problems == {}


async def test_fm_trouble_takes_out_everything_not_claimed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    await node.holder.hold_for_claim(UID, 1)
    node.inject(unreachable=True)
    node.controller.supervise()
    await node.controller.settle()
    pool = inputs(node)
    assert set(pool.partition_problems) == set(node.controller.view().table.ids) - {1}
    assert all("Fabric Manager is unreachable" in p for p in pool.partition_problems.values())
    node.inject(unreachable=False)
    node.controller.supervise()
    await node.controller.settle()
    assert inputs(node).partition_problems == {}


async def test_the_change_counter_moves_only_with_the_pool(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    controller = node.controller
    source = PoolSource(
        controller.view, controller.layout, controller.wait_changed, NODE, DRIVER, "hgx-h200"
    )
    start = await source.wait_for_change(-1)
    # A claim held changes what is free, so the order the devices are listed in.
    await node.holder.hold_for_claim(UID, 1)
    first = await source.wait_for_change(start)
    assert first == start + 1
    # Modules 1-4 are held: the first 1x partition listed is module 5's (FM ID 11).
    assert source.inputs().order[0] == 11
    generation = controller.view().generation
    await node.holder.hold_for_claim(UID, 1)  # asked again: the pool does not move
    with trio.move_on_after(0.2) as waited:
        await source.wait_for_change(first)
    assert waited.cancelled_caught, (generation, controller.view().generation)
    controller.drain(8)
    assert await source.wait_for_change(first) == first + 1
    assert source.inputs().gpu_problems == {8: DRAINED}
    await node.holder.release_claim(UID)
    assert OTHER not in controller.view().claims
