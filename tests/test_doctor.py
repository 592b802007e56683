"""``nvswitch-dp doctor``: every check passing, and failing with its fix, on fake trees."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sysfs_helpers import REAL_ADDRESS, real_like_node

from nvswitch_dp import doctor
from nvswitch_dp.doctor import (
    CheckResult,
    FmAnswer,
    NodeFacts,
    Roots,
    Status,
    exit_code,
    format_report,
    run_checks,
)
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.types import (
    FmConnectionNotValid,
    FmGpu,
    FmNotConfigured,
    FmPartition,
    FmReport,
)
from nvswitch_dp.vfio.discovery import PciGpu, VfioSnapshot
from nvswitch_dp.vfio.pci_ids import GPU_DEVICE_IDS

H200 = platform("hgx-h200")
MODULE_MAP = H200.module_map()
GPU_IDS = {"10de:2335": "H200 SXM 141GB"}


def h200_report() -> FmReport:
    return FmReport(
        tuple(
            FmPartition(pid, pid == 1, tuple(FmGpu(m, links, links) for m in modules))
            for pid, modules, links in H200.rows
        )
    )


@dataclass
class FakeNode:
    """A node's /proc, /sys, /dev and fabricmanager.cfg under one temporary directory."""

    base: Path
    cmdline: str = "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on iommu=pt"
    modules: tuple[str, ...] = ("vfio_pci", "vfio_iommu_type1", "vfio")
    builtin: tuple[str, ...] = ()
    iommu: bool = True
    hugepages: dict[str, int] = field(default_factory=lambda: {"1048576kB": 512, "2048kB": 0})
    fm_config: str | None = "# Fabric Manager\nFABRIC_MODE=1\nFM_CMD_PORT_NUMBER=6666\n"
    gpu_driver: dict[str, str | None] = field(default_factory=dict)  # address -> driver
    group_extra: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)
    missing_dev: tuple[str, ...] = ()  # group numbers without /dev/vfio/<n>

    @property
    def roots(self) -> Roots:
        return Roots(
            proc=self.base / "proc",
            sysfs=self.base / "sys",
            dev=self.base / "dev",
            fm_config=self.base / "fabricmanager.cfg",
        )

    def build(self) -> Roots:
        r = self.roots
        (r.proc).mkdir(parents=True)
        (r.proc / "cmdline").write_text(self.cmdline + "\n")
        (r.proc / "modules").write_text(
            "".join(f"{m} 16384 0 - Live 0x0000000000000000\n" for m in self.modules)
        )
        for m in self.builtin:
            (r.sysfs / "module" / m / "parameters").mkdir(parents=True)
        for size, n in self.hugepages.items():
            pool = r.sysfs / "kernel" / "mm" / "hugepages" / f"hugepages-{size}"
            pool.mkdir(parents=True)
            (pool / "nr_hugepages").write_text(f"{n}\n")
        if self.fm_config is not None:
            r.fm_config.write_text(self.fm_config)
        (r.sysfs / "bus" / "pci" / "devices").mkdir(parents=True)
        (r.sysfs / "kernel" / "iommu_groups").mkdir(parents=True, exist_ok=True)
        (r.dev / "vfio").mkdir(parents=True)
        (r.dev / "vfio" / "vfio").touch()
        if self.iommu:
            (r.sysfs / "class" / "iommu" / "dmar0").mkdir(parents=True)
        for number, address in enumerate(sorted(MODULE_MAP.values()), start=40):
            driver = self.gpu_driver.get(address, "vfio-pci")
            self._function(address, "0x10de", "0x2335", "0x030200", driver, str(number))
            if str(number) not in self.missing_dev and self.iommu:
                (r.dev / "vfio" / str(number)).touch()
        for gpu, (address, pci_class, driver) in self.group_extra.items():
            group = os.readlink(r.sysfs / "bus" / "pci" / "devices" / gpu / "iommu_group")
            self._function(address, "0x10de", "0x22a3", pci_class, driver, Path(group).name)
        # An unrelated device that is not a GPU.
        self._function("0000:00:1f.0", "0x8086", "0x1234", "0x060100", "lpc_ich", "1")
        return r

    def _function(
        self, address: str, vendor: str, device: str, pci_class: str, driver: str | None, group: str
    ) -> None:
        sysfs = self.roots.sysfs
        dev = sysfs / "bus" / "pci" / "devices" / address
        dev.mkdir(parents=True)
        (dev / "vendor").write_text(vendor + "\n")
        (dev / "device").write_text(device + "\n")
        (dev / "class").write_text(pci_class + "\n")
        if driver is not None:
            drv = sysfs / "bus" / "pci" / "drivers" / driver
            drv.mkdir(parents=True, exist_ok=True)
            (dev / "driver").symlink_to(drv)
        if self.iommu:
            gdir = sysfs / "kernel" / "iommu_groups" / group
            (gdir / "devices").mkdir(parents=True, exist_ok=True)
            (gdir / "devices" / address).symlink_to(dev)
            (dev / "iommu_group").symlink_to(gdir)


def check(results: list[CheckResult], name: str) -> CheckResult:
    (found,) = [r for r in results if r.name == name]
    return found


def run(node: FakeNode, *, fm: FmAnswer | None = None, **kw: object) -> list[CheckResult]:
    roots = node.build()
    module_map = kw.get("module_map", MODULE_MAP)
    assert isinstance(module_map, dict)
    return run_checks(
        roots,
        gpu_device_ids=GPU_IDS,
        module_map=module_map,
        fm=fm if fm is not None else FmAnswer(report=h200_report()),
    )


ALL_CHECKS = [
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


FIRST_GPU = MODULE_MAP[1]

FAILURES: list[tuple[str, Callable[[Path], FakeNode], dict[str, object], Status, str, str]] = [
    # (case, node, run kwargs, status of the check, detail fragment, fix fragment)
    (
        "iommu-off",
        lambda p: FakeNode(p, cmdline="ro quiet", iommu=False),
        {},
        Status.FAIL,
        "no IOMMU groups",
        'intel_iommu=on iommu=pt" (Intel)',
    ),
    (
        "iommu-asked-but-absent",
        lambda p: FakeNode(p, iommu=False),
        {},
        Status.FAIL,
        "disabled in the BIOS",
        "update-grub",
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
        lambda p: FakeNode(p, hugepages={"2048kB": 0}),
        {},
        Status.WARN,
        "no hugepages reserved",
        "hugepagesz=1G",
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
        "fm-waiting-after-restart",
        FakeNode,
        {"fm": FmAnswer(error=str(FmNotConfigured("list")), error_code=-8)},
        Status.FAIL,
        "NOT_CONFIGURED",
        "--set-activated-list",
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
    "iommu-asked-but-absent": "iommu",
    "vfio-modules-missing": "vfio-modules",
    "gpu-on-nvidia-driver": "gpus-vfio",
    "group-not-viable": "gpus-vfio",
    "no-dev-vfio-node": "gpus-vfio",
    "no-hugepages": "hugepages",
    "fm-full-passthrough-mode": "fm-shared-nvswitch-mode",
    "fm-config-unreadable": "fm-shared-nvswitch-mode",
    "fm-unreachable": "fm-reachable",
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
    # The other checks are unaffected, except the ones that depend on the broken fact.
    dependent = {"iommu": {"gpus-vfio"}, "fm-reachable": {"module-map"}}
    others = {
        r.name
        for r in results
        if r.status is not Status.PASS
        and r.name != result.name
        and r.name not in dependent.get(result.name, set())
    }
    assert others == set(), format_report(results)


def test_no_gpus_found_names_the_ids(tmp_path: Path) -> None:
    roots = FakeNode(tmp_path).build()
    results = run_checks(
        roots,
        gpu_device_ids={"10de:2330": "H100"},
        module_map={},
        fm=FmAnswer(report=h200_report()),
    )
    result = check(results, "gpus-vfio")
    assert result.status is Status.FAIL
    assert "10de:2330" in result.detail
    assert "10de:2335" in result.fix


def test_bridge_in_group_keeps_it_viable(tmp_path: Path) -> None:
    node = FakeNode(tmp_path, group_extra={FIRST_GPU: ("0000:5c:00.0", "0x060400", "pcieport")})
    assert check(run(node), "gpus-vfio").status is Status.PASS


def test_unchecked_fm_warns_and_module_map_is_still_compared_with_sysfs(tmp_path: Path) -> None:
    roots = FakeNode(tmp_path).build()
    results = run_checks(roots, gpu_device_ids=GPU_IDS, module_map=MODULE_MAP)
    assert check(results, "fm-reachable").status is Status.WARN
    mm = check(results, "module-map")
    assert mm.status is Status.WARN
    assert "all discovered GPUs" in mm.detail


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
    text = format_report(results)
    assert "[PASS] iommu: 64 IOMMU groups" in text
    assert "[WARN] hugepages: none\n       fix: reserve some" in text
    assert "[FAIL] module-map: module 8 missing\n       fix: add it" in text
    assert text.endswith("1 passed, 1 warning(s), 1 failed\n")
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
    gpus = check(results, "gpus-vfio")
    assert gpus.status is Status.FAIL
    assert "10de:2335" in gpus.fix and REAL_ADDRESS in gpus.fix
    others = [key for key in GPU_DEVICE_IDS if key != "10de:2335"]
    fixes = " ".join(r.fix for r in results)
    assert not [key for key in others if key in fixes]  # never another model's ID
    assert check(results, "iommu").fix == doctor.FIX_IOMMU
    assert fixes.count("intel_iommu=on") == 1  # the IOMMU fix once, no bind recipe
    assert "driver_override" not in gpus.fix
    module_map = check(results, "module-map")
    assert "prepare-node --print-module-map" in module_map.fix
