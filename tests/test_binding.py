"""Moving GPUs to vfio-pci: the pure plan, the /proc scan for open GPUs, and the real
kernel port (its writes and its modprobe) against files and programs made here."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from nvswitch_dp.vfio.binding import (
    FunctionState,
    SysfsKernel,
    find_open_holders,
    plan_binding,
    read_device_minor,
)

SYS = Path("/sys")
GPU, GPU2, AUDIO, BRIDGE, SWITCH = (
    "0000:5d:00.0",
    "0000:18:00.0",
    "0000:5d:00.1",
    "0000:5c:01.0",
    "0000:5e:00.0",
)
FIXTURES = Path(__file__).parent / "fixtures" / "h200-sxm-passthrough"


def _gpu(address: str = GPU, driver: str | None = "nvidia", **kw: object) -> FunctionState:
    fields: dict[str, object] = {
        "address": address,
        "driver": driver,
        "pci_class": 0x030200,
        "iommu_group": 7,
        "is_gpu": True,
    }
    fields.update(kw)
    return FunctionState(**fields)  # type: ignore[arg-type]


def _member(address: str, driver: str | None, pci_class: int) -> FunctionState:
    return FunctionState(address, driver, pci_class, 7, False)


def _shell(plan_moves: object) -> list[str]:
    return [w.shell() for m in plan_moves for w in m.writes]  # type: ignore[attr-defined]


def test_a_gpu_on_nvidia_moves_by_override_unbind_probe() -> None:
    plan = plan_binding(SYS, {GPU: [_gpu()]}, ["vfio_pci"])
    assert plan.modules == ("vfio_pci",)
    assert _shell(plan.moves) == [
        f"echo vfio-pci > /sys/bus/pci/devices/{GPU}/driver_override",
        f"echo {GPU} > /sys/bus/pci/drivers/nvidia/unbind",
        f"echo {GPU} > /sys/bus/pci/drivers_probe",
    ]
    assert plan.refusals == () and plan.already == 0


def test_interrupted_halfway_the_rerun_plans_only_what_is_left() -> None:
    # killed after the unbind: unbound, override already set
    plan = plan_binding(SYS, {GPU: [_gpu(driver=None, override="vfio-pci")]}, [])
    assert _shell(plan.moves) == [f"echo {GPU} > /sys/bus/pci/drivers_probe"]


def test_nothing_to_do_when_every_gpu_is_on_vfio_pci_and_no_module_is_loaded_for_nothing() -> None:
    plan = plan_binding(SYS, {GPU: [_gpu(driver="vfio-pci")]}, ["vfio_pci"])
    assert plan.changes_nothing and plan.already == 1 and plan.modules == ()


def test_group_members_move_too_but_bridges_unbound_and_stub_stay() -> None:
    members = [
        _gpu(),
        _member(AUDIO, "snd_hda_intel", 0x040300),
        _member(BRIDGE, "pcieport", 0x060400),
        _member("0000:5d:00.2", None, 0x0C0330),
        _member("0000:5d:00.3", "pci-stub", 0x0C8000),
    ]
    plan = plan_binding(SYS, {GPU: members}, [])
    assert [(m.address, m.from_driver) for m in plan.moves] == [
        (GPU, "nvidia"),
        (AUDIO, "snd_hda_intel"),
    ]
    assert plan.moves[1].reason == f"in IOMMU group 7 with GPU {GPU}"


@pytest.mark.parametrize(
    ("members", "held", "refusal"),
    [
        ([_gpu(iommu_group=None)], {}, "has no IOMMU group"),
        ([_gpu(), _member(SWITCH, "nvidia", 0x068000)], {}, "also holds NVSwitch 0000:5e:00.0"),
        ([_gpu()], {GPU: "/dev/nvidia0 is open in pid 42 (python3)"}, "pid 42 (python3)"),
        ([], {}, "gone from the PCI bus"),
    ],
)
def test_refused_gpus_move_nothing_and_the_others_still_do(
    members: list[FunctionState], held: dict[str, str], refusal: str
) -> None:
    groups = {GPU: members, GPU2: [_gpu(GPU2, iommu_group=8)]}
    plan = plan_binding(SYS, groups, [], held)
    assert len(plan.refusals) == 1 and refusal in plan.refusals[0]
    assert plan.refusals[0].startswith(GPU)
    assert [m.address for m in plan.moves] == [GPU2]


def test_device_minor_from_the_real_driver_information_file(tmp_path: Path) -> None:
    info = tmp_path / "driver" / "nvidia" / "gpus" / "0000:00:06.0" / "information"
    info.parent.mkdir(parents=True)
    info.write_text((FIXTURES / "proc-driver-nvidia.txt").read_text().split("\n", 1)[1])
    assert read_device_minor(tmp_path, "0000:00:06.0") == 0
    assert read_device_minor(tmp_path, "0000:5d:00.0") is None


def test_open_holders_are_found_by_their_fd_links(tmp_path: Path) -> None:
    for pid, comm, targets in [
        ("42", "python3", ["/dev/nvidiactl", "/dev/nvidia0"]),
        ("43", "bash", ["/dev/pts/0"]),
        ("44", "qemu", ["/dev/nvidia0"]),
    ]:
        (tmp_path / pid / "fd").mkdir(parents=True)
        (tmp_path / pid / "comm").write_text(comm + "\n")
        for n, target in enumerate(targets):
            os.symlink(target, tmp_path / pid / "fd" / str(n))
    (tmp_path / "self").mkdir()  # not a pid
    scan = find_open_holders(tmp_path, {"/dev/nvidia0", "/dev/nvidia1"})
    assert dict(scan.holders) == {"/dev/nvidia0": ("pid 42 (python3)", "pid 44 (qemu)")}
    assert scan.unreadable == 0


def test_sysfs_kernel_writes_the_value_in_one_write(tmp_path: Path) -> None:
    attribute = tmp_path / "driver_override"
    attribute.write_text("(null)\n")
    SysfsKernel().write_attribute(attribute, "vfio-pci")
    # no O_TRUNC or O_APPEND: a sysfs store sees exactly the value, at offset 0
    assert attribute.read_text() == "vfio-pci"
    with pytest.raises(FileNotFoundError):
        SysfsKernel().write_attribute(tmp_path / "absent", "x")


def _program(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_modprobe_is_run_without_a_shell_and_its_failure_is_said(tmp_path: Path) -> None:
    log = tmp_path / "log"
    ok = _program(tmp_path / "modprobe-ok", f'echo "$@" >> {log}')
    SysfsKernel(ok).load_module("vfio_pci")
    assert log.read_text() == "vfio_pci\n"
    bad = _program(tmp_path / "modprobe-bad", 'echo "FATAL: Module $1 not found" >&2; exit 1')
    with pytest.raises(OSError) as caught:
        SysfsKernel(bad).load_module("vfio_pci")
    assert caught.value.errno == errno.EIO
    assert "cannot load vfio_pci: modprobe exited 1: FATAL: Module vfio_pci not found" in str(
        caught.value
    )
    with pytest.raises(OSError, match="not found"):
        SysfsKernel(str(tmp_path / "no-such-modprobe")).load_module("vfio_pci")


def test_a_held_gpu_keeps_its_whole_group_even_when_another_gpu_shares_it() -> None:
    group = [_gpu(GPU), _gpu(GPU2)]  # two GPUs behind one switch without ACS
    plan = plan_binding(SYS, {GPU: group, GPU2: group}, [], {GPU2: "pid 42 (qemu)"})
    assert plan.moves == ()
    assert plan.refused == (GPU2, GPU)
    assert plan.refusals == (
        f"{GPU2}, {GPU}: in use: {GPU2}: pid 42 (qemu); stop it first, then run again",
    )


def test_host_devices_of_other_vendors_are_never_taken_unasked() -> None:
    nic = _member("0000:5d:00.2", "mlx5_core", 0x020000)
    nic = FunctionState(nic.address, nic.driver, nic.pci_class, 7, False, vendor="15b3")
    nvme = FunctionState("0000:5d:00.3", "nvme", 0x010802, 7, False, vendor="144d")
    plan = plan_binding(SYS, {GPU: [_gpu(), nic, nvme]}, [])
    assert plan.moves == () and plan.refused == (GPU,)
    assert "0000:5d:00.2 on mlx5_core, 0000:5d:00.3 on nvme" in plan.refusals[0]
