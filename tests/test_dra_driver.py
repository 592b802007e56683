"""DRA Prepare/Unprepare on the FM simulator: one partition per claim, refusals that say
what to ask for, idempotency, per-claim errors, the checkpoint across a restart, and the
clean-up of claims the API server forgot."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio
from dra_node import DRIVER, NODE, MemoryClaims, allocated_claim, build_node, ref_of

from nvswitch_dp.dra.checkpoint import Checkpoint, PreparedClaim
from nvswitch_dp.dra.driver import ClaimRef, allocated_devices, resolve_partition
from nvswitch_dp.dra.errors import ClaimRefused
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.table import PartitionTable

# The H200 table: 0 = 1-8, 1 = 1-4, 2 = 5-8, 3 = {1,3}, 4 = {2,4}, 5 = {5,7}, 6 = {6,8},
# 7..14 = one GPU each (module 1..8).
H200 = PartitionTable.from_rows(
    [
        (0, range(1, 9)),
        (1, (1, 2, 3, 4)),
        (2, (5, 6, 7, 8)),
        (3, (1, 3)),
        (4, (2, 4)),
        (5, (5, 7)),
        (6, (6, 8)),
        *((6 + m, (m,)) for m in range(1, 9)),
    ]
)
MODULE_MAP = platform("hgx-h200").module_map()


# -- pure: which partition the allocated devices stand for ------------------------------


@pytest.mark.parametrize(
    ("devices", "partition"),
    [
        (["partition-2"], 2),
        (["partition-0"], 0),
        (["gpu-5", "gpu-6", "gpu-7", "gpu-8"], 2),
        (["gpu-8", "gpu-6"], 6),  # any order
        (["gpu-3"], 9),
        ([f"gpu-{m}" for m in range(1, 9)], 0),
    ],
)
def test_devices_that_are_one_partition_resolve_to_it(devices: list[str], partition: int) -> None:
    assert resolve_partition(devices, H200, driver=DRIVER) == partition


@pytest.mark.parametrize(
    ("devices", "says"),
    [
        (["gpu-1", "gpu-2"], ["GPUs 1,2 are not one Fabric Manager partition",
                              "partition-2x.gpu.nvswitch-dp.io",
                              "2 requests of class gpu.gpu.nvswitch-dp.io",
                              "matchAttribute gpu.nvswitch-dp.io/partition2x"]),
        (["gpu-1", "gpu-2", "gpu-3"], ["partitions on this node have 1, 2, 4, 8 GPUs"]),
        (["gpu-1", "gpu-2", "gpu-3", "gpu-5"], ["partition-4x.gpu.nvswitch-dp.io",
                                                "matchAttribute gpu.nvswitch-dp.io/partition4x"]),
        (["partition-1", "partition-2"], ["2 partitions", "one claim per partition"]),
        (["partition-1", "gpu-5"], ["mixes partition devices (partition-1)", "(gpu-5)"]),
        (["partition-99"], ["partition-99 is not in this node's Fabric Manager table"]),
        (["gpu-9"], ["GPUs [9] are in no Fabric Manager partition"]),
        (["gpu-1", "gpu-1"], ["names a GPU twice"]),
        (["nvidia-gpu-0"], ["'nvidia-gpu-0' is not one gpu.nvswitch-dp.io publishes"]),
        (["gpu-01"], ["'gpu-01' is not one"]),
    ],
)  # fmt: skip
def test_anything_else_is_refused_saying_what_to_ask_for(
    devices: list[str], says: list[str]
) -> None:
    with pytest.raises(ClaimRefused) as refused:
        resolve_partition(devices, H200, driver=DRIVER)
    for text in says:
        assert text in str(refused.value)


def test_results_of_other_drivers_are_left_alone_and_other_pools_refused() -> None:
    claim = allocated_claim("c", [("gpu", "partition-2")])
    claim["status"]["allocation"]["devices"]["results"].append(
        {"request": "nic", "driver": "nic.example.com", "pool": "elsewhere", "device": "eth0"}
    )
    ref = ref_of(claim)
    devices = allocated_devices(claim, ref, driver=DRIVER, pool=NODE)
    assert [(d.request, d.pool, d.device) for d in devices] == [("gpu", NODE, "partition-2")]
    with pytest.raises(ClaimRefused, match="not this node's pool 'node-b'"):
        allocated_devices(claim, ref, driver=DRIVER, pool="node-b")


def test_a_claim_with_another_uid_or_no_allocation_is_refused() -> None:
    claim = allocated_claim("c", [("gpu", "partition-2")])
    stale = ClaimRef("default", str(uuid.uuid4()), "c")
    with pytest.raises(ClaimRefused, match="deleted"):
        allocated_devices(claim, stale, driver=DRIVER, pool=NODE)
    del claim["status"]
    with pytest.raises(ClaimRefused, match="not allocated"):
        allocated_devices(claim, ref_of(claim), driver=DRIVER, pool=NODE)


# -- the driver on the FM simulator -----------------------------------------------------


async def test_prepare_activates_the_partition_writes_cdi_and_answers_its_id(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    claim = allocated_claim("vm", [("gpu", "partition-2")])
    node.claims.put(claim)
    ref = ref_of(claim)
    result = (await node.driver.prepare([ref]))[ref.uid]
    assert result.error == ""
    cdi_id = f"nvswitch-dp.io/partition={ref.uid}"
    assert [(d.requests, d.pool, d.device, d.cdi_device_ids) for d in result.devices] == [
        (("gpu",), NODE, "partition-2", (cdi_id,))
    ]
    assert await node.fm_active() == [2]
    edits = node.spec(ref.uid)["devices"][0]["containerEdits"]
    assert [n["path"] for n in edits["deviceNodes"]] == [
        "/dev/vfio/vfio", "/dev/vfio/15", "/dev/vfio/16", "/dev/vfio/17", "/dev/vfio/18"
    ]  # fmt: skip
    addresses = ",".join(MODULE_MAP[m] for m in (5, 6, 7, 8))
    assert f"PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X={addresses}" in edits["env"]
    assert "NVSWITCH_DP_PARTITION_IDS=2" in edits["env"]
    saved = node.checkpoint.load()[ref.uid]
    assert (saved.partition_id, saved.cdi_ids) == (2, (cdi_id,))
    assert node.holder.holdings == {ref.uid: 2}


async def test_four_gpu_requests_on_one_partition_are_that_partition(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    claim = allocated_claim("vm", [(f"gpu{i}", f"gpu-{m}") for i, m in enumerate((1, 2, 3, 4))])
    node.claims.put(claim)
    ref = ref_of(claim)
    result = (await node.driver.prepare([ref]))[ref.uid]
    assert result.error == ""
    assert [(d.requests, d.device) for d in result.devices] == [
        (("gpu0",), "gpu-1"), (("gpu1",), "gpu-2"), (("gpu2",), "gpu-3"), (("gpu3",), "gpu-4")
    ]  # fmt: skip
    assert {d.cdi_device_ids for d in result.devices} == {(f"nvswitch-dp.io/partition={ref.uid}",)}
    assert await node.fm_active() == [1]


async def test_prepare_and_unprepare_are_idempotent(tmp_path: Path, nursery: trio.Nursery) -> None:
    node = await build_node(tmp_path, nursery)
    claim = allocated_claim("pod", [("gpu", "partition-5")])
    node.claims.put(claim)
    ref = ref_of(claim)
    first = await node.driver.prepare([ref])
    again = await node.driver.prepare([ref, ref])  # a retry, with the claim named twice
    assert again == first
    assert node.claims.reads == 1  # answered from the checkpoint
    assert await node.fm_active() == [5]
    assert await node.driver.unprepare([ref]) == {ref.uid: ""}
    assert await node.fm_active() == []
    assert not node.cdi.spec_path(ref.uid).exists()
    assert node.checkpoint.load() == {}
    assert await node.driver.unprepare([ref]) == {ref.uid: ""}
    assert node.holder.holdings == {}
    node.controller.machine.book.check_invariants()


async def test_unprepare_of_a_claim_never_prepared_succeeds(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    unknown = ClaimRef("default", str(uuid.uuid4()), "ghost")
    malformed = ClaimRef("default", "../../etc", "bad")
    assert await node.driver.unprepare([unknown, malformed]) == {unknown.uid: "", "../../etc": ""}


async def test_a_refused_claim_leaves_nothing_behind(tmp_path: Path, nursery: trio.Nursery) -> None:
    node = await build_node(tmp_path, nursery)
    claim = allocated_claim("vm", [("gpu0", "gpu-1"), ("gpu1", "gpu-2")])
    node.claims.put(claim)
    ref = ref_of(claim)
    result = (await node.driver.prepare([ref]))[ref.uid]
    assert "GPUs 1,2 are not one Fabric Manager partition" in result.error
    assert "matchAttribute gpu.nvswitch-dp.io/partition2x" in result.error
    assert result.devices == ()
    assert await node.fm_active() == []
    assert node.checkpoint.load() == {}
    assert node.cdi.claim_uids() == set()


async def test_a_recreated_claim_with_another_uid_is_refused(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    node.claims.put(allocated_claim("vm", [("gpu", "partition-2")]))
    stale = ClaimRef("default", str(uuid.uuid4()), "vm")
    result = (await node.driver.prepare([stale]))[stale.uid]
    assert "not " + stale.uid in result.error and "deleted" in result.error
    gone = ClaimRef("default", str(uuid.uuid4()), "never-created")
    result = (await node.driver.prepare([gone]))[gone.uid]
    assert "ResourceClaim default/never-created does not exist" in result.error
    assert await node.fm_active() == []


async def test_errors_are_per_claim_and_overlap_names_the_holder(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    whole = allocated_claim("a", [("gpu", "partition-1")])
    overlapping = allocated_claim("b", [("gpu", "partition-3")])
    fine = allocated_claim("c", [("gpu", "partition-6")])
    for claim in (whole, overlapping, fine):
        node.claims.put(claim)
    await node.driver.prepare([ref_of(whole)])
    results = await node.driver.prepare([ref_of(overlapping), ref_of(fine)])
    assert "partition 1" in results[ref_of(overlapping).uid].error
    assert results[ref_of(fine).uid].error == ""
    assert await node.fm_active() == [1, 6]
    assert set(node.checkpoint.load()) == {ref_of(whole).uid, ref_of(fine).uid}


async def test_an_fm_failure_answers_the_claim_error_and_undoes_everything(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    node.inject(nvlink_error_partitions={2})
    claim = allocated_claim("vm", [("gpu", "partition-2")])
    node.claims.put(claim)
    ref = ref_of(claim)
    result = (await node.driver.prepare([ref]))[ref.uid]
    assert "NVLINK_ERROR" in result.error
    assert await node.fm_active() == []
    assert node.checkpoint.load() == {}
    assert node.holder.holdings == {}
    assert not node.controller.view().in_use(2)


async def test_an_unreachable_api_server_is_a_claim_error_to_retry(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    claim = allocated_claim("vm", [("gpu", "partition-2")])
    node.claims.put(claim)
    node.claims.down = "connection refused"
    ref = ref_of(claim)
    assert "connection refused" in (await node.driver.prepare([ref]))[ref.uid].error
    node.claims.down = None
    assert (await node.driver.prepare([ref]))[ref.uid].error == ""


async def test_after_a_restart_unprepare_works_and_the_partition_stays_active(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    claims = MemoryClaims()
    node = await build_node(tmp_path, nursery, claims=claims)
    claim = allocated_claim("vm", [("gpu", "partition-2")])
    claims.put(claim)
    ref = ref_of(claim)
    answer = await node.driver.prepare([ref])
    node.stop()  # SIGKILL: FM keeps partition 2 active

    restarted = await build_node(tmp_path, nursery, claims=claims)  # same FM, CDI, checkpoint
    assert set(restarted.driver.prepared) == {ref.uid}
    assert restarted.holder.holdings == {ref.uid: 2}
    view = restarted.controller.view()
    assert view.in_use(2)  # never handed out again, never deactivated
    assert not {0, 2, 5, 6, 11, 12, 13, 14} & view.available
    with trio.move_on_after(1):  # well beyond the release grace: a claim is not released
        await trio.sleep_forever()
    assert await restarted.fm_active() == [2]
    assert await restarted.driver.prepare([ref]) == answer  # the kubelet's retry
    assert await restarted.driver.unprepare([ref]) == {ref.uid: ""}
    assert await restarted.fm_active() == []


async def test_a_prepare_interrupted_before_the_hold_is_finished_or_released(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    claims = MemoryClaims()
    claim = allocated_claim("vm", [("gpu", "partition-2")])
    claims.put(claim)
    ref = ref_of(claim)
    # What a SIGKILL right after "checkpoint as preparing" leaves: an entry, no hold, FM
    # with nothing active. The restarted machine holds the claim's partition again.
    preparing = PreparedClaim(ref.uid, ref.namespace, ref.name, 2, ((("gpu",), "partition-2"),), ())
    Checkpoint(tmp_path / "retried" / "state" / "dra-checkpoint.json").save({ref.uid: preparing})
    node = await build_node(tmp_path / "retried", nursery, claims=claims)
    assert await node.fm_active() == [2]
    assert (await node.driver.prepare([ref]))[ref.uid].error == ""
    assert claims.reads == 1  # an unfinished entry is prepared from the API server's claim
    assert node.cdi.claim_uids() == {ref.uid}
    assert await node.fm_active() == [2]

    Checkpoint(tmp_path / "released" / "state" / "dra-checkpoint.json").save({ref.uid: preparing})
    other = await build_node(tmp_path / "released", nursery, claims=claims)
    assert await other.driver.unprepare([ref]) == {ref.uid: ""}
    assert other.checkpoint.load() == {}
    assert await other.fm_active() == []


async def test_claims_the_api_server_forgot_are_cleaned_up_and_kept_while_it_is_down(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    claims = MemoryClaims()
    node = await build_node(tmp_path, nursery, claims=claims)
    kept = allocated_claim("kept", [("gpu", "partition-5")])
    deleted = allocated_claim("deleted", [("gpu", "partition-6")])
    recreated = allocated_claim("recreated", [("gpu", "partition-1")])
    for claim in (kept, deleted, recreated):
        claims.put(claim)
    await node.driver.prepare([ref_of(c) for c in (kept, deleted, recreated)])
    assert await node.fm_active() == [1, 5, 6]
    node.stop()

    restarted = await build_node(tmp_path, nursery, claims=claims)
    claims.delete("default", "deleted")
    claims.put(allocated_claim("recreated", [("gpu", "partition-1")]))  # same name, new UID
    claims.down = "timeout"
    assert await restarted.driver.collect_orphans() == []
    assert await restarted.fm_active() == [1, 5, 6]
    claims.down = None
    orphans = await restarted.driver.collect_orphans()
    assert sorted(orphans) == sorted([ref_of(deleted).uid, ref_of(recreated).uid])
    assert await restarted.fm_active() == [5]
    assert set(restarted.checkpoint.load()) == {ref_of(kept).uid}
    assert restarted.cdi.claim_uids() == {ref_of(kept).uid}


async def test_many_claims_prepared_at_once_are_all_checkpointed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    claims = [allocated_claim(f"pod{m}", [("gpu", f"gpu-{m}")]) for m in range(1, 9)]
    for claim in claims:
        node.claims.put(claim)
    results = await node.driver.prepare([ref_of(c) for c in claims])
    assert {uid: r.error for uid, r in results.items()} == {ref_of(c).uid: "" for c in claims}
    assert set(node.checkpoint.load()) == {ref_of(c).uid for c in claims}
    assert await node.fm_active() == list(range(7, 15))
    errors = await node.driver.unprepare([ref_of(c) for c in claims])
    assert set(errors.values()) == {""}
    assert node.checkpoint.load() == {}
    assert await node.fm_active() == []


async def test_a_prepare_cancelled_by_the_kubelet_deadline_is_finished_not_half_done(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    node = await build_node(tmp_path, nursery)
    node.inject(activation_delay_s=0.3)
    claim = allocated_claim("vm", [("gpu", "partition-2")])
    node.claims.put(claim)
    ref = ref_of(claim)
    with trio.move_on_after(0.05) as deadline:
        await node.driver.prepare([ref])
    assert deadline.cancel_called  # the deadline passed while FM was activating
    # The work went on to the end: held, active, CDI spec and checkpoint written.
    assert node.checkpoint.load()[ref.uid].cdi_ids == (f"nvswitch-dp.io/partition={ref.uid}",)
    assert node.cdi.claim_uids() == {ref.uid}
    assert await node.fm_active() == [2]
    retried = (await node.driver.prepare([ref]))[ref.uid]
    assert retried.error == "" and retried.devices[0].device == "partition-2"
    assert await node.driver.unprepare([ref]) == {ref.uid: ""}
    assert await node.fm_active() == []
