"""The kubelet edge of DRA mode: plugin registration and the DRAPlugin service.

Two grpclib servers, both under Trio through :func:`nvswitch_dp.plugin.grpc_trio.serving`:

- ``Registration`` (package ``pluginregistration``) on
  ``<plugin-registry-dir>/<driver>-reg.sock``. The kubelet's plugin watcher notices the
  socket, calls GetInfo (type ``DRAPlugin``, name = the driver, endpoint = the DRAPlugin
  socket, supported versions ``v1.DRAPlugin`` then ``v1beta1.DRAPlugin``: the kubelet
  takes the first entry it supports, so the newer goes first), then tells us the outcome
  with NotifyRegistrationStatus.
- ``DRAPlugin`` v1 and v1beta1 (same handler, same socket) on
  ``<dra-plugin-dir>/dra.sock``; a kubelet of 1.32/1.33 speaks only v1beta1.

A restarted kubelet dials the registration socket again (it does not delete the sockets
in the registry directory); that needs nothing from us but an answer. A removed socket
(an operator, a cleanup) is served afresh, which the kubelet sees as a new plugin.

Handlers run on the asyncio side (grpclib) and hop to Trio once per call, where
:class:`~nvswitch_dp.dra.driver.DraDriver` does the work; they never fail a call for a
claim's own problem (that goes in the claim's ``error``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from trio_asyncio import trio_as_aio

from nvswitch_dp.dra.driver import ClaimRef, DraDriver, PrepareResult
from nvswitch_dp.files import file_identity
from nvswitch_dp.plugin.grpc_trio import serving
from nvswitch_dp.proto import pluginregistration as reg
from nvswitch_dp.proto.k8s.io.kubelet.pkg.apis.dra import v1 as dra_v1
from nvswitch_dp.proto.k8s.io.kubelet.pkg.apis.dra import v1beta1 as dra_v1beta1

log = logging.getLogger(__name__)

PLUGIN_TYPE = "DRAPlugin"
# "<proto package version>.<service>", as the kubelet's DRA plugin manager reads them.
SUPPORTED_VERSIONS = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
DRA_SOCKET = "dra.sock"
REGISTRATION_SUFFIX = "-reg.sock"
DEFAULT_PLUGIN_REGISTRY_DIR = Path("/var/lib/kubelet/plugins_registry")
DEFAULT_PLUGINS_DIR = Path("/var/lib/kubelet/plugins")
POLL_S = 0.1


def registration_socket(registry_dir: Path, driver_name: str) -> Path:
    """``<registry_dir>/<driver>-reg.sock``."""
    return registry_dir / f"{driver_name}{REGISTRATION_SUFFIX}"


def default_plugin_dir(driver_name: str) -> Path:
    """``/var/lib/kubelet/plugins/<driver>``, the conventional DRA plugin directory."""
    return DEFAULT_PLUGINS_DIR / driver_name


# -- registration --------------------------------------------------------------------


@dataclass
class RegistrationState:
    """What the kubelet last told us about our registration (for ``/readyz``).

    ``registered`` is None until the kubelet has answered since the registration socket
    was (re)served, then its verdict; ``error`` is the kubelet's reason on a refusal.
    Written by the Registration handler and the serve task (one thread), read by anyone.
    """

    registered: bool | None = None
    error: str = ""
    info_calls: int = 0
    notifications: int = 0
    served_at: float = field(default_factory=time.monotonic)

    @property
    def problem(self) -> str | None:
        """Why DRA mode is not ready, or None when the kubelet accepted us."""
        if self.registered is None:
            return "waiting for the kubelet to register the DRA plugin"
        if not self.registered:
            return f"the kubelet refused the DRA plugin: {self.error}"
        return None

    def reset(self) -> None:
        self.registered = None
        self.error = ""
        self.served_at = time.monotonic()


class RegistrationService(reg.RegistrationBase):
    """``pluginregistration.Registration``: who we are and where the DRAPlugin is served.

    Owns nothing; records the kubelet's verdict in ``state``.
    """

    def __init__(
        self,
        driver_name: str,
        endpoint: Path,
        state: RegistrationState,
        supported_versions: Sequence[str] = SUPPORTED_VERSIONS,
    ) -> None:
        self.driver_name = driver_name
        self.endpoint = endpoint
        self.state = state
        self.supported_versions = list(supported_versions)

    async def get_info(self, message: reg.InfoRequest) -> reg.PluginInfo:
        self.state.info_calls += 1
        return reg.PluginInfo(
            type=PLUGIN_TYPE,
            name=self.driver_name,
            endpoint=str(self.endpoint),
            supported_versions=list(self.supported_versions),
        )

    async def notify_registration_status(
        self, message: reg.RegistrationStatus
    ) -> reg.RegistrationStatusResponse:
        self.state.notifications += 1
        self.state.registered = message.plugin_registered
        self.state.error = message.error
        if message.plugin_registered:
            log.info("the kubelet registered DRA driver %s", self.driver_name)
        else:
            log.error("the kubelet refused DRA driver %s: %s", self.driver_name, message.error)
        return reg.RegistrationStatusResponse()


# -- DRAPlugin -----------------------------------------------------------------------


class _DraHandlers:
    """The one implementation behind both API versions; ``pb`` is the version's module."""

    def __init__(self, driver: DraDriver, pb: Any) -> None:
        self.driver = driver
        self.pb = pb

    async def prepare(self, message: Any) -> Any:
        refs = [ClaimRef(c.namespace, c.uid, c.name) for c in message.claims]
        results: dict[str, PrepareResult] = await trio_as_aio(self.driver.prepare)(refs)
        pb = self.pb
        return pb.NodePrepareResourcesResponse(
            claims={
                uid: pb.NodePrepareResourceResponse(
                    devices=[
                        pb.Device(
                            request_names=list(d.requests),
                            pool_name=d.pool,
                            device_name=d.device,
                            cdi_device_ids=list(d.cdi_device_ids),
                        )
                        for d in result.devices
                    ],
                    error=result.error,
                )
                for uid, result in results.items()
            }
        )

    async def unprepare(self, message: Any) -> Any:
        refs = [ClaimRef(c.namespace, c.uid, c.name) for c in message.claims]
        errors: dict[str, str] = await trio_as_aio(self.driver.unprepare)(refs)
        pb = self.pb
        return pb.NodeUnprepareResourcesResponse(
            claims={uid: pb.NodeUnprepareResourceResponse(error=e) for uid, e in errors.items()}
        )


class DraPluginV1(dra_v1.DraPluginBase):
    """``k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin``; borrows the driver."""

    def __init__(self, driver: DraDriver) -> None:
        self._handlers = _DraHandlers(driver, dra_v1)

    async def node_prepare_resources(
        self, message: dra_v1.NodePrepareResourcesRequest
    ) -> dra_v1.NodePrepareResourcesResponse:
        response: dra_v1.NodePrepareResourcesResponse = await self._handlers.prepare(message)
        return response

    async def node_unprepare_resources(
        self, message: dra_v1.NodeUnprepareResourcesRequest
    ) -> dra_v1.NodeUnprepareResourcesResponse:
        response: dra_v1.NodeUnprepareResourcesResponse = await self._handlers.unprepare(message)
        return response


class DraPluginV1beta1(dra_v1beta1.DraPluginBase):
    """``k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin``; borrows the driver."""

    def __init__(self, driver: DraDriver) -> None:
        self._handlers = _DraHandlers(driver, dra_v1beta1)

    async def node_prepare_resources(
        self, message: dra_v1beta1.NodePrepareResourcesRequest
    ) -> dra_v1beta1.NodePrepareResourcesResponse:
        response: dra_v1beta1.NodePrepareResourcesResponse = await self._handlers.prepare(message)
        return response

    async def node_unprepare_resources(
        self, message: dra_v1beta1.NodeUnprepareResourcesRequest
    ) -> dra_v1beta1.NodeUnprepareResourcesResponse:
        response: dra_v1beta1.NodeUnprepareResourcesResponse = await self._handlers.unprepare(
            message
        )
        return response


# -- the serve task ------------------------------------------------------------------


async def _wait_changed(paths: Sequence[Path]) -> str:
    """Return once one of ``paths`` is removed or replaced by another file."""
    before = {path: file_identity(path) for path in paths}
    while True:
        await trio.sleep(POLL_S)
        for path, ident in before.items():
            now = file_identity(path)
            if now is None:
                return f"{path} was removed"
            if now != ident:
                return f"{path} was replaced"


async def serve_dra_plugin(
    driver: DraDriver,
    *,
    registry_dir: Path,
    plugin_dir: Path,
    state: RegistrationState,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DRAPlugin (v1, v1beta1) and Registration until cancelled.

    The DRAPlugin socket is served first, so the endpoint GetInfo names answers as soon
    as the kubelet dials it; ``task_status.started()`` is called once both sockets are
    served. ``driver.start()`` must have run before.

    Resource handling: owns ``<plugin_dir>/dra.sock`` and
    ``<registry_dir>/<driver>-reg.sock`` (a stale file at either path is replaced;
    both are removed on exit, within grpc_trio's close grace) and creates both
    directories if missing. When either socket is removed or replaced, both are closed
    and served afresh and ``state`` is reset until the kubelet registers us again.

    Error handling: ``OSError`` binding a socket propagates (a wrong directory, no
    permission) and stops the daemon; nothing else is expected to escape.
    """
    plugin_dir.mkdir(parents=True, exist_ok=True)
    registry_dir.mkdir(parents=True, exist_ok=True)
    endpoint = plugin_dir / DRA_SOCKET
    reg_socket = registration_socket(registry_dir, driver.driver_name)
    services = [DraPluginV1(driver), DraPluginV1beta1(driver)]
    registration = RegistrationService(driver.driver_name, endpoint, state)
    started = False
    while True:
        async with serving(services, endpoint), serving([registration], reg_socket):
            state.reset()
            log.info(
                "DRA driver %s: serving %s, registration on %s",
                driver.driver_name,
                endpoint,
                reg_socket,
            )
            if not started:
                task_status.started()
                started = True
            reason = await _wait_changed([endpoint, reg_socket])
        log.warning("DRA driver %s: %s; serving both sockets again", driver.driver_name, reason)
        state.reset()


__all__ = [
    "DRA_SOCKET",
    "PLUGIN_TYPE",
    "SUPPORTED_VERSIONS",
    "DraPluginV1",
    "DraPluginV1beta1",
    "RegistrationService",
    "RegistrationState",
    "default_plugin_dir",
    "registration_socket",
    "serve_dra_plugin",
]
