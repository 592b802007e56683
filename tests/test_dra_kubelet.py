"""The DRA kubelet edge over real Unix sockets: our grpclib Registration and DRAPlugin
servers under Trio, driven by the grpcio kubelet stand-in compiled from the published
protos, on the FM simulator."""

from __future__ import annotations

import functools
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from dra_node import DRIVER, NODE, DraNode, allocated_claim, build_node, ref_of

from nvswitch_dp.demo.cluster import ClaimSpec
from nvswitch_dp.dra.kubelet import (
    DRA_SOCKET,
    RegistrationService,
    RegistrationState,
    registration_socket,
    serve_dra_plugin,
)
from nvswitch_dp.plugin.grpc_trio import serving
from nvswitch_dp.proto import pluginregistration as reg
from testkit.dra_kubelet import (
    V1_SERVICE,
    V1BETA1_SERVICE,
    DraKubeletStandIn,
    RegisteredDriver,
)

WAIT_S = 10.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (a Unix socket path has at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="dra", dir="/tmp") as name:
        yield Path(name)


@dataclass
class Env:
    node: DraNode
    kubelet: DraKubeletStandIn
    state: RegistrationState
    registry: Path
    plugin_dir: Path

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking stand-in method in a worker thread."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def registered(self, *, after: int = 0) -> RegisteredDriver:
        driver: RegisteredDriver = await self.call(
            self.kubelet.wait_registered, DRIVER, WAIT_S, after=after
        )
        return driver

    async def notified(self) -> None:
        """Wait until the kubelet's verdict has reached our Registration service."""
        with trio.fail_after(WAIT_S):
            # Written by the grpclib handler on the asyncio side: polled, not awaited.
            while self.state.registered is None:  # noqa: ASYNC110
                await trio.sleep(0.01)

    async def prepare(self, *claims: dict[str, Any]) -> dict[str, Any]:
        specs = [spec_of(c) for c in claims]
        answers: dict[str, Any] = await self.call(self.kubelet.prepare, DRIVER, specs)
        return answers

    async def unprepare(self, *specs: ClaimSpec) -> dict[str, str]:
        errors: dict[str, str] = await self.call(self.kubelet.unprepare, DRIVER, list(specs))
        return errors


@asynccontextmanager
async def dra_node(root: Path, sockets: Path, **kubelet_options: Any) -> AsyncIterator[Env]:
    """The node serving both sockets, and a kubelet stand-in watching the registry."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        node = await build_node(root, nursery)
        state = RegistrationState()
        registry = sockets / "plugins_registry"
        plugin_dir = sockets / "plugins" / DRIVER
        await nursery.start(
            functools.partial(
                serve_dra_plugin,
                node.driver,
                registry_dir=registry,
                plugin_dir=plugin_dir,
                state=state,
            )
        )
        kubelet = DraKubeletStandIn(registry, **kubelet_options).start()
        try:
            yield Env(node, kubelet, state, registry, plugin_dir)
        finally:
            await trio.to_thread.run_sync(kubelet.stop)
            nursery.cancel_scope.cancel()


def spec_of(claim: dict[str, Any]) -> ClaimSpec:
    ref = ref_of(claim)
    return ClaimSpec(ref.namespace, ref.uid, ref.name)


async def test_the_kubelet_registers_the_driver_on_v1_with_its_dra_socket(
    tmp_path: Path, sock_dir: Path
) -> None:
    async with dra_node(tmp_path, sock_dir) as env:
        driver = await env.registered()
        assert driver.name == DRIVER
        assert driver.registration_socket == registration_socket(env.registry, DRIVER)
        assert driver.registration_socket.name == "gpu.nvswitch-dp.io-reg.sock"
        assert driver.endpoint == str(env.plugin_dir / DRA_SOCKET)
        assert driver.supported_versions == ("v1.DRAPlugin", "v1beta1.DRAPlugin")
        assert driver.service == V1_SERVICE
        await env.notified()
        assert env.state.registered is True
        assert env.state.problem is None
        assert [(n.registered, n.error, n.delivered) for n in env.kubelet.notifications()] == [
            (True, "", True)
        ]


async def test_prepare_activates_the_partition_and_answers_cdi_ids_idempotently(
    tmp_path: Path, sock_dir: Path
) -> None:
    async with dra_node(tmp_path, sock_dir) as env:
        await env.registered()
        claim = allocated_claim("vm", [(f"gpu{i}", f"gpu-{m}") for i, m in enumerate((5, 6, 7, 8))])
        env.node.claims.put(claim)
        uid = claim["metadata"]["uid"]
        answer = (await env.prepare(claim))[uid]
        assert answer.error == ""
        cdi_id = f"nvswitch-dp.io/partition={uid}"
        assert answer.devices == [
            {
                "request_names": [f"gpu{i}"],
                "pool_name": NODE,
                "device_name": f"gpu-{m}",
                "cdi_device_ids": [cdi_id],
            }
            for i, m in enumerate((5, 6, 7, 8))
        ]
        assert await env.node.fm_active() == [2]
        assert env.node.cdi.claim_uids() == {uid}

        assert (await env.prepare(claim))[uid] == answer  # the kubelet's retry
        assert await env.node.fm_active() == [2]

        assert await env.unprepare(spec_of(claim)) == {uid: ""}
        assert await env.node.fm_active() == []
        assert env.node.cdi.claim_uids() == set()
        assert await env.unprepare(spec_of(claim)) == {uid: ""}
        stranger = ClaimSpec("default", str(uuid.uuid4()), "never-prepared")
        assert await env.unprepare(stranger) == {stranger.uid: ""}


async def test_refusals_are_per_claim_and_say_what_to_ask_for(
    tmp_path: Path, sock_dir: Path
) -> None:
    async with dra_node(tmp_path, sock_dir) as env:
        await env.registered()
        not_a_partition = allocated_claim("vm", [("gpu0", "gpu-1"), ("gpu1", "gpu-2")])
        good = allocated_claim("pod", [("gpu", "partition-6")])
        for claim in (not_a_partition, good):
            env.node.claims.put(claim)
        wrong_uid = ClaimSpec("default", str(uuid.uuid4()), "pod")  # "pod" has another UID
        specs = [spec_of(not_a_partition), spec_of(good), wrong_uid]
        answers = await env.call(env.kubelet.prepare, DRIVER, specs)
        refused = answers[spec_of(not_a_partition).uid]
        assert refused.devices == []
        assert "GPUs 1,2 are not one Fabric Manager partition" in refused.error
        assert "2 requests of class gpu.gpu.nvswitch-dp.io" in refused.error
        assert "matchAttribute gpu.nvswitch-dp.io/partition2x" in refused.error
        assert "partition-2x.gpu.nvswitch-dp.io" in refused.error
        assert answers[spec_of(good).uid].error == ""
        assert f"not {wrong_uid.uid}" in answers[wrong_uid.uid].error
        assert await env.node.fm_active() == [6]


async def test_a_removed_registration_socket_is_served_and_registered_again(
    tmp_path: Path, sock_dir: Path
) -> None:
    async with dra_node(tmp_path, sock_dir) as env:
        first = await env.registered()
        await env.notified()
        count = env.kubelet.registrations
        first.registration_socket.unlink()
        again = await env.registered(after=count)
        assert again.registration_socket == first.registration_socket
        await env.notified()
        assert env.state.registered is True
        claim = allocated_claim("pod", [("gpu", "partition-1")])
        env.node.claims.put(claim)
        assert (await env.prepare(claim))[claim["metadata"]["uid"]].error == ""
        assert await env.node.fm_active() == [1]


async def test_a_removed_dra_socket_is_served_again_too(tmp_path: Path, sock_dir: Path) -> None:
    async with dra_node(tmp_path, sock_dir) as env:
        await env.registered()
        count = env.kubelet.registrations
        (env.plugin_dir / DRA_SOCKET).unlink()
        await env.registered(after=count)  # both sockets served afresh: a new registration
        claim = allocated_claim("pod", [("gpu", "partition-3")])
        env.node.claims.put(claim)
        assert (await env.prepare(claim))[claim["metadata"]["uid"]].error == ""


async def test_a_kubelet_restart_registers_again_and_unprepares_what_was_prepared(
    tmp_path: Path, sock_dir: Path
) -> None:
    async with dra_node(tmp_path, sock_dir) as env:
        await env.registered()
        claim = allocated_claim("vm", [("gpu", "partition-2")])
        env.node.claims.put(claim)
        uid = claim["metadata"]["uid"]
        answer = (await env.prepare(claim))[uid]
        count = env.kubelet.registrations
        await env.call(env.kubelet.restart)
        await env.registered(after=count)
        assert len(env.kubelet.notifications()) == 2
        assert env.node.claims.reads == 1
        assert (await env.prepare(claim))[uid] == answer  # the restarted kubelet's retry
        assert env.node.claims.reads == 1
        assert await env.unprepare(spec_of(claim)) == {uid: ""}
        assert await env.node.fm_active() == []


async def test_a_kubelet_that_speaks_only_v1beta1_is_served_v1beta1(
    tmp_path: Path, sock_dir: Path
) -> None:
    async with dra_node(tmp_path, sock_dir, kubelet_services=(V1BETA1_SERVICE,)) as env:
        driver = await env.registered()
        assert driver.service == V1BETA1_SERVICE
        claim = allocated_claim("pod", [("gpu", "partition-12")])
        env.node.claims.put(claim)
        uid = claim["metadata"]["uid"]
        answer = (await env.prepare(claim))[uid]
        assert answer.error == ""
        assert answer.cdi_device_ids == [f"nvswitch-dp.io/partition={uid}"]
        assert await env.node.fm_active() == [12]
        assert await env.unprepare(spec_of(claim)) == {uid: ""}
        assert await env.node.fm_active() == []


async def test_a_kubelet_that_refuses_the_driver_leaves_it_not_ready_saying_why(
    tmp_path: Path, sock_dir: Path
) -> None:
    async with dra_node(tmp_path, sock_dir, kubelet_services=("v2.DRAPlugin",)) as env:
        await env.notified()
        assert env.state.registered is False
        assert "none of services supported by the plugin" in env.state.error
        assert env.state.problem is not None
        assert env.state.problem.startswith("the kubelet refused the DRA plugin")
        assert env.kubelet.registered() == {}


async def test_the_stand_in_refuses_a_plugin_of_another_type(sock_dir: Path) -> None:
    class CsiRegistration(RegistrationService):
        async def get_info(self, message: reg.InfoRequest) -> reg.PluginInfo:
            info = await super().get_info(message)
            info.type = "CSIPlugin"
            return info

    state = RegistrationState()
    service = CsiRegistration("csi.example.com", sock_dir / "csi.sock", state)
    async with (
        trio_asyncio.open_loop(),
        serving([service], sock_dir / "csi.example.com-reg.sock"),
    ):
        kubelet = DraKubeletStandIn(sock_dir).start()
        try:
            with trio.fail_after(WAIT_S):
                while state.registered is None:  # noqa: ASYNC110 (as in Env.notified)
                    await trio.sleep(0.01)
        finally:
            await trio.to_thread.run_sync(kubelet.stop)
    assert state.registered is False
    assert "no handler registered for plugin type: CSIPlugin" in state.error
    assert kubelet.registered() == {}
