"""Serve one resource's DevicePlugin, register it with the kubelet, and keep it so.

A kubelet that restarts deletes every socket in the device-plugin directory and comes
back with a new ``kubelet.sock``; until we register again our resources read as
capacity 0. So each resource runs this loop:

    serve on our socket -> wait for kubelet.sock -> register (retry with backoff)
      -> watch: our socket removed, or kubelet.sock replaced -> close and start over

The watch polls ``stat`` every ``POLL_S``: cheap, and it sees both events the kubelet
gives (removal of our socket, a new kubelet.sock inode) with the same code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from nvswitch_dp.files import file_identity
from nvswitch_dp.limits import CAPACITY_ERRNOS, RateLimitedLog
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.plugin.grpc_trio import call_on, serving
from nvswitch_dp.plugin.service import DevicePluginService
from nvswitch_dp.ports import KubeletSide
from nvswitch_dp.proto import v1beta1 as dp

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
POLL_S = 0.1
REGISTER_TIMEOUT_S = 15.0  # the kubelet dials back for up to 10 s inside Register
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
BIND_BACKOFF_MIN_S = 0.1
BIND_BACKOFF_MAX_S = 2.0
_bind_errors = RateLimitedLog(log)


def socket_name(resource: str) -> str:
    """Our socket's file name for ``resource`` (relative to the plugin directory)."""
    return "nvswitch-dp-" + resource.rsplit("/", 1)[-1] + ".sock"


async def register(plugin_dir: Path, resource: str, endpoint: str) -> None:
    """Call Registration.Register on ``kubelet.sock``. Raises ``OSError``/``GRPCError``."""

    request = dp.RegisterRequest(
        version=API_VERSION,
        endpoint=endpoint,
        resource_name=resource,
        options=dp.DevicePluginOptions(get_preferred_allocation_available=True),
    )
    await call_on(
        plugin_dir / KUBELET_SOCKET,
        lambda channel: dp.RegistrationStub(channel).register(request, timeout=REGISTER_TIMEOUT_S),
    )


async def register_with_backoff(plugin_dir: Path, resource: str, endpoint: str) -> None:
    """Register until it succeeds; a kubelet still starting refuses at first.

    Cancelled only from outside.
    """
    delay = BACKOFF_FIRST_S
    while True:
        try:
            await register(plugin_dir, resource, endpoint)
            return
        except Exception as exc:  # any failure: kubelet not ready yet, or restarting
            log.warning("registering %s failed (%s); retrying in %.2fs", resource, exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)


async def wait_for_kubelet(plugin_dir: Path) -> tuple[int, int, int]:
    """Wait until ``kubelet.sock`` exists; return its identity."""
    path = plugin_dir / KUBELET_SOCKET
    announced = False
    while (ident := file_identity(path)) is None:
        if not announced:
            log.info("waiting for the kubelet at %s", path)
            announced = True
        await trio.sleep(POLL_S)
    return ident


async def wait_for_restart(
    socket_path: Path, kubelet: Path, kubelet_id: tuple[int, int, int]
) -> str:
    """Return why we must serve and register again: our socket went, or a new kubelet.sock.

    A kubelet.sock that is merely absent is not a reason: a restarting kubelet deletes
    the directory's sockets before it creates its own, and serving again before that
    sweep would only have the new socket swept away.
    """
    while True:
        await trio.sleep(POLL_S)
        if not os.path.exists(socket_path):
            return "our socket was removed"
        ident = file_identity(kubelet)
        if ident is not None and ident != kubelet_id:
            return "a new kubelet.sock appeared"


async def _cancel_on_restart(
    scope: trio.CancelScope, reasons: list[str], socket_path: Path, kubelet_id: tuple[int, int, int]
) -> None:
    reasons.append(
        await wait_for_restart(socket_path, socket_path.parent / KUBELET_SOCKET, kubelet_id)
    )
    scope.cancel()


async def serve_resource(
    node: KubeletSide,
    resource: str,
    plugin_dir: Path,
    metrics: Metrics,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve and register ``resource`` until cancelled.

    Resource handling: owns the socket ``plugin_dir/socket_name(resource)``; it is
    served before ``task_status.started()`` and removed on exit. Error handling:
    registration failures are retried with backoff for as long as the kubelet and our
    socket stay the same; a change of either abandons the attempt and starts over.
    EMFILE/ENFILE/ENOBUFS/ENOMEM serving the socket is retried with backoff (0.1 s to
    2 s, logged at most every 10 s); any other ``OSError`` binding the socket propagates
    and stops the daemon.
    """
    endpoint = socket_name(resource)
    socket_path = plugin_dir / endpoint
    service = DevicePluginService(node, resource, metrics)
    started = False
    backoff = BIND_BACKOFF_MIN_S
    while True:
        try:
            async with serving([service], socket_path):
                backoff = BIND_BACKOFF_MIN_S
                if not started:
                    task_status.started()
                    started = True
                kubelet_id = await wait_for_kubelet(plugin_dir)
                reasons: list[str] = []
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(
                            _cancel_on_restart,
                            nursery.cancel_scope,
                            reasons,
                            socket_path,
                            kubelet_id,
                        )
                        await register_with_backoff(plugin_dir, resource, endpoint)
                        node.set_registered(resource, True)
                        log.info("registered %s with the kubelet (endpoint %s)", resource, endpoint)
                finally:
                    node.set_registered(resource, False)
                log.info("%s: %s; serving and registering again", resource, reasons[0])
        except OSError as exc:
            # Out of descriptors or memory when the socket is served again (a kubelet
            # restart during a flood): wait and retry rather than end the daemon. Any
            # other error binding the socket is a configuration problem and propagates.
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            _bind_errors.log(
                logging.ERROR,
                resource,
                "cannot serve %s on %s: %s; retrying in %.1fs",
                resource,
                socket_path,
                exc.strerror,
                backoff,
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BIND_BACKOFF_MAX_S)
