"""The prepared-claims checkpoint: what DRA mode has prepared on this node.

NodePrepareResources records a claim here before it answers the kubelet, and
NodeUnprepareResources drops it after the partition is released. After a crash the
daemon reads it back to know which partitions are held (never deactivate them), to
unprepare what the kubelet asks for although this process never prepared it, and to
clean up claims the API server no longer knows.

File format (JSON, one object)::

    {"version": 1,
     "checksum": "sha256:<hex>",          # of the canonical JSON of "claims"
     "claims": {"<uid>": {"uid": ..., "namespace": ..., "name": ...,
                          "partitionID": 4,
                          "devices": [{"requests": ["gpu"], "device": "partition-4"}],
                          "cdiIDs": ["nvswitch-dp.io/partition=<uid>"]}}}

Rules: a missing file is an empty checkpoint (a fresh node). Anything else that cannot
be read as exactly this format (bad JSON, another version, a checksum mismatch, a
missing or unknown field, a bad UID) raises :class:`CheckpointError` naming the file and
the problem: the daemon must refuse to start rather than forget a prepared claim and
deactivate a partition a VM is using. Saving is atomic: temporary file, fsync, rename,
fsync of the directory, so a reader (or a restarted daemon after SIGKILL or power loss)
sees the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvswitch_dp.dra.uid import InvalidClaimUid, validate_claim_uid
from nvswitch_dp.files import TEMP_SUFFIX, write_atomically

CHECKPOINT_VERSION = 1
DEFAULT_FILE_NAME = "dra-checkpoint.json"
_TEMP_SUFFIX = TEMP_SUFFIX

_CLAIM_KEYS = {"uid", "namespace", "name", "partitionID", "devices", "cdiIDs"}
_DEVICE_KEYS = {"requests", "device"}


class CheckpointError(Exception):
    """The checkpoint file exists but cannot be trusted. ``path`` and ``problem`` say
    which file and what is wrong; the message adds what an operator can do."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(
            f"checkpoint {path}: {problem}. The daemon will not start without knowing "
            "which claims it prepared; restore the file or, once no pod on this node "
            "uses a partition, move it aside"
        )
        self.path = path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class PreparedClaim:
    """One claim prepared on this node: who it is, the FM partition held for it, the
    devices answered to the kubelet (request names, device name), and its CDI IDs."""

    uid: str
    namespace: str
    name: str
    partition_id: int
    devices: tuple[tuple[tuple[str, ...], str], ...]
    cdi_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        validate_claim_uid(self.uid)


class Checkpoint:
    """The checkpoint file at ``path``.

    Ownership: one daemon process owns the file and is its only writer; ``save``
    replaces it whole. Both methods block on disk (fsync): call them from a worker
    thread in async code.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, PreparedClaim]:
        """The claims saved last, by UID; a missing file is an empty checkpoint.

        Also removes temporary files a killed :meth:`save` left beside it.
        Errors: :class:`CheckpointError` for a file that is not a valid checkpoint of
        this version; OSError for a file that cannot be read.
        """
        self._discard_partial_saves()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(self.path, f"not valid JSON ({error})") from None
        return _decode(self.path, document)

    def save(self, claims: Mapping[str, PreparedClaim]) -> None:
        """Replace the checkpoint with ``claims`` (keyed by UID), atomically and durably.

        Errors: ValueError if a key is not its claim's UID; OSError from the file
        system (the previous checkpoint is then unchanged and no temporary is left).
        """
        for uid, claim in claims.items():
            if uid != claim.uid:
                raise ValueError(f"checkpoint key {uid!r} is not the claim's UID {claim.uid!r}")
        encoded = {uid: _encode_claim(claims[uid]) for uid in sorted(claims)}
        document = {
            "version": CHECKPOINT_VERSION,
            "checksum": _checksum(encoded),
            "claims": encoded,
        }
        data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()
        write_atomically(self.path, data)

    def _discard_partial_saves(self) -> None:
        try:
            names = os.listdir(self.path.parent)
        except FileNotFoundError:
            return
        prefix = f".{self.path.name}."
        for name in names:
            if name.startswith(prefix) and name.endswith(_TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path.parent / name)


def _checksum(claims: Mapping[str, Any]) -> str:
    canonical = json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _encode_claim(claim: PreparedClaim) -> dict[str, Any]:
    return {
        "uid": claim.uid,
        "namespace": claim.namespace,
        "name": claim.name,
        "partitionID": claim.partition_id,
        "devices": [
            {"requests": list(requests), "device": device} for requests, device in claim.devices
        ],
        "cdiIDs": list(claim.cdi_ids),
    }


def _decode(path: Path, document: Any) -> dict[str, PreparedClaim]:
    if not isinstance(document, dict):
        raise CheckpointError(path, "not a JSON object")
    version = document.get("version")
    if type(version) is not int:
        raise CheckpointError(path, f"no version number (found {version!r})")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            path, f"version {version}, but this daemon reads version {CHECKPOINT_VERSION}"
        )
    if set(document) != {"version", "checksum", "claims"}:
        raise CheckpointError(
            path, f"fields {sorted(document)}, expected checksum, claims and version"
        )
    claims = document["claims"]
    if not isinstance(claims, dict):
        raise CheckpointError(path, "claims is not an object")
    if document["checksum"] != _checksum(claims):
        raise CheckpointError(path, "checksum mismatch (the file was changed or damaged)")
    return {uid: _decode_claim(path, uid, entry) for uid, entry in claims.items()}


def _decode_claim(path: Path, uid: str, entry: Any) -> PreparedClaim:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(path, f"claim {uid!r}: {problem}")

    if not isinstance(entry, dict) or set(entry) != _CLAIM_KEYS:
        found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise bad(f"fields {found}, expected {sorted(_CLAIM_KEYS)}")
    if entry["uid"] != uid:
        raise bad(f"recorded under another UID ({entry['uid']!r})")
    for key in ("namespace", "name"):
        if not isinstance(entry[key], str) or not entry[key]:
            raise bad(f"{key} {entry[key]!r} is not a non-empty string")
    partition_id = entry["partitionID"]
    if type(partition_id) is not int or partition_id < 0:
        raise bad(f"partitionID {partition_id!r} is not a partition ID")
    devices: list[tuple[tuple[str, ...], str]] = []
    if not isinstance(entry["devices"], list):
        raise bad("devices is not a list")
    for device in entry["devices"]:
        if not isinstance(device, dict) or set(device) != _DEVICE_KEYS:
            raise bad(f"device {device!r} is not {{requests, device}}")
        requests, name = device["requests"], device["device"]
        if not isinstance(requests, list) or not all(isinstance(r, str) for r in requests):
            raise bad(f"requests {requests!r} is not a list of strings")
        if not isinstance(name, str) or not name:
            raise bad(f"device name {name!r} is not a non-empty string")
        devices.append((tuple(requests), name))
    cdi_ids = entry["cdiIDs"]
    if not isinstance(cdi_ids, list) or not all(isinstance(c, str) for c in cdi_ids):
        raise bad(f"cdiIDs {cdi_ids!r} is not a list of strings")
    try:
        return PreparedClaim(
            uid=uid,
            namespace=entry["namespace"],
            name=entry["name"],
            partition_id=partition_id,
            devices=tuple(devices),
            cdi_ids=tuple(cdi_ids),
        )
    except InvalidClaimUid as error:
        raise bad(str(error)) from None
