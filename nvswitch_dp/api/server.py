"""Serving the REST API on Hypercorn with a bounded number of connections.

Why not ``hypercorn.trio.serve``: its accept loop (``trio.serve_listeners``) takes every
connection it is offered, so the network side of the daemon could hold every file
descriptor of the process (a flood of idle connections: FM's ``fmpm`` runs, PodResources
and the kubelet's plugin connections then fail with EMFILE). This module runs the same
pieces (Hypercorn's lifespan, ``TCPServer`` per connection, TLS through ``SSLStream``)
under its own accept loop, which keeps these rules:

1. At most ``limit`` connections are open at once (``api.max_connections``, lowered to
   what the descriptor limit leaves after the kubelet/FM reserve; see
   :mod:`nvswitch_dp.limits`). One more is accepted and closed at once with a reset, so
   it frees its descriptor immediately and the client sees a refusal, not a hang; each
   is counted in ``hgx_h200_api_connections_refused_total{reason="limit"}``.
2. EMFILE, ENFILE, ENOBUFS or ENOMEM from ``accept`` is a back-off (100 ms doubling to
   1 s) and retry, counted (``reason="descriptors"``) and logged at most every 10 s,
   never an exception into the daemon's nursery.
3. Deadlines: a connection with no request in flight is closed after
   :data:`IDLE_TIMEOUT` seconds (Hypercorn's keep-alive timer, which also bounds slow
   headers: a request only stops the timer once its headers are complete; it is also
   what ends a connection its client closed while idle, so such a connection keeps its
   slot and descriptor until then); no single
   read waits longer than :data:`READ_TIMEOUT`; bodies are bounded by
   :class:`api.asgi.WholeExchanges` (64 KiB within 10 s).
4. One connection's unexpected error is logged (rate-limited) and ends that connection
   only.

Ownership: :func:`serve_api` owns the listening sockets and every accepted connection;
all are closed when it is cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from functools import partial
from typing import Any

import hypercorn.config
import trio
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from nvswitch_dp.limits import CAPACITY_ERRNOS, RateLimitedLog
from nvswitch_dp.metrics import Metrics

__all__ = ["IDLE_TIMEOUT", "READ_TIMEOUT", "ConnectionGate", "serve_api"]

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 4.0  # under the 5 s in which a flood must have cleared (issue 16)
READ_TIMEOUT = 30
ACCEPT_BACKOFF_MIN_S = 0.1
ACCEPT_BACKOFF_MAX_S = 1.0
_LINGER_RESET = struct.pack("ii", 1, 0)


class ConnectionGate:
    """Counts the REST connections open now against ``limit``. Trio only.

    Errors: none; :meth:`admit` answers False beyond the limit and counts the refusal.
    """

    def __init__(self, limit: int, metrics: Metrics | None = None) -> None:
        if limit < 1:
            raise ValueError(f"the connection limit must be >= 1, got {limit}")
        self.limit = limit
        self.open = 0
        self.refused = 0
        self.metrics = metrics
        self._log = RateLimitedLog(log)

    def admit(self) -> bool:
        if self.open >= self.limit:
            self.refused += 1
            self._count("limit")
            self._log.log(
                logging.WARNING,
                "limit",
                "REST connection refused: %d connections open, the limit "
                "(api.max_connections, or what the descriptor limit leaves) is %d",
                self.open,
                self.limit,
            )
            return False
        self.open += 1
        self._gauge()
        return True

    def release(self) -> None:
        self.open -= 1
        self._gauge()

    def out_of_descriptors(self, exc: OSError, retry_in: float) -> None:
        self._count("descriptors")
        self._log.log(
            logging.ERROR,
            "descriptors",
            "REST accept failed: %s; retrying in %.1fs (raise the process's file "
            "descriptor limit, or lower api.max_connections)",
            exc.strerror or exc,
            retry_in,
        )

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.api_connections_refused.labels(reason=reason).inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.api_connections.set(self.open)


def rest_config(config: hypercorn.config.Config) -> hypercorn.config.Config:
    """``config`` with this module's deadlines (rule 3); the daemon's ``api_config``
    applies it, tests may set their own."""
    config.keep_alive_timeout = IDLE_TIMEOUT
    config.read_timeout = READ_TIMEOUT
    return config


async def serve_api(
    app: Any,
    config: hypercorn.config.Config,
    gate: ConnectionGate,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` on ``config.bind`` until cancelled (rules in the module
    docstring). ``task_status.started`` receives the bound URLs.

    Resource handling: the listening sockets and every accepted connection belong to
    this task and are closed when it ends. Error handling: a socket that cannot be bound
    (``OSError``) or a bad TLS certificate (``ssl.SSLError``) raises before ``started``;
    after it, only cancellation ends the task.
    """
    config.set_statsd_logger_class(StatsdLogger)
    app = wrap_app(app, config.wsgi_max_body_size, None)  # as hypercorn.trio.serve does
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)
    ssl_context = config.create_ssl_context() if config.ssl_enabled else None
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        sockets = config.create_sockets()
        raw = [*sockets.secure_sockets, *sockets.insecure_sockets]
        listeners = []
        binds = []
        scheme = "https" if ssl_context is not None else "http"
        for sock in raw:
            sock.listen(config.backlog)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            binds.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")
        try:
            async with trio.open_nursery() as connections:
                handle = partial(
                    _serve_connection,
                    partial(TCPServer, app, config, context),
                    lifespan_state,
                    ssl_context,
                    gate,
                )
                for listener in listeners:
                    connections.start_soon(_accept_loop, listener, gate, handle, connections)
                task_status.started(binds)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
            lifespan_nursery.cancel_scope.cancel()


async def _accept_loop(
    listener: trio.abc.Listener[trio.SocketStream],
    gate: ConnectionGate,
    handle: Any,
    nursery: trio.Nursery,
) -> None:
    backoff = ACCEPT_BACKOFF_MIN_S
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            gate.out_of_descriptors(exc, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX_S)
            continue
        backoff = ACCEPT_BACKOFF_MIN_S
        if not gate.admit():
            _reset(stream)
            continue
        nursery.start_soon(handle, stream)


def _reset(stream: trio.SocketStream) -> None:
    """Close at once with a reset: no TIME_WAIT, the descriptor is free now."""
    # The peer may already be gone; closing is all that matters.
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    stream.socket.close()


_connection_errors = RateLimitedLog(log)


async def _serve_connection(
    server: Any,
    lifespan_state: LifespanState,
    ssl_context: Any,
    gate: ConnectionGate,
    stream: trio.SocketStream,
) -> None:
    try:
        transport: Any = stream
        if ssl_context is not None:
            transport = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
        await server(ConnectionState(lifespan_state.copy()), transport)
    except Exception as exc:  # one connection's failure must not end the REST server
        _connection_errors.log(logging.ERROR, type(exc).__name__, "REST connection failed: %r", exc)
    finally:
        gate.release()
        with trio.CancelScope(shield=True):
            await stream.aclose()
