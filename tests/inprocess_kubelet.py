"""The kubelet's side of the device-plugin and PodResources APIs, played in the test's Trio run.

The grpcio stand-in (:mod:`testkit.kubelet`) runs in its own threads, which
make progress in real time while a ``MockClock`` jumps; this one runs as Trio tasks (with
grpclib on trio-asyncio, like the daemon) in the same run as the daemon under test, so
every step of both sides happens in virtual time and ``autojump_clock`` stays
deterministic: a task waiting on an in-process Unix socket is woken by the kernel before
the clock may jump, since the peer wrote before it blocked.

* :class:`InProcessKubelet` serves ``Registration`` on ``<plugin_dir>/kubelet.sock``. Inside
  ``Register`` it checks the version, dials the plugin's endpoint (relative to
  ``plugin_dir``), calls ``GetDevicePluginOptions`` and starts ``ListAndWatch``, then
  answers, as the kubelet's device manager does. It records each registration and the
  latest device list per resource; :meth:`InProcessKubelet.restart` plays a kubelet
  restart (stop, delete the directory's sockets, serve a new ``kubelet.sock``).
* :class:`InProcessPodResources` serves ``PodResourcesLister.List`` from assignments the
  test makes; :meth:`InProcessPodResources.stop` makes it unreadable (socket gone).

Ownership: each object owns its socket and the tasks it starts in the nursery it is
given; cancelling that nursery ends them. Both need an open trio-asyncio loop (the
caller's ``trio_asyncio.open_loop()``). Errors: the ``wait_*`` methods raise
``TimeoutError`` naming what they waited for; RPCs to the plugin raise
``grpclib.GRPCError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import ProtocolError, StreamTerminatedError
from trio_asyncio import aio_as_trio, trio_as_aio

from nvswitch_dp.plugin.grpc_trio import serving
from nvswitch_dp.plugin.lifecycle import socket_name
from nvswitch_dp.proto import v1 as pr
from nvswitch_dp.proto import v1beta1 as dp

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
# How a stream or a dial ends when the plugin goes away (closed, reset, refused).
STREAM_ENDS = (GRPCError, StreamTerminatedError, ProtocolError, OSError)
CALL_TIMEOUT_S = 10.0  # virtual seconds under a MockClock: a hung plugin fails a test
# Every wait's backstop: under autojump a wait that never ends would jump the clock from
# one periodic task to the next for ever instead of hanging.
WAIT_LIMIT_S = 120.0


class _Served:
    """One grpclib server run by :func:`_serve`: cancel it and wait for its cleanup."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.closed = trio.Event()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.closed.wait()


async def _serve(
    handler: object, socket_path: Path, *, task_status: trio.TaskStatus[_Served]
) -> None:
    served = _Served()
    try:
        with served.scope:
            async with serving([handler], socket_path):
                task_status.started(served)
                await trio.sleep_forever()
    finally:
        served.closed.set()


class Changes:
    """A change counter Trio code can wait on (set from either loop: one thread)."""

    def __init__(self) -> None:
        self.version = 0
        self._event = trio.Event()

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        """Until the next change."""
        await self._event.wait()

    async def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Until ``predicate`` holds (checked after each change); ``TimeoutError`` after
        ``WAIT_LIMIT_S``, the backstop that keeps a broken test from jumping for ever."""
        with trio.move_on_after(WAIT_LIMIT_S):
            while not predicate():
                await self._event.wait()
            return
        raise TimeoutError(f"{what} did not happen within {WAIT_LIMIT_S:g}s")


@dataclass
class Registration:
    """One accepted Register: what the plugin sent, and when (Trio's clock)."""

    resource: str
    endpoint: str
    at: float
    devices: dict[str, str] = field(default_factory=dict)  # latest ListAndWatch: id -> health
    messages: int = 0
    ended: bool = False
    ended_cleanly: bool = False  # the plugin finished the stream (OK), not a lost connection
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class _RegistrationService(dp.RegistrationBase):
    def __init__(self, kubelet: InProcessKubelet) -> None:
        self.kubelet = kubelet

    async def register(self, message: dp.RegisterRequest) -> dp.Empty:
        problem = await trio_as_aio(self.kubelet._register)(message)
        if problem:
            raise GRPCError(Status.UNKNOWN, problem)
        return dp.Empty()


class InProcessKubelet:
    """See the module docstring. :meth:`start` serves ``kubelet.sock`` in ``nursery``."""

    def __init__(self, plugin_dir: Path, nursery: trio.Nursery) -> None:
        self.plugin_dir = plugin_dir
        self.socket_path = plugin_dir / KUBELET_SOCKET
        self.changes = Changes()
        self.history: list[Registration] = []  # every accepted Register, oldest first
        self.rejected: list[str] = []
        self._current: dict[str, Registration] = {}
        self._nursery = nursery
        self._serving: _Served | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Serve ``Registration`` (returns once ``kubelet.sock`` accepts)."""
        self._serving = await self._nursery.start(
            _serve, _RegistrationService(self), self.socket_path
        )

    async def stop(self) -> None:
        """Stop serving (returns once ``kubelet.sock`` is gone) and end every stream."""
        if self._serving is not None:
            await self._serving.stop()
            self._serving = None
        for registration in self._current.values():
            registration.scope.cancel()
        self._current.clear()
        self.changes.bump()

    async def restart(self) -> None:
        """A kubelet restart: stop, delete every socket in the directory, serve again."""
        await self.stop()
        for path in self.plugin_dir.iterdir():
            if path.is_socket():
                path.unlink(missing_ok=True)
        self.changes.bump()
        await self.start()

    # -- Register, as the kubelet does it

    async def _register(self, request: dp.RegisterRequest) -> str:
        if request.version != API_VERSION:
            problem = f"{request.resource_name}: version {request.version!r} is not supported"
            self.rejected.append(problem)
            self.changes.bump()
            return problem
        registration = Registration(request.resource_name, request.endpoint, trio.current_time())
        try:
            await self._nursery.start(self._watch, registration)
        except STREAM_ENDS as exc:
            problem = f"{request.resource_name}: failed to dial {request.endpoint}: {exc}"
            self.rejected.append(problem)
            self.changes.bump()
            return problem
        replaced = self._current.get(request.resource_name)
        if replaced is not None:
            replaced.scope.cancel()
        self._current[request.resource_name] = registration
        self.history.append(registration)
        self.changes.bump()
        return ""

    async def _watch(
        self, registration: Registration, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Dial, ask the options, then follow ListAndWatch until cancelled or ended."""
        channel = Channel(path=str(self.plugin_dir / registration.endpoint))
        try:
            stub = dp.DevicePluginStub(channel)
            await aio_as_trio(stub.get_device_plugin_options)(dp.Empty(), timeout=CALL_TIMEOUT_S)
            task_status.started()

            async def follow() -> None:
                async for message in stub.list_and_watch(dp.Empty()):
                    registration.devices = {d.id: d.health for d in message.devices}
                    registration.messages += 1
                    self.changes.bump()

            with registration.scope, contextlib.suppress(*STREAM_ENDS):
                await aio_as_trio(follow)()
                registration.ended_cleanly = True
        finally:
            registration.ended = True
            self.changes.bump()
            channel.close()

    # -- queries

    def registered(self) -> dict[str, Registration]:
        """Resource -> its current registration (streams that ended are dropped)."""
        return {r: reg for r, reg in self._current.items() if not reg.ended}

    def devices(self, resource: str) -> dict[str, str]:
        registration = self._current.get(resource)
        return {} if registration is None else dict(registration.devices)

    def healthy(self, resource: str) -> set[str]:
        return {d for d, h in self.devices(resource).items() if h == "Healthy"}

    async def wait_registered(self, resources: Sequence[str], *, after: int = 0) -> None:
        """Every resource registered anew (later than ``history[:after]``), its first list in."""

        def done() -> bool:
            current = self.registered()
            fresh = self.history[after:]
            return all(
                r in current and any(current[r] is reg for reg in fresh) and current[r].messages > 0
                for r in resources
            )

        await self.changes.wait_until(done, f"registration of {list(resources)}")

    async def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait for ``predicate`` over what the kubelet has seen (checked after each change)."""
        await self.changes.wait_until(predicate, what)

    # -- admission, driven by the test

    async def allocate(
        self, resource: str, devices: Sequence[str], *, deadline: float = CALL_TIMEOUT_S
    ) -> dp.AllocateResponse:
        """One Allocate with one container, sent with a gRPC ``deadline`` (seconds), which
        the plugin's server enforces by cancelling its handler. Raises ``GRPCError``
        (``DEADLINE_EXCEEDED`` once it passes). Cancellable: the call is then abandoned
        and its channel closed, as when a kubelet's connection goes."""
        registration = self._current.get(resource)
        endpoint = registration.endpoint if registration else socket_name(resource)

        async def allocate_aio() -> dp.AllocateResponse:
            channel = Channel(path=str(self.plugin_dir / endpoint))
            try:
                return await dp.DevicePluginStub(channel).allocate(
                    dp.AllocateRequest(
                        container_requests=[dp.ContainerAllocateRequest(devices_ids=list(devices))]
                    ),
                    timeout=deadline,
                )
            finally:
                channel.close()

        response: dp.AllocateResponse = await aio_as_trio(allocate_aio)()
        return response


class _PodResourcesService(pr.PodResourcesListerBase):
    def __init__(self, owner: InProcessPodResources) -> None:
        self.owner = owner

    async def list(self, message: pr.ListPodResourcesRequest) -> pr.ListPodResourcesResponse:
        self.owner.lists += 1
        pods: dict[tuple[str, str], list[pr.ContainerResources]] = {}
        for (namespace, pod, container), (resource, ids) in sorted(self.owner.assigned.items()):
            pods.setdefault((namespace, pod), []).append(
                pr.ContainerResources(
                    name=container,
                    devices=[pr.ContainerDevices(resource_name=resource, device_ids=list(ids))],
                )
            )
        return pr.ListPodResourcesResponse(
            pod_resources=[
                pr.PodResources(name=pod, namespace=namespace, containers=containers)
                for (namespace, pod), containers in pods.items()
            ]
        )


class InProcessPodResources:
    """The kubelet's PodResources ``List``, from :meth:`assign` / :meth:`unassign`."""

    def __init__(self, socket_path: Path, nursery: trio.Nursery) -> None:
        self.socket_path = socket_path
        self.assigned: dict[tuple[str, str, str], tuple[str, tuple[str, ...]]] = {}
        self.lists = 0
        self._nursery = nursery
        self._serving: _Served | None = None

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self._serving = await self._nursery.start(
            _serve, _PodResourcesService(self), self.socket_path
        )

    async def stop(self) -> None:
        """Unreadable from now on: returns once the server is closed and its socket gone."""
        if self._serving is not None:
            await self._serving.stop()
            self._serving = None

    def assign(
        self, namespace: str, pod: str, container: str, resource: str, devices: Sequence[str]
    ) -> None:
        self.assigned[(namespace, pod, container)] = (resource, tuple(devices))

    def unassign(self, namespace: str, pod: str) -> None:
        for key in [k for k in self.assigned if k[:2] == (namespace, pod)]:
            del self.assigned[key]
