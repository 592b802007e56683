"""The device-plugin demo's kubelet: Registration, the calls into plugins, PodResources.

A small grpclib program under Trio (:mod:`nvswitch_dp.demo.wire`), written from the
kubelet's device manager and PodResources server as shared/reference/kubelet.md states
them, on our generated code (``nvswitch_dp/proto``):

- :class:`DemoKubelet` serves ``Registration`` on ``<plugin-dir>/kubelet.sock``. Inside
  ``Register`` it checks the API version (``v1beta1``), dials the plugin's socket
  (``endpoint``, relative to the directory) and asks ``GetDevicePluginOptions``; a
  failure is ``Register``'s error. Then it starts reading the plugin's ``ListAndWatch``
  in a task of its own, and only then answers. A second registration of a resource
  replaces the first (the old stream is cancelled).
- The device manager's side of admission: :meth:`DemoKubelet.preferred_allocation` and
  :meth:`DemoKubelet.allocate`, one container each.
- :class:`PodResources` serves ``PodResourcesLister`` ``List`` (the assignments the demo
  makes and takes back, which is how the daemon learns that a pod ended: the device-plugin
  API has no Deallocate) and ``GetAllocatableResources`` (the Healthy devices of the live
  registrations, as the kubelet counts allocatable). ``Get`` answers UNIMPLEMENTED, as a
  kubelet without the ``KubeletPodResourcesGet`` feature does.

Simpler than the kubelet where the demo does not need more: no checkpoint, no restart, no
5-minute grace for a plugin whose stream ended (its devices simply read as last listed).
The tests' independent wire check is the grpcio stand-in in ``testkit/kubelet.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from trio_asyncio import trio_as_aio

from nvswitch_dp.demo.wire import serve
from nvswitch_dp.plugin.grpc_trio import call_on, on_channel_aio
from nvswitch_dp.proto import v1 as pr
from nvswitch_dp.proto import v1beta1 as dp

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
HEALTHY = "Healthy"
CALL_TIMEOUT_S = 10.0  # the kubelet's dial inside Register; our bound on every call


@dataclass
class Plugin:
    """One registration: where the plugin serves and what its ListAndWatch last said.

    ``devices`` (device ID -> health) and ``messages`` are written by the stream's reader
    on the asyncio side and read from Trio (one thread); ``ended`` says why the stream
    stopped ("" while it runs).
    """

    resource: str
    socket_path: Path
    options: dp.DevicePluginOptions
    devices: dict[str, str] = field(default_factory=dict)
    messages: int = 0
    ended: str = ""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class _Registration(dp.RegistrationBase):
    """``v1beta1.Registration`` on ``kubelet.sock``; hands accepted plugins to the kubelet."""

    def __init__(self, kubelet: DemoKubelet) -> None:
        self.kubelet = kubelet

    async def register(self, message: dp.RegisterRequest) -> dp.Empty:
        if message.version != API_VERSION:
            raise GRPCError(
                Status.UNKNOWN,
                f"requested device plugin API version {message.version!r} is not supported",
            )
        socket_path = self.kubelet.plugin_dir / message.endpoint
        try:
            options = await on_channel_aio(
                socket_path,
                lambda channel: dp.DevicePluginStub(channel).get_device_plugin_options(
                    dp.Empty(), timeout=CALL_TIMEOUT_S
                ),
            )
        except (OSError, GRPCError, TimeoutError) as exc:
            # The kubelet's plain error, which gRPC reports as UNKNOWN.
            raise GRPCError(
                Status.UNKNOWN, f"failed to dial device plugin {socket_path}: {exc!r}"
            ) from None
        plugin = Plugin(message.resource_name, socket_path, options)
        await trio_as_aio(self.kubelet.accept)(plugin)
        return dp.Empty()


async def _list_and_watch_aio(channel: Channel, plugin: Plugin) -> None:
    """Asyncio side: record every device list ``plugin`` sends until its stream ends."""
    async for response in dp.DevicePluginStub(channel).list_and_watch(dp.Empty()):
        plugin.devices = {d.id: d.health for d in response.devices}
        plugin.messages += 1


class DemoKubelet:
    """The kubelet's device manager, serving ``Registration`` on ``plugin_dir/kubelet.sock``.

    Ownership: the caller owns ``plugin_dir``; :meth:`serve` owns ``kubelet.sock`` and
    the stream readers, and ends them when cancelled. Errors: the calls into a plugin
    raise ``KeyError`` for a resource never registered, and pass on grpclib's errors.
    """

    def __init__(self, plugin_dir: Path) -> None:
        self.plugin_dir = plugin_dir
        self.socket_path = plugin_dir / KUBELET_SOCKET
        self.plugins: dict[str, Plugin] = {}
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ``Registration`` until cancelled; started once ``kubelet.sock`` exists.

        Error handling: ``OSError`` when the socket cannot be bound.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(serve, [_Registration(self)], self.socket_path)
            task_status.started()

    async def accept(self, plugin: Plugin) -> None:
        """Record an accepted registration and start reading its stream (Trio side)."""
        assert self._nursery is not None, "accept() before serve()"
        replaced = self.plugins.get(plugin.resource)
        if replaced is not None:
            replaced.ended = "replaced by a new registration"
            replaced.scope.cancel()
        self.plugins[plugin.resource] = plugin
        self._nursery.start_soon(self._read, plugin)

    async def _read(self, plugin: Plugin) -> None:
        with plugin.scope:
            try:
                await call_on(
                    plugin.socket_path, lambda channel: _list_and_watch_aio(channel, plugin)
                )
                plugin.ended = plugin.ended or "the plugin ended the stream"
            except Exception as exc:  # any end of the stream is recorded, not raised
                plugin.ended = plugin.ended or f"the stream failed: {exc!r}"

    def registered(self, resources: Sequence[str]) -> bool:
        """Whether every one of ``resources`` is registered and has sent its first list."""
        return all(r in self.plugins and self.plugins[r].messages for r in resources)

    def devices(self, resource: str) -> dict[str, str]:
        """Device ID -> health, as ``resource``'s plugin last listed them."""
        return dict(self.plugins[resource].devices)

    async def preferred_allocation(
        self, resource: str, available: Sequence[str], size: int
    ) -> list[str]:
        """GetPreferredAllocation for one container; the plugin's answer."""
        request = dp.PreferredAllocationRequest(
            container_requests=[
                dp.ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(available), allocation_size=size
                )
            ]
        )
        response = await call_on(
            self.plugins[resource].socket_path,
            lambda channel: dp.DevicePluginStub(channel).get_preferred_allocation(
                request, timeout=CALL_TIMEOUT_S
            ),
        )
        return list(response.container_responses[0].device_i_ds)

    async def allocate(
        self, resource: str, device_ids: Sequence[str]
    ) -> dp.ContainerAllocateResponse:
        """Allocate for one container (one ``ContainerAllocateRequest``, as the kubelet
        sends); the container's answer."""
        request = dp.AllocateRequest(
            container_requests=[dp.ContainerAllocateRequest(devices_ids=list(device_ids))]
        )
        response = await call_on(
            self.plugins[resource].socket_path,
            lambda channel: dp.DevicePluginStub(channel).allocate(request, timeout=CALL_TIMEOUT_S),
        )
        return response.container_responses[0]


# -- PodResources ----------------------------------------------------------------------


@dataclass
class _Pod:
    namespace: str
    name: str
    # container name -> resource name -> device IDs
    containers: dict[str, dict[str, list[str]]] = field(default_factory=dict)


class PodResources(pr.PodResourcesListerBase):
    """``v1.PodResourcesLister``, fed by :meth:`assign` and :meth:`remove`.

    Ownership: owns its book of assignments; borrows ``kubelet`` (for allocatable).
    Serve it with :func:`nvswitch_dp.demo.wire.serve`. ``lists`` counts ``List`` calls.
    """

    def __init__(self, kubelet: DemoKubelet) -> None:
        self.kubelet = kubelet
        self.lists = 0
        self._pods: dict[tuple[str, str], _Pod] = {}

    def assign(
        self, namespace: str, pod: str, container: str, resource: str, device_ids: Sequence[str]
    ) -> None:
        """One container holds ``device_ids`` of ``resource`` (replacing earlier ones)."""
        record = self._pods.setdefault((namespace, pod), _Pod(namespace, pod))
        record.containers.setdefault(container, {})[resource] = list(device_ids)

    def remove(self, namespace: str, pod: str) -> bool:
        """The pod ended: forget its assignments; whether it was there."""
        return self._pods.pop((namespace, pod), None) is not None

    async def list(self, message: pr.ListPodResourcesRequest) -> pr.ListPodResourcesResponse:
        self.lists += 1
        return pr.ListPodResourcesResponse(
            pod_resources=[
                pr.PodResources(
                    name=pod.name,
                    namespace=pod.namespace,
                    containers=[
                        pr.ContainerResources(
                            name=container,
                            devices=[
                                pr.ContainerDevices(resource_name=resource, device_ids=ids)
                                for resource, ids in held.items()
                            ],
                        )
                        for container, held in pod.containers.items()
                    ],
                )
                for pod in self._pods.values()
            ]
        )

    async def get_allocatable_resources(
        self, message: pr.AllocatableResourcesRequest
    ) -> pr.AllocatableResourcesResponse:
        return pr.AllocatableResourcesResponse(
            devices=[
                pr.ContainerDevices(
                    resource_name=resource,
                    device_ids=[d for d, h in plugin.devices.items() if h == HEALTHY],
                )
                for resource, plugin in sorted(self.kubelet.plugins.items())
                if not plugin.ended
            ]
        )
