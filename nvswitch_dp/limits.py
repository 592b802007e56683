"""File descriptors as a budget, and log lines that cannot flood the log.

The daemon's kubelet and Fabric Manager paths need descriptors of their own: every
``fmpm`` run takes three pipes and a process, every PodResources read and kubelet
Register a socket, every plugin connection one more. The REST port faces the network and
could otherwise take them all (a connection flood), so the REST side gets what is left
after :data:`FD_RESERVE` (:func:`rest_connection_limit`), and the soft limit is raised to
the hard one at start (:func:`raise_nofile_limit`).

Ownership: nothing here holds a resource; :class:`RateLimitedLog` holds only counters.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CAPACITY_ERRNOS",
    "FD_RESERVE",
    "RateLimitedLog",
    "open_fd_count",
    "raise_nofile_limit",
    "rest_connection_limit",
]

# OS errors that mean "out of a resource now", not "wrong": wait and retry.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Descriptors kept away from the REST side: FM calls (3 pipes per fmpm run, several runs
# at once), PodResources and kubelet Register channels, the plugin servers and their
# kubelet connections, inotify, log files. Measured use of an idle simulated H200 daemon
# is about 40; 96 leaves room for a kubelet restart and a burst of FM calls on top.
FD_RESERVE = 96
# Whatever the arithmetic says, the REST API keeps a few connections (probes, metrics).
MIN_REST_CONNECTIONS = 8
# RLIM_INFINITY cannot be a soft limit for files; Linux's default nr_open is 2**20.
_NOFILE_CEILING = 1 << 20


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return ``(soft, hard)`` now.

    Errors: none raised; a limit that cannot be raised (a container's seccomp, a hard
    limit at the soft one) is left as it is and reported by the caller's log line.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def open_fd_count() -> int:
    """Descriptors this process has open (Linux ``/proc/self/fd``; 0 where unreadable)."""
    try:
        return len(os.listdir(Path("/proc/self/fd")))
    except OSError:
        return 0


def rest_connection_limit(configured: int, soft_limit: int, in_use: int) -> int:
    """How many REST connections may be open at once. Pure.

    ``configured`` (``api.max_connections``), but never more than the soft descriptor
    limit leaves after what is ``in_use`` and :data:`FD_RESERVE`; that bound is at least
    :data:`MIN_REST_CONNECTIONS` (probes and metrics must still get through).
    """
    left = soft_limit - in_use - FD_RESERVE
    return min(configured, max(MIN_REST_CONNECTIONS, left))


class RateLimitedLog:
    """Logs the first occurrence of a key, then at most one line per ``period`` seconds
    with the count of those left out, so a flood of the same failure (EMFILE on every
    accept, a client reconnecting 1,500 times a second) costs a few lines, not megabytes.

    Ownership: only counters. Not thread-safe (one event loop thread uses it).
    """

    def __init__(
        self,
        logger: logging.Logger,
        period: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.period = period
        self.clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` under ``key`` unless it was logged within the period;
        return whether a line was written."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return False
        self._last[key] = now
        left_out = self._left_out.pop(key, 0)
        if left_out:
            msg += " (%d more like this in the last %.0fs)"
            args = (*args, left_out, self.period)
        self.logger.log(level, msg, *args)
        return True
