"""The pool publisher against the API-server stand-in, over real HTTP through lightkube."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from dra_helpers import inputs_for

from nvswitch_dp.demo.apiserver import ApiServer
from nvswitch_dp.demo.apistore import TAINTS
from nvswitch_dp.dra.kube import KubeClient
from nvswitch_dp.dra.publish import PoolPublisher
from nvswitch_dp.dra.slices import PoolInputs, build_pool, without_generation
from nvswitch_dp.dra.validation import check_pool

TOKEN = "publisher-test-token"
DEVICES = "node-a-gpu-nvswitch-dp-io-devices-0"


class Node:
    """Plays the lead's node: inputs now, and a change counter to wait on."""

    def __init__(self, inputs: PoolInputs) -> None:
        self.inputs = inputs
        self.changes = 0
        self._event = trio.Event()

    def source(self) -> PoolInputs:
        return self.inputs

    async def wait_for_change(self, last: int) -> int:
        while self.changes == last:
            await self._event.wait()
        return self.changes

    def change(
        self,
        *,
        gpu_problems: Mapping[int, str] | None = None,
        partition_problems: Mapping[int, str] | None = None,
    ) -> None:
        if gpu_problems is not None:
            self.inputs = replace(self.inputs, gpu_problems=gpu_problems)
        if partition_problems is not None:
            self.inputs = replace(self.inputs, partition_problems=partition_problems)
        self.changes += 1
        self._event.set()
        self._event = trio.Event()


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with ApiServer(token=TOKEN) as running:
        yield running


@pytest.fixture
async def client(server: ApiServer, tmp_path: Path) -> AsyncIterator[KubeClient]:
    async with KubeClient.from_kubeconfig(server.write_kubeconfig(tmp_path / "kubeconfig")) as c:
        yield c


def publisher(client: KubeClient, node: Node, *, resync_s: float = 60.0) -> PoolPublisher:
    return PoolPublisher(
        client,
        node.source,
        node.wait_for_change,
        backoff_first_s=0.02,
        backoff_cap_s=0.1,
        resync_s=resync_s,
        min_interval_s=0.02,
    )


def pool_in(server: ApiServer) -> list[dict[str, Any]]:
    return [s for s in server.store.slices() if s["spec"]["nodeName"] == "node-a"]


def assert_matches(server: ApiServer, inputs: PoolInputs, generation: int) -> None:
    """The pool in the server is the builder's, tainted where the server keeps taints."""
    taints = TAINTS in server.store.features
    stored = pool_in(server)
    assert check_pool(stored) == []
    assert [without_generation(s) for s in stored] == [
        without_generation(s) for s in build_pool(inputs, generation, taints=taints)
    ]
    assert {s["spec"]["pool"]["generation"] for s in stored} == {generation}


async def test_publishes_then_follows_a_gpu_fault(server: ApiServer, client: KubeClient) -> None:
    server.store.features.discard(TAINTS)  # a server without device taints
    node = Node(inputs_for("hgx-h200"))
    pub = publisher(client, node)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(pub.run)
        assert pub.problem is None and pub.generation == 1 and pub.writes == 1
        assert pub.taints is False
        assert_matches(server, node.inputs, 1)
        node.change(gpu_problems={3: "XID 79"})
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.generation == 2)
        assert_matches(server, node.inputs, 2)
        names = {d["name"] for s in pool_in(server) for d in s["spec"].get("devices") or []}
        assert "gpu-3" not in names and "partition-1" not in names and "partition-2" in names
        # Back healthy: the devices return, at a higher generation again.
        node.change(gpu_problems={})
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.generation == 3)
        assert_matches(server, node.inputs, 3)
        # A change that changes nothing writes nothing.
        node.change(gpu_problems={})
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.rounds >= 4)
        assert pub.writes == 3 and pub.generation == 3
        nursery.cancel_scope.cancel()


async def test_restart_with_equal_content_writes_nothing(
    server: ApiServer, client: KubeClient
) -> None:
    node = Node(inputs_for("hgx-h200"))
    first = publisher(client, node)
    assert await first.publish_once(node.inputs)
    versions = [s["metadata"]["resourceVersion"] for s in pool_in(server)]
    again = publisher(client, node)
    assert not await again.publish_once(node.inputs)
    assert again.generation == 1
    assert [s["metadata"]["resourceVersion"] for s in pool_in(server)] == versions


async def test_stale_slices_are_removed_and_others_kept(
    server: ApiServer, client: KubeClient
) -> None:
    server.store.features.discard(TAINTS)  # drained GPUs leave the pool
    node = Node(inputs_for("hgx-h200"))
    old = build_pool(inputs_for("hgx-h200"), 5)[1]
    old["metadata"]["name"] = "node-a-left-by-an-old-version"
    await client.create_slice(old)
    other_node = build_pool(inputs_for("hgx-h200", node="node-b"), 1)[0]
    await client.create_slice(other_node)
    pub = publisher(client, node)
    assert await pub.publish_once(node.inputs)
    assert pub.generation == 6  # above the highest found
    assert_matches(server, node.inputs, 6)
    assert [
        s["metadata"]["name"] for s in server.store.slices() if s["spec"]["nodeName"] == "node-b"
    ] == [other_node["metadata"]["name"]]
    # A shrinking pool (every GPU drained) drops its device slice.
    node.change(gpu_problems={m: "drained" for m in range(1, 9)})
    assert await pub.publish_once(node.inputs)
    assert [s["metadata"]["name"] for s in pool_in(server)] == [
        "node-a-gpu-nvswitch-dp-io-counters"
    ]
    assert_matches(server, node.inputs, 7)


async def test_conflict_is_retried_from_a_fresh_read(server: ApiServer, client: KubeClient) -> None:
    node = Node(inputs_for("hgx-h200"))
    pub = publisher(client, node)
    assert await pub.publish_once(node.inputs)
    server.store.modify_behind(DEVICES)  # another writer, between our read and our write
    node.change(partition_problems={2: "FM refuses"})
    assert await pub.publish_once(node.inputs)
    assert 409 in server.store.codes("PUT")
    # The second round saw generation 2 on the counters slice and moved above it.
    assert_matches(server, node.inputs, pub.generation)
    assert pub.generation == 3


async def test_api_server_outage_is_survived(server: ApiServer, client: KubeClient) -> None:
    node = Node(inputs_for("hgx-h200"))
    pub = publisher(client, node)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(pub.run)
        server.stop()
        node.change(gpu_problems={5: "fault"})
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.problem is not None and p.rounds >= 3)
        assert pub.problem is not None and "ConnectError" in pub.problem
        assert pub.generation == 1
        server.start()  # same port, same objects
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.problem is None)
        assert pub.generation == 2
        assert_matches(server, node.inputs, 2)
        nursery.cancel_scope.cancel()


async def test_start_during_an_outage_does_not_block(server: ApiServer, client: KubeClient) -> None:
    server.stop()
    node = Node(inputs_for("hgx-h200"))
    pub = publisher(client, node)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(pub.run)
        assert pub.problem is not None and pub.writes == 0
        server.start()
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.problem is None)
        assert_matches(server, node.inputs, 1)
        nursery.cancel_scope.cancel()


async def test_rejected_pool_is_reported(server: ApiServer, client: KubeClient) -> None:
    node = Node(replace(inputs_for("hgx-h200"), platform="p" * 65))  # string attribute > 64
    pub = publisher(client, node)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(pub.run)
        assert pub.problem is not None and "422 Invalid" in pub.problem
        assert "spec.devices[0].attributes[platform]" in pub.problem
        nursery.cancel_scope.cancel()


async def test_resync_restores_a_deleted_slice(server: ApiServer, client: KubeClient) -> None:
    node = Node(inputs_for("hgx-h200"))
    pub = publisher(client, node, resync_s=0.05)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(pub.run)
        await client.delete_slice(DEVICES)
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.writes == 2)
        assert_matches(server, node.inputs, 2)
        nursery.cancel_scope.cancel()


def device_taints(server: ApiServer) -> dict[str, list[tuple[str, str, str]]]:
    """Device name -> its taints (key, value, effect), for every device published."""
    return {
        d["name"]: [(t["key"], t["value"], t["effect"]) for t in d.get("taints") or []]
        for s in pool_in(server)
        for d in s["spec"].get("devices") or []
    }


async def test_devices_with_problems_are_tainted_where_the_server_keeps_taints(
    server: ApiServer, client: KubeClient
) -> None:
    node = Node(inputs_for("hgx-h200"))
    pub = publisher(client, node)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(pub.run)
        assert pub.taints is True and pub.writes == 1
        assert not any(device_taints(server).values())
        node.change(gpu_problems={3: "XID 79"}, partition_problems={6: "NVLink training failed"})
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.generation == 2)
        assert_matches(server, node.inputs, 2)
        taints = device_taints(server)
        fault = ("gpu.nvswitch-dp.io/gpu-fault", "modules-3", "NoSchedule")
        # Every device holding GPU 3 stays, tainted; so does partition 6, for its own fault.
        assert taints["gpu-3"] == [("gpu.nvswitch-dp.io/gpu-fault", "xid-79", "NoSchedule")]
        assert taints["partition-1"] == [fault] and taints["partition-0"] == [fault]
        assert taints["partition-9"] == [fault]
        assert taints["partition-6"] == [
            ("gpu.nvswitch-dp.io/partition-fault", "nvlink-training-failed", "NoSchedule")
        ]
        assert taints["partition-2"] == [] and taints["gpu-5"] == []
        # The server stamped timeAdded; an equal pool still writes nothing.
        assert all(
            t.get("timeAdded")
            for s in pool_in(server)
            for d in s["spec"].get("devices") or []
            for t in d.get("taints") or []
        )
        node.change(gpu_problems={3: "XID 79"}, partition_problems={})
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.generation == 3)
        writes = pub.writes
        node.change(gpu_problems={3: "XID 79"})
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.rounds >= 4)
        assert pub.writes == writes
        node.change(gpu_problems={})
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.generation == 4)
        assert not any(device_taints(server).values())
        nursery.cancel_scope.cancel()


async def test_a_server_that_drops_taints_is_caught_on_read_back(
    server: ApiServer, client: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe said yes, then the gate went off (a downgrade): the write's answer lacks
    the taints, so the round is redone with the sick devices left out."""
    node = Node(inputs_for("hgx-h200"))
    pub = publisher(client, node)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(pub.run)
        assert pub.taints is True
        server.store.features.discard(TAINTS)
        node.change(gpu_problems={3: "XID 79"})
        with trio.fail_after(10):
            await pub.wait_until(
                lambda p: p.taints is False and p.problem is None and p.rounds >= 2
            )
        names = set(device_taints(server))
        assert not {"gpu-3", "partition-0", "partition-1", "partition-9"} & names
        assert "partition-2" in names
        assert_matches(server, node.inputs, pub.generation)
        nursery.cancel_scope.cancel()
    drops = [r for r in caplog.records if "drops device taints" in r.getMessage()]
    assert len(drops) == 1


async def test_a_server_gaining_taints_is_noticed_at_the_resync(
    server: ApiServer, client: KubeClient
) -> None:
    server.store.features.discard(TAINTS)
    node = Node(inputs_for("hgx-h200", gpu_problems={3: "XID 79"}))
    pub = publisher(client, node, resync_s=0.1)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(pub.run)
        assert pub.taints is False and "gpu-3" not in device_taints(server)
        server.store.features.add(TAINTS)  # the API server was upgraded
        with trio.fail_after(10):
            await pub.wait_until(lambda p: p.taints is True and p.writes >= 2)
        assert device_taints(server)["gpu-3"][0][0] == "gpu.nvswitch-dp.io/gpu-fault"
        nursery.cancel_scope.cancel()
