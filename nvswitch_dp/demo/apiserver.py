"""The Kubernetes API server's HTTP front for the DRA resources we use (demo, tests).

Serves an :class:`~nvswitch_dp.demo.apistore.ApiStore` over real HTTP/1.1 (keep-alive)
with bearer-token authentication, as the daemon's Kubernetes client expects of a real
server; what the store answers (and how it follows the REST conventions) is stated in
:mod:`nvswitch_dp.demo.apistore`.

Ownership: :class:`ApiServer` owns its listening socket, its thread and the connections
it accepted (``start()``/``stop()``; ``stop`` closes every open connection too: an
outage, not a pause); the store outlives it. ``python -m nvswitch_dp.demo.apiserver``
runs it as a process (SIGTERM or SIGINT stops it; kill it to play a crash).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nvswitch_dp.demo.apistore import PREFIX, ApiError, ApiStore, Obj, Request

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
        store.record(Request(self.command, url.path, code))
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
        prog="python -m nvswitch_dp.demo.apiserver", description=__doc__.splitlines()[0]
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
