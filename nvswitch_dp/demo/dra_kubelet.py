"""The DRA demo's kubelet: the plugin watcher, registration, Prepare and Unprepare.

A small grpclib program under Trio (:mod:`nvswitch_dp.demo.wire`), written from the
kubelet's plugin manager and DRA plugin manager as shared/reference/dra.md states them,
on our generated code (``nvswitch_dp/proto``):

- :meth:`DemoDraKubelet.watch` polls the plugin registry directory every ``POLL_S``
  (the kubelet uses inotify; a poll sees the same events). Every Unix socket whose name
  does not start with ``.`` is a plugin: a new or replaced one is registered, a removed
  one forgotten.
- Registering: ``GetInfo`` on the registration socket; refuse a type other than
  ``DRAPlugin``, an empty name, or no service this kubelet speaks (``v1.DRAPlugin``,
  ``v1beta1.DRAPlugin``; the first of the plugin's list that it speaks is chosen, as the
  kubelet does); an empty endpoint means the registration socket itself. Then
  ``NotifyRegistrationStatus`` with the verdict and the reason.
- :meth:`DemoDraKubelet.prepare` / :meth:`DemoDraKubelet.unprepare` call
  NodePrepareResources / NodeUnprepareResources of a registered driver with the chosen
  service's messages, and check that every claim asked for is answered.

Simpler than the kubelet where the demo does not need more: no retries, no checkpoint.
The tests' independent wire check is the grpcio stand-in in ``testkit/dra_kubelet.py``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import trio
from grpclib.exceptions import GRPCError

from nvswitch_dp.demo.cluster import ClaimSpec, PrepareAnswer
from nvswitch_dp.plugin.grpc_trio import call_on
from nvswitch_dp.proto import pluginregistration as reg
from nvswitch_dp.proto.k8s.io.kubelet.pkg.apis.dra import v1 as dra_v1
from nvswitch_dp.proto.k8s.io.kubelet.pkg.apis.dra import v1beta1 as dra_v1beta1

PLUGIN_TYPE = "DRAPlugin"
# What this kubelet speaks, newest first, as "<proto package version>.<service>".
SERVICES: dict[str, ModuleType] = {"v1.DRAPlugin": dra_v1, "v1beta1.DRAPlugin": dra_v1beta1}
POLL_S = 0.05
GET_INFO_TIMEOUT_S = 1.0  # the kubelet's plugin manager: GetInfo
NOTIFY_TIMEOUT_S = 5.0  # ... NotifyRegistrationStatus
CALL_TIMEOUT_S = 45.0  # the kubelet's DRA call timeout


class NotRegisteredError(LookupError):
    """A call named a driver that has no current registration."""


class MissingClaimsError(RuntimeError):
    """The driver's answer lacks claims the request named (the kubelet would retry them)."""


@dataclass(frozen=True)
class Driver:
    """One accepted registration."""

    name: str
    endpoint: Path
    service: str  # the chosen one, e.g. "v1.DRAPlugin"
    registration_socket: Path

    @property
    def pb(self) -> ModuleType:
        """The chosen service's generated module."""
        return SERVICES[self.service]


def _socket_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def choose_service(info: reg.PluginInfo) -> tuple[str, str]:
    """(refusal, chosen service) for a plugin's ``GetInfo`` answer; the refusal is "" when
    it is accepted. The wording follows the kubelet's."""
    if info.type != PLUGIN_TYPE:
        return (f"RegisterPlugin error -- no handler registered for plugin type: {info.type}", "")
    if not info.name:
        return ("RegisterPlugin error -- plugin validation failed: empty driver name", "")
    for version in info.supported_versions:  # the plugin's order decides
        if version in SERVICES:
            return ("", version)
    return (
        "RegisterPlugin error -- plugin validation failed with err: none of services "
        f"supported by the plugin ({list(info.supported_versions)}) are supported by the "
        f"kubelet ({list(SERVICES)})",
        "",
    )


class DemoDraKubelet:
    """The kubelet's DRA side: watches ``registry_dir``, calls the drivers registered there.

    Ownership: the caller owns ``registry_dir`` and the drivers' sockets; :meth:`watch`
    runs until cancelled and owns nothing else (a channel per call). ``refusals`` lists
    every refused registration as ``"<socket>: <why>"``.

    Errors: calls to an unknown driver raise :class:`NotRegisteredError`; grpclib's errors
    pass through; an answer missing claims raises :class:`MissingClaimsError`.
    """

    def __init__(self, registry_dir: Path) -> None:
        self.registry_dir = registry_dir
        self.drivers: dict[str, Driver] = {}
        self.registrations = 0
        self.refusals: list[str] = []
        self._seen: dict[Path, tuple[int, int, int]] = {}

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the directory (created if missing) until cancelled."""
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        task_status.started()
        while True:
            await self.scan()
            await trio.sleep(POLL_S)

    async def scan(self) -> None:
        """One pass of the plugin watcher over the directory."""
        present: dict[Path, tuple[int, int, int]] = {}
        for name in sorted(os.listdir(self.registry_dir)):
            ident = _socket_identity(self.registry_dir / name)
            if ident is not None and not name.startswith("."):  # the kubelet skips hidden files
                present[self.registry_dir / name] = ident
        for path in [p for p, ident in self._seen.items() if present.get(p) != ident]:
            del self._seen[path]
            for name, driver in list(self.drivers.items()):
                if driver.registration_socket == path:
                    del self.drivers[name]
        for path, ident in present.items():
            if self._seen.get(path) != ident:
                self._seen[path] = ident
                await self._register(path)

    async def _register(self, path: Path) -> None:
        try:
            info = await call_on(
                path,
                lambda channel: reg.RegistrationStub(channel).get_info(
                    reg.InfoRequest(), timeout=GET_INFO_TIMEOUT_S
                ),
            )
        except (OSError, GRPCError, TimeoutError) as exc:
            self.refusals.append(f"{path.name}: GetInfo failed: {exc!r}")
            return
        refusal, service = choose_service(info)
        if not refusal:
            endpoint = Path(info.endpoint) if info.endpoint else path
            self.drivers[info.name] = Driver(info.name, endpoint, service, path)
        else:
            self.refusals.append(f"{path.name}: {refusal}")
        status = reg.RegistrationStatus(plugin_registered=not refusal, error=refusal)
        try:
            await call_on(
                path,
                lambda channel: reg.RegistrationStub(channel).notify_registration_status(
                    status, timeout=NOTIFY_TIMEOUT_S
                ),
            )
        except (OSError, GRPCError, TimeoutError) as exc:
            self.refusals.append(f"{path.name}: NotifyRegistrationStatus failed: {exc!r}")
            return
        if not refusal:  # counted once the plugin has heard the verdict
            self.registrations += 1

    def driver(self, name: str) -> Driver:
        """The current registration of ``name``; raises :class:`NotRegisteredError`."""
        try:
            return self.drivers[name]
        except KeyError:
            raise NotRegisteredError(
                f"DRA driver {name} is not registered (registered: {sorted(self.drivers)})"
            ) from None

    async def prepare(self, name: str, claims: Sequence[ClaimSpec]) -> dict[str, PrepareAnswer]:
        """NodePrepareResources of driver ``name`` for ``claims``; claim UID -> answer."""
        driver = self.driver(name)
        pb = driver.pb
        request = pb.NodePrepareResourcesRequest(claims=[_claim(pb, c) for c in claims])
        response = await call_on(
            driver.endpoint,
            lambda channel: pb.DraPluginStub(channel).node_prepare_resources(
                request, timeout=CALL_TIMEOUT_S
            ),
        )
        _check_complete(name, "NodePrepareResources", claims, response.claims)
        return {
            uid: PrepareAnswer(
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
            for uid, result in response.claims.items()
        }

    async def unprepare(self, name: str, claims: Sequence[ClaimSpec]) -> dict[str, str]:
        """NodeUnprepareResources of driver ``name``; claim UID -> error ("" on success)."""
        driver = self.driver(name)
        pb = driver.pb
        request = pb.NodeUnprepareResourcesRequest(claims=[_claim(pb, c) for c in claims])
        response = await call_on(
            driver.endpoint,
            lambda channel: pb.DraPluginStub(channel).node_unprepare_resources(
                request, timeout=CALL_TIMEOUT_S
            ),
        )
        _check_complete(name, "NodeUnprepareResources", claims, response.claims)
        return {uid: result.error for uid, result in response.claims.items()}


def _claim(pb: ModuleType, claim: ClaimSpec) -> Any:
    return pb.Claim(namespace=claim.namespace, uid=claim.uid, name=claim.name)


def _check_complete(
    driver: str, call: str, wanted: Sequence[ClaimSpec], answered: dict[str, Any]
) -> None:
    missing = sorted({c.uid for c in wanted} - set(answered))
    if missing:
        raise MissingClaimsError(f"{driver} answered {call} without claims {missing}")
