"""``nvswitch-dp prepare-node`` end to end, as a real process.

Two kinds of node:

- one **like the real H200** of ``tests/fixtures/h200-sxm-passthrough``: its sysfs
  attributes (one GPU at ``0000:00:06.0`` on ``nvidia``, no IOMMU group: a VM without a
  virtual IOMMU), its ``/proc/driver/nvidia`` entry, and an ``nvidia-smi`` that prints
  exactly what the real one printed; NVML is the fake library or absent;
- a **simulated HGX H200** whose GPUs start on ``nvidia`` and whose sysfs answers
  ``driver_override``/``unbind``/``drivers_probe`` as the kernel does
  (:class:`~nvswitch_dp.vfio.simulate.SimulatedKernel`).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from nvml_helpers import (  # noqa: F401
    FAKE_NVML_ENV,
    H200_GPU_LINE,
    fake_nvml_dir_fixture,
    write_fake_nvml,
)
from sysfs_helpers import REAL_ADDRESS, real_like_node

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.vfio.discovery import read_function, vfio_problem
from nvswitch_dp.vfio.nvidia_smi_sim import install_nvidia_smi
from nvswitch_dp.vfio.simulate import SimulatedKernel, build_simulated_node
from nvswitch_dp.vfio.simulate.faults import add_function, hold_open
from nvswitch_dp.vfio.simulate.node import SimulatedNode
from testkit.harness import DaemonProcess
from testkit.kubelet import KubeletStandIn

FIXTURES = Path(__file__).parent / "fixtures" / "h200-sxm-passthrough"
H200 = "nvidia.com/gpu-h200"


def run_prepare(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as a process; NVML absent unless ``env`` brings the fake."""
    environment = {k: v for k, v in os.environ.items() if k != FAKE_NVML_ENV}
    environment["LD_LIBRARY_PATH"] = ""
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "nvswitch_dp", "prepare-node", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )


def _program(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# ----------------------------------------------------------------- a node like the real one


def real_nvidia_smi(root: Path, runs: Path | None = None) -> Path:
    """An ``nvidia-smi`` that prints the real output (and notes each run in ``runs``)."""
    note = f"echo run >> {runs}\n" if runs is not None else ""
    return _program(root / "nvidia-smi", f'{note}cat "{FIXTURES / "nvidia-smi-q.txt"}"')


def test_print_module_map_from_the_real_nvidia_smi_output_without_nvml(tmp_path: Path) -> None:
    sysfs, dev, _ = real_like_node(tmp_path)
    result = run_prepare(
        "--sysfs-root", str(sysfs),
        "--dev-root", str(dev),
        "--state-dir", str(tmp_path / "state"),
        "--nvidia-smi", str(real_nvidia_smi(tmp_path)),
        "--print-module-map",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert 'module_map:\n  8: "0000:00:06.0"\n' in result.stdout
    assert "NVML unavailable" in result.stdout
    assert not (tmp_path / "state").exists()  # changes nothing


def test_print_module_map_with_nvml_does_not_run_nvidia_smi(
    tmp_path: Path, fake_nvml_dir: Path
) -> None:
    sysfs, dev, _ = real_like_node(tmp_path)
    runs = tmp_path / "nvidia-smi-runs"
    env = {
        "LD_LIBRARY_PATH": str(fake_nvml_dir),
        FAKE_NVML_ENV: str(write_fake_nvml(tmp_path / "nvml.txt", [H200_GPU_LINE])),
    }
    result = run_prepare(
        "--sysfs-root", str(sysfs),
        "--dev-root", str(dev),
        "--state-dir", str(tmp_path / "state"),
        "--nvidia-smi", str(real_nvidia_smi(tmp_path, runs)),
        "--print-module-map",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert 'module_map:\n  8: "0000:00:06.0"\n' in result.stdout
    assert "modules read with NVML for 1 GPU(s)" in result.stdout
    assert not runs.exists()


def test_the_inventory_records_what_the_driver_said(tmp_path: Path) -> None:
    sysfs, dev, _ = real_like_node(tmp_path)
    state = tmp_path / "state"
    args = ["--sysfs-root", str(sysfs), "--dev-root", str(dev), "--state-dir", str(state)]
    smi = ["--nvidia-smi", str(real_nvidia_smi(tmp_path))]
    result = run_prepare(*args, *smi)
    assert result.returncode == 0, result.stderr + result.stdout
    inventory = json.loads((state / "node-inventory.json").read_text())
    assert inventory == {
        "version": 1,
        "gpus": {
            REAL_ADDRESS: {
                "module_id": 8,
                "device_id": "10de:2335",
                "uuid": "GPU-00000000-1111-2222-3333-444444444444",
                "serial": "1650000000001",
                "source": "nvidia-smi",
            }
        },
    }
    again = run_prepare(*args, *smi)
    assert again.returncode == 0 and "unchanged (1 GPU(s))" in again.stdout


def test_binding_on_a_node_without_iommu_groups_is_refused_and_nothing_moves(
    tmp_path: Path,
) -> None:
    sysfs, dev, proc = real_like_node(tmp_path)
    result = run_prepare(
        "--sysfs-root", str(sysfs),
        "--dev-root", str(dev),
        "--proc-root", str(proc),
        "--state-dir", str(tmp_path / "state"),
        "--nvidia-smi", str(real_nvidia_smi(tmp_path)),
        "--bind-vfio",
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{REAL_ADDRESS}: has no IOMMU group" in result.stderr
    assert read_function(sysfs, REAL_ADDRESS).driver == "nvidia"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("program", "problem"),
    [
        ("echo 'NVIDIA-SMI has failed because it could not communicate' >&2; exit 9", "exited 9"),
        ("echo 'No devices were found'; exit 6", "exited 6: No devices were found"),
        ("echo 'GPU 00000000:00:06.0'; echo '  Module Id : N/A'", "no module ID reported"),
    ],
)
def test_a_failing_nvidia_smi_is_said_and_nothing_is_written(
    tmp_path: Path, program: str, problem: str
) -> None:
    sysfs, dev, _ = real_like_node(tmp_path)
    smi = _program(tmp_path / "nvidia-smi", program)
    result = run_prepare(
        "--sysfs-root", str(sysfs),
        "--dev-root", str(dev),
        "--state-dir", str(tmp_path / "state"),
        "--nvidia-smi", str(smi),
    )  # fmt: skip
    assert result.returncode == 1
    assert problem in result.stderr
    assert not (tmp_path / "state" / "node-inventory.json").exists()


def test_bad_arguments_and_configuration_exit_2(tmp_path: Path) -> None:
    assert run_prepare("--print-module-map", "--bind-vfio").returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: v1\nmodule_map: [1]\n")
    result = run_prepare("--config", str(bad))
    assert result.returncode == 2 and "module_map" in result.stderr


# ----------------------------------------------------------------- a simulated HGX H200


def simulated(tmp_path: Path, **kw: object) -> tuple[SimulatedNode, list[str]]:
    node = build_simulated_node(tmp_path / "node", platform("hgx-h200"), gpu_driver="nvidia", **kw)  # type: ignore[arg-type]
    smi = install_nvidia_smi(node)
    args = [
        "--sysfs-root", str(node.sysfs_root),
        "--dev-root", str(node.dev_root),
        "--proc-root", str(node.proc_root),
        "--state-dir", str(tmp_path / "state"),
        "--nvidia-smi", str(smi),
    ]  # fmt: skip
    return node, args


def drivers(node: SimulatedNode) -> dict[str, str | None]:
    return {
        a: (f.driver if (f := read_function(node.sysfs_root, a)) else "gone")
        for a in sorted(node.functions)
    }


def test_dry_run_prints_every_write_and_changes_nothing(tmp_path: Path) -> None:
    node, args = simulated(tmp_path)
    before = drivers(node)
    result = run_prepare(*args, "--bind-vfio", "--dry-run")
    assert result.returncode == 0, result.stderr + result.stdout
    gpu = node.module_map[1]
    assert f"echo vfio-pci > {node.sysfs_root}/bus/pci/devices/{gpu}/driver_override" in (
        result.stdout
    )
    assert f"echo {gpu} > {node.sysfs_root}/bus/pci/drivers/nvidia/unbind" in result.stdout
    assert result.stdout.count("drivers_probe") == 8
    assert "would write" in result.stdout
    assert drivers(node) == before
    assert not (tmp_path / "state").exists()


def test_bind_moves_every_gpu_writes_the_inventory_and_a_second_run_changes_nothing(
    tmp_path: Path,
) -> None:
    node, args = simulated(tmp_path)
    result = run_prepare(*args, "--bind-vfio")
    assert result.returncode == 0, result.stderr + result.stdout
    for address in node.module_map.values():
        assert vfio_problem(node.sysfs_root, node.dev_root, address) is None
    switches = [a for a, f in node.functions.items() if f.pci_class >> 8 == 0x0680]
    assert switches and all(drivers(node)[a] == "nvidia" for a in switches)  # FM keeps them
    path = tmp_path / "state" / "node-inventory.json"
    recorded = json.loads(path.read_text())["gpus"]
    assert {a: e["module_id"] for a, e in recorded.items()} == {
        a: i.module_id for a, i in node.identities.items()
    }
    assert {a: e["uuid"] for a, e in recorded.items()} == {
        a: i.uuid for a, i in node.identities.items()
    }
    written = path.stat().st_mtime_ns
    before = drivers(node)
    again = run_prepare(*args, "--bind-vfio")
    assert again.returncode == 0, again.stderr + again.stdout
    assert "no GPU on nvidia: nothing to read" in again.stdout
    assert "nothing to bind: 8 GPU(s) on vfio-pci already" in again.stdout
    assert drivers(node) == before and path.stat().st_mtime_ns == written


def test_a_gpu_held_open_is_refused_by_name_and_the_others_move(tmp_path: Path) -> None:
    node, args = simulated(tmp_path)
    held = node.module_map[3]
    hold_open(node, 4242, "python3", f"/dev/nvidia{node.identities[held].minor}")
    minor = node.identities[held].minor
    result = run_prepare(*args, "--bind-vfio")
    assert result.returncode == 1
    assert result.stderr == (
        f"problem: {held}: in use: /dev/nvidia{minor} is open in pid 4242 (python3); "
        "stop it first, then run again\n"
    )  # said once: not also as "bound to nvidia" afterwards
    assert drivers(node)[held] == "nvidia"
    moved = [a for m, a in node.module_map.items() if m != 3]
    assert all(drivers(node)[a] == "vfio-pci" for a in moved)
    # its module is recorded all the same: it was read before anything moved
    recorded = json.loads((tmp_path / "state" / "node-inventory.json").read_text())["gpus"]
    assert recorded[held]["module_id"] == 3
    # as an init container: the refusal is said, and the node serves the other seven
    again = run_prepare(*args, "--bind-vfio", "--allow-refused")
    assert again.returncode == 0, again.stderr + again.stdout
    assert f"--allow-refused: 1 GPU(s) left where they are ({held})" in again.stdout
    assert "in use" in again.stderr


def test_a_gpu_whose_minor_cannot_be_read_counts_as_in_use(tmp_path: Path) -> None:
    node, args = simulated(tmp_path)
    gpu = node.module_map[4]
    # no /proc/driver/nvidia entry (another --proc-root, say) and nvidia-smi prints no
    # Minor Number: whether it is in use cannot be told, so it is not moved
    info = node.proc_root / "driver" / "nvidia" / "gpus" / gpu / "information"
    info.rename(tmp_path / "information")
    smi = _program(
        tmp_path / "smi-no-minor",
        f"{node.sysfs_root.parent / 'bin' / 'nvidia-smi'} -q | grep -v 'Minor Number'",
    )
    result = run_prepare(*args, "--nvidia-smi", str(smi), "--bind-vfio")
    assert result.returncode == 1
    assert f"{gpu}: in use: cannot tell whether it is in use" in result.stderr
    assert drivers(node)[gpu] == "nvidia"


def test_a_group_shared_with_a_host_nic_is_refused_whole(tmp_path: Path) -> None:
    node, args = simulated(tmp_path)
    gpu = node.module_map[6]
    nic = add_function(
        node, node.gpu_group(6), vendor="15b3", device="1021", pci_class=0x020000,
        driver="mlx5_core",
    )  # fmt: skip
    result = run_prepare(*args, "--bind-vfio")
    assert result.returncode == 1
    assert f"{gpu}: IOMMU group {node.gpu_group(6)} also holds {nic} on mlx5_core" in result.stderr
    assert drivers(node)[gpu] == "nvidia"
    assert read_function(node.sysfs_root, nic).driver == "mlx5_core"  # type: ignore[union-attr]


def test_modules_are_loaded_first_and_group_mates_move_too(tmp_path: Path) -> None:
    node, args = simulated(tmp_path, vfio_loaded=False)
    gpu = node.module_map[2]
    audio = add_function(node, node.gpu_group(2))
    result = run_prepare(*args, "--bind-vfio")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "loaded kernel module vfio_pci" in result.stdout
    assert read_function(node.sysfs_root, audio).driver == "vfio-pci"  # type: ignore[union-attr]
    assert f"{audio}: snd_hda_intel -> vfio-pci (in IOMMU group" in result.stdout
    assert vfio_problem(node.sysfs_root, node.dev_root, gpu) is None


def test_a_run_killed_halfway_is_finished_by_the_next(tmp_path: Path) -> None:
    node, args = simulated(tmp_path)
    assert run_prepare(*args).returncode == 0  # modules recorded
    gpu = node.module_map[5]
    kernel = SimulatedKernel(node)
    pci = node.sysfs_root / "bus" / "pci"
    kernel.write_attribute(pci / "devices" / gpu / "driver_override", "vfio-pci")
    kernel.write_attribute(pci / "drivers" / "nvidia" / "unbind", gpu)  # killed here
    assert drivers(node)[gpu] is None
    result = run_prepare(*args, "--bind-vfio")
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"{gpu}: no driver -> vfio-pci" in result.stdout
    assert all(drivers(node)[a] == "vfio-pci" for a in node.module_map.values())


def write_config(tmp_path: Path, node: SimulatedNode, extra: str = "") -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        "version: v1\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "fabric_manager:\n  backend: simulator\n  simulator_platform: hgx-h200\n"
        f"vfio:\n  sysfs_root: {node.sysfs_root}\n  dev_root: {node.dev_root}\n" + extra
    )
    return config


def test_a_daemon_with_no_module_map_serves_every_resource_from_the_inventory(
    tmp_path: Path,
) -> None:
    node, args = simulated(tmp_path)
    assert run_prepare(*args, "--bind-vfio").returncode == 0
    plugin_dir = tmp_path / "device-plugins"
    plugin_dir.mkdir()
    config = write_config(tmp_path, node)
    with KubeletStandIn(plugin_dir) as kubelet:
        # workdir tmp_path: its --state-dir is the configuration's, tmp_path / "state"
        daemon = DaemonProcess(
            tmp_path, plugin_dir, platform=None, extra_args=["--config", str(config)]
        )
        daemon.start()
        try:
            resources = [f"{H200}-{n}x" for n in (1, 2, 4, 8)]
            kubelet.wait_registered(resources, timeout=30)
            for resource in resources:
                assert set(kubelet.devices(resource).values()) == {"Healthy"}
            response = kubelet.allocate(f"{H200}-2x", ["partition-3"])  # modules 1 and 3
            pci = response.container_responses[0].envs["PCI_RESOURCE_NVIDIA_COM_GPU-H200-2X"]
            assert pci.split(",") == [node.module_map[1], node.module_map[3]]
            assert "module map from the node inventory" in daemon.log_text()
        finally:
            code, _ = daemon.terminate()
        assert code == 0


def test_a_damaged_inventory_without_module_map_stops_the_start_with_one_line(
    tmp_path: Path,
) -> None:
    node, args = simulated(tmp_path)
    assert run_prepare(*args, "--bind-vfio").returncode == 0
    inventory = tmp_path / "state" / "node-inventory.json"
    inventory.write_text(inventory.read_text()[:40])  # cut short
    config = write_config(tmp_path, node)
    plugin_dir = tmp_path / "device-plugins"
    plugin_dir.mkdir()
    daemon = DaemonProcess(
        tmp_path, plugin_dir, platform=None, extra_args=["--config", str(config)]
    )
    daemon.start()
    assert daemon.process is not None
    assert daemon.process.wait(timeout=30) == 1
    refusals = [line for line in daemon.log_text().splitlines() if "cannot start" in line]
    assert len(refusals) == 1
    assert str(inventory) in refusals[0] and "nvswitch-dp prepare-node" in refusals[0]


def test_nvidia_smi_is_bounded_in_time_and_size(tmp_path: Path) -> None:
    from nvswitch_dp.prepare_node import DiscoveryError, Tools, run_nvidia_smi
    from nvswitch_dp.vfio.identity import MAX_SMI_OUTPUT_BYTES

    hang = _program(tmp_path / "hang", "exec sleep 60")
    with pytest.raises(DiscoveryError, match=r"ran over 0\.5 s"):
        run_nvidia_smi(Tools(nvidia_smi=str(hang)), timeout=0.5)
    flood = _program(tmp_path / "flood", "exec yes GPU")
    with pytest.raises(DiscoveryError, match=f"printed more than {MAX_SMI_OUTPUT_BYTES} bytes"):
        run_nvidia_smi(Tools(nvidia_smi=str(flood)), timeout=30)
    with pytest.raises(DiscoveryError, match="cannot run"):
        run_nvidia_smi(Tools(nvidia_smi=str(tmp_path / "absent")))
    # closes its output, then hangs: the deadline still holds
    closes = _program(tmp_path / "closes", "echo 'GPU 00000000:00:06.0'; exec >&- 2>&-; sleep 60")
    with pytest.raises(DiscoveryError, match=r"ran over 0\.5 s"):
        run_nvidia_smi(Tools(nvidia_smi=str(closes)), timeout=0.5)
    real = run_nvidia_smi(Tools(nvidia_smi=str(real_nvidia_smi(tmp_path))))
    assert real == (FIXTURES / "nvidia-smi-q.txt").read_text()


def test_host_nvidia_smi_sees_the_host_nvml_and_no_other_host_library(tmp_path: Path) -> None:
    from nvswitch_dp.prepare_node import find_tools, run_nvidia_smi

    root = tmp_path / "driver-root"
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    (libdir / "libnvidia-ml.so.1").write_text("")
    (libdir / "libc.so.6").write_text("")  # the host's libc must never reach the program
    bindir = root / "usr" / "bin"
    bindir.mkdir(parents=True)
    _program(bindir / "nvidia-smi", 'ls "$LD_LIBRARY_PATH"; readlink "$LD_LIBRARY_PATH"/*')
    tools = find_tools(root, None, None)
    assert tools.nvml_library == libdir / "libnvidia-ml.so.1"
    assert tools.nvidia_smi == str(bindir / "nvidia-smi")
    assert run_nvidia_smi(tools).split() == [
        "libnvidia-ml.so.1",
        str(libdir / "libnvidia-ml.so.1"),
    ]


def test_a_damaged_inventory_is_written_anew_only_when_every_gpu_can_be_read(
    tmp_path: Path,
) -> None:
    _, args = simulated(tmp_path)
    path = tmp_path / "state" / "node-inventory.json"
    path.parent.mkdir()
    path.write_text('{"version": 1, "gpus": {"0000:5d:00.0": {"module_id": 5000}}}')
    result = run_prepare(*args)  # every GPU on nvidia: every module read again
    assert result.returncode == 0, result.stderr + result.stdout
    assert "so it is written anew" in result.stdout
    assert len(json.loads(path.read_text())["gpus"]) == 8
    assert run_prepare(*args, "--bind-vfio").returncode == 0
    path.write_text("{")
    result = run_prepare(*args)  # on vfio-pci now: what the file held cannot be read again
    assert result.returncode == 1
    assert f"mv {path} {path}.bad" in result.stderr
