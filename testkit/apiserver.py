"""A Kubernetes API-server stand-in for the DRA resources we use (tests, demo, benchmarks).

No API server runs here, so this plays one over real HTTP, following the published REST
conventions for exactly what the daemon touches:

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

Ownership: :class:`ApiStore` holds the objects and outlives servers, so a test can stop the
server (every open connection is closed too: an outage, not a pause) and start another on
the same port with the same objects. :class:`ApiServer` is the HTTP front, run in a thread
(``start()``/``stop()``); ``python -m testkit.apiserver`` runs it as a process
(SIGTERM or SIGINT stops it; kill it to play a crash).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import signal
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
            if resource == "resourceslices":
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
            stored = copy.deepcopy(current)
            if status:
                stored["status"] = copy.deepcopy(body.get("status"))
            else:
                kept = {
                    k: current["metadata"][k]
                    for k in ("uid", "creationTimestamp")
                    if k in current["metadata"]
                }
                spec_changed = body.get("spec") != current.get("spec")
                stored = copy.deepcopy(body)
                stored["metadata"].update(kept)
                if resource == "resourceclaims":  # status changes only through /status
                    stored.pop("status", None)
                    if "status" in current:
                        stored["status"] = copy.deepcopy(current["status"])
                stored["metadata"]["generation"] = current["metadata"].get("generation", 1) + int(
                    spec_changed
                )
                if namespace:
                    stored["metadata"]["namespace"] = namespace
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


_ROUTE = re.compile(
    rf"{re.escape(PREFIX)}/(?:namespaces/(?P<ns>[^/]+)/)?(?P<resource>resourceslices|resourceclaims)"
    r"(?:/(?P<name>[^/]+)(?P<status>/status)?)?"
)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a client pool expects
    # Headers and body leave in separate writes; with Nagle's algorithm and the client's
    # delayed ACK each answer would wait ~40 ms. Go's net/http (the real one) sets
    # TCP_NODELAY too.
    disable_nagle_algorithm = True
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read store.requests
        pass

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.untrack(self.connection)

    def _answer(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self) -> None:
        store = self.server.store
        url = urlsplit(self.path)
        code = 500
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.headers.get("Authorization") != f"Bearer {self.server.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            route = _ROUTE.fullmatch(url.path)
            if route is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            resource = route["resource"]
            ns = route["ns"] or ""
            name = route["name"]
            if (resource == "resourceslices") == bool(ns):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body: Obj = {}
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError as exc:
                    raise ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from exc
                if not isinstance(parsed, dict):
                    raise ApiError(400, "BadRequest", "the body must be a JSON object")
                body = parsed
            method = self.command
            code = 200
            dry_run = "dryRun" in query
            if dry_run and (query["dryRun"] != "All" or method not in ("POST", "PUT")):
                raise ApiError(400, "BadRequest", f"invalid dryRun {query['dryRun']!r}")
            if method == "GET" and name is None:
                result = store.list(resource, ns, query)
            elif method == "GET":
                result = store.get(resource, ns, name)
            elif method == "POST" and name is None:
                result = store.create(resource, ns, body, dry_run=dry_run)
                code = 201
            elif method == "PUT" and name is not None:
                if route["status"] and resource != "resourceclaims":
                    raise ApiError(
                        404, "NotFound", "the server could not find the requested resource"
                    )
                result = store.update(
                    resource, ns, name, body, status=bool(route["status"]), dry_run=dry_run
                )
            elif method == "DELETE" and name is not None and not route["status"]:
                result = store.delete(resource, ns, name)
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
        except ApiError as exc:
            code = exc.code
            result = exc.status()
        except Exception as exc:  # a bug in the stand-in: answer as the real one would
            code = 500
            result = ApiError(500, "InternalError", f"{type(exc).__name__}: {exc}").status()
        with store._lock:
            store.requests.append(Request(self.command, url.path, code))
        self._answer(code, result)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store: ApiStore, token: str) -> None:
        self.store = store
        self.token = token
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def drop_connections(self) -> None:
        with self._connections_lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._connections.clear()


class ApiServer:
    """The HTTP front on ``host:port`` (port 0: any free port), serving ``store``.

    ``start()`` binds and serves from a thread; ``stop()`` stops accepting, closes every
    open connection and releases the port (idempotent). ``url`` is known after ``start``.
    Errors: ``OSError`` from ``start`` when the port cannot be bound.
    """

    def __init__(
        self, store: ApiStore | None = None, *, token: str, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.store = store if store is not None else ApiStore()
        self.token = token
        self.host = host
        self.port = port
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ApiServer:
        if self._server is not None:
            return self
        server = _HttpServer((self.host, self.port), self.store, self.token)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="apiserver",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for this server (its URL and token) at ``path``; returns ``path``."""
        return write_kubeconfig(path, self.url, self.token)


def write_kubeconfig(path: Path, server_url: str, token: str) -> Path:
    """Write a kubeconfig naming one cluster (``server_url``), one user (bearer ``token``)
    and the context joining them. JSON is YAML, so the file is both."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {"server": server_url}}],
        "users": [{"name": "standin", "user": {"token": token}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
        "current-context": "standin",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in until SIGTERM or SIGINT; prints ``listening on <url>`` once bound."""
    parser = argparse.ArgumentParser(
        prog="python -m testkit.apiserver", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--token", required=True, help="the bearer token clients must send")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig for clients here")
    args = parser.parse_args(argv)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    server = ApiServer(token=args.token, host=args.host, port=args.port).start()
    if args.kubeconfig is not None:
        server.write_kubeconfig(args.kubeconfig)
    print(f"listening on {server.url}", flush=True)
    try:
        while not stopped.wait(0.5):  # a bounded wait, so signals are seen promptly
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
