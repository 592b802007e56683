"""Durable file writes for the node's state: DRA CDI specs, device metadata and
checkpoint, and the node inventory.

One way to write a file that a reader (a container runtime, virt-launcher, the daemon
restarted after a SIGKILL or a power loss) sees either whole or not at all: a temporary
file in the same directory, written and fsynced, renamed over the target, then the
directory fsynced so that the rename itself is durable. Blocking: call from a worker
thread. Errors: ``OSError`` from the file system; a failed write leaves no temporary
file behind (one left by a killed process ends in :data:`TEMP_SUFFIX`, which readers
ignore and the owners sweep).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def fsync_directory(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``target`` with ``data`` durably (see the module docstring); ``mode``
    sets the file's permissions (else the process's default)."""
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_directory(directory)


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` is: device, inode and change time (a freed inode is reused at
    once on some file systems, so a new socket may get the old number); None when absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)
