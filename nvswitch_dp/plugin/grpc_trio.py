"""grpclib (asyncio) inside Trio: the one adapter between the two domains.

grpclib runs on the asyncio loop that ``trio_asyncio.open_loop()`` provides above the
daemon's nursery. This module starts and stops grpclib servers and makes grpclib client
calls on behalf of Trio code; nothing else in the project calls ``aio_as_trio``.

grpclib's ``Server.close()`` stops accepting and cancels running handlers but leaves
accepted connections open, so a kubelet's ListAndWatch would hang on shutdown. The
server here remembers its connections' transports and closes them too.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import trio
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server
from trio_asyncio import aio_as_trio

from nvswitch_dp.limits import RateLimitedLog

T = TypeVar("T")

# Long enough for in-flight unary calls to answer; short enough to exit within 3 s.
CLOSE_GRACE_S = 1.0


class _TrackedProtocol(H2Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        super().connection_made(transport)


# The largest request the kubelet's calls need is a few KiB (an Allocate of 256 device
# IDs is about 10 KiB); grpclib itself sets no limit, and decoding a 4 MB message of
# 300,000 IDs holds the event loop for over a second.
MAX_MESSAGE_BYTES = 256 * 1024


class BoundedProtoCodec(ProtoCodec):
    """grpclib's protobuf codec, refusing to decode a message over ``max_bytes``.

    Errors: ``GRPCError(RESOURCE_EXHAUSTED)`` naming both sizes, raised inside the
    handler's ``recv_message``, so grpclib answers it as the call's status and the
    connection and every other call go on.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self.max_bytes:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"request of {len(data)} bytes; at most {self.max_bytes} are accepted "
                "(send each device once)",
            )
        return super().decode(data, message_type)


class ClosingServer(Server):
    """A grpclib Server whose ``close_connections`` closes accepted connections, and
    whose requests are bounded (:class:`BoundedProtoCodec`)."""

    def __init__(self, handlers: Sequence[Any]) -> None:
        super().__init__(list(handlers), codec=BoundedProtoCodec())
        self._protocols: weakref.WeakSet[_TrackedProtocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        base = super()._protocol_factory()
        tracked = _TrackedProtocol(base.handler, base.config, base.h2_config)
        self._protocols.add(tracked)
        return tracked

    def close_connections(self) -> None:
        for protocol in list(self._protocols):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.close()


log = logging.getLogger(__name__)
_os_errors = RateLimitedLog(log)


def tolerate_os_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Make an ``OSError`` that asyncio reports to the loop's exception handler a log
    line instead of an exception in the daemon's nursery.

    trio-asyncio's default handler re-raises whatever asyncio reports into the nursery
    that holds the loop, which ends the daemon. asyncio reports OS errors it has
    already dealt with: EMFILE/ENFILE on a server's ``accept`` (it stops accepting and
    retries after a second, so the kubelet's connection waits rather than fails), and a
    transport's fatal read/write error (that one connection is closed). Neither is a
    reason to stop serving every other resource. Anything else still goes to the
    default handler: it is a bug we want to see.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError):
            message = context.get("message", "asyncio reported an OS error")
            _os_errors.log(
                logging.ERROR,
                f"{message}:{exc.errno}",
                "gRPC side: %s: %s (asyncio retries accepting after 1 s; the daemon keeps serving)",
                message,
                exc.strerror or exc,
            )
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def _unlink_socket(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


@asynccontextmanager
async def serving(handlers: Sequence[Any], socket_path: Path) -> AsyncIterator[ClosingServer]:
    """Serve ``handlers`` on Unix socket ``socket_path`` for the body of the block.

    Resource handling: a stale socket file is removed first; on exit the server stops
    accepting, open connections (ListAndWatch streams) are closed, handlers get
    ``CLOSE_GRACE_S`` to finish, and the socket file is removed. Errors: ``OSError``
    when the socket cannot be bound.
    """
    _unlink_socket(socket_path)
    server = ClosingServer(handlers)
    await aio_as_trio(server.start)(path=str(socket_path))
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_GRACE_S
            server.close()
            server.close_connections()
            await aio_as_trio(server.wait_closed)()
        _unlink_socket(socket_path)


async def call_aio(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """Await an asyncio coroutine function (a grpclib client call) from Trio."""
    result: T = await aio_as_trio(fn)(*args)
    return result


async def on_channel_aio(path: Path, call: Callable[[Channel], Awaitable[T]]) -> T:
    """Asyncio side: open a channel to the Unix socket ``path``, await ``call`` on it,
    close it. A channel per call: nothing is shared between calls, so a peer that
    restarted between two of them is simply dialled afresh. Errors: whatever the call
    raises (``OSError`` when nothing serves ``path``, ``grpclib.GRPCError``,
    ``asyncio.TimeoutError``)."""
    channel = Channel(path=str(path))
    try:
        return await call(channel)
    finally:
        channel.close()


async def call_on(path: Path, call: Callable[[Channel], Awaitable[T]]) -> T:
    """Trio side of :func:`on_channel_aio`; raises what it raises."""
    return await call_aio(on_channel_aio, path, call)


__all__ = ["ClosingServer", "call_aio", "call_on", "on_channel_aio", "serving"]
