"""``nvswitch-dp doctor``'s fixes: only programs the machine has, one hugepage size per
fix, a missing FM client told apart from a silent FM, and a read-only import."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from doctor_helpers import MODULE_MAP, FakeNode, check, h200_report, run

from nvswitch_dp import doctor
from nvswitch_dp.doctor import Check, CheckResult, FmAnswer, NodeFacts, Status
from nvswitch_dp.doctor.advice import command_note, kernel_parameters_fix
from nvswitch_dp.doctor.checks_node import hugepages_fix
from nvswitch_dp.fabric.fmpm import LEDGER_DIRECTORY, process_identity

PARAMS = "intel_iommu=on iommu=pt"


@pytest.mark.parametrize(
    ("commands", "expected", "absent"),
    [
        (
            {"update-grub", "grubby"},
            f'add "{PARAMS}" to GRUB_CMDLINE_LINUX in /etc/default/grub, then '
            "`sudo update-grub && sudo reboot`",
            "grubby",
        ),
        (
            {"grubby", "grub2-mkconfig"},
            f'`sudo grubby --update-kernel=ALL --args="{PARAMS}" && sudo reboot`',
            "update-grub",
        ),
        ({"grub2-mkconfig"}, "`sudo grub2-mkconfig -o /boot/grub2/grub.cfg", "update-grub"),
        (set(), "none of update-grub, grubby or grub2-mkconfig is on this machine's PATH", "`"),
    ],
    ids=["debian", "rhel", "grub2-only", "none"],
)
def test_kernel_parameters_fix_uses_the_boot_loader_tool_present(
    commands: set[str], expected: str, absent: str
) -> None:
    fix = kernel_parameters_fix(NodeFacts(commands=frozenset(commands)), PARAMS)
    assert expected in fix
    assert absent not in fix
    assert PARAMS in fix


def test_command_note_names_only_missing_programs_grouped_by_source() -> None:
    facts = NodeFacts(commands=frozenset({"systemctl"}))
    assert command_note(facts, "systemctl") == ""
    note = command_note(NodeFacts(), "systemctl", "journalctl", "lspci")
    assert note == (
        " (not on this machine's PATH: systemctl, journalctl: systemd; inside the plugin's "
        "container, run it on the node; lspci: package pciutils)"
    )


def test_fm_service_fix_says_where_systemctl_is_missing(tmp_path: Path) -> None:
    unreachable = FmAnswer(error="CONNECTION_NOT_VALID", error_code=-9)
    with_systemd = check(run(FakeNode(tmp_path / "a"), fm=unreachable), "fm-reachable")
    assert "not on this machine" not in with_systemd.fix
    without = check(
        run(FakeNode(tmp_path / "b", commands=("lspci",)), fm=unreachable), "fm-reachable"
    )
    assert "`systemctl status nvidia-fabricmanager`" in without.fix
    assert "(not on this machine's PATH: systemctl, journalctl: systemd" in without.fix


_SIZE_OF_PARAMETER = {"1G": "1048576kB", "2M": "2048kB"}


@pytest.mark.parametrize(
    ("pools", "size"),
    [
        ({"1048576kB": 0, "2048kB": 0}, "1G"),
        ({"2048kB": 0}, "2M"),
        ({}, "1G"),
    ],
    ids=["both-pools", "2m-only", "no-pools"],
)
def test_hugepages_fix_names_one_page_size_at_boot_and_now(
    pools: dict[str, int], size: str
) -> None:
    for commands in (frozenset({"update-grub"}), frozenset()):
        fix = hugepages_fix(NodeFacts(hugepages=pools, commands=commands))
        boot_sizes = set(re.findall(r"hugepagesz=(\d+[GM])", fix))
        sysfs_pools = set(re.findall(r"/sys/kernel/mm/hugepages/hugepages-(\d+kB)/", fix))
        assert boot_sizes == {size}, fix
        assert sysfs_pools == {_SIZE_OF_PARAMETER[size]}, fix
        assert ("default_hugepagesz=1G" in fix) is (size == "1G")
        assert "GRUB_CMDLINE_LINUX" in fix if commands else "boot-loader tool" in fix


def _doctor_argv(tmp_path: Path, node: FakeNode, fm_lines: str) -> list[str]:
    roots = node.build()
    config = tmp_path / "config.yaml"
    entries = "".join(f'  {m}: "{a}"\n' for m, a in MODULE_MAP.items())
    config.write_text(
        f"version: v1\nstate_dir: {tmp_path / 'state'}\nmodule_map:\n{entries}"
        f"fabric_manager:\n{fm_lines}"
    )
    return [
        "--config", str(config),
        "--proc-root", str(roots.proc),
        "--sysfs-root", str(roots.sysfs),
        "--dev-root", str(roots.dev),
        "--fm-config", str(roots.fm_config),
    ]  # fmt: skip


@pytest.mark.parametrize("where", ["absolute", "on-path"])
def test_a_missing_fmpm_is_named_with_where_it_was_looked_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    fmpm = str(tmp_path / "no" / "fmpm") if where == "absolute" else "fmpm-not-installed"
    argv = _doctor_argv(tmp_path, FakeNode(tmp_path / "node"), f"  fmpm_path: {fmpm}\n")
    assert doctor.doctor_main(argv) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[FAIL] fm-reachable:"))
    if where == "absolute":
        assert f"fmpm not found: {fmpm} does not exist (fabric_manager.fmpm_path)" in line
    else:
        assert f"fmpm not found: no '{fmpm}' on PATH (" in line
    fix = out.split(line, 1)[1].splitlines()[1]
    assert "fabric_manager.fmpm_path" in fix and "NVIDIA/Fabric-Manager-Client" in fix
    assert "systemctl" not in fix  # FM was never asked: its service is not the suspect
    assert "[SKIP] module-map:" in out and "fm-reachable failed" in out


def test_an_fmpm_that_cannot_reach_fm_points_at_the_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fmpm = tmp_path / "fmpm"
    # What fmpm does when FM does not accept the connection: no fmReturn printed, exit
    # status 256 - 9 (CONNECTION_NOT_VALID).
    fmpm.write_text("#!/bin/sh\necho 'Failed to connect to Fabric Manager'\nexit 247\n")
    fmpm.chmod(0o755)
    fm_lines = f"  fmpm_path: {fmpm}\n  retries: 0\n  timeout_seconds: 5\n"
    argv = _doctor_argv(tmp_path, FakeNode(tmp_path / "node"), fm_lines)
    assert doctor.doctor_main(argv) == 1
    out = capsys.readouterr().out
    assert "[FAIL] fm-reachable: Fabric Manager did not answer:" in out
    assert "`systemctl status nvidia-fabricmanager`" in out
    assert f"`{fmpm} -l` answers on the node" in out
    assert "not found" not in out


def test_a_missing_libnvfm_is_named(tmp_path: Path) -> None:
    from nvswitch_dp.config import FabricManagerConfig

    library = str(tmp_path / "libnvfm.so.1")
    client, why = doctor.find_fm_client(
        FabricManagerConfig(backend="libnvfm", libnvfm_path=library)
    )
    assert client == ""
    assert why is not None and why.startswith(f"libnvfm not found: cannot load {library!r}")
    result = doctor.check_fm_reachable(
        NodeFacts(fm=FmAnswer(client_missing=why, backend="libnvfm"))
    )
    assert result.status is Status.FAIL
    assert "fabric_manager.libnvfm_path" in result.fix and "systemctl" not in result.fix


def test_no_fm_skips_fm_and_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _doctor_argv(tmp_path, FakeNode(tmp_path / "node"), "  retries: 0\n")
    assert doctor.doctor_main([*argv, "--no-fm"]) == 0
    out = capsys.readouterr().out
    assert "[SKIP] fm-reachable: not checked: Fabric Manager not asked" in out
    assert out.endswith("6 passed, 0 warning(s), 0 failed, 2 skipped\n")


def test_evaluate_refuses_a_check_that_needs_a_later_one() -> None:
    def judge(facts: NodeFacts) -> CheckResult:
        return CheckResult("a", Status.PASS, "")

    with pytest.raises(ValueError, match="check a needs b, not run before it"):
        doctor.evaluate(NodeFacts(), [Check("a", judge, ("b",)), Check("b", judge)])


def test_every_check_is_listed_after_what_it_needs_and_returns_its_own_name() -> None:
    facts = NodeFacts(fm=FmAnswer(report=h200_report()))
    results = doctor.evaluate(facts)  # raises if the order is wrong
    assert [r.name for r in results] == [c.name for c in doctor.CHECKS]


def test_doctor_imports_nothing_of_the_daemon_or_the_http_stack() -> None:
    """doctor is a read-only check: it must run where Hypercorn and Quart are broken or
    absent, and must not drag the daemon in (a fresh interpreter, to see every import)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import nvswitch_dp.doctor as d\n"
        "from nvswitch_dp.config import load_config\n"
        # The fmpm client, as configured by default (built, not called).
        "d.command._fm_lister(load_config(None, {}), Path('/nonexistent'))\n"
        "assert d.doctor_main(['--simulate', 'hgx-h200']) == 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('hypercorn', 'quart', 'quart_trio', 'grpclib') or m.startswith("
        "('nvswitch_dp.daemon', 'nvswitch_dp.api', 'nvswitch_dp.controller')))\n"
        "print('IMPORTED', bad)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "IMPORTED []"


def test_doctor_never_kills_the_daemons_fmpm_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An fmpm run the daemon has in flight, recorded in its state directory's ledger,
    survives a doctor run against the same state directory (the fmpm backend kills a
    killed predecessor's runs before its first call; doctor is not the daemon's heir)."""
    fmpm = tmp_path / "fmpm"
    fmpm.write_text("#!/bin/sh\necho 'Failed to connect to Fabric Manager'\nexit 247\n")
    fmpm.chmod(0o755)
    fm_lines = f"  fmpm_path: {fmpm}\n  retries: 0\n  timeout_seconds: 5\n"
    argv = _doctor_argv(tmp_path, FakeNode(tmp_path / "node"), fm_lines)
    in_flight = subprocess.Popen(["sleep", "60"])
    try:
        identity = process_identity(in_flight.pid)
        assert identity is not None
        ledger = tmp_path / "state" / LEDGER_DIRECTORY
        ledger.mkdir(parents=True)
        record = {"identity": identity, "owner": "another-boot/1", "argv": [str(fmpm), "-a", "1"]}
        (ledger / str(in_flight.pid)).write_text(json.dumps(record))
        assert doctor.doctor_main(argv) == 1
        assert "[FAIL] fm-reachable: Fabric Manager did not answer" in capsys.readouterr().out
        assert in_flight.poll() is None  # still running
        assert (ledger / str(in_flight.pid)).exists()
    finally:
        in_flight.kill()
        in_flight.wait()
