"""The REST API of the real daemon process (simulated node, grpcio kubelet stand-in), driven
by outside tools: schemathesis against openapi.yaml, a client generated from openapi.yaml,
``nvswitch-dp status``, and HTTPS with a self-signed certificate."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.harness import DaemonProcess
from testkit.kubelet import KubeletStandIn

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "openapi.yaml"
BIN = Path(sys.executable).parent
TOKEN = "e2e-token"
R = "nvidia.com/gpu-h200"
RESOURCES = [f"{R}-{n}x" for n in (1, 2, 4, 8)]


def write_config(tmp_path: Path, **api: Any) -> Path:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    lines = ["version: v1", "api:", f"  token_file: {token_file}"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in api.items()]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def post(url: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon whose mutations accept ``TOKEN``, registered with the kubelet stand-in."""
    plugin_dir = tmp_path / "device-plugins"
    plugin_dir.mkdir()
    config = write_config(tmp_path)
    with KubeletStandIn(plugin_dir) as kubelet:
        process = DaemonProcess(tmp_path, plugin_dir, extra_args=["--config", str(config)])
        process.start()
        try:
            kubelet.wait_registered(RESOURCES, timeout=30)
            process.wait_api()
            yield process
        finally:
            process.terminate()


def daemon_sockets(daemon: DaemonProcess) -> int:
    """Open sockets of the daemon process (``/proc/<pid>/fd`` entries that are sockets)."""
    assert daemon.process is not None
    count = 0
    for fd in Path(f"/proc/{daemon.process.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            count += os.readlink(fd).startswith("socket:")
    return count


def daemon_resources(
    daemon: DaemonProcess, expected: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(living Trio tasks from ``/healthz``, open sockets of the daemon).

    Without ``expected``: once two readings in a row agree (the connection that asked
    has gone). With it: once a reading equals it, else the reading after 15 s. A
    connection its client closed keeps its task and socket until Hypercorn's keep-alive
    timer ends (5 s, ``keep_alive_timeout``), so the wait is longer than that.
    """
    previous = None
    deadline = time.monotonic() + 15
    while True:
        reading = (daemon.get("/healthz")[1]["tasks"], daemon_sockets(daemon))
        settled = reading == expected if expected is not None else reading == previous
        if settled or time.monotonic() > deadline:
            return reading
        previous = reading
        time.sleep(0.2)


def test_schemathesis_finds_no_deviation_from_openapi(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """Every answer conforms to openapi.yaml; no request hangs, and the run leaves no task
    or socket behind. The 1 s bound is a hang detector (a loopback answer takes
    milliseconds; a connection that stopped answering never answers), not a speed goal."""
    before = daemon_resources(daemon)
    har = tmp_path / "schemathesis.har"
    result = subprocess.run(
        [
            str(BIN / "schemathesis"), "run", str(OPENAPI),
            "--url", daemon.url,
            "--header", f"Authorization: Bearer {TOKEN}",
            "--checks", "all",
            "--max-examples", "30",
            "--seed", "20261128",
            "--request-timeout", "5",
            "--max-response-time", "1",
            "--report", "har",
            "--report-har-path", str(har),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=daemon.workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    assert re.search(r"Tested: 12\b", result.stdout), result.stdout[-3000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    slowest = max(entries, key=lambda e: e["time"])
    assert len(entries) > 500 and slowest["time"] < 1000, (
        len(entries), slowest["time"], slowest["request"]["method"], slowest["request"]["url"],
    )  # fmt: skip
    assert daemon_resources(daemon, expected=before) == before  # (tasks, sockets)
    # The token made the mutations go through, not just their refusals.
    metrics = daemon.get("/metrics")[1]
    assert re.search(
        r'hgx_h200_partition_operations_total\{operation="activate",result="SUCCESS"\} [1-9]',
        metrics,
    )


def test_a_client_generated_from_openapi_lists_activates_and_deactivates(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    package = "nvswitch_dp_generated_client"
    out = tmp_path / "generated"
    out.mkdir()
    result = subprocess.run(
        [
            str(BIN / "openapi-python-client"), "generate",
            "--path", str(OPENAPI),
            "--output-path", str(out / package),
            "--meta", "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": f"{BIN}:/usr/bin:/bin"},  # it formats with ruff from PATH
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(out))
    try:
        client_module: Any = importlib.import_module(f"{package}.client")
        partitions: Any = importlib.import_module(f"{package}.api.partitions")
        models: Any = importlib.import_module(f"{package}.models")
        for name in ("list_partitions", "activate_partition", "deactivate_partition"):
            importlib.import_module(f"{package}.api.partitions.{name}")
        client = client_module.AuthenticatedClient(base_url=daemon.url, token=TOKEN)
        with client:
            listing = partitions.list_partitions.sync(client=client, size=4)
            assert [p.id for p in listing.partitions] == [1, 2]
            assert listing.partitions[0].state == models.PartitionState.FREE
            activated = partitions.activate_partition.sync(id=2, client=client)
            assert isinstance(activated, models.Partition), activated
            assert activated.state == models.PartitionState.READY
            blocked = partitions.activate_partition.sync(id=0, client=client)
            assert isinstance(blocked, models.Problem) and blocked.status == 409
            assert (blocked.blocked_by, blocked.blocker_state) == (2, models.PartitionState.READY)
            body = models.Deactivation(force=False)
            deactivated = partitions.deactivate_partition.sync(id=2, client=client, body=body)
            assert isinstance(deactivated, models.Partition), deactivated
            assert deactivated.state == models.PartitionState.FREE
        anonymous = client_module.AuthenticatedClient(base_url=daemon.url, token="wrong")
        with anonymous:
            refused = partitions.activate_partition.sync_detailed(id=2, client=anonymous)
            assert refused.status_code == 403
    finally:
        sys.path.remove(str(out))
        for module in [m for m in sys.modules if m.startswith(package)]:
            del sys.modules[module]


def test_status_prints_the_fabric_map(daemon: DaemonProcess) -> None:
    assert post(daemon.url + "/v1/partitions/1/activate")[0] == 200
    assert post(daemon.url + "/v1/gpus/6/drain")[0] == 200
    token_file = daemon.workdir / "token"
    result = subprocess.run(
        [sys.executable, "-m", "nvswitch_dp", "status", "--api", daemon.url,
         "--token-file", str(token_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Fabric Manager (simulator): reachable" in out
    assert "4/4 resources registered" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("partition-")}
    assert len(rows) == 15
    assert "█  █  █  █  ·  ·  ·  ·  ready" in rows["partition-1"]
    assert "blocked by partition-1" in rows["partition-0"]
    assert "unhealthy".upper() in rows["partition-2"]  # GPU 6 drained
    assert re.search(r"^health\s+✓\s+✓\s+✓\s+✓\s+✓\s+D\s+✓\s+✓$", out, re.M), out
    assert re.search(
        r"^6\s+0000:[0-9a-f]{2}:00\.0\s+1\s+\d+\s+vfio-pci\s+ok \(drained\)", out, re.M
    )
    assert out.index("-- 8x") < out.index("-- 4x") < out.index("-- 2x") < out.index("-- 1x")

    unreachable = subprocess.run(
        [sys.executable, "-m", "nvswitch_dp", "status", "--api", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unreachable.returncode == 1 and "127.0.0.1:1" in unreachable.stderr


def test_https_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    config = write_config(tmp_path, tls_cert_file=str(cert), tls_key_file=str(key))
    plugin_dir = tmp_path / "device-plugins"
    plugin_dir.mkdir()
    daemon = DaemonProcess(tmp_path, plugin_dir, extra_args=["--config", str(config)]).start()
    url = f"https://127.0.0.1:{daemon.port}"
    context = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 20
        while True:
            daemon.check_alive()
            try:
                with urllib.request.urlopen(url + "/healthz", context=context, timeout=5) as r:
                    assert json.loads(r.read())["status"] == "ok"
                    break
            except (OSError, ssl.SSLError):
                assert time.monotonic() < deadline, daemon.log_text()
                time.sleep(0.1)
        request = urllib.request.Request(url + "/v1/partitions/7/activate", method="POST")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            assert json.loads(response.read())["state"] == "ready"
        with pytest.raises(Exception):  # noqa: B017 - plain HTTP gets no HTTP answer
            urllib.request.urlopen(daemon.url + "/healthz", timeout=5)
    finally:
        daemon.terminate()
