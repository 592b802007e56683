"""The API-server stand-in's REST conventions (raw HTTP), its process mode, and the
client's configuration and claim reads through lightkube."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from dra_helpers import inputs_for

from nvswitch_dp.demo.apiserver import ApiServer
from nvswitch_dp.dra import errors
from nvswitch_dp.dra.kube import (
    ClaimNotFound,
    ClaimUnreadable,
    KubeClient,
    KubeConfigError,
    KubeRejected,
    KubeUnavailable,
    load_config,
)
from nvswitch_dp.dra.slices import build_pool

TOKEN = "standin-token"
SLICES = "/apis/resource.k8s.io/v1/resourceslices"
CLAIMS = "/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims"


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with ApiServer(token=TOKEN) as running:
        yield running


@pytest.fixture
def http(server: ApiServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=5) as client:
        yield client


def a_slice(node: str = "node-a", index: int = 0) -> dict[str, Any]:
    return build_pool(inputs_for("hgx-h200", node=node), 1)[index]


def claim(name: str = "vm-gpus") -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {
            "devices": {
                "requests": [
                    {"name": "gpu0", "exactly": {"deviceClassName": "gpu.gpu.nvswitch-dp.io"}}
                ]
            }
        },
    }


def assert_status(answer: httpx.Response, code: int, reason: str) -> dict[str, Any]:
    assert answer.status_code == code
    assert answer.headers["content-type"] == "application/json"
    body: dict[str, Any] = answer.json()
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["code"] == code and body["reason"] == reason
    return body


def test_slice_lifecycle(http: httpx.Client) -> None:
    created = http.post(SLICES, json=a_slice())
    assert created.status_code == 201
    meta = created.json()["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["generation"] == 1
    assert_status(http.post(SLICES, json=a_slice()), 409, "AlreadyExists")
    name = meta["name"]
    got = http.get(f"{SLICES}/{name}").json()
    assert got["spec"] == a_slice()["spec"]
    got["spec"]["pool"]["generation"] = 2
    updated = http.put(f"{SLICES}/{name}", json=got)
    assert updated.status_code == 200
    assert int(updated.json()["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert updated.json()["metadata"]["generation"] == 2
    stale = assert_status(http.put(f"{SLICES}/{name}", json=got), 409, "Conflict")
    assert "the object has been modified" in stale["message"]
    assert stale["details"] == {"name": name, "group": "resource.k8s.io", "kind": "resourceslices"}
    deleted = http.delete(f"{SLICES}/{name}")
    assert deleted.status_code == 200 and deleted.json()["status"] == "Success"
    assert_status(http.delete(f"{SLICES}/{name}"), 404, "NotFound")
    assert_status(http.get(f"{SLICES}/{name}"), 404, "NotFound")


def test_update_rules(http: httpx.Client) -> None:
    body = http.post(SLICES, json=a_slice()).json()
    name = body["metadata"]["name"]
    no_version = json.loads(json.dumps(body))
    del no_version["metadata"]["resourceVersion"]
    invalid = assert_status(http.put(f"{SLICES}/{name}", json=no_version), 422, "Invalid")
    assert invalid["details"]["causes"][0]["field"] == "metadata.resourceVersion"
    moved = json.loads(json.dumps(body))
    moved["spec"]["nodeName"] = "node-z"
    immutable = assert_status(http.put(f"{SLICES}/{name}", json=moved), 422, "Invalid")
    assert immutable["details"]["causes"][0]["message"] == "field is immutable"
    assert_status(http.put(f"{SLICES}/other", json=body), 400, "BadRequest")
    absent = json.loads(json.dumps(body))
    absent["metadata"]["name"] = "absent"
    assert_status(http.put(f"{SLICES}/absent", json=absent), 404, "NotFound")


def test_limits_are_enforced_with_causes(http: httpx.Client) -> None:
    broken = a_slice(index=1)
    device = broken["spec"]["devices"][0]
    broken["spec"]["devices"] = [dict(device, name=f"d-{i}") for i in range(65)]
    broken["spec"]["sharedCounters"] = [{"name": "s", "counters": {"c": {"value": "1"}}}]
    body = assert_status(http.post(SLICES, json=broken), 422, "Invalid")
    causes = body["details"]["causes"]
    assert {c["reason"] for c in causes} == {"FieldValueInvalid", "FieldValueTooMany"}
    assert body["message"].startswith('ResourceSlice.resource.k8s.io "node-a-gpu')
    assert http.get(SLICES).json()["items"] == []


def test_list_selectors(http: httpx.Client) -> None:
    for node in ("node-a", "node-b"):
        for index in (0, 1):
            assert http.post(SLICES, json=a_slice(node, index)).status_code == 201
    labelled = a_slice("node-c")
    labelled["metadata"]["labels"] = {"team": "gpu"}
    http.post(SLICES, json=labelled)

    def names(**params: str) -> list[str]:
        answer = http.get(SLICES, params=params)
        assert answer.status_code == 200
        body = answer.json()
        assert body["kind"] == "ResourceSliceList" and body["metadata"]["resourceVersion"]
        return [s["metadata"]["name"] for s in body["items"]]

    assert len(names()) == 5
    assert names(fieldSelector="spec.nodeName=node-b,spec.driver=gpu.nvswitch-dp.io") == [
        "node-b-gpu-nvswitch-dp-io-counters",
        "node-b-gpu-nvswitch-dp-io-devices-0",
    ]
    assert names(fieldSelector="spec.driver=other.example.com") == []
    assert names(labelSelector="team=gpu") == ["node-c-gpu-nvswitch-dp-io-counters"]
    assert len(names(labelSelector="!team")) == 4
    assert len(names(labelSelector="team!=gpu")) == 4
    assert_status(http.get(SLICES, params={"fieldSelector": "spec.bogus=1"}), 400, "BadRequest")
    assert_status(http.get(SLICES, params={"watch": "true"}), 400, "BadRequest")


def test_authentication_and_unknown_paths(server: ApiServer, http: httpx.Client) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as anonymous:
        assert_status(anonymous.get(SLICES), 401, "Unauthorized")
        assert_status(
            anonymous.get(SLICES, headers={"Authorization": "Bearer wrong"}), 401, "Unauthorized"
        )
    assert_status(http.get("/apis/resource.k8s.io/v1/devices"), 404, "NotFound")
    assert_status(http.get("/apis/resource.k8s.io/v1/namespaces/x/resourceslices"), 404, "NotFound")
    assert_status(http.patch(f"{SLICES}/x", json={}), 405, "MethodNotAllowed")


def test_claims_and_status(http: httpx.Client) -> None:
    url = CLAIMS.format(ns="vms")
    created = http.post(url, json=claim())
    assert created.status_code == 201 and created.json()["metadata"]["namespace"] == "vms"
    body = created.json()
    body["status"] = {
        "allocation": {
            "devices": {
                "results": [
                    {
                        "request": "gpu0",
                        "driver": "gpu.nvswitch-dp.io",
                        "pool": "node-a",
                        "device": "gpu-1",
                    }
                ]
            }
        }
    }
    spec_put = http.put(f"{url}/vm-gpus", json=body)
    assert spec_put.status_code == 200 and "status" not in spec_put.json()  # only via /status
    body["metadata"] = spec_put.json()["metadata"]
    status_put = http.put(f"{url}/vm-gpus/status", json=body)
    assert status_put.status_code == 200
    got = http.get(f"{url}/vm-gpus").json()
    assert got["status"]["allocation"]["devices"]["results"][0]["device"] == "gpu-1"
    assert_status(http.get(CLAIMS.format(ns="other") + "/vm-gpus"), 404, "NotFound")
    assert http.get(url).json()["kind"] == "ResourceClaimList"


async def test_client_reads_claims_and_maps_errors(server: ApiServer, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        uid = (await http.post(CLAIMS.format(ns="vms"), json=claim())).json()["metadata"]["uid"]
    async with KubeClient.from_kubeconfig(server.write_kubeconfig(tmp_path / "kc")) as client:
        got = await client.get_claim("vms", "vm-gpus")
        assert got["metadata"]["uid"] == uid
        assert got["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"] == (
            "gpu.gpu.nvswitch-dp.io"
        )
        with pytest.raises(errors.ClaimNotFound, match="vms/absent does not exist") as absent:
            await client.get_claim("vms", "absent")
        assert isinstance(absent.value, ClaimNotFound) and absent.value.name == "absent"
        bad = a_slice()
        bad["spec"]["driver"] = "Not A Driver"
        with pytest.raises(KubeRejected) as rejected:
            await client.create_slice(bad)
        assert rejected.value.code == 422 and rejected.value.causes[0].field == "spec.driver"
        server.stop()
        with pytest.raises(errors.ClaimUnreadable, match="ConnectError") as unreadable:
            await client.get_claim("vms", "vm-gpus")
        assert isinstance(unreadable.value, ClaimUnreadable)
        assert isinstance(unreadable.value.cause, KubeUnavailable)


async def test_wrong_token_is_rejected(server: ApiServer, tmp_path: Path) -> None:
    wrong = ApiServer(server.store, token="wrong", port=server.port)
    async with KubeClient.from_kubeconfig(wrong.write_kubeconfig(tmp_path / "kc")) as client:
        with pytest.raises(KubeRejected) as rejected:
            await client.list_slices("node-a", "gpu.nvswitch-dp.io")
        assert rejected.value.code == 401


def test_config_order(server: ApiServer, tmp_path: Path) -> None:
    given = server.write_kubeconfig(tmp_path / "given")
    from_env = ApiServer(token="env", port=1).write_kubeconfig(tmp_path / "env")

    def server_of(config: Any) -> str:
        return str(config.get().cluster.server)

    assert server_of(load_config(given, environ={"KUBECONFIG": str(from_env)})) == server.url
    assert server_of(load_config(None, environ={"KUBECONFIG": str(from_env)})) == (
        "http://127.0.0.1:1"
    )
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text("sa-token\n")
    (account / "ca.crt").write_text("")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    in_cluster: Any = load_config(None, environ=env, service_account_dir=account).get()
    assert in_cluster.cluster.server == "https://10.0.0.1:443"
    assert in_cluster.user.token == "sa-token"
    with pytest.raises(KubeConfigError, match="give --kubeconfig or set KUBECONFIG"):
        load_config(None, environ={})
    with pytest.raises(KubeConfigError, match="cannot read the token"):
        load_config(None, environ=env, service_account_dir=tmp_path / "none")
    with pytest.raises(KubeConfigError, match="kubeconfig"):
        load_config(tmp_path / "missing", environ={})


async def test_runs_as_a_process_and_stops_on_sigterm(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    command = [sys.executable, "-m", "nvswitch_dp.demo.apiserver", "--port", "0"]
    command += ["--token", TOKEN, "--kubeconfig", str(kubeconfig)]
    proc = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        assert proc.stdout is not None
        out = b""
        with trio.fail_after(20):
            while b"\n" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the stand-in exited before listening"
                out += chunk
        assert out.decode().startswith("listening on http://127.0.0.1:")
        async with KubeClient.from_kubeconfig(kubeconfig) as client:
            created = await client.create_slice(a_slice())
            assert created["metadata"]["resourceVersion"] == "1"
            assert len(await client.list_slices("node-a", "gpu.nvswitch-dp.io")) == 1
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await proc.wait() == 0
            with pytest.raises(KubeUnavailable):
                await client.list_slices("node-a", "gpu.nvswitch-dp.io")
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await proc.wait()
