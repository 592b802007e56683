"""The REST API over real HTTP/1.1: the app served by Hypercorn on 127.0.0.1, as the daemon
serves it (``api_config``, ``api.server.serve_api``), driven byte by byte from a raw socket.

What these guard: a keep-alive connection either answers its next request or is closed,
never hangs, whatever the app answers before the body has arrived (401/403/404/405), and
no request leaves a task or a socket behind (``/healthz`` ``tasks`` comes back to where it
was). Bodies are bounded (413, 408) and absurdly nested JSON is a 400, never a 500.

The ``fail_after`` bounds are hang detectors, not speed requirements: a healthy server
answers a loopback request in milliseconds, a broken one never does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_api import TOKEN, make_api

from nvswitch_dp.api.server import ConnectionGate, serve_api
from nvswitch_dp.config import ApiConfig
from nvswitch_dp.core import api_config

HANG = 1.0  # seconds: far above a loopback answer, far below a test timeout
AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """One TCP connection to the server; requests are written as given, answers parsed
    just enough (status line, headers, ``Content-Length`` body). Owns its stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        """Write ``data``; a server that closed the connection is not an error here (the
        next :meth:`reply` says None)."""
        with contextlib.suppress(trio.BrokenResourceError):
            await self.stream.send_all(data)

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset: the server closed with our bytes unread
            return False
        self.buffer += data
        return bool(data)

    async def reply(self) -> Reply | None:
        """The next answer, or None when the server closed the connection first."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not await self._fill():
                raise AssertionError(f"connection closed inside a body: {self.buffer!r}")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Reply(int(status_line.split()[1]), headers, body)

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Server:
    host: str
    port: int

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[RawConnection]:
        connection = RawConnection(await trio.open_tcp_stream(self.host, self.port))
        try:
            yield connection
        finally:
            await connection.aclose()

    async def tasks(self) -> int:
        """``/healthz`` ``tasks`` once every task is blocked (teardown of closed
        connections finished), on a connection of its own."""
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        async with self.connect() as connection:
            await connection.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            with trio.fail_after(HANG):
                reply = await connection.reply()
        assert reply is not None and reply.status == 200
        tasks: int = reply.json()["tasks"]
        return tasks


@asynccontextmanager
async def served(
    tmp_path: Path, keep_alive: float | None = None, **options: Any
) -> AsyncIterator[Server]:
    """The app of :func:`test_api.make_api` (``options`` go to ``create_app``) served by
    Hypercorn with the daemon's configuration on an ephemeral 127.0.0.1 port."""
    async with trio.open_nursery() as nursery:
        api = await make_api(tmp_path, nursery, **options)
        config = api_config(ApiConfig(listen="127.0.0.1:0"))
        if keep_alive is not None:
            config.keep_alive_timeout = keep_alive
        binds = await nursery.start(serve_api, api.app, config, ConnectionGate(64))
        host, _, port = binds[0].removeprefix("http://").rpartition(":")
        yield Server(host, int(port))
        nursery.cancel_scope.cancel()


def head(method: str, path: str, *extra: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: t", *extra]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


FORCE = b'{"force": false}'  # 16 bytes
assert len(FORCE) == 16


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        pytest.param(
            head("POST", "/v1/partitions/86994/deactivate", AUTH.strip(), length=16),
            404,
            id="404-unknown-partition",
        ),
        pytest.param(
            head("POST", "/v1/partitions/8/deactivate", length=16), 401, id="401-no-token"
        ),
        pytest.param(head("PUT", "/v1/partitions/8", length=16), 405, id="405-method"),
    ],
)
async def test_an_answer_before_the_body_leaves_the_connection_usable_or_closed(
    tmp_path: Path, request_head: bytes, status: int
) -> None:
    """Headers only; the body later, in a write of its own (as requests/urllib3 do); then
    the next request on the same connection. Whenever the answer comes (a server that
    answers before the body must still cope), the next request is answered, or the
    connection closed, and no task is left over."""
    async with served(tmp_path) as server:
        before = await server.tasks()
        async with server.connect() as connection:
            await connection.send(request_head)
            # A client in another process sends its body some time after its headers;
            # here the server shares our event loop, so let it do all it would meanwhile
            # (an early answer included) before the body goes out.
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            await connection.send(FORCE)
            await connection.send(b"GET /v1/partitions/8 HTTP/1.1\r\nHost: t\r\n\r\n")
            with trio.fail_after(HANG):
                first = await connection.reply()
                second = await connection.reply() if first is not None else None
            if first is not None:
                assert first.status == status, first
                assert first.headers["content-type"] == "application/problem+json"
            assert second is None or second.status == 200, second
            if second is not None:
                assert second.json()["id"] == 8
        assert await server.tasks() == before


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    tmp_path: Path,
) -> None:
    """After a complete exchange the connection is idle: Hypercorn's keep-alive timer
    must run again (it is restarted from inside the app's last send) and close it."""
    async with served(tmp_path, keep_alive=0.2) as server:
        before = await server.tasks()
        async with server.connect() as connection:
            await connection.send(b"GET /v1/partitions/8 HTTP/1.1\r\nHost: t\r\n\r\n")
            with trio.fail_after(HANG):
                reply = await connection.reply()
            assert reply is not None and reply.status == 200
            with trio.fail_after(HANG):
                assert await connection.reply() is None
        assert await server.tasks() == before


async def test_a_body_nested_100000_deep_is_refused_with_a_problem_not_a_500(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as server, server.connect() as connection:
        body = b"[" * 100_000 + b"]" * 100_000
        request = head("POST", "/v1/partitions/2/deactivate", AUTH.strip(), length=len(body))
        await connection.send(request + body)
        with trio.fail_after(HANG):
            reply = await connection.reply()
        assert reply is not None and reply.status in (400, 413), reply
        assert reply.headers["content-type"] == "application/problem+json"


async def test_a_deep_body_within_the_size_limit_is_a_400_problem(tmp_path: Path) -> None:
    async with served(tmp_path) as server, server.connect() as connection:
        body = b"[" * 20_000 + b"]" * 20_000  # 40,000 bytes: under the limit
        request = head("POST", "/v1/partitions/2/deactivate", AUTH.strip(), length=len(body))
        await connection.send(request + body)
        with trio.fail_after(HANG):
            reply = await connection.reply()
        assert reply is not None and reply.status == 400, reply
        problem = reply.json()
        assert problem["type"].endswith("/invalid-request")
        assert "deeper than 16" in problem["detail"]


async def test_a_declared_body_over_the_limit_is_413_without_waiting_for_it(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as server:
        before = await server.tasks()
        async with server.connect() as connection:
            request = head("POST", "/v1/partitions/2/deactivate", AUTH.strip(), length=70_000)
            await connection.send(request)
            with trio.fail_after(HANG):
                reply = await connection.reply()
                assert reply is not None and reply.status == 413, reply
                assert reply.headers["connection"] == "close"
                assert reply.json()["max_bytes"] == 65536
                assert await connection.reply() is None  # closed: the body is not read
        assert await server.tasks() == before


async def test_a_chunked_body_over_the_limit_is_413_and_the_connection_closed(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as server:
        before = await server.tasks()
        async with server.connect() as connection:
            request = head(
                "POST",
                "/v1/partitions/2/deactivate",
                AUTH.strip(),
                "Content-Type: application/json",
                "Transfer-Encoding: chunked",
            )
            chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"  # 16 KiB each
            await connection.send(request + chunk * 5)
            with trio.fail_after(HANG):
                reply = await connection.reply()
                assert reply is not None and reply.status == 413, reply
                assert reply.json()["type"].endswith("/content-too-large")
                assert await connection.reply() is None
        assert await server.tasks() == before


async def test_a_body_that_stops_arriving_is_408_and_the_connection_closed(
    tmp_path: Path,
) -> None:
    async with served(tmp_path, body_timeout=0.2) as server:
        before = await server.tasks()
        async with server.connect() as connection:
            request = head("POST", "/v1/partitions/2/deactivate", AUTH.strip(), length=16)
            await connection.send(request + FORCE[:5])
            with trio.fail_after(HANG):
                reply = await connection.reply()
                assert reply is not None and reply.status == 408, reply
                assert reply.headers["connection"] == "close"
                assert "5 bytes received" in reply.json()["detail"]
                assert await connection.reply() is None
        assert await server.tasks() == before


async def test_many_keep_alive_exchanges_with_split_bodies_leave_nothing_behind(
    tmp_path: Path,
) -> None:
    """The normal case, repeated: split body, answer, next request; 50 on one connection."""
    async with served(tmp_path, rest_rate=None) as server:
        before = await server.tasks()
        async with server.connect() as connection:
            for _ in range(50):
                await connection.send(head("POST", "/v1/partitions/8/deactivate", length=16))
                await trio.testing.wait_all_tasks_blocked(cushion=0.001)
                await connection.send(FORCE)
                with trio.fail_after(HANG):
                    reply = await connection.reply()
                assert reply is not None and reply.status == 401
        assert await server.tasks() == before


async def test_a_client_that_leaves_inside_its_body_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as server:
        before = await server.tasks()
        async with server.connect() as connection:
            request = head("POST", "/v1/partitions/2/deactivate", AUTH.strip(), length=16)
            await connection.send(request + FORCE[:5])
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        assert await server.tasks() == before
