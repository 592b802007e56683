"""Issue 16: no resource, signal or impossible FM state takes the daemon down, and every
refusal is said. Each test runs the real daemon process on a simulated node."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from nvswitch_dp.fabric.simulator import STATE_VERSION
from testkit.harness import DaemonProcess, simulated_node

H200 = "nvidia.com/gpu-h200"
RESOURCES = [f"{H200}-{n}x" for n in (1, 2, 4, 8)]


def _metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (any labels) in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            total += float(match.group(2))
    return total


def test_a_connection_flood_under_256_descriptors_neither_kills_nor_starves(
    tmp_path: Path,
) -> None:
    with simulated_node(tmp_path, command_prefix=["prlimit", "--nofile=256:256"]) as (
        daemon,
        kubelet,
    ):
        flood = []
        try:
            for _ in range(400):  # idle, unauthenticated: more than the daemon has fds
                # A reset before connect returned is a refusal, as meant.
                with contextlib.suppress(OSError):
                    flood.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=5))
            time.sleep(0.5)
            # The kubelet restarts in the middle: every plugin socket is served and
            # registered again, and Allocate (FM activation included) still works.
            kubelet.restart()
            kubelet.wait_registered(RESOURCES, timeout=30)
            response = kubelet.allocate(f"{H200}-4x", ["partition-1"])
            assert response.container_responses[0].envs["NVSWITCH_DP_PARTITION_IDS"] == "1"
            daemon.check_alive()
        finally:
            for sock in flood:
                sock.close()
        status, text = _get_within(daemon, "/metrics", 5.0)  # the flood's slots free up
        assert status == 200
        assert _metric(text, "hgx_h200_api_connections_refused_total") > 0
        assert "REST connections limited to" in daemon.log_text()
        # A few rate-limited lines, not a traceback per connection.
        assert "Traceback" not in daemon.log_text()
        assert len(daemon.log_text()) < 50_000
        code, _ = daemon.terminate()
        assert code == 0


def _get_within(daemon: DaemonProcess, path: str, seconds: float) -> tuple[int, Any]:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return daemon.get(path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _overlapping_fm_state(state_dir: Path) -> None:
    # HGX H200: partition 1 is modules 1-4, partition 3 the pair (1, 3): they share GPUs.
    state_dir.mkdir(parents=True, exist_ok=True)
    state = {"version": STATE_VERSION, "platform": "hgx-h200", "active": [1, 3]}
    (state_dir / "fabricmanager.state").write_text(json.dumps(state))


def test_fm_reporting_overlapping_partitions_at_start_is_a_refusal_naming_both(
    tmp_path: Path,
) -> None:
    daemon = DaemonProcess(tmp_path, tmp_path / "device-plugins")
    _overlapping_fm_state(daemon.state_dir)
    daemon.start()
    assert daemon.process is not None
    code = daemon.process.wait(timeout=30)
    log = daemon.log_text()
    assert code == 1
    refusals = [line for line in log.splitlines() if "cannot start" in line]
    assert len(refusals) == 1
    assert "partitions 1 and 3 active" in refusals[0]
    assert "nothing was deactivated" in refusals[0] and "fmpm -d" in refusals[0]
    assert "Traceback" not in log
    assert json.loads(daemon.fm_state_file.read_text())["active"] == [1, 3]


def test_sighup_is_ignored_and_two_sigints_still_exit_0_with_sockets_removed(
    tmp_path: Path,
) -> None:
    with simulated_node(tmp_path) as (daemon, kubelet):
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        daemon.check_alive()
        assert kubelet.allocate(f"{H200}-1x", ["partition-7"]).container_responses
        assert "received SIGHUP; ignored" in daemon.log_text()
        daemon.process.send_signal(signal.SIGINT)
        time.sleep(0.03)  # the second one lands in the shutdown's cleanup
        daemon.process.send_signal(signal.SIGINT)
        code = daemon.process.wait(timeout=10)
        assert code == 0
        assert not list(daemon.plugin_dir.glob("nvswitch-dp-*.sock"))
        assert "KeyboardInterrupt" not in daemon.log_text()


def test_huge_allocates_are_refused_at_once_and_echo_little(tmp_path: Path) -> None:
    with simulated_node(tmp_path) as (_daemon, kubelet):
        begin = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            kubelet.allocate(f"{H200}-1x", ["partition-7"] * 300_000, timeout=30)
        elapsed = time.monotonic() - begin
        # Refused before it is decoded: the message is 3.9 MB.
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.value.details() or ""
        assert "at most 262144" in details and len(details) < 500
        # Not a timed assertion of speed: a bound far above the answer, far below the
        # 16-21 s the quadratic check took.
        assert elapsed < 10
        assert kubelet.allocate(f"{H200}-1x", ["partition-8"]).container_responses
        # Under the byte limit but over the ID limit: refused by count, echo clipped.
        with pytest.raises(grpc.RpcError) as refused:
            kubelet.allocate(f"{H200}-1x", ["partition-7"] * 5_000)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "5000 device IDs" in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as refused:
            kubelet.allocate(f"{H200}-1x", ["x" * 100_000])
        assert "(99920 more characters)" in (refused.value.details() or "")
        assert len(refused.value.details() or "") < 500


def test_sigterm_during_a_flood_still_exits_0(tmp_path: Path) -> None:
    with simulated_node(tmp_path, command_prefix=["prlimit", "--nofile=256:256"]) as (
        daemon,
        _kubelet,
    ):
        flood = []
        for _ in range(300):
            with contextlib.suppress(OSError):  # a reset before connect returned
                flood.append(socket.create_connection(("127.0.0.1", daemon.port)))
        try:
            code, took = daemon.terminate()
        finally:
            for sock in flood:
                sock.close()
        assert code == 0 and took < 5


def test_prlimit_runs_the_daemon_itself() -> None:
    # The flood tests rely on prlimit exec'ing the command (signals reach the daemon).
    out = subprocess.run(
        ["prlimit", "--nofile=256:256", "sh", "-c", "ulimit -n"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "256"


def _config(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\n" + text)
    return ["--config", str(path)]


def _wait(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_fm_reporting_an_overlap_mid_run_is_said_once_counted_and_not_ready(
    tmp_path: Path,
) -> None:
    args = _config(tmp_path, "fabric_manager:\n  reconcile_interval_seconds: 0.5\n")
    with simulated_node(tmp_path, extra_args=args) as (daemon, kubelet):
        kubelet.allocate(f"{H200}-4x", ["partition-1"])
        state = json.loads(daemon.fm_state_file.read_text())
        state["active"] = [1, 3]  # behind FM's own back: what FM forbids
        daemon.fm_state_file.write_text(json.dumps(state))
        _wait(lambda: daemon.get("/readyz")[0] == 503, 10, "readyz 503 on the overlap")
        time.sleep(2)  # several more supervision rounds see the same overlap
        _status, body = daemon.get("/readyz")
        assert any("partitions 1 and 3 active" in p for p in body["problems"])
        said = [line for line in daemon.log_text().splitlines() if "share a GPU: FM" in line]
        assert len(said) == 1
        _status, text = daemon.get("/metrics")
        assert _metric(text, "hgx_h200_fabric_overlap_reports_total") == 1
        assert json.loads(daemon.fm_state_file.read_text())["active"] == [1, 3]
        state["active"] = [1]
        daemon.fm_state_file.write_text(json.dumps(state))
        _wait(lambda: daemon.get("/readyz")[0] == 200, 10, "readyz 200 once FM is sane")


def test_failing_fm_lists_make_readyz_503_after_the_window_and_it_recovers(
    tmp_path: Path,
) -> None:
    from testkit.faults import fake_fmpm_path

    garble = tmp_path / "garble"
    wrapper = tmp_path / "fmpm"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{garble}" ]; then printf \'{{ "partitionInfo" : [ {{ "gpuInfo\'; exit 0; fi\n'
        f'exec "{fake_fmpm_path()}" "$@"\n'
    )
    wrapper.chmod(0o755)
    args = _config(
        tmp_path,
        "fabric_manager:\n  reconcile_interval_seconds: 5\n  list_failure_window_seconds: 2\n",
    )
    args += ["--fm-backend", "fmpm", "--fmpm-path", str(wrapper), "--fm-endpoint", "127.0.0.1"]
    env = {**os.environ, "NVSWITCH_DP_FMPM_SIM_STATE": str(tmp_path / "fm.state")}
    with simulated_node(tmp_path, extra_args=args, env=env) as (daemon, _kubelet):
        assert daemon.get("/readyz")[0] == 200
        garble.touch()
        began = time.monotonic()
        _wait(lambda: daemon.get("/readyz")[0] == 503, 20, "readyz 503 on failing lists")
        assert time.monotonic() - began >= 2  # not before the window
        _status, body = daemon.get("/readyz")
        assert any("every Fabric Manager list has failed" in p for p in body["problems"])
        garble.unlink()
        _wait(lambda: daemon.get("/readyz")[0] == 200, 10, "readyz 200 once FM answers")
        _status, text = daemon.get("/metrics")
        assert _metric(text, "hgx_h200_fabric_list_failures_total") >= 1


def test_a_damaged_dra_checkpoint_is_one_line_naming_the_file_and_exit_1(
    tmp_path: Path,
) -> None:
    from nvswitch_dp.demo.apiserver import write_kubeconfig
    from nvswitch_dp.dra.mode import CHECKPOINT_FILE

    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9", "t")
    args = ["--mode", "dra", "--node-name", "n1", "--kubeconfig", str(kubeconfig)]
    daemon = DaemonProcess(tmp_path, tmp_path / "device-plugins", extra_args=args)
    daemon.state_dir.mkdir(parents=True)
    checkpoint = daemon.state_dir / CHECKPOINT_FILE
    checkpoint.write_text('{"version": 1, "claims": {')  # cut off mid-write by hand
    daemon.start()
    assert daemon.process is not None
    code = daemon.process.wait(timeout=30)
    log = daemon.log_text()
    assert code == 1
    refusals = [line for line in log.splitlines() if "cannot start" in line]
    assert len(refusals) == 1, log
    assert str(checkpoint) in refusals[0] and "move it aside" in refusals[0]
    assert "Traceback" not in log


def test_list_and_watch_streams_per_resource_are_capped(tmp_path: Path) -> None:
    from nvswitch_dp.plugin.service import MAX_STREAMS
    from testkit.kubelet import unix_address

    with simulated_node(tmp_path) as (daemon, kubelet):
        api = kubelet.api
        socket_path = daemon.plugin_dir / "nvswitch-dp-gpu-h200-1x.sock"
        with grpc.insecure_channel(unix_address(socket_path)) as channel:
            stub = api.deviceplugin_grpc.DevicePluginStub(channel)
            streams = []
            for _ in range(MAX_STREAMS - 1):  # the kubelet stand-in holds one already
                stream = stub.ListAndWatch(api.deviceplugin.Empty(), timeout=30)
                assert next(stream).devices
                streams.append(stream)
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.ListAndWatch(api.deviceplugin.Empty(), timeout=30))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for stream in streams:
                stream.cancel()
            # The kubelet's own stream is untouched; a freed slot serves again.
            assert kubelet.allocate(f"{H200}-1x", ["partition-7"]).container_responses
            _wait(
                lambda: _stream_opens(stub, api),
                10,
                "a ListAndWatch stream once the others closed",
            )


def _stream_opens(stub: Any, api: Any) -> bool:
    stream = stub.ListAndWatch(api.deviceplugin.Empty(), timeout=30)
    try:
        return bool(next(stream).devices)
    except grpc.RpcError:
        return False
    finally:
        stream.cancel()
