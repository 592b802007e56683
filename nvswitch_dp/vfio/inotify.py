"""inotify on one directory, awaited from Trio (Linux only).

The kernel reports creation and removal of ``/dev/vfio/<group>`` nodes as inotify
events; sysfs attributes (driver bindings) give none, so the health watcher combines
this with a poll. Built on ctypes: the standard library has no inotify binding.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from types import TracebackType

import trio

IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

WATCH_MASK = IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF


class DirectoryWatch:
    """Wakes when entries of ``directory`` appear, vanish or change attributes.

    Ownership: owns one inotify file descriptor, closed by :meth:`close` or the
    context manager. Errors: ``OSError`` from :meth:`open` when inotify is unavailable
    or the directory does not exist; callers fall back to polling.
    """

    def __init__(self, fd: int, directory: Path) -> None:
        self.fd = fd
        self.directory = directory

    @classmethod
    def open(cls, directory: Path) -> DirectoryWatch:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if libc.inotify_add_watch(fd, os.fsencode(directory), WATCH_MASK) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        return cls(fd, directory)

    async def wait(self) -> None:
        """Return once at least one event arrived (all pending events are consumed)."""
        await trio.lowlevel.wait_readable(self.fd)
        while True:
            try:
                if not os.read(self.fd, 65536):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirectoryWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
