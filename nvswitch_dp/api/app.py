"""The REST control API: inventory, manual activation, maintenance, health, metrics.

Ownership: the app borrows the node's :class:`~nvswitch_dp.ports.OperatorSide`; it reads
the node only through its views and changes it only through its operator methods
(``activate``, ``deactivate``, ``drain``, ``undrain``), the same core the kubelet path uses.
``openapi.yaml`` is the contract: every route here is in it, and schemathesis checks the
running daemon against it.

Errors: every error answer is an RFC 9457 problem (:mod:`nvswitch_dp.api.problems`),
including 404 for unknown routes, 405, and 500 for anything unexpected (logged with its
traceback). Auth is :mod:`nvswitch_dp.api.auth`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from nvswitch_dp.api.asgi import BODY_TIMEOUT, MAX_BODY_BYTES, WholeExchanges
from nvswitch_dp.api.auth import Authorizer, TokenSource
from nvswitch_dp.api.problems import (
    PROBLEM_CONTENT_TYPE,
    Problem,
    problem_from_fabric_error,
    problem_from_state_error,
)
from nvswitch_dp.api.schemas import (
    DEFAULT_LIST_FAILURE_WINDOW_S,
    NodeFacts,
    gpu_json,
    gpus_json,
    node_json,
    partition_json,
    readiness_problems,
)
from nvswitch_dp.config import ApiConfig, Config
from nvswitch_dp.fabric.types import FabricManagerError
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.state import State, StateError
from nvswitch_dp.ports import OperatorSide

__all__ = ["PROMETHEUS_CONTENT_TYPE", "create_app", "node_facts", "readiness_problems"]

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
_DIGITS = re.compile(r"[0-9]{1,10}")
_STATES = tuple(s.value for s in State)
# The kubelet's Allocate shares this one event loop with the REST API. Unpaced, 16
# connections of a load generator keep the loop busy and Allocate's p99 grows tenfold
# (benchmarks/rest.py); paced, REST still serves far more than operators, dashboards and
# Prometheus need, and Allocate keeps its latency. Probes and /metrics are not paced.
REST_REQUESTS_PER_SECOND = 100.0
REST_BURST = 40
# The only body is {"force": bool}: depth 1. Deeper nesting is refused before json.loads,
# which would raise RecursionError (a 500) somewhere near a thousand levels.
MAX_JSON_DEPTH = 16
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class Pacer:
    """Spaces requests ``1/rate`` seconds apart beyond a burst of ``burst``. Trio only.

    Requests take their turn in arrival order (:class:`trio.Lock` is fair); the one at
    the head sleeps until the next slot of a virtual schedule and claims the slot only
    when it is granted. So a request cancelled while it waits (its client gave up, the
    server stops) leaves the line without using a slot: cancelled waiters never push
    later requests back, and the requests that stay are never granted early.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 0:
            raise ValueError(f"rate must be > 0 and burst >= 0, got {rate}, {burst}")
        self.interval = 1.0 / rate
        self.burst = burst
        self._next = 0.0
        self._line = trio.Lock()

    async def wait(self) -> None:
        async with self._line:
            now = trio.current_time()
            slot = max(self._next, now - self.burst * self.interval)
            if slot > now:
                await trio.sleep_until(slot)
            self._next = slot + self.interval


def node_facts(config: Config | None, model: str | None = None) -> NodeFacts:
    """What the app reports about the node beyond its views, from ``config`` and the
    GPU ``model`` the start found (:attr:`~nvswitch_dp.partitions.layout.NodeLayout.gpu_model`)."""
    if config is None:
        return NodeFacts()
    sysfs = Path(config.vfio.sysfs_root)
    simulated = (
        config.fabric_manager.simulator_platform
        if config.fabric_manager.backend == "simulator"
        else None
    )
    return NodeFacts(sysfs_root=sysfs, gpu_model=model, simulated=simulated)


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type=JSON_CONTENT_TYPE)


def _problem_response(problem: Problem) -> Response:
    response = Response(
        problem.render(request.path), status=problem.status, content_type=PROBLEM_CONTENT_TYPE
    )
    for name, value in problem.headers.items():
        response.headers[name] = value
    return response


def _int_param(name: str, text: str, *, low: int, high: int) -> int:
    """A decimal integer from a path or query parameter; 400 problem otherwise."""
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        raise Problem(
            "invalid-request",
            f"{name} must be an integer {low}-{high}, got {text!r}",
            {"parameter": name},
        )
    return int(text)


def _single_arg(name: str) -> str | None:
    values = request.args.getlist(name)
    if len(values) > 1:
        raise Problem("invalid-request", f"{name} may be given once", {"parameter": name})
    return values[0] if values else None


def _json_too_deep(data: bytes, limit: int) -> bool:
    """Whether the JSON text ``data`` nests arrays/objects deeper than ``limit``. Brackets
    inside strings do not count; unbalanced text is left to the parser to refuse."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            return True
    return False


def _load_json(data: bytes) -> Any:
    """``data`` parsed as JSON; 400 problem when it is not JSON or nests absurdly deep."""
    if _json_too_deep(data, MAX_JSON_DEPTH):
        raise Problem("invalid-request", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem("invalid-request", f"the body is not JSON: {exc}") from None
    except RecursionError:  # the depth check should make this unreachable; never a 500
        raise Problem("invalid-request", "the body nests too deep to parse") from None


async def _deactivate_body() -> bool:
    """``force`` from the optional ``{"force": bool}`` body; 400 problem when malformed."""
    data = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    if not data.strip():
        return False
    mimetype = request.mimetype
    if mimetype != JSON_CONTENT_TYPE and not mimetype.endswith("+json"):
        raise Problem(
            "invalid-request", f"the body must be application/json, got {mimetype or 'none'}"
        )
    body = _load_json(data)
    if not isinstance(body, dict) or set(body) - {"force"}:
        raise Problem("invalid-request", 'the body must be {"force": true|false} or empty')
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise Problem("invalid-request", f"force must be true or false, got {force!r}")
    return force


class _Routes:
    """The handlers of one app, bound to the node they serve (see :func:`create_app`).

    Every handler authorizes first; a read answers from one view of the node, a mutation
    calls one operator method and answers with the view after it. Errors are raised as
    :class:`Problem` (or the node's ``StateError``/``FabricManagerError``), which the
    app's error handlers render.
    """

    def __init__(
        self,
        node: OperatorSide,
        metrics: Metrics,
        config: Config | None,
        readiness: Callable[[], Sequence[str]] | None,
    ) -> None:
        self.node = node
        self.metrics = metrics
        self.readiness = readiness
        api = config.api if config is not None else ApiConfig()
        self.list_window = (
            config.fabric_manager.list_failure_window_seconds
            if config is not None
            else DEFAULT_LIST_FAILURE_WINDOW_S
        )
        self.facts = node_facts(config, node.layout.gpu_model)
        self.auth = Authorizer(TokenSource(api.token_file), open_reads=api.open_reads)
        # The unfiltered list is what dashboards and the benchmark poll: keep its bytes
        # for as long as the node has not changed (its generation moves on every change).
        self._list_generation: int | None = None
        self._list_body = b""

    # -- parameters ------------------------------------------------------------------

    def authorize(self, *, mutating: bool) -> None:
        self.auth.check(request.headers.get("Authorization"), mutating=mutating)

    def partition_id(self, text: str) -> int:
        pid = _int_param("id", text, low=0, high=10**9)
        if pid not in self.node.view().table:
            raise Problem(
                "unknown-partition",
                f"partition {pid} is not in Fabric Manager's table",
                {"partition_id": pid},
            )
        return pid

    def module_id(self, text: str) -> int:
        module = _int_param("module", text, low=1, high=16)
        if module not in self.node.view().table.module_ids:
            raise Problem(
                "unknown-gpu", f"GPU module {module} is in no partition", {"module": module}
            )
        return module

    def _partition(self, partition: int) -> Response:
        return _json(partition_json(self.node.layout, self.node.partition_view(partition)))

    def _gpu(self, gpu: int) -> Response:
        return _json(gpu_json(self.node.layout, self.node.view(), self.facts, gpu))

    # -- reads -----------------------------------------------------------------------

    async def get_node(self) -> Response:
        self.authorize(mutating=False)
        return _json(node_json(self.node.layout, self.node.view(), self.facts))

    async def list_gpus(self) -> Response:
        self.authorize(mutating=False)
        return _json({"gpus": gpus_json(self.node.layout, self.node.view(), self.facts)})

    async def get_gpu(self, module: str) -> Response:
        self.authorize(mutating=False)
        return self._gpu(self.module_id(module))

    async def list_partitions(self) -> Response:
        self.authorize(mutating=False)
        size_text, state = _single_arg("size"), _single_arg("state")
        size = _int_param("size", size_text, low=1, high=16) if size_text is not None else None
        if state is not None and state not in _STATES:
            raise Problem(
                "invalid-request",
                f"state must be one of {', '.join(_STATES)}, got {state!r}",
                {"parameter": "state"},
            )
        node = self.node.view()
        if size is None and state is None:
            if self._list_generation != node.generation:
                views = list(node.partitions.values())
                body = {"partitions": [partition_json(self.node.layout, v) for v in views]}
                self._list_generation, self._list_body = node.generation, json.dumps(body).encode()
            return Response(self._list_body, content_type=JSON_CONTENT_TYPE)
        views = [
            v
            for v in node.partitions.values()
            if (size is None or v.partition.size == size)
            and (state is None or v.state.value == state)
        ]
        return _json({"partitions": [partition_json(self.node.layout, v) for v in views]})

    async def get_partition(self, pid: str) -> Response:
        self.authorize(mutating=False)
        return self._partition(self.partition_id(pid))

    # -- mutations -------------------------------------------------------------------

    async def activate(self, pid: str) -> Response:
        self.authorize(mutating=True)
        partition = self.partition_id(pid)
        await self.node.activate(partition)
        log.info("partition %d activated through the API by %s", partition, request.remote_addr)
        return self._partition(partition)

    async def deactivate(self, pid: str) -> Response:
        self.authorize(mutating=True)
        partition = self.partition_id(pid)
        force = await _deactivate_body()
        if force and self.node.view().in_use(partition):
            log.warning(
                "forced deactivation of partition %d (held by a pod or claim) requested by %s",
                partition,
                request.remote_addr,
            )
        await self.node.deactivate(partition, force=force)
        log.info("partition %d deactivated through the API by %s", partition, request.remote_addr)
        return self._partition(partition)

    async def drain(self, module: str) -> Response:
        self.authorize(mutating=True)
        gpu = self.module_id(module)
        self.node.drain(gpu)
        return self._gpu(gpu)

    async def undrain(self, module: str) -> Response:
        self.authorize(mutating=True)
        gpu = self.module_id(module)
        self.node.undrain(gpu)
        return self._gpu(gpu)

    # -- probes and metrics: always open --------------------------------------------

    async def healthz(self) -> Response:
        # Living Trio tasks: flat over the daemon's life, so a leak shows (kubelet restarts).
        tasks = trio.lowlevel.current_statistics().tasks_living
        return _json({"status": "ok", "tasks": tasks})

    async def readyz(self) -> Response:
        if self.readiness is not None:
            problems = list(self.readiness())
        else:
            problems = readiness_problems(
                self.node.view(), now=trio.current_time(), list_window=self.list_window
            )
        return _json({"ready": not problems, "problems": problems}, 503 if problems else 200)

    async def metrics_text(self) -> Response:
        return Response(self.metrics.exposition(), content_type=PROMETHEUS_CONTENT_TYPE)

    def install(self, app: QuartTrio) -> None:
        """Register every route on ``app`` (openapi.yaml lists the same ones)."""
        get, post = ["GET"], ["POST"]
        for rule, handler, methods in (
            ("/v1/node", self.get_node, get),
            ("/v1/gpus", self.list_gpus, get),
            ("/v1/gpus/<module>", self.get_gpu, get),
            ("/v1/partitions", self.list_partitions, get),
            ("/v1/partitions/<pid>", self.get_partition, get),
            ("/v1/partitions/<pid>/activate", self.activate, post),
            ("/v1/partitions/<pid>/deactivate", self.deactivate, post),
            ("/v1/gpus/<module>/drain", self.drain, post),
            ("/v1/gpus/<module>/undrain", self.undrain, post),
            ("/healthz", self.healthz, get),
            ("/readyz", self.readyz, get),
            ("/metrics", self.metrics_text, get),
        ):
            app.add_url_rule(rule, view_func=handler, methods=methods)


async def _on_problem(problem: Problem) -> Response:
    return _problem_response(problem)


async def _on_state_error(exc: StateError) -> Response:
    return _problem_response(problem_from_state_error(exc))


async def _on_fabric_error(exc: FabricManagerError) -> Response:
    log.warning("%s %s: %s", request.method, request.path, exc)
    return _problem_response(problem_from_fabric_error(exc))


async def _on_http_exception(exc: HTTPException) -> Response:
    if isinstance(exc, MethodNotAllowed):
        allowed = ", ".join(sorted(exc.valid_methods or ()))
        problem = Problem(
            "method-not-allowed",
            f"{request.method} is not allowed on {request.path}; allowed: {allowed}",
            headers={"Allow": allowed},
        )
    elif exc.code == 404:
        problem = Problem("not-found", f"no route {request.path}; see openapi.yaml")
    elif exc.code is not None and 400 <= exc.code < 500:
        problem = Problem("invalid-request", exc.description or str(exc))
    else:
        log.error("%s %s failed: %s", request.method, request.path, exc)
        problem = Problem("internal-error", exc.description or str(exc))
    return _problem_response(problem)


async def _on_unexpected(exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.path)
    return _problem_response(Problem("internal-error", f"{type(exc).__name__}: {exc}"))


def create_app(
    node: OperatorSide,
    metrics: Metrics,
    config: Config | None = None,
    *,
    rest_rate: float | None = REST_REQUESTS_PER_SECOND,
    max_body: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT,
    readiness: Callable[[], Sequence[str]] | None = None,
) -> QuartTrio:
    """The ASGI app serving ``node``, configured by ``config.api``; ``/metrics`` renders
    ``metrics``.

    ``/readyz`` answers :func:`readiness_problems` of the node (every device-plugin
    resource registered, FM reachable) unless ``readiness`` is given: then its problems,
    read at each probe (DRA mode: the kubelet's registration, the ResourceSlices, FM).

    Without ``config`` it uses :class:`ApiConfig`'s defaults: open reads, no token, so
    every mutation is refused with ``403 mutations-disabled``. ``/v1`` requests are paced
    to ``rest_rate`` per second (None: unpaced); see :data:`REST_REQUESTS_PER_SECOND`.

    The app's ASGI entry is wrapped in :class:`~nvswitch_dp.api.asgi.WholeExchanges`:
    every body is read whole (``max_body`` bytes within ``body_timeout`` seconds, else
    413/408) before a route runs, and the end of every answer is shielded, so a
    keep-alive connection is always recycled or closed (see :mod:`nvswitch_dp.api.asgi`
    for why). Serve the returned app as is
    (``nvswitch_dp.api.server.serve_api(create_app(...), ...)``); Quart's
    ``test_client()`` goes through the same wrapper.
    """
    app = QuartTrio("nvswitch_dp")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    # Quart's documented place for ASGI middleware: the app stays a QuartTrio.
    app.asgi_app = WholeExchanges(  # type: ignore[method-assign]
        app.asgi_app, max_body=max_body, body_timeout=body_timeout
    )
    pacer = Pacer(rest_rate, REST_BURST) if rest_rate else None

    @app.before_request
    async def pace() -> None:
        if pacer is not None and request.path.startswith("/v1/"):
            await pacer.wait()

    app.register_error_handler(Problem, _on_problem)
    app.register_error_handler(StateError, _on_state_error)
    app.register_error_handler(FabricManagerError, _on_fabric_error)
    app.register_error_handler(HTTPException, _on_http_exception)
    app.register_error_handler(Exception, _on_unexpected)
    _Routes(node, metrics, config, readiness).install(app)
    return app
