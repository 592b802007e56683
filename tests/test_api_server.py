"""The REST server's bounds (nvswitch_dp/api/server.py), the descriptor budget (limits.py),
the asyncio error policy (plugin/grpc_trio.py) and clipped echoes (nvswitch_dp/echo.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import trio_asyncio
from test_api import make_api

from nvswitch_dp.api.server import ConnectionGate, _accept_loop, serve_api
from nvswitch_dp.config import ApiConfig
from nvswitch_dp.core import api_config
from nvswitch_dp.echo import clipped
from nvswitch_dp.limits import (
    FD_RESERVE,
    MIN_REST_CONNECTIONS,
    RateLimitedLog,
    rest_connection_limit,
)
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.plugin.grpc_trio import tolerate_os_errors

GET = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``predicate``: the counters under test have no event to wait on."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


@asynccontextmanager
async def served(tmp_path: Path, gate: ConnectionGate) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        api = await make_api(tmp_path, nursery)
        config = api_config(ApiConfig(listen="127.0.0.1:0"))
        binds = await nursery.start(serve_api, api.app, config, gate)
        yield int(binds[0].rpartition(":")[2])
        nursery.cancel_scope.cancel()


async def answered(port: int) -> bool:
    """Whether a GET on a new connection is answered (False: reset or closed)."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False  # reset before the connect call even returned
    try:
        await stream.send_all(GET)
        with trio.fail_after(5):
            data = await stream.receive_some(65536)
        return data.startswith(b"HTTP/1.1 200")
    except trio.BrokenResourceError:
        return False  # reset by the server
    finally:
        await stream.aclose()


async def test_connections_beyond_the_limit_are_reset_and_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    gate = ConnectionGate(3, metrics)
    async with served(tmp_path, gate) as port:
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        await until(lambda: gate.open == 3)  # accepted (the server runs in this process)
        assert not await answered(port)
        assert gate.refused == 1
        assert b'hgx_h200_api_connections_refused_total{reason="limit"} 1.0' in (
            metrics.exposition()
        )
        await idle.pop().aclose()
        # Hypercorn ends a connection whose client left only when its keep-alive timer
        # fires (IDLE_TIMEOUT, 4 s): the slot, and the descriptor, are held until then.
        await until(lambda: gate.open < 3, seconds=10)
        assert await answered(port)
        for stream in idle:
            await stream.aclose()


async def test_an_idle_connection_is_closed_by_the_server(tmp_path: Path) -> None:
    gate = ConnectionGate(8)
    async with served(tmp_path, gate) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):  # IDLE_TIMEOUT is 4 s
            assert await stream.receive_some(10) == b""
        await stream.aclose()
        await until(lambda: gate.open == 0)


class ExhaustedListener(trio.abc.Listener[trio.SocketStream]):
    """A listener whose ``accept`` fails with EMFILE ``failures`` times, then hangs."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def accept(self) -> trio.SocketStream:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


async def test_emfile_on_accept_backs_off_logs_once_and_never_raises(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    gate = ConnectionGate(8, metrics)
    listener = ExhaustedListener(failures=20)
    async with trio.open_nursery() as nursery:
        begin = trio.current_time()
        nursery.start_soon(_accept_loop, listener, gate, None, nursery)
        await until(lambda: listener.calls > 20, seconds=60)
        elapsed = trio.current_time() - begin
        nursery.cancel_scope.cancel()
    # 0.1, 0.2, 0.4, 0.8, then 1 s each: backed off, not spinning.
    assert elapsed >= 0.1 + 0.2 + 0.4 + 0.8 + 16 * 1.0
    lines = [r for r in caplog.records if "REST accept failed" in r.getMessage()]
    assert 1 <= len(lines) <= 3  # rate-limited: one per 10 s
    assert b'hgx_h200_api_connections_refused_total{reason="descriptors"} 20.0' in (
        metrics.exposition()
    )


async def test_an_os_error_asyncio_reports_is_a_log_line_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with trio_asyncio.open_loop() as loop:
        tolerate_os_errors(loop)
        for _ in range(5):
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                }
            )
        await trio.sleep(0.01)
    lines = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert len(lines) == 1


async def test_other_errors_asyncio_reports_still_reach_the_nursery() -> None:
    with pytest.RaisesGroup(ValueError, flatten_subgroups=True):
        async with trio_asyncio.open_loop() as loop:
            tolerate_os_errors(loop)
            loop.call_exception_handler({"message": "a bug", "exception": ValueError("bug")})
            await trio.sleep(1)
    assert isinstance(asyncio.get_event_loop_policy(), asyncio.AbstractEventLoopPolicy)


@pytest.mark.parametrize(
    ("configured", "soft", "in_use", "expected"),
    [
        (256, 1_048_576, 40, 256),  # plenty of descriptors: the configured cap
        (256, 256, 40, 256 - 40 - FD_RESERVE),  # a tight limit lowers it
        (256, 100, 40, MIN_REST_CONNECTIONS),  # never below the floor (probes, metrics)
        (4, 1024, 40, 4),
    ],
)
def test_rest_connection_limit(configured: int, soft: int, in_use: int, expected: int) -> None:
    assert rest_connection_limit(configured, soft, in_use) == expected


def test_rate_limited_log_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), period=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        written = [limited.log(logging.WARNING, "k", "flood %d", i) for i in range(100)]
        now[0] = 11.0
        assert limited.log(logging.WARNING, "k", "flood %d", 100)
        assert limited.log(logging.WARNING, "other", "different")
    assert written.count(True) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "flood 0",
        "flood 100 (99 more like this in the last 10s)",
        "different",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("partition-3", "partition-3"),
        ("x" * 100_000, "x" * 80 + "... (99920 more characters)"),
        ("a\nb", "a\\nb"),
    ],
)
def test_clipped(text: str, expected: str) -> None:
    assert clipped(text) == expected


async def test_a_plugin_socket_out_of_descriptors_is_retried_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A kubelet restart during a flood: the plugin socket must be served again once
    # descriptors are back, and the daemon must not end meanwhile.
    from nvswitch_dp.limits import open_fd_count
    from nvswitch_dp.plugin.lifecycle import serve_resource, socket_name

    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        api = await make_api(tmp_path, nursery)
        name = next(iter(api.controller.layout.resources))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fd_count() + 8, hard))
        try:
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
            nursery.start_soon(
                serve_resource, api.controller, name, plugin_dir, api.controller.metrics
            )
            await trio.sleep(0.5)
            assert not (plugin_dir / socket_name(name)).exists()
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await until(lambda: (plugin_dir / socket_name(name)).exists())
        nursery.cancel_scope.cancel()
    assert any("cannot serve" in r.getMessage() for r in caplog.records)
