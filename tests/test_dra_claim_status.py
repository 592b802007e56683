"""Claim status (KEP-4817): what the writer puts into ``status.devices``, and that no
trouble with it reaches Prepare. A simulated H200 node in DRA mode (``dra_node``) and an
in-memory claim store that keeps status writes as the API server's status subresource
does (the spec untouched, the whole status replaced), can fail or drop the field."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from dra_node import DRIVER, NODE, MemoryClaims, allocated_claim, build_node, ref_of

from nvswitch_dp.dra.claim_status import ClaimStatusWriter
from nvswitch_dp.dra.kube import KubeUnavailable


class StatusClaims(MemoryClaims):
    """Claims whose status can be written; ``failing`` plays an unreachable server,
    ``drops`` one without ``DRAResourceClaimDeviceStatus``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.drops = False
        self.status_writes = 0

    async def update_claim_status(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if self.failing:
            raise KubeUnavailable("update the status: connection refused")
        meta = obj["metadata"]
        stored = copy.deepcopy(self._claims[(meta["namespace"], meta["name"])])
        stored["status"] = copy.deepcopy(obj.get("status") or {})
        if self.drops:
            stored["status"].pop("devices", None)
        self._claims[(meta["namespace"], meta["name"])] = stored
        self.status_writes += 1
        return copy.deepcopy(stored)


def ready(claims: StatusClaims, claim: dict[str, Any]) -> list[tuple[str, str, str]]:
    meta = claim["metadata"]
    obj = claims._claims[(meta["namespace"], meta["name"])]
    return [
        (d["driver"], c["status"], c["reason"])
        for d in obj["status"].get("devices") or []
        if d["driver"] == DRIVER
        for c in d["conditions"]
    ]


async def start(tmp_path: Path, nursery: trio.Nursery, claims: StatusClaims) -> Any:
    node = await build_node(tmp_path, nursery, claims=claims)
    writer = ClaimStatusWriter(
        claims,
        driver=DRIVER,
        pool=NODE,
        gpus=node.controller.layout.gpus,
        prepared=lambda: node.driver.prepared,
        view=node.controller.view,
        wait_changed=node.controller.wait_changed,
        retry_s=0.05,
    )
    node.driver.on_change = writer.notify
    await nursery.start(writer.run)
    return node, writer


async def test_prepared_claim_gets_ready_and_its_partition_and_follows_a_fault(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    claims = StatusClaims()
    node, writer = await start(tmp_path, nursery, claims)
    claim = allocated_claim("vm", [("gpus", "partition-1")])
    # Another driver's entry in the same claim is kept.
    claim["status"]["devices"] = [{"driver": "other.example.com", "pool": "p", "device": "d"}]
    claims.put(claim)
    assert (await node.driver.prepare_claim(ref_of(claim))).error == ""
    with trio.fail_after(5):
        await writer.wait_until(lambda w: w.writes >= 1)
    assert ready(claims, claim) == [(DRIVER, "True", "Prepared")]
    stored = claims._claims[("default", "vm")]
    ours = next(d for d in stored["status"]["devices"] if d["driver"] == DRIVER)
    assert ours["device"] == "partition-1" and ours["pool"] == NODE
    assert ours["data"]["partitionID"] == 1 and ours["data"]["modules"] == [1, 2, 3, 4]
    gpus = node.controller.layout.gpus
    assert ours["data"]["pciAddresses"] == [gpus[m].pci_address for m in (1, 2, 3, 4)]
    assert ours["data"]["iommuGroups"] == [gpus[m].iommu_group for m in (1, 2, 3, 4)]
    assert stored["status"]["allocation"]  # the scheduler's part untouched
    assert any(d["driver"] == "other.example.com" for d in stored["status"]["devices"])

    node.controller.set_gpu_fault(3, "XID 79")
    with trio.fail_after(5):
        await writer.wait_until(lambda w: w.writes >= 2)
    (condition,) = ours_conditions(claims)
    assert (condition["status"], condition["reason"]) == ("False", "GPUFault")
    assert "GPU module 3: XID 79" in condition["message"]
    node.controller.set_gpu_fault(3, None)
    with trio.fail_after(5):
        await writer.wait_until(lambda w: w.writes >= 3)
    assert ready(claims, claim)[-1] == (DRIVER, "True", "Prepared")
    # A node change that leaves the claim's health alone writes nothing.
    node.controller.drain(8)
    await trio.sleep(0.2)
    assert writer.writes == 3


def ours_conditions(claims: StatusClaims) -> list[dict[str, Any]]:
    stored = claims._claims[("default", "vm")]
    return [
        c for d in stored["status"]["devices"] if d["driver"] == DRIVER for c in d["conditions"]
    ]


async def test_a_failing_status_write_never_fails_prepare_and_is_retried(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    claims = StatusClaims()
    claims.failing = True
    node, writer = await start(tmp_path, nursery, claims)
    claim = allocated_claim("vm", [("gpus", "partition-2")])
    claims.put(claim)
    assert (await node.driver.prepare_claim(ref_of(claim))).error == ""
    with trio.fail_after(5):
        await writer.wait_until(lambda w: w.problem is not None)
    assert "connection refused" in (writer.problem or "")
    assert await node.fm_active() == [2]
    claims.failing = False
    with trio.fail_after(5):
        await writer.wait_until(lambda w: w.writes >= 1 and w.problem is None)
    assert ready(claims, claim) == [(DRIVER, "True", "Prepared")]


async def test_a_server_without_the_field_is_said_once_and_left_alone(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    claims = StatusClaims()
    claims.drops = True
    node, writer = await start(tmp_path, nursery, claims)
    for name, device in (("a", "partition-7"), ("b", "partition-8")):
        claim = allocated_claim(name, [("gpus", device)])
        claims.put(claim)
        assert (await node.driver.prepare_claim(ref_of(claim))).error == ""
    with trio.fail_after(5):
        await writer.wait_until(lambda w: w.supported is False)
    await trio.sleep(0.2)
    assert claims.status_writes == 1
    drops = [r for r in caplog.records if "drops ResourceClaim status.devices" in r.getMessage()]
    assert len(drops) == 1
