"""The grpcio kubelet stand-in, end to end against the bare grpclib plugin in a subprocess.

The stand-in must behave like the kubelet for the daemon's tests to mean anything, so
these tests drive it as the kubelet is driven: a plugin process serves its socket, a
grpcio client calls ``Register`` on ``kubelet.sock``, and the stand-in dials back.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpclib.client import Channel

from nvswitch_dp.proto import v1 as podresources
from testkit.kubelet import (
    CHECKPOINT_FILE,
    KUBELET_SOCKET,
    PROTO_DIR_ENV,
    KubeletStandIn,
    NotRegisteredError,
    PodResourcesStandIn,
    ProtoDirNotFoundError,
    find_proto_dir,
    load_api,
    unix_address,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
BARE_SERVER = REPO_ROOT / "benchmarks" / "bare_server.py"
RESOURCE = "nvidia.com/gpu-h200-4x"
ENDPOINT = "bare.sock"
PROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


# -- helpers -----------------------------------------------------------------------------


class OutputLines:
    """A process's stdout lines, collected by a reader thread (no buffering surprises)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self._stream = process.stdout
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def until(self, wanted: str, timeout: float) -> list[str]:
        """Lines up to the first containing ``wanted``; AssertionError after ``timeout``."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break  # the process closed stdout
            lines.append(line)
            if wanted in line:
                return lines
        raise AssertionError(f"no line with {wanted!r} within {timeout} s; got {lines}")


def stop_process(process: subprocess.Popen[str]) -> int:
    """SIGTERM, then wait (kill after 5 s); the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def start_bare_server(socket_path: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, str(BARE_SERVER), "--socket", str(socket_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=PROCESS_ENV,
    )
    try:
        OutputLines(process).until("serving", timeout=10)
    except BaseException:
        stop_process(process)
        raise
    return process


def register(
    plugin_dir: Path,
    *,
    resource: str = RESOURCE,
    endpoint: str = ENDPOINT,
    version: str = "v1beta1",
) -> None:
    """Call Registration.Register on ``plugin_dir/kubelet.sock`` as a plugin would."""
    api = load_api()
    with grpc.insecure_channel(unix_address(plugin_dir / KUBELET_SOCKET)) as channel:
        api.deviceplugin_grpc.RegistrationStub(channel).Register(
            api.deviceplugin.RegisterRequest(
                version=version,
                endpoint=endpoint,
                resource_name=resource,
                options=api.deviceplugin.DevicePluginOptions(
                    get_preferred_allocation_available=True
                ),
            ),
            timeout=15,
        )


@pytest.fixture(scope="module")
def shared_plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A plugin directory with one bare server in it, shared by the read-only tests."""
    plugin_dir = tmp_path_factory.mktemp("plugins")
    process = start_bare_server(plugin_dir / ENDPOINT)
    try:
        yield plugin_dir
    finally:
        stop_process(process)


@pytest.fixture
def kubelet(shared_plugin_dir: Path) -> Iterator[KubeletStandIn]:
    with KubeletStandIn(shared_plugin_dir) as standin:
        yield standin


@pytest.fixture
def registered(kubelet: KubeletStandIn) -> KubeletStandIn:
    register(kubelet.plugin_dir)
    kubelet.wait_registered([RESOURCE], timeout=5)
    return kubelet


@pytest.fixture
def own_plugin(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A bare server of the test's own, for tests that stop it or delete its socket."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    process = start_bare_server(plugin_dir / ENDPOINT)
    try:
        yield plugin_dir, process
    finally:
        stop_process(process)


# -- Register ----------------------------------------------------------------------------


def test_register_dials_back_and_records_the_first_device_list(
    registered: KubeletStandIn,
) -> None:
    plugin = registered.registered()[RESOURCE]
    assert plugin.endpoint == ENDPOINT
    assert plugin.socket_path == registered.plugin_dir / ENDPOINT
    assert plugin.options.get_preferred_allocation_available
    assert not plugin.options.pre_start_required
    assert plugin.requested_options.get_preferred_allocation_available

    assert registered.devices(RESOURCE) == {"partition-1": "Healthy", "partition-2": "Healthy"}
    assert registered.topology(RESOURCE) == {"partition-1": [0], "partition-2": [0]}
    [(stamp, devices)] = registered.updates(RESOURCE)
    assert stamp >= plugin.registered_at
    assert devices == registered.devices(RESOURCE)
    assert not registered.stream_ended(RESOURCE)


def test_register_with_a_bad_version_fails_like_the_kubelet(kubelet: KubeletStandIn) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        register(kubelet.plugin_dir, version="v1beta2")
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    assert "v1beta2" in (raised.value.details() or "")
    assert kubelet.registered() == {}
    assert len(kubelet.rejected()) == 1


def test_register_of_a_resource_that_is_not_extended_fails(kubelet: KubeletStandIn) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        register(kubelet.plugin_dir, resource="gpu")
    assert "not an extended resource" in (raised.value.details() or "")
    assert kubelet.registered() == {}


def test_register_fails_when_nothing_serves_the_endpoint(tmp_path: Path) -> None:
    with KubeletStandIn(tmp_path, dial_timeout=0.3) as kubelet:
        with pytest.raises(grpc.RpcError) as raised:
            register(tmp_path, endpoint="nobody.sock")
        assert "failed to dial device plugin" in (raised.value.details() or "")
        assert kubelet.registered() == {}


def test_a_second_register_replaces_the_first(registered: KubeletStandIn) -> None:
    first = registered.registered()[RESOURCE]
    register(registered.plugin_dir)
    registered.wait_until(lambda: len(registered.updates(RESOURCE)) == 2, timeout=5)
    second = registered.registered()[RESOURCE]
    assert second.registered_at > first.registered_at
    assert not registered.stream_ended(RESOURCE)
    assert registered.devices(RESOURCE) == {"partition-1": "Healthy", "partition-2": "Healthy"}


# -- the kubelet's calls into the plugin -------------------------------------------------


def test_allocate_returns_the_vfio_shape(registered: KubeletStandIn) -> None:
    response = registered.allocate(RESOURCE, ["partition-1"])
    [container] = response.container_responses
    paths = [d.container_path for d in container.devices]
    assert paths == [
        "/dev/vfio/vfio",
        "/dev/vfio/41",
        "/dev/vfio/42",
        "/dev/vfio/43",
        "/dev/vfio/44",
    ]
    assert {d.permissions for d in container.devices} == {"rwm"}
    addresses = container.envs["PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X"].split(",")
    assert len(addresses) == 4
    assert container.annotations["nvswitch-dp.io/partition-ids"] == "1"
    assert container.annotations["nvswitch-dp.io/pci-addresses"].split(",") == addresses


def test_allocate_errors_reach_the_caller_as_rpc_errors(registered: KubeletStandIn) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        registered.allocate(RESOURCE, ["partition-99"])
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "partition-99" in (raised.value.details() or "")


def test_preferred_allocation_and_pre_start(registered: KubeletStandIn) -> None:
    answer = registered.preferred_allocation(
        RESOURCE, ["partition-1", "partition-2"], ["partition-2"], 1
    )
    assert answer == ["partition-2"]
    registered.pre_start_container(RESOURCE, ["partition-2"])


def test_queries_about_an_unregistered_resource_say_so(kubelet: KubeletStandIn) -> None:
    with pytest.raises(NotRegisteredError, match="gpu-h200-8x"):
        kubelet.devices("nvidia.com/gpu-h200-8x")
    with pytest.raises(NotRegisteredError):
        kubelet.allocate("nvidia.com/gpu-h200-8x", ["partition-0"])


def test_wait_until_names_what_it_waited_for(kubelet: KubeletStandIn) -> None:
    def pigs_fly() -> bool:
        return False

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="pigs_fly"):
        kubelet.wait_until(pigs_fly, timeout=0.1)
    assert time.monotonic() - started < 1
    with pytest.raises(TimeoutError, match="still missing"):
        kubelet.wait_registered(["example.com/nothing"], timeout=0.1)


# -- plugin and kubelet going away -------------------------------------------------------


def test_the_stream_end_is_recorded_when_the_plugin_stops(
    own_plugin: tuple[Path, subprocess.Popen[str]],
) -> None:
    plugin_dir, process = own_plugin
    with KubeletStandIn(plugin_dir) as kubelet:
        register(plugin_dir)
        kubelet.wait_registered([RESOURCE], timeout=5)
        assert stop_process(process) == 0
        kubelet.wait_until(lambda: kubelet.stream_ended(RESOURCE), timeout=3)
        assert not (plugin_dir / ENDPOINT).exists()


def test_restart_deletes_the_sockets_but_the_checkpoint_and_forgets_plugins(
    own_plugin: tuple[Path, subprocess.Popen[str]],
) -> None:
    plugin_dir, _ = own_plugin
    (plugin_dir / CHECKPOINT_FILE).write_text("{}")
    with KubeletStandIn(plugin_dir) as kubelet:
        register(plugin_dir)
        kubelet.wait_registered([RESOURCE], timeout=5)

        kubelet.restart()

        assert sorted(p.name for p in plugin_dir.iterdir()) == sorted(
            [CHECKPOINT_FILE, KUBELET_SOCKET]
        )
        assert kubelet.registered() == {}
        assert len(kubelet.updates(RESOURCE)) == 1  # the record survives the restart
        kubelet.dial_timeout = 0.3
        with pytest.raises(grpc.RpcError) as raised:  # the new kubelet.sock answers, but
            register(plugin_dir)  # the plugin's socket is gone, so dialing back fails
        assert "failed to dial device plugin" in (raised.value.details() or "")
    assert sorted(p.name for p in plugin_dir.iterdir()) == [CHECKPOINT_FILE]


# -- PodResources ------------------------------------------------------------------------


def test_pod_resources_lists_gets_and_forgets_assignments(tmp_path: Path) -> None:
    socket_path = tmp_path / "pod-resources" / KUBELET_SOCKET
    api = load_api()
    with PodResourcesStandIn(socket_path) as pod_resources:
        pod_resources.assign("vms", "vm-a", "compute", RESOURCE, ["partition-1"])
        pod_resources.set_allocatable(RESOURCE, ["partition-1", "partition-2"])
        with grpc.insecure_channel(unix_address(socket_path)) as channel:
            stub = api.podresources_grpc.PodResourcesListerStub(channel)
            [pod] = stub.List(api.podresources.ListPodResourcesRequest()).pod_resources
            assert (pod.namespace, pod.name) == ("vms", "vm-a")
            [container] = pod.containers
            assert container.name == "compute"
            assert [(d.resource_name, list(d.device_ids)) for d in container.devices] == [
                (RESOURCE, ["partition-1"])
            ]
            got = stub.Get(
                api.podresources.GetPodResourcesRequest(pod_name="vm-a", pod_namespace="vms")
            )
            assert got.pod_resources == pod
            allocatable = stub.GetAllocatableResources(
                api.podresources.AllocatableResourcesRequest()
            )
            assert [list(d.device_ids) for d in allocatable.devices] == [
                ["partition-1", "partition-2"]
            ]

            assert pod_resources.unassign("vms", "vm-a")
            assert not stub.List(api.podresources.ListPodResourcesRequest()).pod_resources
            with pytest.raises(grpc.RpcError) as raised:
                stub.Get(
                    api.podresources.GetPodResourcesRequest(pod_name="vm-a", pod_namespace="vms")
                )
            assert "not found" in (raised.value.details() or "")
        assert pod_resources.calls("List") == 2
    assert not socket_path.exists()


def test_pod_resources_answers_our_generated_grpclib_client(tmp_path: Path) -> None:
    """The betterproto2 ``v1`` code and grpcio agree on the wire."""
    socket_path = tmp_path / KUBELET_SOCKET

    async def list_pods() -> podresources.ListPodResourcesResponse:
        channel = Channel(path=str(socket_path))
        try:
            stub = podresources.PodResourcesListerStub(channel)
            return await stub.list(podresources.ListPodResourcesRequest(), timeout=5)
        finally:
            channel.close()

    with PodResourcesStandIn(socket_path) as pod_resources:
        pod_resources.assign("vms", "vm-b", "compute", RESOURCE, ["partition-2"])
        response = asyncio.run(list_pods())
    [pod] = response.pod_resources
    assert pod.name == "vm-b"
    assert pod.containers[0].devices[0].device_ids == ["partition-2"]
    assert pod.containers[0].devices[0].resource_name == RESOURCE


def test_pod_resources_allocatable_follows_the_kubelet_health(
    registered: KubeletStandIn, tmp_path: Path
) -> None:
    api = load_api()
    socket_path = tmp_path / KUBELET_SOCKET
    with (
        PodResourcesStandIn(socket_path, kubelet=registered),
        grpc.insecure_channel(unix_address(socket_path)) as channel,
    ):
        stub = api.podresources_grpc.PodResourcesListerStub(channel)
        response = stub.GetAllocatableResources(api.podresources.AllocatableResourcesRequest())
    assert [(d.resource_name, sorted(d.device_ids)) for d in response.devices] == [
        (RESOURCE, ["partition-1", "partition-2"])
    ]


# -- loading the protos and the command line ---------------------------------------------


def test_the_proto_dir_is_found_from_the_module_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_proto_dir() == REPO_ROOT / "proto"
    with pytest.raises(ProtoDirNotFoundError):
        find_proto_dir(start=tmp_path)
    monkeypatch.setenv(PROTO_DIR_ENV, str(tmp_path))
    with pytest.raises(ProtoDirNotFoundError, match=PROTO_DIR_ENV):
        find_proto_dir()
    monkeypatch.setenv(PROTO_DIR_ENV, str(REPO_ROOT / "proto"))
    assert find_proto_dir(start=tmp_path) == REPO_ROOT / "proto"


def test_the_command_line_prints_registrations_and_updates(
    own_plugin: tuple[Path, subprocess.Popen[str]],
) -> None:
    plugin_dir, _ = own_plugin
    process = subprocess.Popen(
        [sys.executable, "-m", "testkit.kubelet", "--plugin-dir", str(plugin_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=PROCESS_ENV,
    )
    output = OutputLines(process)
    try:
        output.until("serving Registration", timeout=10)
        register(plugin_dir)
        lines = output.until("ListAndWatch", timeout=5)
        assert any(f"registered {RESOURCE}" in line for line in lines)
        assert "2/2 healthy" in lines[-1]
    finally:
        assert stop_process(process) == 0
