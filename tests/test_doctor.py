"""``nvswitch-dp doctor``: every check passing, and failing with its fix, on fake trees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from doctor_helpers import (
    FIRST_GPU,
    GPU_IDS,
    MODULE_MAP,
    FakeNode,
    check,
    h200_report,
    run,
)
from sysfs_helpers import REAL_ADDRESS, real_like_node

from nvswitch_dp import doctor
from nvswitch_dp.doctor import (
    CheckResult,
    FmAnswer,
    NodeFacts,
    Status,
    exit_code,
    format_report,
    run_checks,
)
from nvswitch_dp.fabric.types import (
    FmConnectionNotValid,
    FmNotConfigured,
    FmReport,
)
from nvswitch_dp.vfio.discovery import PciGpu, VfioSnapshot
from nvswitch_dp.vfio.pci_ids import GPU_DEVICE_IDS

ALL_CHECKS = [
    "gpus",
    "iommu",
    "vfio-modules",
    "gpus-vfio",
    "hugepages",
    "fm-shared-nvswitch-mode",
    "fm-reachable",
    "module-map",
]


def test_healthy_node_passes_every_check(tmp_path: Path) -> None:
    results = run(FakeNode(tmp_path))
    assert [r.name for r in results] == ALL_CHECKS
    assert all(r.status is Status.PASS for r in results), format_report(results)
    assert all(r.fix == "" and r.passed for r in results)
    assert exit_code(results) == 0
    assert "8 GPU(s) on vfio-pci" in check(results, "gpus-vfio").detail
    assert "sizes 1x, 2x, 4x, 8x" in check(results, "fm-reachable").detail
    assert "512.0 GiB" in check(results, "hugepages").detail


def test_builtin_vfio_modules_count_as_present(tmp_path: Path) -> None:
    node = FakeNode(tmp_path, modules=(), builtin=("vfio_pci", "vfio_iommu_type1"))
    result = check(run(node), "vfio-modules")
    assert result.status is Status.PASS
    assert "built in" in result.detail


def test_amd_iommu_flag_is_recognised(tmp_path: Path) -> None:
    node = FakeNode(tmp_path, cmdline="ro amd_iommu=on iommu=pt")
    result = check(run(node), "iommu")
    assert result.status is Status.PASS
    assert "amd_iommu=on iommu=pt" in result.detail


FAILURES: list[tuple[str, Callable[[Path], FakeNode], dict[str, object], Status, str, str]] = [
    # (case, node, run kwargs, status of the check, detail fragment, fix fragment)
    (
        "iommu-off",
        lambda p: FakeNode(p, cmdline="ro quiet", iommu=False),
        {},
        Status.FAIL,
        "no IOMMU groups",
        'enable VT-d in the BIOS, then add "intel_iommu=on iommu=pt" to GRUB_CMDLINE_LINUX',
    ),
    (
        "iommu-off-amd",
        lambda p: FakeNode(p, cmdline="ro quiet", iommu=False, cpu_vendor="AuthenticAMD"),
        {},
        Status.FAIL,
        "no IOMMU groups",
        'enable AMD-Vi in the BIOS, then add "amd_iommu=on iommu=pt"',
    ),
    (
        "iommu-asked-but-absent",
        lambda p: FakeNode(p, iommu=False),
        {},
        Status.FAIL,
        "disabled in the BIOS",
        "already asks for the IOMMU: enable VT-d in the BIOS setup",
    ),
    (
        "vfio-modules-missing",
        lambda p: FakeNode(p, modules=("nvidia",)),
        {},
        Status.FAIL,
        "vfio_pci, vfio_iommu_type1",
        "modprobe vfio-pci",
    ),
    (
        "gpu-on-nvidia-driver",
        lambda p: FakeNode(p, gpu_driver={FIRST_GPU: "nvidia"}),
        {},
        Status.FAIL,
        f"{FIRST_GPU}: bound to nvidia, not vfio-pci",
        "nvswitch-dp prepare-node --bind-vfio",
    ),
    (
        "group-not-viable",
        lambda p: FakeNode(p, group_extra={FIRST_GPU: ("0000:5e:00.0", "0x068000", "nvidia")}),
        {},
        Status.FAIL,
        "is not viable",
        "bind every other function in the GPU's IOMMU group to vfio-pci",
    ),
    (
        "no-dev-vfio-node",
        lambda p: FakeNode(p, missing_dev=("40",)),
        {},
        Status.FAIL,
        "/dev/vfio/40 is missing",
        "mount the host's /dev/vfio",
    ),
    (
        "no-hugepages",
        lambda p: FakeNode(p, hugepages={"1048576kB": 0, "2048kB": 0}),
        {},
        Status.WARN,
        "no hugepages reserved",
        "hugepagesz=1G",
    ),
    (
        "no-hugepages-2m-only",
        lambda p: FakeNode(p, hugepages={"2048kB": 0}),
        {},
        Status.WARN,
        "no hugepages reserved",
        "hugepages-2048kB/nr_hugepages",
    ),
    (
        "fm-full-passthrough-mode",
        lambda p: FakeNode(p, fm_config="FABRIC_MODE=0\n"),
        {},
        Status.FAIL,
        "FABRIC_MODE=0",
        "set FABRIC_MODE=1",
    ),
    (
        "fm-config-unreadable",
        lambda p: FakeNode(p, fm_config=None),
        {},
        Status.WARN,
        "cannot read",
        "--fm-config",
    ),
    (
        "fm-unreachable",
        FakeNode,
        {"fm": FmAnswer(error=str(FmConnectionNotValid("list")), error_code=-9)},
        Status.FAIL,
        "CONNECTION_NOT_VALID",
        "systemctl status nvidia-fabricmanager",
    ),
    (
        "fm-client-missing",
        FakeNode,
        {"fm": FmAnswer(client_missing="fmpm not found: /x/fmpm does not exist", backend="fmpm")},
        Status.FAIL,
        "Fabric Manager not asked: fmpm not found: /x/fmpm does not exist",
        "set fabric_manager.fmpm_path",
    ),
    (
        "fm-waiting-after-restart",
        FakeNode,
        {
            "fm": FmAnswer(
                error=str(FmNotConfigured("list")),
                error_code=-8,
                backend="fmpm",
                client="/opt/fm-client/fmpm",
            )
        },
        Status.FAIL,
        "NOT_CONFIGURED",
        "`/opt/fm-client/fmpm --set-activated-list <ids>`",
    ),
    (
        "fm-no-partitions",
        FakeNode,
        {"fm": FmAnswer(report=FmReport(()))},
        Status.FAIL,
        "no partitions",
        "FABRIC_MODE=1",
    ),
    (
        "module-map-incomplete",
        FakeNode,
        {"module_map": {m: a for m, a in MODULE_MAP.items() if m != 8}},
        Status.FAIL,
        "modules 8 have no address in the module_map",
        "nvswitch-dp prepare-node",
    ),
    (
        "module-map-wrong-address",
        FakeNode,
        {"module_map": {**MODULE_MAP, 3: "0000:00:1f.0"}},
        Status.FAIL,
        "not a discovered GPU: 3 -> 0000:00:1f.0",
        "Module ID",
    ),
]

FAILURES.append(
    (
        "module-map-empty",
        FakeNode,
        {"module_map": {}},
        Status.FAIL,
        "no module_map in the configuration and no node inventory",
        "nvidia-smi -q | grep -iE '^GPU |module id'",
    )
)

CHECK_OF_CASE = {
    "module-map-empty": "module-map",
    "iommu-off": "iommu",
    "iommu-off-amd": "iommu",
    "iommu-asked-but-absent": "iommu",
    "vfio-modules-missing": "vfio-modules",
    "gpu-on-nvidia-driver": "gpus-vfio",
    "group-not-viable": "gpus-vfio",
    "no-dev-vfio-node": "gpus-vfio",
    "no-hugepages": "hugepages",
    "no-hugepages-2m-only": "hugepages",
    "fm-full-passthrough-mode": "fm-shared-nvswitch-mode",
    "fm-config-unreadable": "fm-shared-nvswitch-mode",
    "fm-unreachable": "fm-reachable",
    "fm-client-missing": "fm-reachable",
    "fm-waiting-after-restart": "fm-reachable",
    "fm-no-partitions": "fm-reachable",
    "module-map-incomplete": "module-map",
    "module-map-wrong-address": "module-map",
}


@pytest.mark.parametrize(
    ("node", "kwargs", "status", "detail", "fix"),
    [case[1:] for case in FAILURES],
    ids=[case[0] for case in FAILURES],
)
def test_each_check_fails_with_its_fix(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    node: Callable[[Path], FakeNode],
    kwargs: dict[str, object],
    status: Status,
    detail: str,
    fix: str,
) -> None:
    case = request.node.callspec.id
    fm = kwargs.get("fm")
    assert fm is None or isinstance(fm, FmAnswer)
    extra = {k: v for k, v in kwargs.items() if k != "fm"}
    results = run(node(tmp_path), fm=fm, **extra)
    result = check(results, CHECK_OF_CASE[case])
    assert result.status is status, format_report(results)
    assert detail in result.detail
    assert fix in result.fix
    assert not result.passed
    assert exit_code(results) == (1 if status is Status.FAIL else 0)
    # The other checks are unaffected, except the ones that depend on the broken fact:
    # those are skipped, name it, and give no fix of their own.
    dependent = {
        "iommu": {"gpus-vfio"},
        "vfio-modules": {"gpus-vfio"},
        "fm-shared-nvswitch-mode": {"fm-reachable"},
        "fm-reachable": {"module-map"},
    }
    others = {r.name for r in results if r.status is not Status.PASS and r.name != result.name}
    expected = dependent.get(result.name, set()) if status is Status.FAIL else set()
    assert others == expected, format_report(results)
    for skipped in (check(results, name) for name in expected):
        assert skipped.status is Status.SKIP and skipped.fix == "", format_report(results)
        assert f"{result.name} failed" in skipped.detail


def test_gpus_of_an_unconfigured_model_are_named_with_their_id(tmp_path: Path) -> None:
    roots = FakeNode(tmp_path).build()
    results = run_checks(
        roots,
        gpu_device_ids={"10de:2330": "H100"},
        module_map={},
        fm=FmAnswer(report=h200_report()),
    )
    result = results[0]
    assert result.name == "gpus" and result.status is Status.FAIL
    assert "no GPU with a configured ID (10de:2330)" in result.detail
    assert "8 x 10de:2335 (H200 SXM 141GB)" in result.detail
    assert "add 10de:2335 to vfio.gpu_device_ids" in result.fix
    assert {r.status for r in results[1:]} == {Status.SKIP}


@pytest.mark.parametrize("lspci", [True, False], ids=["with-lspci", "without-lspci"])
def test_a_node_without_gpus_leads_with_that_and_skips_the_rest(
    tmp_path: Path, lspci: bool
) -> None:
    """The root cause first; no GRUB edit, module load or FM fix for a node that has no
    GPU; ``lspci`` suggested only where it is installed."""
    commands = ("update-grub", "modprobe", "systemctl") + (("lspci",) if lspci else ())
    node = FakeNode(
        tmp_path,
        cmdline="ro quiet",
        iommu=False,
        modules=(),
        hugepages={"2048kB": 0},
        fm_config=None,
        gpu_device=None,
        commands=commands,
    )
    results = run(node, fm=FmAnswer(error="CONNECTION_NOT_VALID", error_code=-9))
    text = format_report(results)
    first = results[0]
    assert first.name == "gpus" and first.status is Status.FAIL, text
    assert "no NVIDIA GPU on this node" in first.detail
    assert text.splitlines()[0].startswith("[FAIL] gpus: no NVIDIA GPU")
    for r in results[1:]:
        assert r.status is Status.SKIP, text
        assert r.detail.startswith("skipped: gpus failed"), text
        assert r.fix == ""
    assert text.count("fix:") == 1
    assert "GRUB" not in text and "modprobe" not in text and "systemctl" not in text
    assert ("lspci -nn -d 10de:" in first.fix) is lspci
    assert text.endswith("0 passed, 0 warning(s), 1 failed, 7 skipped\n")
    assert exit_code(results) == 1


def test_bridge_in_group_keeps_it_viable(tmp_path: Path) -> None:
    node = FakeNode(tmp_path, group_extra={FIRST_GPU: ("0000:5c:00.0", "0x060400", "pcieport")})
    assert check(run(node), "gpus-vfio").status is Status.PASS


def test_unasked_fm_is_skipped_and_module_map_is_still_compared_with_sysfs(
    tmp_path: Path,
) -> None:
    roots = FakeNode(tmp_path).build()
    results = run_checks(roots, gpu_device_ids=GPU_IDS, module_map=MODULE_MAP)
    fm = check(results, "fm-reachable")
    assert (fm.status, fm.fix) == (Status.SKIP, "")
    mm = check(results, "module-map")
    assert mm.status is Status.SKIP
    assert "all discovered GPUs" in mm.detail and "not asked" in mm.detail
    assert exit_code(results) == 0
    bad = run_checks(roots, gpu_device_ids=GPU_IDS, module_map={**MODULE_MAP, 3: "0000:00:1f.0"})
    assert check(bad, "module-map").status is Status.FAIL  # the node side is still judged


def test_duplicate_module_map_address_fails() -> None:
    facts = NodeFacts(
        module_map={**MODULE_MAP, 9: MODULE_MAP[1]},
        fm=FmAnswer(report=h200_report()),
    )
    result = doctor.check_module_map(facts)
    assert result.status is Status.FAIL
    assert "address used by several modules" in result.detail


def test_module_map_entries_fm_does_not_report_warn() -> None:
    extra = "0000:f0:00.0"
    gpus = tuple(
        doctor.GpuFacts(
            PciGpu(a, "10de", "2335", "H200 SXM 141GB", "vfio-pci", 1, 0),
            VfioSnapshot(a, present=True, driver="vfio-pci", iommu_group=1),
        )
        for a in [*MODULE_MAP.values(), extra]
    )
    facts = NodeFacts(
        module_map={**MODULE_MAP, 9: extra}, gpus=gpus, fm=FmAnswer(report=h200_report())
    )
    result = doctor.check_module_map(facts)
    assert result.status is Status.WARN
    assert "modules 9 are mapped (module_map) but FM reports no such module" in result.detail
    assert "remove them from module_map" in result.fix


def test_list_partitions_sync_and_async_callables() -> None:
    report = h200_report()

    async def async_list() -> FmReport:
        return report

    def failing() -> FmReport:
        raise FmConnectionNotValid("list", "connect to 127.0.0.1:6666 refused")

    assert doctor.ask_fabric_manager(lambda: report).report is report
    assert doctor.ask_fabric_manager(async_list).report is report
    answer = doctor.ask_fabric_manager(failing)
    assert answer.report is None
    assert answer.error_code == -9
    assert "refused" in (answer.error or "")


def test_run_checks_calls_the_lister(tmp_path: Path) -> None:
    roots = FakeNode(tmp_path).build()
    results = run_checks(
        roots, gpu_device_ids=GPU_IDS, module_map=MODULE_MAP, list_partitions=h200_report
    )
    assert exit_code(results) == 0


def test_format_report_shows_status_detail_and_fix() -> None:
    results = [
        CheckResult("iommu", Status.PASS, "64 IOMMU groups"),
        CheckResult("hugepages", Status.WARN, "none", "reserve some"),
        CheckResult("module-map", Status.FAIL, "module 8 missing", "add it"),
    ]
    text = format_report([*results, CheckResult("gpus-vfio", Status.SKIP, "skipped: x")])
    assert "[PASS] iommu: 64 IOMMU groups" in text
    assert "[WARN] hugepages: none\n       fix: reserve some" in text
    assert "[FAIL] module-map: module 8 missing\n       fix: add it" in text
    assert "[SKIP] gpus-vfio: skipped: x\n" in text
    assert text.endswith("1 passed, 1 warning(s), 1 failed, 1 skipped\n")
    assert exit_code(results) == 1
    assert exit_code(results[:2]) == 0


def test_parse_fm_config_ignores_comments() -> None:
    text = (
        "# FABRIC_MODE=0\nFABRIC_MODE = 1\n\n"
        "FM_CMD_UNIX_SOCKET_PATH=/run/nvidia-fabricmanager/socket\n"
    )
    assert doctor.parse_fm_config(text) == {
        "FABRIC_MODE": "1",
        "FM_CMD_UNIX_SOCKET_PATH": "/run/nvidia-fabricmanager/socket",
    }


def test_doctor_main_on_a_simulated_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.doctor_main(["--simulate", "hgx-h200"]) == 0
    out = capsys.readouterr().out
    for name in ALL_CHECKS:
        assert f"[PASS] {name}:" in out
    assert "0 failed" in out


def test_doctor_main_against_fake_roots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = FakeNode(tmp_path / "node", gpu_driver={FIRST_GPU: "nvidia"})
    roots = node.build()
    config = tmp_path / "config.yaml"
    entries = "".join(f'  {m}: "{a}"\n' for m, a in MODULE_MAP.items())
    config.write_text(f"version: v1\nstate_dir: {tmp_path / 'state'}\nmodule_map:\n{entries}")
    argv = [
        "--config", str(config),
        "--proc-root", str(roots.proc),
        "--sysfs-root", str(roots.sysfs),
        "--dev-root", str(roots.dev),
        "--fm-config", str(roots.fm_config),
    ]  # fmt: skip
    assert doctor.doctor_main(argv, list_partitions=h200_report) == 1
    out = capsys.readouterr().out
    assert f"[FAIL] gpus-vfio: 1 of 8 GPU(s) unusable: {FIRST_GPU}: bound to nvidia" in out
    assert "[PASS] fm-reachable" in out


def test_doctor_main_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nno_such_key: 1\n")
    assert doctor.doctor_main(["--config", str(config), "--no-fm"]) == 2


def test_on_a_node_like_the_real_h200_the_fixes_name_its_id_and_the_iommu_once(
    tmp_path: Path,
) -> None:
    sysfs, dev, proc = real_like_node(tmp_path)
    roots = doctor.Roots(proc=proc, sysfs=sysfs, dev=dev, fm_config=tmp_path / "absent.cfg")
    results = run_checks(roots, gpu_device_ids=GPU_DEVICE_IDS, module_map={})
    gpus = check(results, "gpus")
    assert (gpus.status, gpus.detail) == (
        Status.PASS,
        "1 x 10de:2335 (H200 SXM 141GB); drivers: nvidia 1",
    )
    others = [key for key in GPU_DEVICE_IDS if key != "10de:2335"]
    fixes = " ".join(r.fix for r in results)
    assert not [key for key in others if key in fixes]  # never another model's ID
    iommu = check(results, "iommu")
    assert iommu.status is Status.FAIL
    assert fixes.count("intel_iommu=on") == 1  # the IOMMU fix once, no bind recipe
    assert "amd_iommu=on" in iommu.fix  # no /proc/cpuinfo here: both vendors named
    bind = check(results, "gpus-vfio")
    assert (bind.status, bind.fix) == (Status.SKIP, "")
    assert bind.detail == "skipped: iommu and vfio-modules failed; fix those first"
    assert "driver_override" not in fixes and REAL_ADDRESS not in fixes
    module_map = check(results, "module-map")
    assert "prepare-node --print-module-map" in module_map.fix
