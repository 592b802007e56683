"""DRA placement end to end: the real daemon publishes its pool in the policy's order, and
the scheduler stand-in, allocating from the slices as the API-server stand-in serves
them, takes exactly the partitions the policy would have chosen.

Also the write budget of a burst: the slice writes 50 Prepares (and the Unprepares between
them) cost, printed, and bounded by the publisher's coalescing interval.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from nvswitch_dp.demo.apistore import DEVICE_STATUS, TAINTS
from nvswitch_dp.demo.cluster import ClaimSpec
from nvswitch_dp.demo.dra_allocator import partition_claim
from nvswitch_dp.dra.publish import MIN_INTERVAL_S
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.policy import (
    parse_device,
    placement_order,
    preferred_allocation,
    remaining_after,
)
from nvswitch_dp.partitions.table import PartitionTable
from testkit.dra_cluster import DraCluster, dra_cluster


@dataclass(frozen=True)
class Free:
    """The policy's Availability: what is free while ``held`` are held."""

    table: PartitionTable
    free: frozenset[int]

    def available_ids(self) -> frozenset[int]:
        return self.free


def table_of(name: str) -> PartitionTable:
    return PartitionTable.from_rows((pid, mods) for pid, mods, _ in platform(name).rows)


@pytest.fixture(params=["hgx-h200", "hgx-a100-16"])
def cluster(request: pytest.FixtureRequest) -> Iterator[DraCluster]:
    with (
        tempfile.TemporaryDirectory(prefix="dra-place-") as workdir,
        dra_cluster(Path(workdir), platform=request.param) as started,
    ):
        yield started


def published_partitions(cluster: DraCluster) -> list[int]:
    """The partition devices in the order the served slices list them."""
    found = [
        int(d["name"].removeprefix("partition-"))
        for s in cluster.slices()
        for d in s["spec"].get("devices") or []
        if d["name"].startswith("partition-")
    ]
    return found


def in_policy_order(cluster: DraCluster, table: PartitionTable, free: frozenset[int]) -> bool:
    """Whether the served pool lists the free partitions in the policy's order."""
    wanted = [p for p in placement_order(table, free) if p in free]
    return [p for p in published_partitions(cluster) if p in free] == wanted


# A sequence of arrivals (size) and departures (-index of the claim to release).
SEQUENCE = (1, 1, 2, 1, 4, -1, 1, 2, -3, 1, 2, -0, 1, 1, -6, 4, 1)


def test_the_scheduler_takes_what_the_policy_would(cluster: DraCluster) -> None:
    table = table_of(cluster.platform)
    held: dict[int, tuple[ClaimSpec, int]] = {}
    compared = 0
    for step, item in enumerate(SEQUENCE):
        free = remaining_after(table, frozenset(table.ids), [p for _, p in held.values()])
        if item <= 0:
            index = -item
            if index in held:
                claim, _ = held.pop(index)
                assert cluster.unprepare(claim) == ""
                cluster.delete_claim(claim)
            continue
        # The daemon re-publishes once what it holds changed; wait for that pool.
        cluster.wait(
            partial(in_policy_order, cluster, table, free),
            20,
            f"step {step}: the pool in the policy's order",
        )
        offered = [p.device_id for p in table.of_size(item) if p.partition_id in free]
        if not offered:
            with pytest.raises(LookupError):
                cluster.create_claim(partition_claim(item))
            continue
        choice = parse_device(preferred_allocation(Free(table, free), offered, [], 1)[0], table)
        claim = cluster.create_claim(partition_claim(item))
        (device,) = cluster.allocated(claim)
        assert device == f"partition-{choice}", f"step {step}: size {item}"
        compared += 1
        answer = cluster.prepare(claim)
        assert answer.error == ""
        held[step] = (claim, int(device.removeprefix("partition-")))
    assert compared >= 10


def test_a_burst_of_50_prepares_costs_a_bounded_number_of_slice_writes(
    cluster: DraCluster,
) -> None:
    store = cluster.store
    table = table_of(cluster.platform)
    off_policy = 0
    before = len(
        [r for r in store.requests if r.method in ("PUT", "POST") and "resourceslices" in r.path]
    )
    started = time.monotonic()
    held: list[ClaimSpec] = []
    prepares = 0
    while prepares < 50:
        if len(held) >= len(table.module_ids) // 2:
            old = held.pop(0)
            assert cluster.unprepare(old) == ""
            cluster.delete_claim(old)
        taken = [int(cluster.allocated(c)[0].removeprefix("partition-")) for c in held]
        free = remaining_after(table, frozenset(table.ids), taken)
        offered = [p.device_id for p in table.of_size(1) if p.partition_id in free]
        choice = preferred_allocation(Free(table, free), offered, [], 1)[0]
        claim = cluster.create_claim(partition_claim(1))  # on whatever pool is served now
        off_policy += cluster.allocated(claim)[0] != choice
        assert cluster.prepare(claim).error == ""
        prepares += 1
        held.append(claim)
    burst = time.monotonic() - started

    def writes() -> int:
        return (
            len(
                [
                    r
                    for r in store.requests
                    if r.method in ("PUT", "POST") and "resourceslices" in r.path
                ]
            )
            - before
        )

    during = writes()
    time.sleep(3 * MIN_INTERVAL_S)
    cluster.wait_published()
    total = writes()
    print(
        f"\n{cluster.platform}: 50 Prepares (and {50 - len(held)} Unprepares) in {burst:.2f} s "
        f"cost {during} slice writes during the burst, {total} in all; "
        f"{off_policy} of the 50 placed on a stale order differ from the policy's choice"
    )
    # One round per coalescing interval at most, each writing the device slice and the
    # counters slice (a new generation), plus the round that settles the last change.
    assert total <= 2 * (burst / MIN_INTERVAL_S + 2)


def ready(cluster: DraCluster, claim: ClaimSpec) -> list[tuple[str, str, str]]:
    """(device, Ready status, reason) of the claim's status.devices entries."""
    obj = cluster.store.get("resourceclaims", claim.namespace, claim.name)
    return [
        (d["device"], c["status"], c["reason"])
        for d in (obj.get("status") or {}).get("devices") or []
        for c in d.get("conditions") or []
        if c["type"] == "Ready"
    ]


@pytest.mark.parametrize(
    "taints", [True, False], ids=["a-1.37-server", "a-server-without-taints-or-device-status"]
)
def test_a_gpu_fault_on_a_prepared_partition_taints_or_removes_and_recovers(
    taints: bool,
) -> None:
    """The issue's third test: devices tainted with the reason (or left out), the claim's
    Ready condition false with the reason (or, on a server without the field, nothing
    written and Prepare unharmed), and both back with the GPU."""
    with (
        tempfile.TemporaryDirectory(prefix="dra-taint-") as workdir,
        DraCluster(Path(workdir)) as cluster,
    ):
        if not taints:
            cluster.store.features -= {TAINTS, DEVICE_STATUS}
        cluster.start_daemon()
        cluster.wait_published()
        claim = cluster.create_claim(partition_claim(4))
        (device,) = cluster.allocated(claim)
        assert cluster.prepare(claim).error == ""
        if taints:
            cluster.wait(
                lambda: ready(cluster, claim) == [(device, "True", "Prepared")], 10, "Ready"
            )
            obj = cluster.store.get("resourceclaims", claim.namespace, claim.name)
            (entry,) = obj["status"]["devices"]
            assert entry["data"]["partitionID"] == int(device.removeprefix("partition-"))
            assert len(entry["data"]["pciAddresses"]) == len(entry["data"]["iommuGroups"]) == 4
            assert obj["status"]["allocation"]  # the scheduler's part is kept
        modules = table_of(cluster.platform)[int(device.removeprefix("partition-"))]
        module = min(modules.module_ids)
        holding = {
            f"partition-{p.partition_id}"
            for p in table_of(cluster.platform)
            if module in p.module_ids
        } | {f"gpu-{module}"}
        group = cluster.vfio_group(module)
        group.unlink()  # /dev/vfio/<group> gone: the GPU cannot be handed to a VM
        cluster.wait(lambda: not cluster.devices() & holding, 10, "the GPU's devices out")
        published = cluster.taints()
        if taints:
            # Every device holding the GPU is still there, saying why it is not offered.
            assert holding <= set(published)
            key = "gpu.nvswitch-dp.io/gpu-fault"
            assert published[device] == [(key, f"modules-{module}")]
            assert published[f"gpu-{module}"][0][0] == key
            assert "missing" in published[f"gpu-{module}"][0][1]
        else:
            assert not holding & set(published)
            assert not any(published.values())  # never a sick device untainted
        assert cluster.fm_active() == [int(device.removeprefix("partition-"))]  # kept
        if taints:
            cluster.wait(lambda: ready(cluster, claim) == [(device, "False", "GPUFault")], 10, "!")
        group.write_text("")
        cluster.wait(lambda: cluster.devices() >= holding - {device}, 10, "back")
        assert not any(cluster.taints().values())
        if taints:
            cluster.wait(lambda: ready(cluster, claim) == [(device, "True", "Prepared")], 10, "up")
        else:
            assert ready(cluster, claim) == []
            log = cluster.daemon.log_text() if cluster.daemon is not None else ""
            assert log.count("drops ResourceClaim status.devices") == 1
            assert log.count("drops device taints") == 1
        assert cluster.unprepare(claim) == ""
