"""The DRA pool builder: shapes, problems, names and the published limits, and a scheduler
played by a counter-honouring allocator on the H200 and 16-GPU tables."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from dra_helpers import inputs_for, table_of
from hypothesis import given, settings
from hypothesis import strategies as st

from nvswitch_dp.demo.dra_allocator import Allocator, gpu_claim, partition_claim
from nvswitch_dp.dra.slices import (
    DEFAULT_DRIVER,
    PCI_BUS_ID,
    PoolError,
    PoolInputs,
    build_pool,
    gpu_partitions,
    slice_name,
)
from nvswitch_dp.dra.validation import check_pool, check_slice, is_dns_subdomain
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.layout import GpuSlot
from nvswitch_dp.partitions.table import PartitionTable

TABLES_JSON = Path("/work/shared/reference/partition-tables.json")
K8S_VERSIONS = ("1.36.0", "1.37.0")
Slice = dict[str, Any]


def devices(slices: list[Slice]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for s in slices for d in s["spec"].get("devices") or []}


def value(device: Mapping[str, Any], attribute: str) -> Any:
    found = device["attributes"].get(attribute)
    return None if found is None else next(iter(found.values()))


def assert_published_rules(slices: list[Slice]) -> None:
    for s in slices:
        assert check_slice(s) == [], s["metadata"]["name"]
    assert check_pool(slices) == []


def test_h200_pool_shape() -> None:
    slices = build_pool(inputs_for("hgx-h200"), 1)
    assert [s["metadata"]["name"] for s in slices] == [
        "node-a-gpu-nvswitch-dp-io-counters",
        "node-a-gpu-nvswitch-dp-io-devices-0",
    ]
    counters, device_slice = slices
    assert "devices" not in counters["spec"] and "sharedCounters" not in device_slice["spec"]
    assert counters["spec"]["sharedCounters"] == [
        {"name": "baseboard-0", "counters": {f"gpu-{m}": {"value": "1"} for m in range(1, 9)}}
    ]
    for s in slices:
        assert s["spec"]["pool"] == {"name": "node-a", "generation": 1, "resourceSliceCount": 2}
        assert s["spec"]["nodeName"] == "node-a" and s["spec"]["driver"] == DEFAULT_DRIVER
    found = devices(slices)
    assert sorted(found) == sorted(
        [f"partition-{i}" for i in range(15)] + [f"gpu-{m}" for m in range(1, 9)]
    )
    assert found["partition-1"] == {
        "name": "partition-1",
        "attributes": {
            "kind": {"string": "partition"},
            "size": {"int": 4},
            "partitionID": {"int": 1},
            "modules": {"string": "1,2,3,4"},
            "numaNodes": {"string": "0"},
            "platform": {"string": "hgx-h200"},
        },
        "consumesCounters": [
            {
                "counterSet": "baseboard-0",
                "counters": {f"gpu-{m}": {"value": "1"} for m in (1, 2, 3, 4)},
            }
        ],
    }
    assert value(found["partition-0"], "numaNodes") == "0,1"
    gpu5 = found["gpu-5"]
    assert {k: value(gpu5, k) for k in gpu5["attributes"]} == {
        "kind": "gpu",
        "moduleID": 5,
        "platform": "hgx-h200",
        PCI_BUS_ID: platform("hgx-h200").module_map()[5],
        "numaNode": 1,
        "partition1x": 11,
        "partition2x": 5,
        "partition4x": 2,
        "partition8x": 0,
    }
    assert gpu5["consumesCounters"] == [
        {"counterSet": "baseboard-0", "counters": {"gpu-5": {"value": "1"}}}
    ]
    assert_published_rules(slices)


def test_sixteen_gpu_pool_uses_two_counter_sets() -> None:
    slices = build_pool(inputs_for("hgx-a100-16"), 3)
    (counter_set_names,) = [
        [c["name"] for c in s["spec"]["sharedCounters"]]
        for s in slices
        if "sharedCounters" in s["spec"]
    ]
    assert counter_set_names == ["baseboard-0", "baseboard-1"]
    found = devices(slices)
    assert len(found) == 35 + 16
    # A partition over both baseboards consumes from both sets, one entry each.
    assert [e["counterSet"] for e in found["partition-3"]["consumesCounters"]] == [
        "baseboard-0",
        "baseboard-1",
    ]
    assert {value(found[f"gpu-{m}"], "partition8x") for m in range(1, 17)} == {1, 2}
    assert {value(found[f"gpu-{m}"], "partition16x") for m in range(1, 17)} == {0}
    assert_published_rules(slices)


@pytest.mark.parametrize("name", ["hgx-h200", "hgx-a100-16", "hgx-b200"])
def test_every_slice_passes_strict_schema_validation(name: str) -> None:
    cases = [
        build_pool(inputs_for(name), 1),
        build_pool(inputs_for(name, gpu_problems={2: "fault"}, partition_problems={1: "FM"}), 7),
        build_pool(inputs_for(name, gpu_problems={m: "drained" for m in range(1, 17)}), 2),
    ]
    # Tainted: every problem kind at once, on every device of the table.
    every = {
        m: ("drained by an operator" if m % 2 else "XID 79: fallen off the bus")
        for m in range(1, 17)
    }
    problems = {1: "Fabric Manager is restarting: x", 2: "shares a GPU with partition 0, y"}
    problems[3] = "a very long NVLink training failure " * 5
    tainted = build_pool(
        inputs_for(name, gpu_problems=every, partition_problems=problems), 3, taints=True
    )
    assert all(d.get("taints") for s in tainted for d in s["spec"].get("devices") or [])
    assert_published_rules(tainted)
    cases.append(tainted)
    for slices in cases:
        for s in slices:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(s, version, strict=True)


def test_schema_bundle_has_v1_resource_slices_for_both_versions() -> None:
    for version in K8S_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(
                {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "spec": {"x": 1}},
                version,
                strict=True,
            )


def test_faulty_gpu_takes_its_partitions_and_attributes_out() -> None:
    slices = build_pool(inputs_for("hgx-h200", gpu_problems={3: "XID 79"}), 2)
    found = devices(slices)
    table = table_of("hgx-h200")
    gone = {p.partition_id for p in table.containing(3)}
    assert gone == {0, 1, 3, 9}
    assert {n for n in found if n.startswith("partition-")} == {
        f"partition-{p}" for p in set(table.ids) - gone
    }
    assert "gpu-3" not in found
    # GPU 1 shares partitions 0, 1 and 3 with GPU 3: no constrained claim may land there.
    gpu1 = found["gpu-1"]
    assert value(gpu1, "partition1x") == 7
    assert all(value(gpu1, f"partition{n}x") is None for n in (2, 4, 8))
    assert value(found["gpu-2"], "partition2x") == 4
    assert_published_rules(slices)


def test_partition_problem_and_missing_gpu() -> None:
    slices = build_pool(inputs_for("hgx-h200", partition_problems={2: "FM refuses"}), 1)
    found = devices(slices)
    assert "partition-2" not in found and "partition-1" in found
    assert all(value(found[f"gpu-{m}"], "partition4x") is None for m in (5, 6, 7, 8))
    assert value(found["gpu-5"], "partition2x") == 5
    # A GPU not found on PCI cannot be handed out: treated as a problem.
    missing = devices(build_pool(inputs_for("hgx-h200", missing=frozenset({8})), 1))
    assert "gpu-8" not in missing and "partition-14" not in missing and "partition-6" not in missing


def test_numa_unknown_gives_empty_numa_nodes() -> None:
    base = inputs_for("hgx-h200")
    gpus = dict(base.gpus)
    gpus[1] = GpuSlot(1, gpus[1].pci_address, 41, None)
    found = devices(
        build_pool(
            PoolInputs(base.node_name, base.driver, base.platform, base.table, gpus, {}, {}), 1
        )
    )
    assert value(found["partition-1"], "numaNodes") == ""
    assert value(found["partition-2"], "numaNodes") == "1"
    assert "numaNode" not in found["gpu-1"]["attributes"]


def test_all_gpus_faulty_leaves_the_counters_slice_alone() -> None:
    slices = build_pool(inputs_for("hgx-h200", gpu_problems={m: "fault" for m in range(1, 9)}), 4)
    assert [s["metadata"]["name"] for s in slices] == ["node-a-gpu-nvswitch-dp-io-counters"]
    assert slices[0]["spec"]["pool"]["resourceSliceCount"] == 1
    assert_published_rules(slices)


def test_long_node_names_are_hashed_within_limits() -> None:
    long_a = ("a" * 62 + ".") * 4
    long_a = long_a[:253].rstrip(".")
    long_b = long_a[:-1] + "b"
    names = {
        slice_name(node, DEFAULT_DRIVER, suffix)
        for node in (long_a, long_b)
        for suffix in ("counters", "devices-0", "devices-1")
    }
    assert len(names) == 6
    assert all(len(n) <= 253 and is_dns_subdomain(n) for n in names)
    assert slice_name(long_a, DEFAULT_DRIVER, "counters") == slice_name(
        long_a, DEFAULT_DRIVER, "counters"
    )
    slices = build_pool(inputs_for("hgx-h200", node=long_a), 1)
    assert_published_rules(slices)


def test_many_devices_split_into_slices_of_64() -> None:
    # 32 modules over 4 baseboards, 96 partitions: 128 devices, so two device slices.
    rows = [(i, (i % 32 + 1,)) for i in range(96)]
    table = PartitionTable.from_rows(rows)
    gpus = {m: GpuSlot(m, f"0000:{m:02x}:00.0", m, 0) for m in range(1, 33)}
    slices = build_pool(PoolInputs("n", DEFAULT_DRIVER, "test", table, gpus, {}, {}), 1)
    sizes = [len(s["spec"].get("devices") or []) for s in slices]
    assert sizes == [0, 64, 64]
    assert len(slices[0]["spec"]["sharedCounters"]) == 4
    assert_published_rules(slices)


def test_unpublishable_tables_are_refused() -> None:
    table = PartitionTable.from_rows([(0, (1, 9, 17))])
    gpus = {m: GpuSlot(m, f"0000:{m:02x}:00.0", m, 0) for m in (1, 9, 17)}
    with pytest.raises(PoolError, match="spans more than 2 baseboards"):
        build_pool(PoolInputs("n", DEFAULT_DRIVER, "t", table, gpus, {}, {}), 1)
    with pytest.raises(ValueError, match=">= 0"):
        build_pool(inputs_for("hgx-h200"), -1)


def test_validator_applies_the_published_limits() -> None:
    (good,) = [s for s in build_pool(inputs_for("hgx-h200"), 1) if "devices" in s["spec"]]
    one = good["spec"]["devices"][0]
    too_many = json.loads(json.dumps(good))
    too_many["spec"]["devices"] = [dict(one, name=f"d-{i}") for i in range(65)]
    assert [c.reason for c in check_slice(too_many)] == ["FieldValueTooMany"]
    both = json.loads(json.dumps(good))
    both["spec"]["sharedCounters"] = [{"name": "s", "counters": {"c": {"value": "1"}}}]
    assert any("only one of" in c.message for c in check_slice(both))
    bad = json.loads(json.dumps(good))
    bad["spec"]["devices"][0]["name"] = "Partition_1"
    bad["spec"]["devices"][0]["attributes"]["x" * 33] = {"int": 1}
    bad["spec"]["devices"][0]["attributes"]["s"] = {"string": "y" * 65}
    bad["spec"]["devices"][0]["consumesCounters"] *= 3
    fields = {c.field for c in check_slice(bad)}
    assert {
        "spec.devices[0].name",
        f"spec.devices[0].attributes[{'x' * 33}]",
        "spec.devices[0].attributes[s]",
        "spec.devices[0].consumesCounters",
    } <= fields
    sets = json.loads(json.dumps(build_pool(inputs_for("hgx-h200"), 1)[0]))
    sets["spec"]["sharedCounters"] = [
        {"name": f"set-{i}", "counters": {f"c-{j}": {"value": "1"} for j in range(33)}}
        for i in range(9)
    ]
    reasons = [c.reason for c in check_slice(sets)]
    assert reasons.count("FieldValueTooMany") == 10  # 9 sets > 8, and each set > 32


def _reference_tables() -> dict[str, PartitionTable]:
    data = json.loads(TABLES_JSON.read_text())
    return {
        name: PartitionTable.from_rows((p["id"], p["gpus"]) for p in entry["partitions"])
        for name, entry in data.items()
        if not name.startswith("_") and entry.get("partitions")
    }


def test_reference_tables_publish_and_gpus_per_size() -> None:
    """Each GPU is in exactly one partition of each size on the 8-GPU tables; the 16-GPU
    tables put each GPU in three 8-GPU partitions, so ``partition8x`` names one of them."""
    several: dict[str, set[int]] = {}
    for name, table in _reference_tables().items():
        for size in table.sizes:
            counts = {
                m: sum(1 for p in table.of_size(size) if m in p.module_ids)
                for m in table.module_ids
            }
            if set(counts.values()) != {1}:
                several.setdefault(name, set()).add(size)
        gpus = {m: GpuSlot(m, f"0000:{m:02x}:00.0", m, 0) for m in table.module_ids}
        slices = build_pool(PoolInputs("n", DEFAULT_DRIVER, "ref", table, gpus, {}, {}), 1)
        assert_published_rules(slices)
        chosen = gpu_partitions(table)
        for size in table.sizes:
            for pid in {c[size] for c in chosen.values() if size in c}:
                holders = {m for m, c in chosen.items() if c.get(size) == pid}
                assert holders == set(table[pid].module_ids)
    assert {name for name in several} == {
        n for n in _reference_tables() if "16" in n or "HGX-2" in n
    }
    assert all(sizes == {8} for sizes in several.values())


# The scheduler, played: every set of devices it can allocate at once is a set of
# non-overlapping FM partitions, and a free partition is always allocatable.


def claimed_partitions(
    table: PartitionTable, slices: list[Slice], allocation: tuple[str, ...]
) -> int:
    """The FM partition a claim's devices stand for (per-GPU devices count as their
    partition); fails when they are not exactly one partition's GPUs."""
    found = devices(slices)
    if len(allocation) == 1 and allocation[0].startswith("partition-"):
        return int(value(found[allocation[0]], "partitionID"))
    modules = {int(value(found[d], "moduleID")) for d in allocation}
    (pid,) = [p.partition_id for p in table if p.module_ids == modules]
    return pid


def assert_disjoint(table: PartitionTable, held: list[int]) -> None:
    for a, b in itertools.combinations(held, 2):
        assert not table[a].overlaps(table[b]), (a, b)


def free_partitions(table: PartitionTable, held: list[int]) -> list[int]:
    busy = set().union(*(table[p].module_ids for p in held)) if held else set()
    return [p.partition_id for p in table if busy.isdisjoint(p.module_ids)]


def assert_free_allocatable(
    table: PartitionTable, slices: list[Slice], allocator: Allocator, held: list[int]
) -> None:
    chosen = gpu_partitions(table)
    free = set(free_partitions(table, held))
    for p in table:
        claim = partition_claim(p.size, p.partition_id)
        assert (next(allocator.allocations(claim), None) is not None) == (p.partition_id in free)
        attribute = f"partition{p.size}x"
        if p.partition_id in free and all(
            chosen[m][p.size] == p.partition_id for m in p.module_ids
        ):
            ways = allocator.allocations(gpu_claim(p.size, attribute))
            assert any(claimed_partitions(table, slices, way) == p.partition_id for way in ways)


def test_h200_exhaustive_every_state() -> None:
    """Every set of non-overlapping partitions held through partition devices: the free
    partitions are exactly those allocatable, and per-GPU claims land on one partition."""
    table = table_of("hgx-h200")
    slices = build_pool(inputs_for("hgx-h200"), 1)
    ids = table.ids
    states = 0
    for r in range(len(ids) + 1):
        for combo in itertools.combinations(ids, r):
            if any(table[a].overlaps(table[b]) for a, b in itertools.combinations(combo, 2)):
                continue
            allocator = Allocator.from_slices(slices)
            for pid in combo:
                assert allocator.allocate(partition_claim(table[pid].size, pid)) is not None
            assert_free_allocatable(table, slices, allocator, list(combo))
            for size in table.sizes:
                for way in allocator.allocations(gpu_claim(size, f"partition{size}x")):
                    pid = claimed_partitions(table, slices, way)
                    assert_disjoint(table, [*combo, pid])
            states += 1
    # Per quad: each pair (1,3) is empty, its 2x partition, or any of its two 1x: 5 ways;
    # two pairs or the 4x: 5 * 5 + 1 = 26. Two quads, or the 8x: 26 * 26 + 1.
    assert states == 26 * 26 + 1


def test_h200_every_counter_feasible_device_set_is_disjoint() -> None:
    """Exhaustive over every device set the counters admit at once (23 devices): their
    GPUs never overlap, read from the devices' own attributes."""
    slices = build_pool(inputs_for("hgx-h200"), 1)
    allocator = Allocator.from_slices(slices)
    found = devices(slices)
    names = sorted(allocator.devices)

    def gpus_of(name: str) -> set[int]:
        if name.startswith("gpu-"):
            return {int(value(found[name], "moduleID"))}
        return {int(m) for m in str(value(found[name], "modules")).split(",")}

    feasible = 0

    def extend(start: int, counters: set[tuple[str, str]], gpus: set[int]) -> None:
        nonlocal feasible
        feasible += 1
        for i in range(start, len(names)):
            keys = set(allocator.devices[names[i]].consumes)
            if counters.isdisjoint(keys):
                assert gpus.isdisjoint(gpus_of(names[i]))
                extend(i + 1, counters | keys, gpus | gpus_of(names[i]))

    extend(0, set(), set())
    # Per pair (1,3): empty, its 2x device, or per GPU nothing / its 1x / its gpu device
    # (3 * 3): 10 ways; per quad 10 * 10 + its 4x; the board: 101 * 101 + the 8x.
    assert feasible == 101 * 101 + 1


claim_strategy = st.one_of(
    st.tuples(st.just("partition"), st.sampled_from([1, 2, 4, 8, 16])),
    st.tuples(st.just("gpus"), st.sampled_from([1, 2, 4, 8, 16])),
    st.tuples(st.just("free"), st.integers(0, 15)),
)


@pytest.mark.parametrize("name", ["hgx-h200", "hgx-a100-16"])
@settings(max_examples=60, deadline=None)
@given(steps=st.lists(claim_strategy, max_size=14))
def test_random_claims_hold_disjoint_partitions(name: str, steps: list[tuple[str, int]]) -> None:
    table = table_of(name)
    slices = build_pool(inputs_for(name), 1)
    allocator = Allocator.from_slices(slices)
    claims: list[tuple[tuple[str, ...], int]] = []
    for kind, n in steps:
        if kind == "free":
            if claims:
                devices_held, _ = claims.pop(n % len(claims))
                allocator.free(devices_held)
            continue
        if n not in table.sizes:
            continue
        claim = partition_claim(n) if kind == "partition" else gpu_claim(n, f"partition{n}x")
        got = allocator.allocate(claim)
        held = [pid for _, pid in claims]
        if got is None:
            # Nothing allocatable: then no free partition of that size can be reached.
            if kind == "partition":
                assert not [p for p in free_partitions(table, held) if table[p].size == n]
            continue
        claims.append((got, claimed_partitions(table, slices, got)))
        assert_disjoint(table, [pid for _, pid in claims])
    held = [pid for _, pid in claims]
    assert_free_allocatable(table, slices, allocator, held)


def test_taint_rules_are_checked() -> None:
    slices = build_pool(inputs_for("hgx-h200", gpu_problems={3: "XID 79"}), 2, taints=True)
    device = next(d for d in slices[1]["spec"]["devices"] if d.get("taints"))
    assert check_slice(slices[1]) == []
    device["taints"] = [{"key": "bad key", "value": "x" * 64, "effect": "PreferNoSchedule"}] * 17
    fields = {c.field for c in check_slice(slices[1])}
    index = slices[1]["spec"]["devices"].index(device)
    where = f"spec.devices[{index}].taints"
    assert {where, f"{where}[0].key", f"{where}[0].value", f"{where}[0].effect"} <= fields
