"""A kubelet stand-in: the device manager's side of the device plugin API, in grpcio.

Written from the kubelet's published API definitions (``proto/``), loaded at run time with
``grpc.protos_and_services``: it shares no code with our betterproto2/grpclib stack, so a
wire mistake on our side shows up as a failure here rather than cancelling out.

What it does, like the kubelet's device manager (shared/reference/kubelet.md):

- :class:`KubeletStandIn` serves ``Registration`` on ``<plugin_dir>/kubelet.sock``. Inside
  ``Register`` it checks the version (``v1beta1``) and the resource name, dials the plugin's
  socket (``endpoint`` is relative to ``plugin_dir``; blocking, 10 s), calls
  ``GetDevicePluginOptions`` and starts ``ListAndWatch`` in a background thread; only then
  does ``Register`` answer. Any failure is returned from ``Register`` as an error. A second
  registration of a resource replaces the first (the old stream is cancelled).
- Every ListAndWatch message is recorded with a ``time.monotonic()`` stamp.
- :meth:`KubeletStandIn.restart` plays a kubelet restart: stop, delete every file in the
  directory except ``kubelet_internal_checkpoint`` (the plugins' sockets included), forget
  every registration and serve a new ``kubelet.sock``.
- The kubelet's side of admission (GetPreferredAllocation, Allocate, PreStartContainer) is
  driven by the caller through :meth:`KubeletStandIn.preferred_allocation`,
  :meth:`KubeletStandIn.allocate` and :meth:`KubeletStandIn.pre_start_container`.
- :class:`PodResourcesStandIn` serves ``PodResourcesLister`` (``List``,
  ``GetAllocatableResources``, ``Get``) from assignments the caller makes.

Threads: grpcio runs handlers on its own worker threads and each ListAndWatch stream has a
reader thread. All recorded state sits behind one condition variable, so every query
method may be called from any thread. The caller owns the directory; the stand-in owns
``kubelet.sock``, its channels to the plugins and its threads, and releases them in
:meth:`KubeletStandIn.stop`.

Run it by hand next to a plugin::

    python -m testkit.kubelet --plugin-dir DIR [--pod-resources-socket PATH]
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import grpc

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT_FILE = "kubelet_internal_checkpoint"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
PROTO_DIR_ENV = "NVSWITCH_DP_PROTO_DIR"
DEVICE_PLUGIN_PROTO = "deviceplugin/v1beta1/api.proto"
POD_RESOURCES_PROTO = "podresources/v1/api.proto"
DIAL_TIMEOUT_SECONDS = 10.0  # the kubelet dials a registering plugin for at most 10 s
CALL_TIMEOUT_SECONDS = 10.0  # our own bound, so a hung plugin fails a test instead
PRE_START_TIMEOUT_SECONDS = 30.0  # the kubelet's PreStartContainer deadline


class ProtoDirNotFoundError(FileNotFoundError):
    """No ``proto/`` directory with the kubelet API definitions could be found."""


class NotRegisteredError(LookupError):
    """A query named a resource that has no current registration."""


# -- loading the API definitions ---------------------------------------------------------


def find_proto_dir(start: Path | None = None) -> Path:
    """The directory holding ``deviceplugin/v1beta1/api.proto``.

    ``$NVSWITCH_DP_PROTO_DIR`` wins when set; otherwise the first ``proto/`` found walking
    up from ``start`` (default: this module's directory). Raises
    :class:`ProtoDirNotFoundError`.
    """
    override = os.environ.get(PROTO_DIR_ENV)
    if override:
        candidate = Path(override).resolve()
        if (candidate / DEVICE_PLUGIN_PROTO).is_file():
            return candidate
        raise ProtoDirNotFoundError(f"${PROTO_DIR_ENV}={override} has no {DEVICE_PLUGIN_PROTO}")
    here = (start or Path(__file__)).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "proto"
        if (candidate / DEVICE_PLUGIN_PROTO).is_file():
            return candidate
    raise ProtoDirNotFoundError(
        f"no proto/{DEVICE_PLUGIN_PROTO} above {here}; set ${PROTO_DIR_ENV} to the proto dir"
    )


class KubeletApi(NamedTuple):
    """grpcio modules generated at run time: ``*_pb2`` messages and ``*_pb2_grpc`` services."""

    deviceplugin: Any
    deviceplugin_grpc: Any
    podresources: Any
    podresources_grpc: Any


@functools.cache
def load_api() -> KubeletApi:
    """Compile the kubelet's protos with grpcio (once per process).

    Puts the proto directory on ``sys.path``, as ``grpc.protos_and_services`` requires.
    Raises :class:`ProtoDirNotFoundError`, or grpcio's error for a malformed ``.proto``.
    """
    proto_dir = str(find_proto_dir())
    if proto_dir not in sys.path:
        sys.path.append(proto_dir)
    deviceplugin, deviceplugin_grpc = grpc.protos_and_services(DEVICE_PLUGIN_PROTO)
    podresources, podresources_grpc = grpc.protos_and_services(POD_RESOURCES_PROTO)
    return KubeletApi(deviceplugin, deviceplugin_grpc, podresources, podresources_grpc)


def unix_address(path: Path) -> str:
    """The grpcio target for a unix socket at ``path``."""
    return f"unix:{path.resolve()}"


def _remove_socket(path: Path) -> None:
    path.unlink(missing_ok=True)


# -- recorded state ----------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredPlugin:
    """One accepted registration: what the plugin sent and what it answered."""

    resource_name: str
    endpoint: str
    socket_path: Path
    #: The ``DevicePluginOptions`` the plugin sent in ``RegisterRequest``.
    requested_options: Any
    #: The ``DevicePluginOptions`` it answered to ``GetDevicePluginOptions`` (these rule).
    options: Any
    registered_at: float


class DeviceUpdate(NamedTuple):
    """One ListAndWatch message: when it arrived and device ID -> health."""

    timestamp: float
    devices: dict[str, str]


@dataclass
class _Connection:
    """A registered plugin: its channel, stub, stream and the messages it sent."""

    plugin: RegisteredPlugin
    channel: grpc.Channel
    stub: Any
    stream: Any = None  # the ListAndWatch call; cancel() ends it
    reader: threading.Thread | None = None
    messages: list[tuple[float, Any]] = field(default_factory=list)
    ended: bool = False
    end_reason: str = ""

    def close(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        self.channel.close()


EventSink = Callable[[str], None]


def _describe_devices(devices: Mapping[str, str]) -> str:
    healthy = sum(1 for health in devices.values() if health == HEALTHY)
    listing = " ".join(
        f"{device_id}{'' if health == HEALTHY else '(' + health + ')'}"
        for device_id, health in devices.items()
    )
    return f"{healthy}/{len(devices)} healthy: {listing}"


# -- the device manager ------------------------------------------------------------------


class _RegistrationServicer:
    """grpcio servicer for ``Registration``; delegates to the stand-in."""

    def __init__(self, kubelet: KubeletStandIn) -> None:
        self._kubelet = kubelet

    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._kubelet._register(request, context)


class KubeletStandIn:
    """The kubelet's device manager, serving ``Registration`` on ``plugin_dir/kubelet.sock``.

    Ownership: the caller owns ``plugin_dir``; the stand-in owns ``kubelet.sock``, its
    gRPC server, its channels to plugins and the stream reader threads, all released by
    :meth:`stop` (also on leaving a ``with`` block). ``on_event`` (optional) receives one
    human-readable line per registration, ListAndWatch message and stream end; it is
    called from grpcio's threads, outside the lock. ``dial_timeout`` bounds the dial inside
    ``Register`` (the kubelet's 10 s by default; tests may shorten it).

    Errors: queries about a resource with no current registration raise
    :class:`NotRegisteredError`; RPCs to the plugin let ``grpc.RpcError`` through so
    callers can check ``code()`` and ``details()``; waits raise ``TimeoutError`` naming
    what they waited for.
    """

    def __init__(
        self,
        plugin_dir: Path,
        *,
        on_event: EventSink | None = None,
        dial_timeout: float = DIAL_TIMEOUT_SECONDS,
    ) -> None:
        self.plugin_dir = Path(plugin_dir)
        self.dial_timeout = dial_timeout
        self.socket_path = self.plugin_dir / KUBELET_SOCKET
        self.api = load_api()
        self._on_event = on_event
        self._changed = threading.Condition()  # guards everything below
        self._version = 0  # bumped on every change, so waiters notice one they missed
        self._server: grpc.Server | None = None
        self._connections: dict[str, _Connection] = {}
        self._history: dict[str, list[DeviceUpdate]] = {}
        self._rejected: list[str] = []

    # -- lifecycle

    def start(self) -> Self:
        """Serve ``Registration`` on ``kubelet.sock``. Raises ``RuntimeError`` if running."""
        with self._changed:
            if self._server is not None:
                raise RuntimeError(f"kubelet stand-in already serving {self.socket_path}")
        _remove_socket(self.socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.api.deviceplugin_grpc.add_RegistrationServicer_to_server(
            _RegistrationServicer(self), server
        )
        server.add_insecure_port(unix_address(self.socket_path))
        server.start()
        with self._changed:
            self._server = server
        self._emit(f"kubelet: serving Registration on {self.socket_path}")
        return self

    def stop(self) -> None:
        """Stop serving, end every plugin stream and remove ``kubelet.sock``. Idempotent."""
        with self._changed:
            server, self._server = self._server, None
            connections = list(self._connections.values())
            self._connections.clear()
            self._bump()
        if server is not None:
            server.stop(grace=None).wait()
        for connection in connections:
            connection.close()
        for connection in connections:
            if connection.reader is not None:
                connection.reader.join(timeout=5)
        _remove_socket(self.socket_path)

    def restart(self) -> None:
        """Play a kubelet restart: stop, empty the directory, serve a new ``kubelet.sock``.

        Every file in ``plugin_dir`` except ``kubelet_internal_checkpoint`` is deleted (so
        the plugins' sockets go too) and every registration is forgotten; the recorded
        ListAndWatch history is kept.
        """
        self.stop()
        for path in self.plugin_dir.iterdir():
            if path.name != CHECKPOINT_FILE and not path.is_dir():
                _remove_socket(path)
        self._emit("kubelet: restarted; deleted the sockets in the directory")
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- Register, as the kubelet does it

    def _register(self, request: Any, context: grpc.ServicerContext) -> Any:
        resource = request.resource_name
        problem = self._registration_problem(request)
        if problem:
            with self._changed:
                self._rejected.append(f"{resource}: {problem}")
                self._bump()
            self._emit(f"kubelet: rejected Register({resource!r}): {problem}")
            # The kubelet returns a plain error, which gRPC reports as UNKNOWN.
            context.abort(grpc.StatusCode.UNKNOWN, problem)
        socket_path = self.plugin_dir / request.endpoint
        # A channel of its own: grpcio otherwise shares subchannels between channels to
        # the same address, and a new registration would inherit the reconnect backoff
        # of the connection the plugin closed (the kubelet dials afresh every time).
        channel = grpc.insecure_channel(
            unix_address(socket_path), options=[("grpc.use_local_subchannel_pool", 1)]
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=self.dial_timeout)
            stub = self.api.deviceplugin_grpc.DevicePluginStub(channel)
            options = stub.GetDevicePluginOptions(
                self.api.deviceplugin.Empty(), timeout=CALL_TIMEOUT_SECONDS
            )
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            channel.close()
            reason = f"failed to dial device plugin {socket_path}: {self._failure_text(exc)}"
            with self._changed:
                self._rejected.append(f"{resource}: {reason}")
                self._bump()
            self._emit(f"kubelet: Register({resource!r}) failed: {reason}")
            context.abort(grpc.StatusCode.UNKNOWN, reason)
        plugin = RegisteredPlugin(
            resource_name=resource,
            endpoint=request.endpoint,
            socket_path=socket_path,
            requested_options=request.options,
            options=options,
            registered_at=time.monotonic(),
        )
        connection = _Connection(plugin=plugin, channel=channel, stub=stub)
        connection.stream = stub.ListAndWatch(self.api.deviceplugin.Empty())
        with self._changed:
            stopped = self._server is None  # stop() ran while we dialed
            replaced = None if stopped else self._connections.get(resource)
            if not stopped:
                self._connections[resource] = connection
                self._bump()
        if stopped:
            connection.close()
            context.abort(grpc.StatusCode.UNAVAILABLE, "the kubelet is shutting down")
        if replaced is not None:
            replaced.close()
        connection.reader = threading.Thread(
            target=self._read_stream,
            args=(connection,),
            name=f"ListAndWatch {resource}",
            daemon=True,
        )
        connection.reader.start()
        self._emit(
            f"kubelet: registered {resource} at {request.endpoint}"
            f"{' (replacing the previous registration)' if replaced else ''}"
            f" options: pre_start_required={options.pre_start_required}"
            f" get_preferred_allocation_available={options.get_preferred_allocation_available}"
        )
        return self.api.deviceplugin.Empty()

    @staticmethod
    def _registration_problem(request: Any) -> str:
        if request.version != API_VERSION:
            return (
                f"requested device plugin API version {request.version!r} is not supported"
                f" by kubelet; supported versions are [{API_VERSION!r}]"
            )
        domain, slash, name = request.resource_name.partition("/")
        if not slash or not domain or not name or domain.endswith("kubernetes.io"):
            return f"the resource name {request.resource_name!r} is not an extended resource"
        if not request.endpoint or "/" in request.endpoint:
            return f"the endpoint {request.endpoint!r} is not a socket file name"
        return ""

    def _read_stream(self, connection: _Connection) -> None:
        resource = connection.plugin.resource_name
        reason = "the plugin ended the stream"
        try:
            for message in connection.stream:
                stamp = time.monotonic()
                devices = {device.ID: device.health for device in message.devices}
                with self._changed:
                    connection.messages.append((stamp, message))
                    self._history.setdefault(resource, []).append(DeviceUpdate(stamp, devices))
                    self._bump()
                self._emit(f"kubelet: ListAndWatch {resource}: {_describe_devices(devices)}")
        except grpc.RpcError as exc:
            reason = _rpc_text(exc)
        with self._changed:
            connection.ended = True
            connection.end_reason = reason
            self._bump()
        self._emit(f"kubelet: ListAndWatch {resource} ended: {reason}")

    # -- queries

    def registered(self) -> dict[str, RegisteredPlugin]:
        """Resource name -> its current registration."""
        with self._changed:
            return {name: c.plugin for name, c in self._connections.items()}

    def rejected(self) -> list[str]:
        """One line per Register call that failed (resource: reason), oldest first."""
        with self._changed:
            return list(self._rejected)

    def devices(self, resource: str) -> dict[str, str]:
        """Device ID -> health from the current registration's latest ListAndWatch message.

        Empty until that registration's first message. Raises :class:`NotRegisteredError`.
        """
        with self._changed:
            connection = self._connection(resource)
            if not connection.messages:
                return {}
            return {d.ID: d.health for d in connection.messages[-1][1].devices}

    def topology(self, resource: str) -> dict[str, list[int]]:
        """Device ID -> NUMA node IDs from the latest message. Raises ``NotRegisteredError``."""
        with self._changed:
            connection = self._connection(resource)
            if not connection.messages:
                return {}
            return {
                d.ID: [node.ID for node in d.topology.nodes]
                for d in connection.messages[-1][1].devices
            }

    def updates(self, resource: str) -> list[DeviceUpdate]:
        """Every ListAndWatch message for ``resource`` since start, across registrations."""
        with self._changed:
            return list(self._history.get(resource, []))

    def stream_ended(self, resource: str) -> bool:
        """Whether the current registration's ListAndWatch stream has ended.

        Raises :class:`NotRegisteredError`.
        """
        with self._changed:
            return self._connection(resource).ended

    def wait_registered(self, resources: Iterable[str], timeout: float) -> None:
        """Wait until every resource is registered and its first ListAndWatch list arrived.

        Raises ``TimeoutError`` naming the resources still missing.
        """
        wanted = sorted(set(resources))

        def missing() -> list[str]:
            with self._changed:
                return [
                    r
                    for r in wanted
                    if r not in self._connections or not self._connections[r].messages
                ]

        try:
            self.wait_until(lambda: not missing(), timeout, what=f"registration of {wanted}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; still missing {missing()}") from None

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float, *, what: str | None = None
    ) -> None:
        """Poll ``predicate`` (woken by every recorded change, at least every 50 ms).

        ``predicate`` runs outside the lock, so it may call the query methods. Raises
        ``TimeoutError`` saying what was awaited (``what``, else the predicate's name) and
        what state the stand-in had recorded by then.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._version
            if predicate():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                label = what or getattr(predicate, "__name__", repr(predicate))
                raise TimeoutError(f"waited {timeout} s for {label}; {self._summary()}")
            with self._changed:
                if self._version == seen:
                    self._changed.wait(min(remaining, 0.05))

    def _summary(self) -> str:
        with self._changed:
            parts = []
            for name, connection in sorted(self._connections.items()):
                state = "ended" if connection.ended else "streaming"
                latest = connection.messages[-1][1].devices if connection.messages else []
                healthy = sum(1 for d in latest if d.health == HEALTHY)
                parts.append(f"{name} ({state}, {healthy}/{len(latest)} healthy)")
            registered = ", ".join(parts) or "nothing"
            rejected = f"; rejected: {self._rejected}" if self._rejected else ""
            return f"registered: {registered}{rejected}"

    # -- the kubelet's calls into the plugin

    def preferred_allocation(
        self,
        resource: str,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
        *,
        timeout: float = CALL_TIMEOUT_SECONDS,
    ) -> list[str]:
        """GetPreferredAllocation for one container; the plugin's answer, unfiltered.

        Raises :class:`NotRegisteredError` or ``grpc.RpcError``.
        """
        pb = self.api.deviceplugin
        request = pb.PreferredAllocationRequest(
            container_requests=[
                pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(available),
                    must_include_deviceIDs=list(must_include),
                    allocation_size=size,
                )
            ]
        )
        response = self._stub(resource).GetPreferredAllocation(request, timeout=timeout)
        return list(response.container_responses[0].deviceIDs)

    def allocate(
        self, resource: str, device_ids: Sequence[str], *, timeout: float = CALL_TIMEOUT_SECONDS
    ) -> Any:
        """Allocate for one container (one ``ContainerAllocateRequest``, as the kubelet sends).

        Returns the grpcio ``AllocateResponse``. Raises :class:`NotRegisteredError` or
        ``grpc.RpcError`` (check ``code()`` and ``details()``).
        """
        pb = self.api.deviceplugin
        request = pb.AllocateRequest(
            container_requests=[pb.ContainerAllocateRequest(devices_ids=list(device_ids))]
        )
        return self._stub(resource).Allocate(request, timeout=timeout)

    def pre_start_container(
        self,
        resource: str,
        device_ids: Sequence[str],
        *,
        timeout: float = PRE_START_TIMEOUT_SECONDS,
    ) -> Any:
        """PreStartContainer, with the kubelet's 30 s deadline. Raises like :meth:`allocate`."""
        request = self.api.deviceplugin.PreStartContainerRequest(devices_ids=list(device_ids))
        return self._stub(resource).PreStartContainer(request, timeout=timeout)

    # -- internals

    def _connection(self, resource: str) -> _Connection:
        try:
            return self._connections[resource]
        except KeyError:
            known = sorted(self._connections) or "none"
            raise NotRegisteredError(
                f"{resource} is not registered with the kubelet stand-in (registered: {known})"
            ) from None

    def _stub(self, resource: str) -> Any:
        with self._changed:
            return self._connection(resource).stub

    def _failure_text(self, exc: BaseException) -> str:
        if isinstance(exc, grpc.FutureTimeoutError):
            return f"not reachable within {self.dial_timeout:g} s"
        return _rpc_text(exc)

    def _bump(self) -> None:
        """Record a change and wake waiters; the caller holds the lock."""
        self._version += 1
        self._changed.notify_all()

    def _emit(self, line: str) -> None:
        if self._on_event is not None:
            self._on_event(line)


def _rpc_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)


# -- PodResources ------------------------------------------------------------------------


@dataclass
class _PodRecord:
    namespace: str
    name: str
    # container name -> resource name -> device IDs
    containers: dict[str, dict[str, list[str]]] = field(default_factory=dict)


class _PodResourcesServicer:
    """grpcio servicer for ``PodResourcesLister``; delegates to the stand-in."""

    def __init__(self, owner: PodResourcesStandIn) -> None:
        self._owner = owner

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._owner._list()

    def GetAllocatableResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._owner._allocatable()

    def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._owner._get(request, context)


class PodResourcesStandIn:
    """The kubelet's ``PodResourcesLister`` on ``socket_path``, fed by :meth:`assign`.

    ``GetAllocatableResources`` answers what :meth:`set_allocatable` set; for resources
    not set there it answers, when ``kubelet`` is given, the Healthy devices of that
    stand-in's live registrations (as the kubelet counts allocatable). ``Get`` of an
    unknown pod fails with UNKNOWN "pod ... not found", as the kubelet's plain error does.

    Ownership: the caller owns the directory of ``socket_path``; this object owns the
    socket and its server, released by :meth:`stop`. Thread-safe.
    """

    def __init__(self, socket_path: Path, *, kubelet: KubeletStandIn | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.api = load_api()
        self._kubelet = kubelet
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._pods: dict[tuple[str, str], _PodRecord] = {}
        self._allocatable_override: dict[str, list[str]] = {}
        self._calls: dict[str, int] = {"List": 0, "GetAllocatableResources": 0, "Get": 0}

    def start(self) -> Self:
        """Serve on ``socket_path`` (its directory is created). Raises if already running."""
        if self._server is not None:
            raise RuntimeError(f"pod resources stand-in already serving {self.socket_path}")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_socket(self.socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.api.podresources_grpc.add_PodResourcesListerServicer_to_server(
            _PodResourcesServicer(self), server
        )
        server.add_insecure_port(unix_address(self.socket_path))
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving and remove the socket. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait()
        _remove_socket(self.socket_path)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what the caller sets

    def assign(
        self, namespace: str, pod: str, container: str, resource: str, device_ids: Sequence[str]
    ) -> None:
        """Set the devices of ``resource`` held by one container (replacing earlier ones)."""
        with self._lock:
            record = self._pods.setdefault((namespace, pod), _PodRecord(namespace, pod))
            record.containers.setdefault(container, {})[resource] = list(device_ids)

    def unassign(self, namespace: str, pod: str) -> bool:
        """Forget a pod (it ended); return whether it was there."""
        with self._lock:
            return self._pods.pop((namespace, pod), None) is not None

    def set_allocatable(self, resource: str, device_ids: Sequence[str]) -> None:
        """Fix what ``GetAllocatableResources`` answers for ``resource``."""
        with self._lock:
            self._allocatable_override[resource] = list(device_ids)

    def calls(self, method: str) -> int:
        """How many times ``method`` (``List``, ``GetAllocatableResources``, ``Get``) ran."""
        with self._lock:
            return self._calls[method]

    # -- handlers

    def _pod_message(self, record: _PodRecord) -> Any:
        pb = self.api.podresources
        return pb.PodResources(
            name=record.name,
            namespace=record.namespace,
            containers=[
                pb.ContainerResources(
                    name=container,
                    devices=[
                        pb.ContainerDevices(resource_name=resource, device_ids=ids)
                        for resource, ids in held.items()
                    ],
                )
                for container, held in record.containers.items()
            ],
        )

    def _list(self) -> Any:
        with self._lock:
            self._calls["List"] += 1
            pods = [self._pod_message(record) for record in self._pods.values()]
        return self.api.podresources.ListPodResourcesResponse(pod_resources=pods)

    def _allocatable(self) -> Any:
        with self._lock:
            self._calls["GetAllocatableResources"] += 1
            allocatable = {name: list(ids) for name, ids in self._allocatable_override.items()}
        if self._kubelet is not None:
            for resource in self._kubelet.registered():
                if resource in allocatable:
                    continue
                try:
                    if self._kubelet.stream_ended(resource):
                        continue
                    devices = self._kubelet.devices(resource)
                except NotRegisteredError:
                    continue  # deregistered in between
                allocatable[resource] = [d for d, h in devices.items() if h == HEALTHY]
        pb = self.api.podresources
        return pb.AllocatableResourcesResponse(
            devices=[
                pb.ContainerDevices(resource_name=resource, device_ids=ids)
                for resource, ids in sorted(allocatable.items())
            ]
        )

    def _get(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self._calls["Get"] += 1
            record = self._pods.get((request.pod_namespace, request.pod_name))
            pod = self._pod_message(record) if record is not None else None
        if pod is None:
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
            )
        return self.api.podresources.GetPodResourcesResponse(pod_resources=pod)


# -- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in until Ctrl-C or SIGTERM, printing what the plugins send."""
    parser = argparse.ArgumentParser(
        prog="python -m testkit.kubelet",
        description="A kubelet stand-in (device plugin Registration, PodResources) in grpcio.",
    )
    parser.add_argument(
        "--plugin-dir", type=Path, required=True, help="device plugin directory to serve in"
    )
    parser.add_argument(
        "--pod-resources-socket", type=Path, help="also serve PodResourcesLister on this socket"
    )
    args = parser.parse_args(argv)
    args.plugin_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def show(line: str) -> None:
        print(f"[{time.monotonic() - started:8.3f}] {line}", flush=True)

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, frame: stopping.set())
    kubelet = KubeletStandIn(args.plugin_dir, on_event=show)
    pod_resources = (
        PodResourcesStandIn(args.pod_resources_socket, kubelet=kubelet)
        if args.pod_resources_socket
        else None
    )
    with kubelet:
        if pod_resources is not None:
            pod_resources.start()
            show(f"kubelet: serving PodResourcesLister on {pod_resources.socket_path}")
        try:
            stopping.wait()
        finally:
            if pod_resources is not None:
                pod_resources.stop()
    show("kubelet: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
