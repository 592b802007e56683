"""CDI spec files: how a prepared claim's devices reach its containers.

The Container Device Interface (cncf-tags/container-device-interface, SPEC.md) lets the
container runtime apply edits named by a qualified device ID. In DRA mode the kubelet
passes the IDs NodePrepareResources returned to the runtime, which looks them up in the
spec files of its CDI directories (``/etc/cdi`` and ``/var/run/cdi``).

Rules this module keeps:

* One spec file per prepared claim, ``<dir>/nvswitch-dp.io-partition_<claim uid>.json``
  (the CDI library's transient-spec naming, ``<vendor>-<class>_<id>``), holding one
  device named by the claim UID: ``kind`` ``nvswitch-dp.io/partition``, qualified ID
  ``nvswitch-dp.io/partition=<claim uid>``. Two claims never share a file, so preparing
  or unpreparing one never rewrites another's.
* ``cdiVersion`` is ``0.5.0``: the lowest version with the features used (``hostPath``
  on device nodes, and device names that start with a digit, as UUIDs do). A runtime
  refuses a spec whose version its CDI library does not know, and refuses one that
  claims a version lower than its content needs; 0.5.0 is known to every CDI library
  since v0.5.0 (containerd 1.7 and 2.x, CRI-O, Podman) and is what the content needs.
* Writes are atomic: a temporary file whose name ends in ``.tmp`` (runtimes read only
  ``*.json`` and ``*.yaml``), fsync, rename over the final name, fsync of the directory.
  A runtime scanning the directory sees the old spec, the new one, or none; never half.
* Claim UIDs are checked (:mod:`nvswitch_dp.dra.uid`) before they become a path.

The grant's annotations are not written: CDI annotations (spec 0.6.0) are metadata for
CDI consumers and never reach the container, so they would only raise the version.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvswitch_dp.dra.uid import is_claim_uid, validate_claim_uid
from nvswitch_dp.files import TEMP_SUFFIX, fsync_directory, write_atomically
from nvswitch_dp.partitions.layout import ContainerGrant

VENDOR = "nvswitch-dp.io"
DEVICE_CLASS = "partition"
KIND = f"{VENDOR}/{DEVICE_CLASS}"
CDI_VERSION = "0.5.0"
DEFAULT_CDI_DIR = Path("/var/run/cdi")
# The container may read and write the VFIO group devices; it may not mknod ("m").
DEVICE_PERMISSIONS = "rw"
# Bind mounts of files the driver writes for the container (read-only for it).
MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "bind")

_SPEC_PREFIX = f"{VENDOR}-{DEVICE_CLASS}_"
_SPEC_SUFFIX = ".json"
_TEMP_SUFFIX = TEMP_SUFFIX


class CdiSpecError(ValueError):
    """A grant that cannot be expressed as a valid CDI spec; the message says why."""


@dataclass(frozen=True, slots=True)
class CdiMount:
    """A file the driver wrote on the host, bind-mounted read-only into the container
    (for example a KEP-5304 device metadata file). Both paths must be absolute."""

    host_path: str
    container_path: str


def qualified_device_id(claim_uid: str) -> str:
    """``nvswitch-dp.io/partition=<claim uid>``; raises InvalidClaimUid for a bad UID."""
    return f"{KIND}={validate_claim_uid(claim_uid)}"


def spec_file_name(claim_uid: str) -> str:
    """The spec's file name in the CDI directory; raises InvalidClaimUid for a bad UID."""
    return f"{_SPEC_PREFIX}{validate_claim_uid(claim_uid)}{_SPEC_SUFFIX}"


def cdi_spec(
    claim_uid: str, grant: ContainerGrant, *, mounts: Sequence[CdiMount] = ()
) -> dict[str, Any]:
    """The CDI spec (a JSON-ready dict) for one prepared claim (pure).

    The device's ``containerEdits`` hold one device node per grant device (``path`` in
    the container, ``hostPath`` on the host, permissions ``rw``), the grant's
    environment as ``"NAME=value"`` strings in the grant's order, and ``mounts`` as
    read-only bind mounts.

    Errors: :class:`~nvswitch_dp.dra.uid.InvalidClaimUid` for a bad UID;
    :class:`CdiSpecError` for a grant with no devices, a relative or duplicated device
    path, an environment name that is empty or contains ``=``, or a relative mount path.
    """
    validate_claim_uid(claim_uid)
    if not grant.devices:
        raise CdiSpecError(f"claim {claim_uid}: the grant has no device nodes")
    nodes: list[dict[str, str]] = []
    seen: set[str] = set()
    for device in grant.devices:
        for path in (device.container_path, device.host_path):
            if not os.path.isabs(path):
                raise CdiSpecError(f"claim {claim_uid}: device path {path!r} is not absolute")
        if device.container_path in seen:
            raise CdiSpecError(f"claim {claim_uid}: device {device.container_path!r} appears twice")
        seen.add(device.container_path)
        nodes.append(
            {
                "path": device.container_path,
                "hostPath": device.host_path,
                "permissions": DEVICE_PERMISSIONS,
            }
        )
    env: list[str] = []
    for name, value in grant.envs.items():
        # CDI splits at the first "=": a name containing one would set another variable.
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise CdiSpecError(f"claim {claim_uid}: invalid environment variable {name!r}")
        env.append(f"{name}={value}")
    edits: dict[str, Any] = {"deviceNodes": nodes}
    if env:
        edits["env"] = env
    if mounts:
        for mount in mounts:
            for path in (mount.host_path, mount.container_path):
                if not os.path.isabs(path):
                    raise CdiSpecError(f"claim {claim_uid}: mount path {path!r} is not absolute")
        edits["mounts"] = [
            {
                "hostPath": m.host_path,
                "containerPath": m.container_path,
                "options": list(MOUNT_OPTIONS),
            }
            for m in mounts
        ]
    return {
        "cdiVersion": CDI_VERSION,
        "kind": KIND,
        "devices": [{"name": claim_uid, "containerEdits": edits}],
    }


class CdiDirectory:
    """The CDI spec directory this driver writes its per-claim specs into.

    Ownership: the driver owns every ``nvswitch-dp.io-partition_*.json`` file (and its
    own ``.tmp`` leftovers) in the directory and nothing else; other vendors' specs are
    never read or touched. The methods block on disk (fsync): call them from a worker
    thread (``trio.to_thread.run_sync``) in async code. They are safe to repeat.
    """

    def __init__(self, path: Path | str = DEFAULT_CDI_DIR) -> None:
        self.path = Path(path)

    def spec_path(self, claim_uid: str) -> Path:
        """Where the claim's spec lives; raises InvalidClaimUid for a bad UID."""
        return self.path / spec_file_name(claim_uid)

    def write(
        self, claim_uid: str, grant: ContainerGrant, *, mounts: Sequence[CdiMount] = ()
    ) -> str:
        """Write (or atomically replace) the claim's spec; return its qualified device ID.

        Creates the directory if it is missing. Errors: InvalidClaimUid, CdiSpecError
        (see :func:`cdi_spec`), OSError from the file system (nothing is left behind:
        the temporary file is removed, an existing spec is unchanged).
        """
        spec = cdi_spec(claim_uid, grant, mounts=mounts)
        data = (json.dumps(spec, indent=2) + "\n").encode()
        # Readable by the runtime and by operators' tools (`cdi list`) alike.
        write_atomically(self.spec_path(claim_uid), data, mode=0o644)
        return qualified_device_id(claim_uid)

    def remove(self, claim_uid: str) -> None:
        """Delete the claim's spec; a spec that is already gone is not an error.

        Errors: InvalidClaimUid; OSError other than "not found".
        """
        try:
            self.spec_path(claim_uid).unlink()
        except FileNotFoundError:
            return
        fsync_directory(self.path)

    def claim_uids(self) -> set[str]:
        """UIDs of the claims that have a spec here (a missing directory: none).

        Files of other vendors, temporary files and names whose UID part is not a valid
        UID are ignored.
        """
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return set()
        uids: set[str] = set()
        for name in names:
            if name.startswith(_SPEC_PREFIX) and name.endswith(_SPEC_SUFFIX):
                uid = name[len(_SPEC_PREFIX) : -len(_SPEC_SUFFIX)]
                if is_claim_uid(uid):
                    uids.add(uid)
        return uids

    def discard_partial_writes(self) -> int:
        """Remove temporary files a killed writer left behind; return how many.

        Call it at start, before any write (a concurrent :meth:`write` of this
        directory's owner would lose its temporary file).
        """
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return 0
        removed = 0
        for name in names:
            if name.startswith(f".{_SPEC_PREFIX}") and name.endswith(_TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / name)
                    removed += 1
        return removed
