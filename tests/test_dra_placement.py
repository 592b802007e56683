"""Placement in DRA mode: the order the pool lists its devices in is the policy.

The scheduler stand-in (:mod:`nvswitch_dp.demo.dra_allocator`) takes the first device
that fits in listed order, as kube-scheduler's structured allocator does; these tests
check that, over the slices :func:`~nvswitch_dp.dra.slices.build_pool` builds with
:func:`~nvswitch_dp.partitions.policy.placement_order`, it takes exactly what
:func:`~nvswitch_dp.partitions.policy.preferred_allocation` would, from any reachable
state of the H200 and 16-GPU tables, and that the stand-in's own rules (list order,
generations, incomplete pools, taints, counters) hold.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import pytest
from dra_helpers import inputs_for, table_of
from hypothesis import given, settings
from hypothesis import strategies as st

from nvswitch_dp.demo.dra_allocator import Allocator, gpu_claim, partition_claim
from nvswitch_dp.dra.slices import build_pool, partition_device_name
from nvswitch_dp.partitions.policy import (
    FIRST_FIT,
    KEEP_LARGEST,
    Policy,
    gpu_order,
    parse_device,
    placement_order,
    preferred_allocation,
    remaining_after,
)
from nvswitch_dp.partitions.table import PartitionTable

TABLES = ("hgx-h200", "hgx-a100-16")


@dataclass(frozen=True)
class Book:
    """The policy's Availability over a fixed free set."""

    table: PartitionTable
    free: frozenset[int]

    def available_ids(self) -> frozenset[int]:
        return self.free


def policy_choice(table: PartitionTable, free: frozenset[int], size: int, policy: Policy) -> int:
    offered = [p.device_id for p in table.of_size(size) if p.partition_id in free]
    answer = preferred_allocation(Book(table, free), offered, [], 1, policy=policy)
    pid = parse_device(answer[0], table)
    assert pid is not None
    return pid


@st.composite
def reachable(draw: st.DrawFn, name: str) -> tuple[PartitionTable, list[int], frozenset[int]]:
    """A table, partitions taken one after another (each free when taken), what is free."""
    table = table_of(name)
    taken: list[int] = []
    free = frozenset(table.ids)
    for _ in range(draw(st.integers(0, len(table.module_ids)))):
        if not free:
            break
        pid = draw(st.sampled_from(sorted(free)))
        taken.append(pid)
        free = remaining_after(table, free, (pid,))
    return table, taken, free


def allocator_over(table_name: str, taken: list[int], free: frozenset[int], **kw: Any) -> Allocator:
    table = table_of(table_name)
    inputs = dataclasses.replace(
        inputs_for(table_name),
        order=placement_order(table, free, **kw),
        gpu_order=gpu_order(table, free, **kw),
    )
    allocator = Allocator.from_slices(build_pool(inputs, 1))
    allocator.allocated |= {partition_device_name(pid) for pid in taken}
    return allocator


@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize("policy", [KEEP_LARGEST, FIRST_FIT], ids=lambda p: p.name)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_first_fit_over_the_order_is_the_policy(
    name: str, policy: Policy, data: st.DataObject
) -> None:
    table, taken, free = data.draw(reachable(name))
    order = placement_order(table, free, policy=policy)
    assert sorted(order) == sorted(table.ids)  # every partition, once
    for size in table.sizes:
        first = next((pid for pid in order if pid in free and table[pid].size == size), None)
        expected = policy_choice(table, free, size, policy) if first is not None else None
        assert first == expected
    # The scheduler stand-in, over the slices as published, takes the same partition.
    allocator = allocator_over(name, taken, free, policy=policy)
    for size in table.sizes:
        found = allocator.allocations(partition_claim(size))
        got = next(found, None)
        if any(table[pid].size == size for pid in free):
            assert got == (partition_device_name(policy_choice(table, free, size, policy)),)
        else:
            assert got is None


@pytest.mark.parametrize("name", TABLES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_single_gpu_claim_gets_the_policys_1x_gpu(name: str, data: st.DataObject) -> None:
    table, taken, free = data.draw(reachable(name))
    allocator = allocator_over(name, taken, free)
    got = allocator.allocate(gpu_claim(1))
    singles = [pid for pid in free if table[pid].size == 1]
    if not singles:
        assert got is None
        return
    (module,) = table[policy_choice(table, free, 1, KEEP_LARGEST)].module_ids
    assert got == (f"gpu-{module}",)


def test_h200_the_second_single_goes_to_the_first_ones_pair_mate() -> None:
    """The issue's example: by FM ID, the second 1x claim broke the second pair."""
    table = table_of("hgx-h200")
    free = frozenset(table.ids)
    order = placement_order(table, free)
    taken = [next(p for p in order if table[p].size == 1)]
    free = remaining_after(table, free, taken)
    allocator = allocator_over("hgx-h200", taken, free)
    (second,) = allocator.allocate(partition_claim(1)) or ()
    first_module = min(table[taken[0]].module_ids)
    mate = next(p for p in table.of_size(2) if first_module in p.module_ids).module_ids
    assert table[int(second.split("-")[1])].module_ids <= mate


def test_by_id_order_is_first_fit() -> None:
    """The old publication (by FM ID) made DRA mode first fit: the stand-in shows it."""
    table = table_of("hgx-h200")
    allocator = Allocator.from_slices(build_pool(inputs_for("hgx-h200"), 1))
    first = allocator.allocate(partition_claim(1))
    second = allocator.allocate(partition_claim(1))
    assert (first, second) == (("partition-7",), ("partition-8",))  # modules 1 and 2
    assert table[7].module_ids | table[8].module_ids == {1, 2}


# -- the stand-in's own rules, from the structured allocator's code


def _pool(**kw: Any) -> list[dict[str, Any]]:
    return build_pool(inputs_for("hgx-h200", **kw), 3)


def test_the_allocator_walks_devices_in_listed_order() -> None:
    slices = _pool()
    devices = slices[1]["spec"]["devices"]
    singles = [i for i, d in enumerate(devices) if d["attributes"].get("size", {}).get("int") == 1]
    devices[singles[0]], devices[singles[-1]] = devices[singles[-1]], devices[singles[0]]
    assert Allocator.from_slices(slices).allocate(partition_claim(1)) == (
        devices[singles[0]]["name"],
    )


def test_only_the_newest_generation_counts_and_an_incomplete_pool_gives_nothing() -> None:
    old = _pool()
    new = build_pool(inputs_for("hgx-h200", gpu_problems={1: "XID 79"}), 4)
    assert Allocator.from_slices([*old, *new]).allocate(partition_claim(1)) == ("partition-8",)
    incomplete = Allocator.from_slices([*old, new[1]])  # the counters slice not yet written
    assert incomplete.unusable is not None and "incomplete" in incomplete.unusable
    assert incomplete.allocate(partition_claim(1)) is None


def test_a_missing_counter_makes_the_pool_invalid() -> None:
    slices = _pool()
    slices[1]["spec"]["devices"][0]["consumesCounters"][0]["counters"]["gpu-99"] = {"value": "1"}
    allocator = Allocator.from_slices(slices)
    assert allocator.unusable is not None and "gpu-99" in allocator.unusable
    assert allocator.allocate(partition_claim(8)) is None


def test_noschedule_blocks_unless_tolerated_and_none_never_does() -> None:
    slices = _pool()
    first = next(
        d for d in slices[1]["spec"]["devices"] if d["attributes"].get("size", {}).get("int") == 1
    )
    taint = {"key": "gpu.nvswitch-dp.io/unhealthy", "value": "xid-79", "effect": "NoSchedule"}
    first["taints"] = [taint]
    assert Allocator.from_slices(slices).allocate(partition_claim(1)) != (first["name"],)
    assert Allocator.from_slices(slices, taints=False).allocate(partition_claim(1)) == (
        first["name"],
    )
    tolerant = partition_claim(1)
    tolerating = dataclasses.replace(
        tolerant.requests[0], tolerations=({"key": taint["key"], "operator": "Exists"},)
    )
    claim = dataclasses.replace(tolerant, requests=(tolerating,))
    assert Allocator.from_slices(slices).allocate(claim) == (first["name"],)
    first["taints"] = [dict(taint, effect="None")]
    assert Allocator.from_slices(slices).allocate(partition_claim(1)) == (first["name"],)


def test_shuffled_slices_keep_each_slices_order() -> None:
    """The informer's slice order is undefined; one device slice makes it irrelevant."""
    slices = _pool()
    picks = {
        Allocator.from_slices(slices, slice_order=random.Random(seed)).allocate(partition_claim(2))
        for seed in range(5)
    }
    assert picks == {("partition-3",)}


def test_counters_keep_overlaps_apart_whatever_the_order() -> None:
    allocator = Allocator.from_slices(_pool())
    assert allocator.allocate(partition_claim(4)) == ("partition-1",)
    assert allocator.allocate(partition_claim(4)) == ("partition-2",)
    assert allocator.allocate(partition_claim(1)) is None
    assert allocator.allocate(gpu_claim(1)) is None
