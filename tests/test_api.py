"""The REST API in process: a real controller on a simulated node (sysfs tree + FM simulator)
behind Quart's test client. Auth rules, problem details, filters, mutations, FM failures."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml
from quart.typing import TestClientProtocol as QuartClient
from quart_trio import QuartTrio

from nvswitch_dp.api.app import MAX_JSON_DEPTH, Pacer, create_app
from nvswitch_dp.api.asgi import BODY_TIMEOUT, MAX_BODY_BYTES, WholeExchanges
from nvswitch_dp.api.problems import PROBLEM_TYPES, TYPE_BASE
from nvswitch_dp.cli import simulated
from nvswitch_dp.config import Config, with_overrides
from nvswitch_dp.controller import PartitionController
from nvswitch_dp.daemon import discover_node
from nvswitch_dp.fabric.client import build_fabric_client
from nvswitch_dp.fabric.simulator import SimulatorStore, inject_fault
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.node import NodeMachine
from nvswitch_dp.partitions.state import Phase, State
from nvswitch_dp.partitions.table import PartitionTable

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
R = "nvidia.com/gpu-h200"
OPENAPI = Path(__file__).resolve().parent.parent / "openapi.yaml"


@dataclass
class Api:
    app: QuartTrio
    client: QuartClient
    controller: PartitionController
    config: Config
    token_file: Path

    def fm(self, fault: str) -> None:
        store = SimulatorStore(
            Path(self.config.state_dir) / "fabricmanager.state",
            self.config.fabric_manager.simulator_platform,
        )
        sim = store.load()
        inject_fault(sim, fault)
        store.save(sim)


async def make_api(
    tmp_path: Path,
    nursery: trio.Nursery,
    *,
    token: str | None = TOKEN,
    configured: bool = True,
    open_reads: bool = True,
    **app_options: Any,
) -> Api:
    """The app on a simulated node, its controller's effect runner in ``nursery``;
    ``app_options`` go to :func:`create_app`."""
    token_file = tmp_path / "token"
    if token is not None:
        token_file.write_text(f"  {token}\n")
    overrides: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "fabric_manager.backend": "simulator",
        "api.open_reads": open_reads,
    }
    if configured:
        overrides["api.token_file"] = str(token_file)
    config = simulated(with_overrides(Config(), overrides), "hgx-h200")
    fabric = build_fabric_client(config)
    report = await fabric.list_partitions()
    node = discover_node(config, report)
    table = PartitionTable.from_report(report)
    controller = PartitionController(
        NodeMachine(table, report, trio.current_time(), grace=30.0),
        fabric,
        node.gpus,
        resource_prefix=R,
        dev_root=Path(config.vfio.dev_root),
        metrics=Metrics(),
    )
    await nursery.start(controller.run_effects)
    app = create_app(controller, config, **app_options)
    return Api(app, app.test_client(), controller, config, token_file)


@pytest.fixture
async def api(tmp_path: Path, nursery: trio.Nursery) -> Api:
    return await make_api(tmp_path, nursery)


def active(api: Api) -> frozenset[int]:
    """Partitions active (or on their way) in the node's view."""
    return frozenset(
        pid for pid, v in api.controller.view().partitions.items() if v.phase.value != "inactive"
    )


async def problem(response: Any, status: int, name: str) -> dict[str, Any]:
    assert response.status_code == status, await response.get_data(as_text=True)
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.get_json()
    assert body["type"] == TYPE_BASE + name
    assert body["status"] == status
    assert body["title"] == PROBLEM_TYPES[name][1]
    assert body["detail"]
    assert body["instance"].startswith("/v")
    return body


# -- reads ---------------------------------------------------------------------------


async def test_node_reports_platform_fm_registration_and_counts(api: Api) -> None:
    api.controller.set_registered(f"{R}-4x", True)
    body = await (await api.client.get("/v1/node")).get_json()
    assert body["platform"] == {
        "gpu_model": "H200 SXM 141GB",
        "gpu_count": 8,
        "partition_sizes": [1, 2, 4, 8],
        "simulated": "hgx-h200",
    }
    assert body["fabric_manager"] == {"backend": "simulator", "reachable": True, "problem": None}
    registered = {r["resource"]: r["registered"] for r in body["resources"]}
    assert registered == {f"{R}-1x": False, f"{R}-2x": False, f"{R}-4x": True, f"{R}-8x": False}
    assert body["partitions"]["total"] == 15 and body["partitions"]["by_state"]["free"] == 15
    assert body["pod_resources"] == {"reachable": None}
    assert body["ready"] is False


async def test_gpus_carry_pci_iommu_numa_driver_and_partitions(api: Api) -> None:
    gpus = (await (await api.client.get("/v1/gpus")).get_json())["gpus"]
    assert [g["module"] for g in gpus] == list(range(1, 9))
    one = gpus[0]
    assert one["pci_address"] == api.config.module_map[1]
    assert one["driver"] == "vfio-pci"  # read from the simulated sysfs
    assert one["iommu_group"] == api.controller.layout.gpus[1].iommu_group
    assert one["numa_node"] == 0 and gpus[7]["numa_node"] == 1
    assert one["partitions"] == [0, 1, 3, 7]
    assert (one["healthy"], one["fault"], one["drained"]) == (True, None, False)


@pytest.mark.parametrize(
    ("query", "ids"),
    [
        ("?size=4", [1, 2]),
        ("?state=free&size=8", [0]),
        ("?state=allocated", []),
        ("", list(range(15))),
    ],
)
async def test_partition_filters(api: Api, query: str, ids: list[int]) -> None:
    body = await (await api.client.get("/v1/partitions" + query)).get_json()
    assert [p["id"] for p in body["partitions"]] == ids


@pytest.mark.parametrize(
    "query", ["?size=3x", "?size=0", "?size=17", "?size=-1", "?state=busy", "?size=1&size=2"]
)
async def test_bad_filters_are_400_problems_naming_the_parameter(api: Api, query: str) -> None:
    body = await problem(await api.client.get("/v1/partitions" + query), 400, "invalid-request")
    assert body["parameter"] in query


async def test_unknown_partition_gpu_route_and_method_are_problems(api: Api) -> None:
    body = await problem(await api.client.get("/v1/partitions/99"), 404, "unknown-partition")
    assert body["partition_id"] == 99 and body["instance"] == "/v1/partitions/99"
    await problem(await api.client.get("/v1/partitions/abc"), 400, "invalid-request")
    await problem(await api.client.get("/v1/gpus/9"), 404, "unknown-gpu")
    await problem(await api.client.get("/v2/nothing"), 404, "not-found")
    response = await api.client.delete("/v1/partitions/1")
    await problem(response, 405, "method-not-allowed")
    assert "GET" in response.headers["Allow"]


# -- auth ----------------------------------------------------------------------------


async def test_mutations_need_the_bearer_token(api: Api) -> None:
    response = await api.client.post("/v1/partitions/1/activate")
    await problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    malformed = {"Authorization": f"Basic {TOKEN}"}
    response = await api.client.post("/v1/partitions/1/activate", headers=malformed)
    await problem(response, 401, "unauthorized")
    assert "invalid_request" in response.headers["WWW-Authenticate"]
    wrong = {"Authorization": "Bearer nope"}
    await problem(await api.client.post("/v1/gpus/1/drain", headers=wrong), 403, "forbidden")
    assert active(api) == frozenset()
    assert api.controller.view().drained_modules == frozenset()


async def test_a_rotated_token_file_takes_effect_without_restart(api: Api) -> None:
    assert (await api.client.post("/v1/gpus/2/drain", headers=AUTH)).status_code == 200
    api.token_file.write_text("rotated\n")
    os.utime(api.token_file, ns=(1, 1))  # a different mtime even within the clock's tick
    await problem(await api.client.post("/v1/gpus/2/undrain", headers=AUTH), 403, "forbidden")
    rotated = {"Authorization": "Bearer rotated"}
    assert (await api.client.post("/v1/gpus/2/undrain", headers=rotated)).status_code == 200


async def test_without_a_configured_token_mutations_are_refused_never_open(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    api = await make_api(tmp_path, nursery, configured=False)
    body = await problem(
        await api.client.post("/v1/partitions/1/activate", headers=AUTH), 403, "mutations-disabled"
    )
    assert "api.token_file" in body["detail"]
    assert (await api.client.get("/v1/partitions")).status_code == 200  # reads stay open


@pytest.mark.parametrize("content", [None, "", "  \n"])
async def test_a_missing_or_empty_token_file_is_503_saying_how_to_fix_it(
    tmp_path: Path, nursery: trio.Nursery, content: str | None
) -> None:
    api = await make_api(tmp_path, nursery, token=None)
    if content is not None:
        api.token_file.write_text(content)
    response = await api.client.post("/v1/partitions/1/activate", headers=AUTH)
    body = await problem(response, 503, "token-unavailable")
    assert "api.token_file" in body["detail"]
    assert active(api) == frozenset()


async def test_closed_reads_need_the_token_but_probes_and_metrics_stay_open(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    api = await make_api(tmp_path, nursery, open_reads=False)
    for path in ("/v1/partitions", "/v1/node", "/v1/gpus", "/v1/partitions/1"):
        await problem(await api.client.get(path), 401, "unauthorized")
        assert (await api.client.get(path, headers=AUTH)).status_code == 200
    for path in ("/healthz", "/metrics"):
        assert (await api.client.get(path)).status_code == 200
    assert (await api.client.get("/readyz")).status_code == 503  # open, just not ready


# -- mutations -----------------------------------------------------------------------


async def test_activate_then_overlapping_activate_names_the_blocker(api: Api) -> None:
    response = await api.client.post("/v1/partitions/1/activate", headers=AUTH)
    body = await response.get_json()
    assert (response.status_code, body["state"], body["phase"]) == (200, "ready", "active")
    blocked = await problem(
        await api.client.post("/v1/partitions/3/activate", headers=AUTH), 409, "partition-blocked"
    )
    assert (blocked["blocked_by"], blocked["blocker_state"]) == (1, "ready")
    again = await api.client.post("/v1/partitions/1/activate", headers=AUTH)
    assert (await problem(again, 409, "illegal-transition"))["phase"] == "active"


async def test_deactivate_refuses_a_partition_a_pod_holds_unless_forced(api: Api) -> None:
    allocation = api.controller.allocate(f"{R}-2x", [["partition-5"]])
    await api.controller.wait_allocation(allocation)
    held = await api.client.post("/v1/partitions/5/deactivate", headers=AUTH)
    await problem(held, 409, "partition-in-use")
    forced = await api.client.post(
        "/v1/partitions/5/deactivate", headers=AUTH, json={"force": True}
    )
    body = await forced.get_json()
    assert (forced.status_code, body["state"], body["in_use"]) == (200, "free", False)
    metrics = (await (await api.client.get("/metrics")).get_data(as_text=True)).splitlines()
    assert (
        'hgx_h200_partition_operations_total{operation="force_deactivate",result="requested"} 1.0'
        in metrics
    )


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"force": "yes"}', "application/json"),
        (b'{"force": true, "now": 1}', "application/json"),
        (b"[true]", "application/json"),
        (b"{", "application/json"),
        (b"force=true", "application/x-www-form-urlencoded"),
    ],
)
async def test_a_malformed_deactivate_body_is_400(api: Api, body: bytes, content_type: str) -> None:
    await api.client.post("/v1/partitions/2/activate", headers=AUTH)
    headers = {**AUTH, "Content-Type": content_type}
    response = await api.client.post("/v1/partitions/2/deactivate", headers=headers, data=body)
    await problem(response, 400, "invalid-request")
    assert active(api) == frozenset({2})


async def test_json_nesting_is_refused_before_the_parser_recurses(api: Api) -> None:
    await api.client.post("/v1/partitions/2/activate", headers=AUTH)
    headers = {**AUTH, "Content-Type": "application/json"}
    deep = b"[" * 5000 + b"]" * 5000
    response = await api.client.post("/v1/partitions/2/deactivate", headers=headers, data=deep)
    assert "deeper than" in (await problem(response, 400, "invalid-request"))["detail"]
    # Brackets inside strings are text, not nesting.
    quoted = b'{"force": "' + b"[{" * MAX_JSON_DEPTH + b'\\"]"}'
    response = await api.client.post("/v1/partitions/2/deactivate", headers=headers, data=quoted)
    assert "force must be" in (await problem(response, 400, "invalid-request"))["detail"]
    nested = b'{"force": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    response = await api.client.post("/v1/partitions/2/deactivate", headers=headers, data=nested)
    assert "force must be" in (await problem(response, 400, "invalid-request"))["detail"]
    assert active(api) == frozenset({2})


async def test_a_body_over_the_limit_is_413_through_the_test_client_too(api: Api) -> None:
    response = await api.client.post(
        "/v1/partitions/2/deactivate", headers=AUTH, data=b" " * (MAX_BODY_BYTES + 1)
    )
    assert (await problem(response, 413, "content-too-large"))["max_bytes"] == MAX_BODY_BYTES


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 40), (-1.0, 40), (100.0, -1)])
def test_a_pacer_refuses_a_rate_or_burst_it_cannot_keep(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        Pacer(rate, burst)


@pytest.mark.parametrize(
    "limits",
    [{"max_body": -1}, {"body_timeout": 0.0}, {"final_send_grace": -1.0}],
)
def test_the_body_layer_refuses_limits_it_cannot_apply(limits: dict[str, Any]) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="max_body must be"):
        WholeExchanges(app, **limits)


async def test_cancelled_pacer_waiters_give_their_slots_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = Pacer(rate=100.0, burst=40)
    await trio.sleep(1.0)  # a full burst's credit
    for _ in range(40):
        await pacer.wait()  # the burst: no waiting
    # 1,000 requests whose clients give up while they wait their turn.
    async with trio.open_nursery() as nursery:
        for _ in range(1000):
            nursery.start_soon(pacer.wait)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    start = trio.current_time()
    await pacer.wait()
    assert trio.current_time() - start <= pacer.interval


async def test_pacer_waiters_that_stay_keep_their_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cancellation never lets a waiting request go before its slot."""
    pacer = Pacer(rate=10.0, burst=0)
    granted: dict[str, float] = {}

    async def request(name: str) -> None:
        await pacer.wait()
        granted[name] = trio.current_time()

    await trio.sleep(1.0)
    start = trio.current_time()
    gives_up = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        for name in ("a", "b"):
            nursery.start_soon(request, name)
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_until_cancelled, pacer, gives_up)
        await trio.testing.wait_all_tasks_blocked()
        for name in ("c", "d"):
            nursery.start_soon(request, name)
            await trio.testing.wait_all_tasks_blocked()
        gives_up.cancel()
    offsets = {name: round(t - start, 6) for name, t in granted.items()}
    assert offsets == {"a": 0.0, "b": 0.1, "c": 0.2, "d": 0.3}


async def _until_cancelled(pacer: Pacer, scope: trio.CancelScope) -> None:
    with scope:
        await pacer.wait()
    assert scope.cancelled_caught


async def test_drain_takes_every_partition_of_the_gpu_out_and_undrain_returns_them(
    api: Api,
) -> None:
    response = await api.client.post("/v1/gpus/3/drain", headers=AUTH)
    assert (await response.get_json())["drained"] is True
    states = {
        p["id"]: p["state"]
        for p in (await (await api.client.get("/v1/partitions")).get_json())["partitions"]
    }
    assert {pid for pid, s in states.items() if s == "unhealthy"} == {0, 1, 3, 9}
    refused = await api.client.post("/v1/partitions/9/activate", headers=AUTH)
    await problem(refused, 409, "partition-unhealthy")
    response = await api.client.post("/v1/gpus/3/undrain", headers=AUTH)
    assert (await response.get_json())["drained"] is False
    assert api.controller.view().view(9).state.value == "free"


@pytest.mark.parametrize(
    ("fault", "status", "name", "code"),
    [
        ("unreachable", 503, "fabric-manager-unavailable", "CONNECTION_NOT_VALID"),
        ("nvlink-error=2", 502, "fabric-manager-error", "NVLINK_ERROR"),
    ],
)
async def test_fabric_manager_failures_are_502_or_503_with_fms_code(
    api: Api, fault: str, status: int, name: str, code: str
) -> None:
    api.fm(fault)
    body = await problem(
        await api.client.post("/v1/partitions/2/activate", headers=AUTH), status, name
    )
    assert body["fm_code"] == code
    assert api.controller.view().view(2).phase.value == "inactive"  # nothing half-done
    assert not api.controller.view().in_use(2)


# -- the contract ----------------------------------------------------------------------


def test_problem_types_in_openapi_match_the_code() -> None:
    spec = yaml.safe_load(OPENAPI.read_text())
    documented = spec["components"]["schemas"]["Problem"]["properties"]["type"]["enum"]
    assert documented == [TYPE_BASE + name for name in PROBLEM_TYPES]
    table = re.findall(r"^\| ([a-z-]+) \| (\d{3}) \|", spec["info"]["description"], re.M)
    assert table == [(name, str(status)) for name, (status, _) in PROBLEM_TYPES.items()]


def test_partition_states_and_phases_in_openapi_match_the_code() -> None:
    schemas = yaml.safe_load(OPENAPI.read_text())["components"]["schemas"]
    assert schemas["PartitionState"]["enum"] == [s.value for s in State]
    assert schemas["PartitionPhase"]["enum"] == [p.value for p in Phase]


def test_openapi_states_the_body_limits_the_code_applies() -> None:
    description = yaml.safe_load(OPENAPI.read_text())["info"]["description"]
    assert f"at most\n{MAX_BODY_BYTES} bytes" in description
    assert f"within {BODY_TIMEOUT:g} s" in description
    assert f"deeper than {MAX_JSON_DEPTH}\nlevels" in description


async def test_every_served_route_is_in_openapi(api: Api, tmp_path: Path) -> None:
    spec = yaml.safe_load(OPENAPI.read_text())
    app = create_app(api.controller, api.config)
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        path = path.replace("{pid}", "{id}")
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((path, method.lower()))
    documented = {(p, m) for p, ops in spec["paths"].items() for m in ops if m != "parameters"}
    assert served == documented
