"""The objects of a Kubernetes API server, for the DRA resources we use (demo, tests).

No API server runs beside the demo, so :mod:`nvswitch_dp.demo.apiserver` plays one over
real HTTP; this module holds its objects and answers its verbs, following the published
REST conventions for exactly what the daemon touches:

- ``/apis/resource.k8s.io/v1/resourceslices`` (cluster-scoped): list (``labelSelector``
  with ``=``, ``==``, ``!=``, existence; ``fieldSelector`` on ``metadata.name``,
  ``spec.nodeName``, ``spec.driver``, ``spec.pool.name``; anything else is 400 as on a real
  server), get, create (201; 409 ``AlreadyExists``), update by PUT (``metadata.resourceVersion``
  required; stale: 409 ``Conflict``; absent: 404; immutable ``spec.driver``, ``spec.nodeName``
  and ``spec.pool.name``), delete (200 with a ``Success`` Status; 404).
- ``/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims[/{name}[/status]]``: create,
  get, list, update, status update, delete (tests create claims and write allocations).
- Errors are ``Status`` objects (``kind: Status``, ``reason``, ``code``, ``details``; 422
  ``Invalid`` carries ``details.causes[]`` from :func:`nvswitch_dp.dra.validation.check_slice`,
  the published ResourceSlice rules). Bearer-token authentication (401 ``Unauthorized``).
- ``resourceVersion`` is one counter for the whole store, as etcd's revision is.
- **Feature gates** (``ApiStore.features``, default: all of :data:`FEATURES` on, as in
  1.37): with ``DRADeviceTaints`` off, the ``taints`` of slice devices are dropped on write
  without a word; with ``DRAResourceClaimDeviceStatus`` off, a claim's ``status.devices``
  is dropped likewise. That is what a real server does with a field behind a disabled
  gate (its strategy's ``dropDisabledFields``). With taints on, a taint without
  ``timeAdded`` gets the current time ("added automatically during create or update if
  not set", the API's documentation of ``DeviceTaint``).
- ``?dryRun=All`` on create and update: everything runs (validation, dropping, defaults)
  and the answer is the object as it would be stored, but nothing is stored and the
  revision does not move; any other value is 400, as on a real server.
- Watch is not served (the daemon's client never watches); ``?watch=true`` is a 400.

Ownership: :class:`ApiStore` holds the objects and outlives HTTP servers, so a test can
stop the server (an outage, not a pause) and start another on the same port with the same
objects. It is thread-safe (the HTTP server answers from several threads) and does no I/O.
"""

from __future__ import annotations

import copy
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nvswitch_dp.dra.validation import check_slice

GROUP = "resource.k8s.io"
VERSION = "v1"
PREFIX = f"/apis/{GROUP}/{VERSION}"
SLICE_FIELDS: Mapping[str, tuple[str, ...]] = {
    "metadata.name": ("metadata", "name"),
    "spec.nodeName": ("spec", "nodeName"),
    "spec.driver": ("spec", "driver"),
    "spec.pool.name": ("spec", "pool", "name"),
}
CLAIM_FIELDS: Mapping[str, tuple[str, ...]] = {
    "metadata.name": ("metadata", "name"),
    "metadata.namespace": ("metadata", "namespace"),
}
TAINTS = "DRADeviceTaints"
DEVICE_STATUS = "DRAResourceClaimDeviceStatus"
FEATURES = frozenset({TAINTS, DEVICE_STATUS})
SLICE_IMMUTABLE = (("spec", "driver"), ("spec", "nodeName"), ("spec", "pool", "name"))

Obj = dict[str, Any]


class ApiError(Exception):
    """An answer other than success: becomes a ``Status`` object with ``code``."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        name: str = "",
        kind: str = "",
        causes: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.name = name
        self.kind = kind
        self.causes = causes

    def status(self) -> Obj:
        details: Obj = {}
        if self.name:
            details["name"] = self.name
        if self.kind:
            details["group"] = GROUP
            details["kind"] = self.kind
        if self.causes:
            details["causes"] = self.causes
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if details:
            body["details"] = details
        return body


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


@dataclass(frozen=True, slots=True)
class _Term:
    """One selector requirement: the value at ``path`` (or label ``label``) against ``value``.

    ``op`` is ``=``, ``!=``, ``exists`` or ``absent``."""

    op: str
    value: str = ""
    path: tuple[str, ...] = ()
    label: str = ""

    def holds(self, obj: Obj) -> bool:
        if self.label:
            labels = _dig(obj, ("metadata", "labels"))
            have = labels.get(self.label) if isinstance(labels, dict) else None
        else:
            have = _dig(obj, self.path) or ""
        if self.op == "exists":
            return have is not None
        if self.op == "absent":
            return have is None
        return (have == self.value) == (self.op == "=")


def _parse_field_selector(text: str, allowed: Mapping[str, tuple[str, ...]]) -> list[_Term]:
    terms: list[_Term] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([^=!]+)(==|=|!=)(.*)", term)
        if m is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
        key, op, value = m.groups()
        if key not in allowed:
            raise ApiError(400, "BadRequest", f"field label not supported: {key}")
        terms.append(_Term("!=" if op == "!=" else "=", value, path=allowed[key]))
    return terms


def _parse_label_selector(text: str) -> list[_Term]:
    terms: list[_Term] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([A-Za-z0-9./_-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)", term)
        if m is not None:
            key, op, value = m.groups()
            terms.append(_Term("!=" if op == "!=" else "=", value, label=key))
        elif re.fullmatch(r"![A-Za-z0-9./_-]+", term):
            terms.append(_Term("absent", label=term[1:]))
        elif re.fullmatch(r"[A-Za-z0-9./_-]+", term):
            terms.append(_Term("exists", label=term))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return terms


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Request:
    """One request as the store saw it (for tests: what did the client do?)."""

    method: str
    path: str
    code: int


@dataclass
class ApiStore:
    """The objects, keyed by (resource, namespace, name); thread-safe.

    ``before_update`` hooks run inside an update, before the resourceVersion check: a test
    uses :meth:`modify_behind` to play another writer, which turns the client's next update
    into a genuine stale write (409).
    """

    objects: dict[tuple[str, str, str], Obj] = field(default_factory=dict)
    features: set[str] = field(default_factory=lambda: set(FEATURES))
    revision: int = 0
    requests: list[Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _behind: list[str] = field(default_factory=list)

    def _bump(self) -> str:
        self.revision += 1
        return str(self.revision)

    def modify_behind(self, name: str) -> None:
        """Before the next update of slice ``name``, change it as another writer would (a
        label and a new resourceVersion), so the update's resourceVersion is stale."""
        with self._lock:
            self._behind.append(name)

    def slices(self) -> list[Obj]:
        """A copy of every ResourceSlice, by name."""
        with self._lock:
            return [
                copy.deepcopy(o)
                for (r, _, _), o in sorted(self.objects.items())
                if r == "resourceslices"
            ]

    def record(self, request: Request) -> None:
        """Note one answered request (the HTTP front calls it for every request)."""
        with self._lock:
            self.requests.append(request)

    def codes(self, method: str) -> list[int]:
        with self._lock:
            return [r.code for r in self.requests if r.method == method]

    # The verbs; every one raises ApiError for a failure answer.

    def list(self, resource: str, namespace: str, query: dict[str, str]) -> Obj:
        if query.get("watch") in ("true", "1"):
            raise ApiError(400, "BadRequest", "watch is not served by this stand-in")
        allowed = SLICE_FIELDS if resource == "resourceslices" else CLAIM_FIELDS
        tests = _parse_field_selector(query.get("fieldSelector", ""), allowed)
        tests += _parse_label_selector(query.get("labelSelector", ""))
        kind = "ResourceSliceList" if resource == "resourceslices" else "ResourceClaimList"
        with self._lock:
            items = [
                copy.deepcopy(o)
                for (r, ns, _), o in sorted(self.objects.items())
                if r == resource
                and (not namespace or ns == namespace)
                and all(t.holds(o) for t in tests)
            ]
            return {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": kind,
                "metadata": {"resourceVersion": str(self.revision)},
                "items": items,
            }

    def get(self, resource: str, namespace: str, name: str) -> Obj:
        with self._lock:
            found = self.objects.get((resource, namespace, name))
            if found is None:
                raise _not_found(resource, name)
            return copy.deepcopy(found)

    def _drop_disabled(self, resource: str, body: Obj) -> None:
        """What a server with these gates does to a written object (module docstring)."""
        spec = body.get("spec")
        if resource == "resourceslices" and isinstance(spec, dict):
            for device in spec.get("devices") or []:
                if not isinstance(device, dict) or "taints" not in device:
                    continue
                if TAINTS not in self.features:
                    del device["taints"]
                    continue
                for taint in device["taints"] or []:
                    if isinstance(taint, dict) and not taint.get("timeAdded"):
                        taint["timeAdded"] = _now()
        status = body.get("status")
        if (
            resource == "resourceclaims"
            and isinstance(status, dict)
            and DEVICE_STATUS not in self.features
        ):
            status.pop("devices", None)

    def create(self, resource: str, namespace: str, body: Obj, *, dry_run: bool = False) -> Obj:
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid(
                resource,
                "",
                [
                    {
                        "reason": "FieldValueRequired",
                        "field": "metadata.name",
                        "message": "name or generateName is required",
                    }
                ],
            )
        if namespace and meta.get("namespace", namespace) != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the object does not match the namespace of the request",
            )
        if meta.get("resourceVersion"):
            raise ApiError(
                500, "InternalError", "resourceVersion should not be set on objects to be created"
            )
        if resource == "resourceslices":
            _validate_slice(body)
        self._drop_disabled(resource, body)
        with self._lock:
            key = (resource, namespace, name)
            if key in self.objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{_kind(resource)} "{name}" already exists',
                    name=name,
                    kind=resource,
                )
            meta.update(
                uid=str(uuid.uuid4()),
                resourceVersion=str(self.revision + 1) if dry_run else self._bump(),
                creationTimestamp=_now(),
                generation=1,
            )
            if namespace:
                meta["namespace"] = namespace
            if not dry_run:
                self.objects[key] = copy.deepcopy(body)
            return body

    def update(
        self,
        resource: str,
        namespace: str,
        name: str,
        body: Obj,
        *,
        status: bool = False,
        dry_run: bool = False,
    ) -> Obj:
        meta = body.get("metadata")
        if not isinstance(meta, dict) or meta.get("name") != name:
            raise ApiError(
                400, "BadRequest", "the name of the object does not match the name on the URL"
            )
        version = meta.get("resourceVersion")
        if not version:
            raise _invalid(
                resource,
                name,
                [
                    {
                        "reason": "FieldValueInvalid",
                        "field": "metadata.resourceVersion",
                        "message": "must be specified for an update",
                    }
                ],
            )
        if resource == "resourceslices":
            _validate_slice(body)
        body = copy.deepcopy(body)
        self._drop_disabled(resource, body)
        with self._lock:
            key = (resource, namespace, name)
            if resource == "resourceslices" and name in self._behind and key in self.objects:
                self._behind.remove(name)
                other = self.objects[key]
                other["metadata"].setdefault("labels", {})["touched-by"] = "another-writer"
                other["metadata"]["resourceVersion"] = self._bump()
            current = self.objects.get(key)
            if current is None:
                raise _not_found(resource, name)
            _check_update(resource, name, version, current, body)
            stored = _updated(resource, namespace, current, body, status=status)
            if dry_run:
                stored["metadata"]["resourceVersion"] = str(self.revision + 1)
                return stored
            stored["metadata"]["resourceVersion"] = self._bump()
            self.objects[key] = stored
            return copy.deepcopy(stored)

    def delete(self, resource: str, namespace: str, name: str) -> Obj:
        with self._lock:
            found = self.objects.pop((resource, namespace, name), None)
            if found is None:
                raise _not_found(resource, name)
            self._bump()
            return {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": name,
                    "group": GROUP,
                    "kind": resource,
                    "uid": found["metadata"].get("uid", ""),
                },
            }


def _check_update(resource: str, name: str, version: str, current: Obj, body: Obj) -> None:
    """An update of ``current`` to ``body`` at ``version``: stale (409) or changing an
    immutable field (422) raises :class:`ApiError`."""
    if current["metadata"]["resourceVersion"] != version:
        raise ApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {resource}.{GROUP} "{name}": the object '
            "has been modified; please apply your changes to the latest version and "
            "try again",
            name=name,
            kind=resource,
        )
    if resource != "resourceslices":
        return
    for path in SLICE_IMMUTABLE:
        if _dig(body, path) != _dig(current, path):
            raise _invalid(
                resource,
                name,
                [
                    {
                        "reason": "FieldValueInvalid",
                        "field": ".".join(path),
                        "message": "field is immutable",
                    }
                ],
            )


def _updated(resource: str, namespace: str, current: Obj, body: Obj, *, status: bool) -> Obj:
    """What an update stores (before its resourceVersion): the status alone through
    ``/status``; else the body, keeping uid and creation time (and a claim's status), with
    the generation moved on when the spec changed."""
    if status:
        stored = copy.deepcopy(current)
        stored["status"] = copy.deepcopy(body.get("status"))
        return stored
    kept = {
        k: current["metadata"][k] for k in ("uid", "creationTimestamp") if k in current["metadata"]
    }
    spec_changed = body.get("spec") != current.get("spec")
    stored = copy.deepcopy(body)
    stored["metadata"].update(kept)
    if resource == "resourceclaims":  # status changes only through /status
        stored.pop("status", None)
        if "status" in current:
            stored["status"] = copy.deepcopy(current["status"])
    stored["metadata"]["generation"] = current["metadata"].get("generation", 1) + int(spec_changed)
    if namespace:
        stored["metadata"]["namespace"] = namespace
    return stored


def _kind(resource: str) -> str:
    return f"{resource}.{GROUP}"


def _not_found(resource: str, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{_kind(resource)} "{name}" not found', name=name, kind=resource
    )


def _invalid(resource: str, name: str, causes: list[dict[str, str]]) -> ApiError:
    kind = "ResourceSlice" if resource == "resourceslices" else "ResourceClaim"
    listed = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
    return ApiError(
        422,
        "Invalid",
        f'{kind}.{GROUP} "{name}" is invalid: [{listed}]',
        name=name,
        kind=kind,
        causes=causes,
    )


def _validate_slice(body: Obj) -> None:
    causes = check_slice(body)
    if causes:
        name = str(_dig(body, ("metadata", "name")) or "")
        raise _invalid("resourceslices", name, [c.as_status_cause() for c in causes])
