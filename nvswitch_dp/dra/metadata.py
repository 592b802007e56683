"""KEP-5304 device metadata files: how a prepared claim's device attributes reach the container.

KubeVirt's virt-launcher does not read the ResourceSlice: it reads each request's device
(and its ``resource.kubernetes.io/pciBusID``) from a *device metadata file* the driver
puts in the container, at the path the Kubernetes DRA documentation's "device metadata
protocol" fixes (KubeVirt reads the same paths, ``pkg/dra/utils.go``):

- ``<dir>/resourceclaims/<claim name>/<request>/<driver>-metadata.json`` for a claim the
  pod names directly, where ``<dir>`` is ``/var/run/kubernetes.io/dra-device-attributes``;
- ``<dir>/resourceclaimtemplates/<pod claim name>/<request>/<driver>-metadata.json`` for a
  claim generated from a ResourceClaimTemplate, where the pod claim name is
  ``pod.spec.resourceClaims[].name``; the resource-claim controller records it on the
  generated claim as the annotation ``resource.kubernetes.io/pod-claim-name``.

Each file is a stream of ``DeviceMetadata`` objects (one here, ``apiVersion``
``metadata.resource.k8s.io/v1alpha1``, ``kind`` ``DeviceMetadata``): the claim's
``metadata`` (name, namespace, uid, ``generation`` 1; a file is written once per
preparation and never updated in place), ``podClaimName`` for generated claims, and
``requests[]{name, devices[]{driver, pool, name, attributes}}`` with the attributes the
device is published with. Only the request's top-level name names the directory (a
prioritized-list subrequest ``gpu/high-memory`` lives under ``gpu``).

Rules this module keeps: files live on the host under ``<root>/<claim uid>/`` (``root``
is ``<dra-plugin-dir>/metadata``), mirroring the container layout below it, so the mounts
of a claim can be read back from disk after a restart (:meth:`DeviceMetadataFiles.mounts`);
each file reaches the container as a read-only CDI bind mount
(:class:`~nvswitch_dp.dra.cdi.CdiMount`); writes are atomic (temporary file, fsync,
rename); Unprepare removes the claim's whole directory. Claim UIDs are checked before they
name a path, and names taken from the claim must be single path segments.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from nvswitch_dp.dra.cdi import CdiMount
from nvswitch_dp.dra.uid import validate_claim_uid
from nvswitch_dp.files import TEMP_SUFFIX, write_atomically

CONTAINER_DIR = PurePosixPath("/var/run/kubernetes.io/dra-device-attributes")
RESOURCE_CLAIMS = "resourceclaims"
RESOURCE_CLAIM_TEMPLATES = "resourceclaimtemplates"
FILE_SUFFIX = "-metadata.json"
API_VERSION = "metadata.resource.k8s.io/v1alpha1"
KIND = "DeviceMetadata"
POD_CLAIM_NAME = "resource.kubernetes.io/pod-claim-name"
_TEMP_SUFFIX = TEMP_SUFFIX


class MetadataError(ValueError):
    """The claim cannot be described safely (a name that is not one path segment)."""


def _segment(text: str, what: str) -> str:
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise MetadataError(f"{what} {text!r} cannot name a directory")
    return text


def claim_directory(claim: Mapping[str, Any]) -> PurePosixPath:
    """``resourceclaims/<name>`` or ``resourceclaimtemplates/<pod claim name>``."""
    metadata = claim.get("metadata") or {}
    pod_claim = (metadata.get("annotations") or {}).get(POD_CLAIM_NAME)
    if pod_claim:
        return PurePosixPath(RESOURCE_CLAIM_TEMPLATES, _segment(pod_claim, "pod claim name"))
    return PurePosixPath(RESOURCE_CLAIMS, _segment(str(metadata.get("name", "")), "claim name"))


def file_name(driver: str) -> str:
    return f"{_segment(driver, 'driver name')}{FILE_SUFFIX}"


def device_metadata(
    claim: Mapping[str, Any],
    request: str,
    devices: Sequence[tuple[str, str, str, Mapping[str, Any]]],
) -> dict[str, Any]:
    """One ``DeviceMetadata`` object for ``request`` of ``claim`` (pure).

    ``devices``: ``(driver, pool, device name, attributes)`` of the request's devices.
    """
    metadata = claim.get("metadata") or {}
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": metadata.get("name", ""),
            "namespace": metadata.get("namespace", ""),
            "uid": metadata.get("uid", ""),
            "generation": 1,
        },
    }
    pod_claim = (metadata.get("annotations") or {}).get(POD_CLAIM_NAME)
    if pod_claim:
        obj["podClaimName"] = pod_claim
    obj["requests"] = [
        {
            "name": request,
            "devices": [
                {"driver": driver, "pool": pool, "name": name, "attributes": dict(attributes)}
                for driver, pool, name, attributes in devices
            ],
        }
    ]
    return obj


class DeviceMetadataFiles:
    """The device metadata files of this driver's prepared claims, under ``root``.

    ``attributes`` maps a device name to the attributes it is published with (as in a
    ResourceSlice: ``{"<name>": {"string": ...}}``, our own names unqualified). Ownership:
    everything under ``root`` is this driver's. The methods block on disk: call them from
    a worker thread in async code. Errors: ``OSError``, :class:`MetadataError`,
    ``InvalidClaimUid``.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        driver: str,
        pool: str,
        attributes: Mapping[str, Mapping[str, Any]],
    ) -> None:
        self.root = Path(root)
        self.driver = driver
        self.pool = pool
        self.attributes = attributes

    def claim_root(self, claim_uid: str) -> Path:
        return self.root / validate_claim_uid(claim_uid)

    def write(self, claim: Mapping[str, Any], devices: Sequence[tuple[str, str]]) -> list[CdiMount]:
        """Write one file per request of ``devices`` (``(request, device name)`` pairs,
        this driver's results of the claim) and return their mounts. Replaces whatever
        the claim had here."""
        uid = validate_claim_uid(str((claim.get("metadata") or {}).get("uid", "")))
        by_request: dict[str, list[str]] = {}
        for request, device in devices:
            by_request.setdefault(request, []).append(device)
        base = self.claim_root(uid)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(base)
        directory = claim_directory(claim)
        for request, names in by_request.items():
            top = _segment(request.split("/", 1)[0], "request name")
            obj = device_metadata(
                claim,
                request,
                [(self.driver, self.pool, n, self.attributes.get(n, {})) for n in names],
            )
            target = base / directory / top / file_name(self.driver)
            write_atomically(target, (json.dumps(obj, indent=2) + "\n").encode(), mode=0o644)
        return self.mounts(uid)

    def mounts(self, claim_uid: str) -> list[CdiMount]:
        """The mounts of the files the claim has here (none: an empty list), sorted."""
        base = self.claim_root(claim_uid)
        found: list[CdiMount] = []
        for path in sorted(base.rglob(f"*{FILE_SUFFIX}")) if base.is_dir() else []:
            relative = path.relative_to(base)
            found.append(CdiMount(str(path), str(CONTAINER_DIR / PurePosixPath(*relative.parts))))
        return found

    def remove(self, claim_uid: str) -> None:
        """Remove the claim's files (none there: nothing to do)."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.claim_root(claim_uid))


def published_attributes(slices: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Device name -> its attributes exactly as ``slices`` publish them (names of the
    driver's own domain unqualified, others such as ``resource.kubernetes.io/pciBusID``
    qualified), which is how the metadata file carries them too."""
    return {
        device["name"]: dict(device.get("attributes") or {})
        for obj in slices
        for device in obj["spec"].get("devices") or []
    }
