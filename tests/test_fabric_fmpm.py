"""The fmpm backend: parsing fmpm's real output, exit statuses, retries, and the fake fmpm.

The literal outputs below were printed by JsonCpp 1.9.5's ``Json::StyledWriter`` from the
same ``Json::Value`` building code as ``fmpm.cpp`` (NVIDIA/Fabric-Manager-Client 1.0.1),
with H100-generation values: empty ``uuid``, zero ``pciBusId``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from nvswitch_dp.fabric import fmpm_sim
from nvswitch_dp.fabric.fmpm import (
    FmpmError,
    FmpmFabricManager,
    FmpmOutputError,
    ProcessLedger,
    ProcessResult,
    command_line,
    fm_code_from_status,
    parse_failure,
    parse_partition_list,
    process_identity,
    run_fmpm,
)
from nvswitch_dp.fabric.types import (
    FabricManagerError,
    FmBadParam,
    FmConnectionNotValid,
    FmInUse,
    FmNotConfigured,
    FmNvlinkError,
    FmTimeout,
    FmUninitialized,
)

# Partitions 0 (modules 1,2 here, trimmed), 3 (active) and 7 (single GPU, no NVLinks).
REAL_LIST = """\
{
   "maxNumPartitions" : 64,
   "numPartitions" : 3,
   "partitionInfo" : [
      {
         "gpuInfo" : [
            {
               "maxNumNvLinks" : 18,
               "numNvLinksAvailable" : 18,
               "nvlinkLineRateMBps" : 26562,
               "pciBusId" : "00000000:00:00.0",
               "physicalId" : 1,
               "uuid" : ""
            },
            {
               "maxNumNvLinks" : 18,
               "numNvLinksAvailable" : 18,
               "nvlinkLineRateMBps" : 26562,
               "pciBusId" : "00000000:00:00.0",
               "physicalId" : 2,
               "uuid" : ""
            }
         ],
         "isActive" : 0,
         "numGpus" : 2,
         "partitionId" : 0
      },
      {
         "gpuInfo" : [
            {
               "maxNumNvLinks" : 18,
               "numNvLinksAvailable" : 18,
               "nvlinkLineRateMBps" : 26562,
               "pciBusId" : "00000000:00:00.0",
               "physicalId" : 1,
               "uuid" : ""
            },
            {
               "maxNumNvLinks" : 18,
               "numNvLinksAvailable" : 18,
               "nvlinkLineRateMBps" : 26562,
               "pciBusId" : "00000000:00:00.0",
               "physicalId" : 3,
               "uuid" : ""
            }
         ],
         "isActive" : 1,
         "numGpus" : 2,
         "partitionId" : 3
      },
      {
         "gpuInfo" : [
            {
               "maxNumNvLinks" : 0,
               "numNvLinksAvailable" : 0,
               "nvlinkLineRateMBps" : 0,
               "pciBusId" : "00000000:00:00.0",
               "physicalId" : 1,
               "uuid" : ""
            }
         ],
         "isActive" : 0,
         "numGpus" : 1,
         "partitionId" : 7
      }
   ],
   "version" : 16909068
}
"""

REAL_UNSUPPORTED = """\
{
   "numPartitions" : 1,
   "partitionInfo" : [
      {
         "gpuPhysicalIds" : [ 1, 3 ],
         "numGpus" : 2,
         "partitionId" : 3
      }
   ],
   "version" : 16781832
}
"""


# --- parsing fmpm -l ----------------------------------------------------------------------


def test_parse_real_list_output() -> None:
    report = parse_partition_list(REAL_LIST)
    assert report.max_partitions == 64
    assert [p.partition_id for p in report.partitions] == [0, 3, 7]
    assert report.active_ids == {3}
    gpu = report.partitions[1].gpus[1]
    assert gpu.physical_id == 3
    assert (gpu.uuid, gpu.pci_bus_id) == ("", "00000000:00:00.0")  # H100 generation
    assert (gpu.max_nvlinks, gpu.nvlinks_available, gpu.nvlink_line_rate_mbps) == (18, 18, 26562)
    single = report.partitions[2]
    assert single.module_ids == (1,) and single.gpus[0].max_nvlinks == 0


def test_fake_fmpm_prints_what_jsoncpp_prints() -> None:
    report = parse_partition_list(REAL_LIST)
    assert fmpm_sim.styled_json(fmpm_sim.partition_list_json(report)) == REAL_LIST
    assert fmpm_sim.styled_json(fmpm_sim.unsupported_list_json([(3, (1, 3))])) == REAL_UNSUPPORTED


def _mutated(change: Any) -> str:
    data = json.loads(REAL_LIST)
    change(data)
    return json.dumps(data)


def _gpu(data: dict[str, Any]) -> dict[str, Any]:
    gpu: dict[str, Any] = data["partitionInfo"][1]["gpuInfo"][0]
    return gpu


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("Failed to get partition list. fmReturn: -8\n", "not JSON"),
        ("[]", "top level is not an object"),
        (_mutated(lambda d: d.pop("numPartitions")), "top.numPartitions is missing"),
        (_mutated(lambda d: d.update(numPartitions=4)), "partitionInfo has 3 entries"),
        (_mutated(lambda d: d["partitionInfo"][1].update(isActive=True)), "isActive is True"),
        (_mutated(lambda d: d["partitionInfo"][1].update(isActive=2)), "isActive is 2"),
        (_mutated(lambda d: d["partitionInfo"][0].update(numGpus=3)), "gpuInfo has 2 entries"),
        (_mutated(lambda d: _gpu(d).update(uuid=None)), "gpuInfo[0].uuid is None"),
        (_mutated(lambda d: _gpu(d).pop("physicalId")), "partitionInfo[1].gpuInfo[0].physicalId"),
        (_mutated(lambda d: _gpu(d).update(maxNumNvLinks=-1)), "maxNumNvLinks is -1"),
        (_mutated(lambda d: d["partitionInfo"][2].update(partitionId=3)), "duplicate partitionId"),
    ],
)
def test_parse_rejects_malformed_output(text: str, names: str) -> None:
    with pytest.raises(FmpmOutputError) as info:
        parse_partition_list(text)
    assert names in str(info.value)
    assert not info.value.transient


def test_parse_ignores_keys_fm_may_add() -> None:
    report = parse_partition_list(_mutated(lambda d: d.update(newField=1)))
    assert len(report.partitions) == 3


# --- exit statuses and failures -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (0, 0),
        (255, -1),  # BADPARAM
        (252, -4),  # UNINITIALIZED
        (251, -5),  # TIMEOUT
        (249, -7),  # IN_USE
        (248, -8),  # NOT_CONFIGURED
        (247, -9),  # CONNECTION_NOT_VALID
        (246, -10),  # NVLINK_ERROR
        (227, -29),  # newest header's lowest code
        (1, None),  # fmpm usage error
        (134, None),  # abort through a shell: not an FM code
        (-6, None),  # killed by SIGABRT
    ],
)
def test_exit_status_to_fm_code(status: int, code: int | None) -> None:
    assert fm_code_from_status(status) == code


@pytest.mark.parametrize(
    ("result", "error", "code"),
    [
        (ProcessResult(249, "Failed to activate partition. fmReturn: -7\n", ""), FmInUse, -7),
        (
            ProcessResult(252, "Failed to deactivate partition. fmReturn: -4\n", ""),
            FmUninitialized,
            -4,
        ),
        (
            ProcessResult(248, "Failed to get partition list. fmReturn: -8\n", ""),
            FmNotConfigured,
            -8,
        ),
        (
            ProcessResult(247, "Failed to connect to Fabric Manager instance.\n", ""),
            FmConnectionNotValid,
            -9,
        ),
        (ProcessResult(255, "Invalid Partition ID.\n", ""), FmBadParam, -1),
        (
            ProcessResult(246, "Failed to activate partition. fmReturn: -10\n", ""),
            FmNvlinkError,
            -10,
        ),
        # The printed code wins over a status mangled by a wrapper.
        (ProcessResult(1, "Failed to activate partition. fmReturn: -7\n", ""), FmInUse, -7),
        # A newer header's code has no class of its own, but keeps its number.
        (
            ProcessResult(244, "Failed to activate partition. fmReturn: -12\n", ""),
            FabricManagerError,
            -12,
        ),
        (ProcessResult(1, "", "Error: -a option requires partition ID.\n"), FmpmError, -2),
        (ProcessResult(-9, "", ""), FmpmError, -2),
    ],
)
def test_parse_failure(result: ProcessResult, error: type[FabricManagerError], code: int) -> None:
    exc = parse_failure("op", result)
    assert type(exc) is error
    assert exc.code == code


def test_command_lines() -> None:
    fmpm = ["/usr/bin/fmpm"]
    assert command_line(fmpm, "10.0.0.2", "list") == [
        "/usr/bin/fmpm",
        "--hostname",
        "10.0.0.2",
        "-l",
    ]
    assert command_line(fmpm, "h", "activate", [3])[-2:] == ["-a", "3"]
    assert command_line(fmpm, "h", "deactivate", [3])[-2:] == ["-d", "3"]
    assert command_line(fmpm, "h", "set-activated", [5, 3, 5])[-2:] == [
        "--set-activated-list",
        "3,5",
    ]
    assert command_line(fmpm, "h", "set-activated", [])[-2:] == ["--set-activated-list", ""]
    with pytest.raises(ValueError, match="outside FM's range"):
        command_line(fmpm, "h", "activate", [64])


# --- retries and timeouts, on a scripted runner and Trio's virtual clock -----------------

LIST_OK = ProcessResult(0, REAL_LIST, "")


def _fail(code: int, what: str = "get partition list") -> ProcessResult:
    return ProcessResult(code & 0xFF, f"Failed to {what}. fmReturn: {code}\n", "")


class ScriptedRunner:
    """Answers runs from a script; ``None`` in the script means "hang until killed"."""

    def __init__(self, script: Sequence[ProcessResult | None]) -> None:
        self.script = list(script)
        self.calls: list[tuple[float, list[str]]] = []

    async def __call__(self, argv: Sequence[str]) -> ProcessResult:
        self.calls.append((trio.current_time(), list(argv)))
        result = self.script.pop(0)
        if result is None:
            await trio.sleep_forever()
        assert result is not None
        return result


def _fm(runner: ScriptedRunner, retries: int = 3, timeout: float = 2.0) -> FmpmFabricManager:
    return FmpmFabricManager(
        ["fmpm"], "127.0.0.1", timeout, retries, backoff=0.25, backoff_max=1.0, runner=runner
    )


async def test_transient_errors_are_retried_with_backoff(autojump_clock: MockClock) -> None:
    runner = ScriptedRunner([_fail(-9), _fail(-5), _fail(-9), LIST_OK])
    report = await _fm(runner).list_partitions()
    assert report.active_ids == {3}
    times = [t for t, _ in runner.calls]
    assert [b - a for a, b in itertools.pairwise(times)] == [0.25, 0.5, 1.0]


async def test_a_restarted_fm_is_not_retried_it_waits_for_set_activated(
    autojump_clock: MockClock,
) -> None:
    runner = ScriptedRunner([_fail(-8), LIST_OK])
    with pytest.raises(FmNotConfigured):
        await _fm(runner).list_partitions()
    assert len(runner.calls) == 1


async def test_retries_run_out(autojump_clock: MockClock) -> None:
    runner = ScriptedRunner([_fail(-9)] * 3)
    with pytest.raises(FmConnectionNotValid):
        await _fm(runner, retries=2).list_partitions()
    assert len(runner.calls) == 3


@pytest.mark.parametrize(("code", "error"), [(-7, FmInUse), (-1, FmBadParam)])
async def test_in_use_and_badparam_are_not_retried(
    autojump_clock: MockClock, code: int, error: type[FabricManagerError]
) -> None:
    runner = ScriptedRunner([_fail(code, "activate partition")])
    with pytest.raises(error):
        await _fm(runner).activate(3)
    assert len(runner.calls) == 1


async def test_hung_fmpm_is_a_timeout(autojump_clock: MockClock) -> None:
    runner = ScriptedRunner([None, None])
    with pytest.raises(FmTimeout, match="within 2s"):
        await _fm(runner, retries=1).list_partitions()
    assert trio.current_time() == pytest.approx(2 + 0.25 + 2)


async def test_activate_that_timed_out_but_happened_counts_as_done(
    autojump_clock: MockClock,
) -> None:
    # Attempt 1 hangs (FM activates anyway), attempt 2 says IN_USE, the list shows it active.
    runner = ScriptedRunner([None, _fail(-7, "activate partition"), LIST_OK])
    await _fm(runner).activate(3)
    assert runner.calls[-1][1][-1] == "-l"


async def test_in_use_after_a_retry_for_another_partition_is_still_an_error(
    autojump_clock: MockClock,
) -> None:
    runner = ScriptedRunner([None, _fail(-7, "activate partition"), LIST_OK])
    with pytest.raises(FmInUse):
        await _fm(runner).activate(4)  # partition 4 is not active: someone else holds GPUs


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        FmpmFabricManager([], "h")
    with pytest.raises(ValueError):
        FmpmFabricManager(["fmpm"], "h", timeout=0)
    with pytest.raises(ValueError):
        FmpmFabricManager(["fmpm"], "h", retries=-1)


# --- real processes: FmpmFabricManager against the fake fmpm ------------------------------


def _sim_command(state: Path) -> list[str]:
    return [sys.executable, "-m", "nvswitch_dp.fabric.fmpm_sim", "--state-file", str(state)]


def _inject(state: Path, *specs: str) -> None:
    argv = _sim_command(state)
    for spec in specs:
        argv += ["--inject", spec]
    subprocess.run(argv, check=True)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "fabricmanager.state"


@pytest.fixture
def fm(state: Path) -> FmpmFabricManager:
    return FmpmFabricManager(_sim_command(state), "127.0.0.1", timeout=20, retries=0)


async def test_fmpm_backend_partition_lifecycle(fm: FmpmFabricManager) -> None:
    report = await fm.list_partitions()
    assert len(report.partitions) == 15 and report.active_ids == frozenset()
    await fm.activate(3)
    with pytest.raises(FmInUse) as info:
        await fm.activate(1)  # shares modules 1 and 3
    assert info.value.code == -7 and "fmReturn: -7" in str(info.value)
    await fm.activate(4)
    assert (await fm.list_partitions()).active_ids == {3, 4}
    await fm.deactivate(3)
    with pytest.raises(FmUninitialized):
        await fm.deactivate(3)
    with pytest.raises(FmBadParam):
        await fm.activate(40)  # below fmpm's limit of 64, not in FM's table


async def test_fmpm_backend_restart_recovery(fm: FmpmFabricManager, state: Path) -> None:
    await fm.activate(3)
    _inject(state, "restart")
    with pytest.raises(FmNotConfigured):
        await fm.list_partitions()
    await fm.set_activated([3])
    assert (await fm.list_partitions()).active_ids == {3}
    _inject(state, "restart")
    await fm.set_activated([])  # the empty list, as fmpm takes it
    assert (await fm.list_partitions()).active_ids == frozenset()


async def test_fmpm_backend_unreachable_fm(fm: FmpmFabricManager, state: Path) -> None:
    _inject(state, "unreachable")
    with pytest.raises(FmConnectionNotValid):
        await fm.list_partitions()
    _inject(state, "clear")
    await fm.list_partitions()


async def test_fmpm_backend_kills_a_slow_fmpm(state: Path) -> None:
    _inject(state, "slow-activation=30")
    fm = FmpmFabricManager(_sim_command(state), "127.0.0.1", timeout=1.5, retries=0)
    with trio.fail_after(10):
        with pytest.raises(FmTimeout):
            await fm.activate(3)


async def test_fmpm_backend_missing_program() -> None:
    fm = FmpmFabricManager(["/nonexistent/fmpm"], "127.0.0.1", timeout=5, retries=3)
    with pytest.raises(FmpmError, match="not found"):
        await fm.list_partitions()


# --- fmpm runs a killed daemon left behind ---------------------------------------------

# A daemon in miniature: the fmpm backend activating partition 3, recording its runs under
# the state directory given as argv[2] (argv[1]: the fake fmpm's state file).
_DAEMON = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import trio
    from nvswitch_dp.fabric.fmpm import FmpmFabricManager
    command = [sys.executable, "-m", "nvswitch_dp.fabric.fmpm_sim", "--state-file", sys.argv[1]]
    fm = FmpmFabricManager(command, timeout=120, retries=0, state_dir=Path(sys.argv[2]))
    trio.run(fm.activate, 3)
    """
)


def _wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until true; fail the test (not hang it) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def _records(directory: Path) -> dict[int, dict[str, Any]]:
    if not directory.exists():
        return {}
    return {int(p.name): json.loads(p.read_text()) for p in directory.iterdir()}


async def test_the_next_daemon_kills_the_fmpm_run_a_sigkilled_daemon_left(
    tmp_path: Path, state: Path
) -> None:
    _inject(state, "slow-activation=60")
    state_dir = tmp_path / "daemon-state"
    ledger_dir = state_dir / "fmpm-processes"
    daemon = subprocess.Popen(  # noqa: ASYNC220 (a test driving a process by hand)
        [sys.executable, "-c", _DAEMON, str(state), str(state_dir)]
    )
    try:
        _wait_for(lambda: _records(ledger_dir), "the daemon's fmpm -a 3 to be recorded")
        ((child, record),) = _records(ledger_dir).items()
        assert record["argv"][-2:] == ["-a", "3"]
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    # The daemon is gone; its fmpm run is not, and would activate 3 behind the next one.
    assert process_identity(child) == record["identity"]
    restarted = FmpmFabricManager(_sim_command(state), timeout=20, retries=0, state_dir=state_dir)
    try:
        with trio.fail_after(30):
            report = await restarted.list_partitions()
    finally:
        if process_identity(child) == record["identity"]:
            os.kill(child, signal.SIGKILL)  # the test failed: leave nothing running
    assert process_identity(child) is None
    assert report.active_ids == frozenset()  # killed mid-activation: FM never did it
    assert _records(ledger_dir) == {}


async def test_runs_are_recorded_only_while_they_run(tmp_path: Path, state: Path) -> None:
    ledger_dir = tmp_path / "fmpm-processes"
    fm = FmpmFabricManager(_sim_command(state), timeout=20, retries=0, state_dir=tmp_path)
    await fm.activate(3)
    assert _records(ledger_dir) == {}
    _inject(state, "slow-activation=60")
    with trio.move_on_after(1.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fm.activate, 4)
            while not _records(ledger_dir):  # noqa: ASYNC110 (a file appearing: no event)
                await trio.sleep(0.02)
            (child,) = _records(ledger_dir)
            nursery.cancel_scope.cancel()  # a cancelled call kills its run, then forgets it
    assert process_identity(child) is None
    assert _records(ledger_dir) == {}


async def test_the_ledger_kills_only_the_very_process_another_daemon_recorded(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "fmpm-processes"
    directory.mkdir()
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    sleepers = [subprocess.Popen(sleep) for _ in range(3)]  # noqa: ASYNC220
    try:
        reused, ours, leftover = sleepers
        mine = process_identity(os.getpid())

        def write(
            process: subprocess.Popen[bytes], identity: str | None, owner: str | None
        ) -> None:
            entry = {"identity": identity, "owner": owner, "argv": ["fmpm", "-a", "1"]}
            (directory / str(process.pid)).write_text(json.dumps(entry))

        # The PID now names another process (its start time differs): not killed.
        write(reused, "boot/1", "another daemon")
        # Recorded by this very daemon (a run of ours in flight): not killed.
        write(ours, process_identity(ours.pid), mine)
        # Still the process a killed daemon left: killed.
        write(leftover, process_identity(leftover.pid), "another daemon")
        (directory / ".77.tmp").write_text("{")  # a record cut short by the kill
        (directory / "78").write_text("not json")
        with trio.fail_after(30):
            killed = await ProcessLedger(directory).kill_leftovers()
        assert killed == [leftover.pid]
        assert leftover.wait(timeout=30) == -signal.SIGKILL
        assert reused.poll() is None and ours.poll() is None
        assert sorted(p.name for p in directory.iterdir()) == [str(ours.pid)]
    finally:
        for process in sleepers:
            process.kill()
            process.wait()


def test_process_identity_is_none_for_a_reaped_process() -> None:
    done = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert done.returncode == 0
    assert process_identity(os.getpid()) is not None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_identity(child.pid) is None


# --- the fake fmpm's command line, as fmpm.cpp's main() behaves ---------------------------


def _run(state: Path, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    return fmpm_sim.run(["--state-file", str(state), *argv], env or {})


@pytest.mark.parametrize(
    ("argv", "status", "stdout", "stderr"),
    [
        (["-a", "64"], 255, "Invalid Partition ID.\n", ""),
        (["-a"], 1, "", "Error: -a option requires partition ID.\n"),
        (["-d"], 255, "", "Error: -d option requires partition ID.\n"),
        (["-x"], 255, "", "Invalid argument.\n\n"),
        (["--set-activated-list", "1,64"], 255, "Invalid partition Id 64 was given.\n", ""),
        (["-v"], 0, "1.0.1\n", ""),
        (["--hostname", "10.0.0.9"], 0, "", ""),  # connected, no operation
        (["-d", "3"], 252, "Failed to deactivate partition. fmReturn: -4\n", ""),
    ],
)
def test_fake_fmpm_arguments(
    state: Path, argv: list[str], status: int, stdout: str, stderr: str
) -> None:
    assert _run(state, *argv) == (status, stdout, stderr)


def test_fake_fmpm_help_and_state_from_environment(state: Path) -> None:
    status, out, _ = fmpm_sim.run(["-h"], {})
    assert status == 0 and out.startswith("-l : List partitions\n")
    env = {fmpm_sim.STATE_ENV: str(state), fmpm_sim.PLATFORM_ENV: "hgx-b200"}
    status, out, _ = fmpm_sim.run(["-l"], env)
    assert status == 0
    assert parse_partition_list(out).partitions[0].partition_id == 1  # B200 IDs start at 1
    assert fmpm_sim.run(["-l"], {})[:2] == (247, "Failed to connect to Fabric Manager instance.\n")


def test_fake_fmpm_set_activated_list_drops_duplicates(state: Path) -> None:
    _run(state, "--inject", "restart")
    assert _run(state, "--set-activated-list", "3,4,3") == (0, "", "")
    assert parse_partition_list(_run(state, "-l")[1]).active_ids == {3, 4}


def test_fake_fmpm_side_queries(state: Path) -> None:
    status, out, _ = _run(state, "--list-unsupported-partitions")
    assert (status, json.loads(out)["numPartitions"], out.count("[]")) == (0, 0, 1)
    status, out, _ = _run(state, "--get-nvlink-failed-devices")
    assert status == 0 and json.loads(out)["gpuInfo"] == []
    _run(state, "--inject", "restart")
    assert _run(state, "--get-nvlink-failed-devices")[:2] == (
        253,
        "Failed to NVLink failed devices. fmReturn: -3\n",
    )


def test_fake_fmpm_restart_window_lapses(state: Path) -> None:
    _run(state, "--inject", "restart")
    data = json.loads(state.read_text())
    data["restarted_at"] -= 61  # a minute ago: FM has given up and exited
    state.write_text(json.dumps(data))
    assert _run(state, "-l")[:2] == (247, "Failed to connect to Fabric Manager instance.\n")
    assert _run(state, "--set-activated-list", "")[0] == 247
    _run(state, "--inject", "restart")
    assert _run(state, "--set-activated-list", "")[0] == 0


def test_fake_fmpm_bad_injection(state: Path) -> None:
    status, _, err = _run(state, "--inject", "meteor")
    assert status == 2 and "expected one of" in err


def test_fake_fmpm_as_a_program(state: Path) -> None:
    done = subprocess.run(
        [*_sim_command(state), "-a", "0"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    done = subprocess.run(
        [*_sim_command(state), "-a", "7"], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout) == (249, "Failed to activate partition. fmReturn: -7\n")


async def test_a_program_that_cannot_start_for_any_os_reason_is_an_fmpm_error(
    tmp_path: Path,
) -> None:
    # ENOEXEC here; EMFILE/ENFILE/EAGAIN under a flood take the same path: the process
    # never ran, so the call fails plainly (no traceback, no unknown outcome).
    program = tmp_path / "fmpm"
    program.write_bytes(b"\x7fELF not really")
    program.chmod(0o755)
    with pytest.raises(FmpmError, match=r"cannot start .*Exec format error"):
        await run_fmpm([str(program), "-l"])
