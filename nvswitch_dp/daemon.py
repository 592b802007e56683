"""The daemon: one nursery tree, one shutdown path, two modes.

    trio.run(run_daemon)
    └── trio_asyncio.open_loop()            grpclib's asyncio loop, above everything
        └── daemon nursery
            ├── watch_signals               SIGTERM/SIGINT -> ShutdownError (first of all);
            │                               SIGHUP logged and ignored
            │   the shared start (core.py): wait for FM's first report, resume a
            │   restarted FM, join module IDs with sysfs, build the node machine
            ├── run_effects                 every FM call the node machine asks for
            ├── serve_api                   Quart-Trio on Hypercorn (nvswitch_dp/api/server.py:
            │                               connections capped, idle/read deadlines)
            ├── supervise_fabric            list FM every period (at once on trouble)
            ├── watch_gpu_health            VFIO state of every GPU
            │   device-plugin mode (plugin/mode.py):
            ├── watch_pod_resources         PodResources readings -> the machine
            └── serve_resource  x N         one grpclib server + registration per size
                DRA mode (dra/mode.py), instead of the two above:
                PoolPublisher.run, ClaimStatusWriter.run, serve_dra_plugin,
                DraDriver.watch_orphans

The signal watcher starts before anything else, so a signal while FM is still
unreachable at start ends the daemon cleanly too. A signal closes the change feed (every
ListAndWatch stream ends cleanly), then raises :class:`ShutdownError`, which cancels the
nursery; each task's cleanup (closing servers and removing sockets) runs under a
shielded deadline, and :func:`main_run` turns the ShutdownError into exit status 0. The
shape follows hypercorn's ``trio/run.py``.
"""

from __future__ import annotations

import errno
import logging
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import trio
import trio_asyncio

from nvswitch_dp.config import Config
from nvswitch_dp.controller import PartitionController
from nvswitch_dp.core import StartError
from nvswitch_dp.limits import raise_nofile_limit
from nvswitch_dp.plugin.grpc_trio import tolerate_os_errors

log = logging.getLogger(__name__)

STREAM_DRAIN_S = 0.05
_E = TypeVar("_E", bound=BaseException)


class ShutdownError(Exception):
    """Raised by :func:`watch_signals` to end the daemon's nursery; not an error."""


SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def watch_signals(
    on_signal: Callable[[], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Wait for SIGTERM or SIGINT, call ``on_signal``, raise :class:`ShutdownError`.

    SIGHUP is logged and ignored: the configuration is read once at start, so there is
    nothing to reload, and a hang-up (a closed terminal, a node agent's blanket signal)
    must not stop a daemon whose partitions VMs are using. Once shutdown begins, further
    SIGTERM/SIGINT/SIGHUP are ignored (:func:`_ignore_signals_while_stopping`), so a second
    Ctrl-C cannot interrupt the cleanup that removes the sockets; the cleanup is bounded by
    its own deadlines, and SIGKILL still ends the process at once.
    """
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.warning(
                    "received SIGHUP; ignored (the configuration is read only at start: "
                    "restart the daemon to change it; SIGTERM stops it)"
                )
                continue
            log.info("received %s; shutting down", signal.Signals(signum).name)
            _ignore_signals_while_stopping()
            on_signal()
            # Let every ListAndWatch stream send its end before the cancellation closes
            # the connections (a checkpoint alone is not enough for the asyncio side).
            await trio.sleep(STREAM_DRAIN_S)
            raise ShutdownError(signal.Signals(signum).name)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_handlers_before_stop: dict[int, Any] = {}


def _ignore_signals_while_stopping() -> None:
    """Ignore SIGTERM/SIGINT/SIGHUP from now on (the receiver's exit would otherwise put
    back Trio's KeyboardInterrupt handler, and a second Ctrl-C would cut the cleanup);
    :func:`main_run` restores the handlers once ``trio.run`` has returned."""
    for signum in _STOP_SIGNALS:
        previous = signal.signal(signum, signal.SIG_IGN)
        _handlers_before_stop.setdefault(signum, previous)
    log.info("further signals are ignored while shutting down")


def _restore_signals() -> None:
    for signum, handler in _handlers_before_stop.items():
        signal.signal(signum, handler)
    _handlers_before_stop.clear()


async def run_daemon(
    config: Config,
    *,
    task_status: trio.TaskStatus[PartitionController] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon in the mode ``plugin.mode`` names until a signal (ShutdownError)
    or cancellation; ``task_status.started`` receives the controller once the mode's
    edges serve. Raises :class:`StartError` when it cannot start (see ``core.py``)."""
    stopping: list[Callable[[], None]] = []

    def on_signal() -> None:
        for stop in stopping:
            stop()

    async with trio_asyncio.open_loop() as loop, trio.open_nursery() as nursery:
        tolerate_os_errors(loop)
        await nursery.start(watch_signals, on_signal)
        if config.plugin.mode == "dra":
            from nvswitch_dp.dra.mode import start_dra

            controller = await start_dra(config, nursery, stopping)
        else:
            from nvswitch_dp.plugin.mode import start_device_plugin

            controller = await start_device_plugin(config, nursery, stopping)
        task_status.started(controller)


# Exit statuses of `nvswitch-dp run` (the README lists them).
EXIT_OK = 0  # stopped by SIGTERM/SIGINT, cleanly
EXIT_REFUSED = 1  # refused to start (StartError): one "cannot start:" line says why
EXIT_CONFIG = 2  # the configuration is invalid (cli.py, before anything starts)
EXIT_INTERNAL = 70  # an unexpected error ended the daemon (EX_SOFTWARE): a bug, logged


def main_run(config: Config) -> int:
    """Run the daemon in this process; :data:`EXIT_OK` after a clean shutdown on a
    signal, :data:`EXIT_REFUSED` when it cannot start (:class:`StartError`, one log line
    with the cause and the fix), :data:`EXIT_INTERNAL` for anything else (logged with its
    traceback). The soft file-descriptor limit is raised to the hard one first."""
    soft, hard = raise_nofile_limit()
    log.info("file descriptor limit %d (hard %d)", soft, hard)
    failed: list[StartError] = []
    unbound: list[OSError] = []
    crashed: list[BaseException] = []
    try:
        trio.run(run_daemon, config)
    except* ShutdownError:
        pass
    except* StartError as group:
        failed = _leaves(group, StartError)
    except* OSError as group:
        # A listen address that is taken or not ours is the configuration's fault:
        # one line and the configuration's exit status, not a traceback.
        unbound = [e for e in _leaves(group, OSError) if e.errno in _BIND_ERRNOS]
        crashed = [e for e in _leaves(group, OSError) if e.errno not in _BIND_ERRNOS]
    except* Exception as group:
        crashed = list(group.exceptions)
    finally:
        _restore_signals()
    for error in failed:
        log.error("cannot start: %s", error)
    for bind_error in unbound:
        log.error(
            "cannot start: api.listen %s: %s; another process serves that address (is a "
            "daemon or demo already running?): stop it or choose another api.listen "
            "(--api-listen)",
            config.api.listen,
            bind_error.strerror or bind_error,
        )
    for crash in crashed:
        log.critical("internal error, exiting with %d", EXIT_INTERNAL, exc_info=crash)
    if failed:
        return EXIT_REFUSED
    if unbound and not crashed:
        return EXIT_CONFIG
    return EXIT_INTERNAL if crashed else EXIT_OK


_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})


def _leaves(group: BaseExceptionGroup[BaseException], kind: type[_E]) -> list[_E]:
    """Every ``kind`` in ``group``, however deep: a refusal raised inside the nursery
    arrives wrapped once per nursery (and once more by trio-asyncio's loop)."""
    found: list[_E] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found += _leaves(exc, kind)
        elif isinstance(exc, kind):
            found.append(exc)
    return found
