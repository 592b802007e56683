"""A kubelet stand-in for DRA drivers: plugin watcher, registration, Prepare/Unprepare, in grpcio.

Written from the kubelet's published API definitions (``proto/pluginregistration``,
``proto/dra``), loaded at run time with ``grpc.protos_and_services``: it shares no code
with our betterproto2/grpclib stack, so a wire mistake on our side (a package name, a
field number) shows up as a failure here instead of cancelling out.

What it does, like the kubelet's plugin manager and DRA plugin manager:

- A watcher thread polls the plugin registry directory every ``poll_interval`` seconds
  (the kubelet uses inotify; polling sees the same events: a socket created, removed, or
  replaced by a new file). Every Unix socket whose name does not start with ``.`` is a
  plugin candidate; a new or replaced one is registered, a removed one deregistered.
- Registering: dial the registration socket (10 s), ``GetInfo`` (1 s); refuse a type
  other than ``DRAPlugin``; an empty endpoint means the registration socket itself;
  choose the service: the first entry of the plugin's ``supported_versions`` that this
  kubelet supports (``kubelet_services``, default ``v1.DRAPlugin`` and
  ``v1beta1.DRAPlugin``), refuse when there is none; then ``NotifyRegistrationStatus``
  (5 s) with the verdict and the kubelet's error text.
- :meth:`DraKubeletStandIn.prepare` / :meth:`unprepare` call NodePrepareResources /
  NodeUnprepareResources of a registered driver on its endpoint, with the chosen
  service's messages, and check, as the kubelet does, that every claim asked for has an
  entry in the answer (:class:`MissingClaimsError` otherwise).
- :meth:`DraKubeletStandIn.restart` plays a kubelet restart: every registration is
  forgotten and every socket in the directory is registered again (the kubelet leaves
  the registry directory's sockets alone when it restarts, unlike the device-plugin
  directory).

Threads: grpcio calls block, so call the stand-in from a worker thread in async tests
(``trio.to_thread.run_sync``). All recorded state sits behind one condition variable.
The caller owns the directory; the stand-in owns its watcher thread and its channels,
released by :meth:`stop`.

Run it by hand next to a driver::

    python -m testkit.dra_kubelet --registry-dir DIR
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import grpc

from nvswitch_dp.demo.cluster import ClaimSpec, PrepareAnswer
from testkit.kubelet import find_proto_dir, unix_address

PLUGIN_TYPE = "DRAPlugin"
V1_SERVICE = "v1.DRAPlugin"
V1BETA1_SERVICE = "v1beta1.DRAPlugin"
KUBELET_SERVICES = (V1_SERVICE, V1BETA1_SERVICE)  # newest first, as the kubelet lists them
REGISTRATION_PROTO = "pluginregistration/v1/api.proto"
DRA_V1_PROTO = "dra/v1/api.proto"
DRA_V1BETA1_PROTO = "dra/v1beta1/api.proto"
DIAL_TIMEOUT_SECONDS = 10.0  # the kubelet's plugin manager: dial
GET_INFO_TIMEOUT_SECONDS = 1.0  # ... GetInfo
NOTIFY_TIMEOUT_SECONDS = 5.0  # ... NotifyRegistrationStatus
CALL_TIMEOUT_SECONDS = 45.0  # the kubelet's DRA call timeout
POLL_INTERVAL_SECONDS = 0.05


class NotRegisteredError(LookupError):
    """A call named a driver that has no current registration."""


class MissingClaimsError(RuntimeError):
    """The plugin's answer lacks claims the request named (the kubelet would retry them)."""


class DraApi(NamedTuple):
    """grpcio modules generated at run time: ``*_pb2`` messages and ``*_pb2_grpc`` services."""

    registration: Any
    registration_grpc: Any
    v1: Any
    v1_grpc: Any
    v1beta1: Any
    v1beta1_grpc: Any


@functools.cache
def load_api() -> DraApi:
    """Compile the kubelet's registration and DRA protos with grpcio (once per process).

    Raises :class:`~testkit.kubelet.ProtoDirNotFoundError`, or grpcio's
    error for a malformed ``.proto``.
    """
    proto_dir = str(find_proto_dir())
    if proto_dir not in sys.path:
        sys.path.append(proto_dir)
    registration, registration_grpc = grpc.protos_and_services(REGISTRATION_PROTO)
    v1, v1_grpc = grpc.protos_and_services(DRA_V1_PROTO)
    v1beta1, v1beta1_grpc = grpc.protos_and_services(DRA_V1BETA1_PROTO)
    return DraApi(registration, registration_grpc, v1, v1_grpc, v1beta1, v1beta1_grpc)


# -- recorded state ----------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredDriver:
    """One accepted registration: what GetInfo said and which service was chosen."""

    name: str
    endpoint: str
    supported_versions: tuple[str, ...]
    service: str  # the chosen one, e.g. "v1.DRAPlugin"
    registration_socket: Path
    registered_at: float


@dataclass(frozen=True)
class Notification:
    """One NotifyRegistrationStatus the stand-in sent (or tried to send)."""

    socket: Path
    registered: bool
    error: str
    delivered: bool


@dataclass
class _Plugin:
    driver: RegisteredDriver
    channel: grpc.Channel
    stub: Any
    pb: Any


@dataclass
class _Seen:
    identity: tuple[int, int, int]
    driver: str | None = None  # the driver it registered, if accepted


EventSink = Callable[[str], None]


def _socket_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _rpc_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, grpc.FutureTimeoutError):
        return "not reachable"
    return repr(exc)


# -- the stand-in ------------------------------------------------------------------------


class DraKubeletStandIn:
    """The kubelet's DRA side: watches ``registry_dir`` and calls registered drivers.

    Ownership: the caller owns ``registry_dir`` and the drivers' sockets; the stand-in
    owns its watcher thread and its channels, released by :meth:`stop` (also on leaving
    a ``with`` block). ``on_event`` receives one human-readable line per registration,
    refusal, deregistration and call, from the stand-in's threads.

    Errors: calls to an unknown driver raise :class:`NotRegisteredError`; RPC failures
    raise ``grpc.RpcError``; answers missing claims raise :class:`MissingClaimsError`;
    waits raise ``TimeoutError`` naming what they waited for.
    """

    def __init__(
        self,
        registry_dir: Path,
        *,
        kubelet_services: Sequence[str] = KUBELET_SERVICES,
        poll_interval: float = POLL_INTERVAL_SECONDS,
        on_event: EventSink | None = None,
    ) -> None:
        self.registry_dir = Path(registry_dir)
        self.kubelet_services = tuple(kubelet_services)
        self.poll_interval = poll_interval
        self.api = load_api()
        self._on_event = on_event
        self._changed = threading.Condition()  # guards everything below
        self._version = 0
        self._seen: dict[Path, _Seen] = {}
        self._plugins: dict[str, _Plugin] = {}
        self._notifications: list[Notification] = []
        self._refusals: list[str] = []
        self._registrations = 0
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> Self:
        """Start watching the directory. Raises ``RuntimeError`` if already running."""
        if self._watcher is not None:
            raise RuntimeError(f"DRA kubelet stand-in already watching {self.registry_dir}")
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        self._watcher = threading.Thread(target=self._watch, name="dra-kubelet", daemon=True)
        self._watcher.start()
        self._emit(f"kubelet: watching {self.registry_dir}")
        return self

    def stop(self) -> None:
        """Stop watching and close every channel; registrations are forgotten. Idempotent."""
        watcher, self._watcher = self._watcher, None
        self._stopping.set()
        if watcher is not None:
            watcher.join(timeout=10)
        with self._changed:
            plugins = list(self._plugins.values())
            self._plugins.clear()
            self._seen.clear()
            self._bump()
        for plugin in plugins:
            plugin.channel.close()

    def restart(self) -> None:
        """Play a kubelet restart: forget everything, then register every socket again."""
        self.stop()
        self._emit("kubelet: restarted")
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

    # -- the plugin watcher and registration

    def _watch(self) -> None:
        while not self._stopping.is_set():
            self.scan()
            self._stopping.wait(self.poll_interval)

    def scan(self) -> None:
        """One pass of the plugin watcher over the directory (the thread calls it)."""
        try:
            names = sorted(os.listdir(self.registry_dir))
        except FileNotFoundError:
            names = []
        present: dict[Path, tuple[int, int, int]] = {}
        for name in names:
            if name.startswith("."):
                continue  # the kubelet ignores hidden files
            path = self.registry_dir / name
            ident = _socket_identity(path)
            if ident is not None:
                present[path] = ident
        with self._changed:
            seen = dict(self._seen)
        for path, record in seen.items():
            if present.get(path) != record.identity:
                self._deregister(path, record)
        for path, ident in present.items():
            if self._stopping.is_set():
                return
            known = seen.get(path)
            if known is None or known.identity != ident:
                self._register(path, ident)

    def _deregister(self, path: Path, record: _Seen) -> None:
        with self._changed:
            self._seen.pop(path, None)
            plugin = None
            if record.driver is not None:
                current = self._plugins.get(record.driver)
                if current is not None and current.driver.registration_socket == path:
                    plugin = self._plugins.pop(record.driver)
            self._bump()
        if plugin is not None:
            plugin.channel.close()
            self._emit(f"kubelet: deregistered {record.driver} ({path.name} went away)")

    def _register(self, path: Path, ident: tuple[int, int, int]) -> None:
        with self._changed:
            self._seen[path] = _Seen(ident)
        api = self.api
        channel = grpc.insecure_channel(unix_address(path))
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT_SECONDS)
                stub = api.registration_grpc.RegistrationStub(channel)
                info = stub.GetInfo(
                    api.registration.InfoRequest(), timeout=GET_INFO_TIMEOUT_SECONDS
                )
            except (grpc.RpcError, grpc.FutureTimeoutError) as exc:
                self._refuse(path, f"dial or GetInfo failed: {_rpc_text(exc)}")
                return
            problem, service = self._validate(path, info)
            if problem:
                self._notify(stub, path, False, problem)
                self._refuse(path, problem)
                return
            endpoint = info.endpoint or str(path)
            use_v1 = service == V1_SERVICE
            pb = api.v1 if use_v1 else api.v1beta1
            pb_grpc = api.v1_grpc if use_v1 else api.v1beta1_grpc
            # A channel of its own per registration: the kubelet dials afresh, and grpcio
            # would otherwise share a subchannel (and its reconnect backoff) by address.
            plugin_channel = grpc.insecure_channel(
                unix_address(Path(endpoint)), options=[("grpc.use_local_subchannel_pool", 1)]
            )
            driver = RegisteredDriver(
                name=info.name,
                endpoint=endpoint,
                supported_versions=tuple(info.supported_versions),
                service=service,
                registration_socket=path,
                registered_at=time.monotonic(),
            )
            with self._changed:
                old = self._plugins.get(info.name)
                self._plugins[info.name] = _Plugin(
                    driver, plugin_channel, pb_grpc.DRAPluginStub(plugin_channel), pb
                )
                self._seen[path] = _Seen(ident, info.name)
                self._bump()
            if old is not None:
                old.channel.close()
            self._emit(f"kubelet: registered DRA driver {info.name} at {endpoint} ({service})")
            self._notify(stub, path, True, "")
            with self._changed:  # counted once the plugin has heard the verdict
                self._registrations += 1
                self._bump()
        finally:
            channel.close()

    def _validate(self, path: Path, info: Any) -> tuple[str, str]:
        """(problem, chosen service); the problem text follows the kubelet's wording."""
        if info.type != PLUGIN_TYPE:
            return (
                f"RegisterPlugin error -- no handler registered for plugin type: "
                f"{info.type} at socket {path}",
                "",
            )
        if not info.name:
            return ("RegisterPlugin error -- plugin validation failed: empty driver name", "")
        versions = list(info.supported_versions)
        if not versions:
            return (
                "RegisterPlugin error -- plugin validation failed with err: empty list of "
                "supported gRPC services (aka supported versions)",
                "",
            )
        for version in versions:  # the plugin's order decides, as in the kubelet
            if version in self.kubelet_services:
                return ("", version)
        return (
            "RegisterPlugin error -- plugin validation failed with err: none of services "
            f"supported by the plugin ({versions}) are supported by the kubelet "
            f"({list(self.kubelet_services)})",
            "",
        )

    def _notify(self, stub: Any, path: Path, registered: bool, error: str) -> None:
        status = self.api.registration.RegistrationStatus(plugin_registered=registered, error=error)
        try:
            stub.NotifyRegistrationStatus(status, timeout=NOTIFY_TIMEOUT_SECONDS)
            delivered = True
        except grpc.RpcError as exc:
            delivered = False
            self._emit(f"kubelet: NotifyRegistrationStatus to {path.name} failed: {exc}")
        with self._changed:
            self._notifications.append(Notification(path, registered, error, delivered))
            self._bump()

    def _refuse(self, path: Path, problem: str) -> None:
        with self._changed:
            self._refusals.append(f"{path.name}: {problem}")
            self._bump()
        self._emit(f"kubelet: refused {path.name}: {problem}")

    # -- queries

    def registered(self) -> dict[str, RegisteredDriver]:
        """Driver name -> its current registration."""
        with self._changed:
            return {name: plugin.driver for name, plugin in self._plugins.items()}

    def driver(self, name: str) -> RegisteredDriver:
        """The current registration of ``name``; raises :class:`NotRegisteredError`."""
        with self._changed:
            return self._plugin(name).driver

    @property
    def registrations(self) -> int:
        """How many registrations were accepted and notified since construction."""
        with self._changed:
            return self._registrations

    def notifications(self) -> list[Notification]:
        """Every NotifyRegistrationStatus sent, oldest first."""
        with self._changed:
            return list(self._notifications)

    def refusals(self) -> list[str]:
        """Every refused registration, as ``"<socket>: <why>"``."""
        with self._changed:
            return list(self._refusals)

    def wait_registered(self, name: str, timeout: float, *, after: int = 0) -> RegisteredDriver:
        """Wait until ``name`` is registered and the total count exceeds ``after``.

        Pass the previous :attr:`registrations` as ``after`` to wait for a fresh
        registration. Raises ``TimeoutError``.
        """

        def done() -> bool:
            with self._changed:
                return name in self._plugins and self._registrations > after

        self.wait_until(done, timeout, what=f"registration of {name} (after {after})")
        return self.driver(name)

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float, *, what: str | None = None
    ) -> None:
        """Poll ``predicate`` (woken by every recorded change, at least every 50 ms).

        Raises ``TimeoutError`` saying what was awaited and what was recorded by then.
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
                with self._changed:
                    state = (
                        f"registered: {sorted(self._plugins) or 'nothing'}; "
                        f"refused: {self._refusals or 'nothing'}"
                    )
                raise TimeoutError(f"waited {timeout} s for {label}; {state}")
            with self._changed:
                if self._version == seen:
                    self._changed.wait(min(remaining, 0.05))

    # -- the kubelet's calls into the driver

    def prepare(
        self,
        driver: str,
        claims: Iterable[ClaimSpec],
        *,
        timeout: float = CALL_TIMEOUT_SECONDS,
    ) -> dict[str, PrepareAnswer]:
        """NodePrepareResources for ``claims``; claim uid -> answer.

        Raises :class:`NotRegisteredError`, ``grpc.RpcError``, :class:`MissingClaimsError`.
        """
        wanted = list(claims)
        with self._changed:
            plugin = self._plugin(driver)
        pb = plugin.pb
        request = pb.NodePrepareResourcesRequest(claims=[self._claim(pb, c) for c in wanted])
        response = plugin.stub.NodePrepareResources(request, timeout=timeout)
        self._check_complete(driver, "NodePrepareResources", wanted, response.claims)
        answers: dict[str, PrepareAnswer] = {}
        for uid, result in response.claims.items():
            answers[uid] = PrepareAnswer(
                devices=[
                    {
                        "request_names": list(d.request_names),
                        "pool_name": d.pool_name,
                        "device_name": d.device_name,
                        "cdi_device_ids": list(d.cdi_device_ids),
                    }
                    for d in result.devices
                ],
                error=result.error,
            )
        self._emit(
            f"kubelet: NodePrepareResources({driver}, {[c.uid for c in wanted]}) via "
            f"{plugin.driver.service}: "
            + "; ".join(f"{uid}: {a.error or a.cdi_device_ids}" for uid, a in answers.items())
        )
        return answers

    def unprepare(
        self,
        driver: str,
        claims: Iterable[ClaimSpec],
        *,
        timeout: float = CALL_TIMEOUT_SECONDS,
    ) -> dict[str, str]:
        """NodeUnprepareResources for ``claims``; claim uid -> error text ("" on success).

        Raises like :meth:`prepare`.
        """
        wanted = list(claims)
        with self._changed:
            plugin = self._plugin(driver)
        pb = plugin.pb
        request = pb.NodeUnprepareResourcesRequest(claims=[self._claim(pb, c) for c in wanted])
        response = plugin.stub.NodeUnprepareResources(request, timeout=timeout)
        self._check_complete(driver, "NodeUnprepareResources", wanted, response.claims)
        errors = {uid: result.error for uid, result in response.claims.items()}
        self._emit(f"kubelet: NodeUnprepareResources({driver}, {list(errors)}): {errors}")
        return errors

    # -- internals

    @staticmethod
    def _claim(pb: Any, claim: ClaimSpec) -> Any:
        return pb.Claim(namespace=claim.namespace, uid=claim.uid, name=claim.name)

    @staticmethod
    def _check_complete(
        driver: str, call: str, wanted: Sequence[ClaimSpec], answered: Mapping[str, Any]
    ) -> None:
        missing = sorted({c.uid for c in wanted} - set(answered))
        if missing:
            raise MissingClaimsError(f"{driver} answered {call} without claims {missing}")

    def _plugin(self, name: str) -> _Plugin:
        try:
            return self._plugins[name]
        except KeyError:
            known = sorted(self._plugins) or "none"
            raise NotRegisteredError(
                f"DRA driver {name} is not registered with the kubelet stand-in "
                f"(registered: {known})"
            ) from None

    def _bump(self) -> None:
        """Record a change and wake waiters; the caller holds the lock."""
        self._version += 1
        self._changed.notify_all()

    def _emit(self, line: str) -> None:
        if self._on_event is not None:
            self._on_event(line)


# -- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Watch a registry directory until Ctrl-C or SIGTERM, printing what happens."""
    parser = argparse.ArgumentParser(
        prog="python -m testkit.dra_kubelet",
        description="A kubelet stand-in for DRA drivers (plugin registration) in grpcio.",
    )
    parser.add_argument(
        "--registry-dir", type=Path, required=True, help="plugin registry directory to watch"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()

    def show(line: str) -> None:
        print(f"[{time.monotonic() - started:8.3f}] {line}", flush=True)

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, frame: stopping.set())
    with DraKubeletStandIn(args.registry_dir, on_event=show):
        stopping.wait()
    show("kubelet: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
