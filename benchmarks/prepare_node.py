"""What ``nvswitch-dp prepare-node`` costs on a node: the init container's time before the
daemon starts.

    python benchmarks/prepare_node.py [--runs N] [--platform hgx-h200]

Each run builds a fresh simulated node whose GPUs are on the ``nvidia`` driver, then times
the command as a process (interpreter start included, as in the init container):
``--print-module-map``, a first ``--bind-vfio`` (module IDs read through the simulated
``nvidia-smi``, the inventory written, every GPU moved by the simulated kernel) and a
second one (a prepared node: nothing to change). Prints a Markdown table of median and
max seconds. A real node adds what the driver takes: NVML or ``nvidia-smi`` on 8 GPUs,
and the nvidia driver's unbind of each GPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.vfio.nvidia_smi_sim import install_nvidia_smi
from nvswitch_dp.vfio.simulate import build_simulated_node


def timed(command: list[str]) -> float:
    begin = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - begin
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--platform", default="hgx-h200")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"--print-module-map": [], "first": [], "second": []}
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="nvswitch-dp-bench-") as tmp:
            root = Path(tmp)
            node = build_simulated_node(root / "node", platform(args.platform), gpu_driver="nvidia")
            command = [
                sys.executable, "-m", "nvswitch_dp", "prepare-node",
                "--sysfs-root", str(node.sysfs_root),
                "--dev-root", str(node.dev_root),
                "--proc-root", str(node.proc_root),
                "--state-dir", str(root / "state"),
                "--nvidia-smi", str(install_nvidia_smi(node)),
            ]  # fmt: skip
            times["--print-module-map"].append(timed([*command, "--print-module-map"]))
            times["first"].append(timed([*command, "--bind-vfio"]))
            times["second"].append(timed([*command, "--bind-vfio"]))
        print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
    gpus = len(platform(args.platform).module_map())
    print(f"| prepare-node on a simulated {args.platform} ({gpus} GPUs), {args.runs} runs | "
          "median (s) | max (s) |")  # fmt: skip
    print("|---|---|---|")
    rows = {
        "--print-module-map (GPUs on nvidia)": times["--print-module-map"],
        "--bind-vfio, first run (read, record, bind)": times["first"],
        "--bind-vfio, second run (nothing to change)": times["second"],
    }
    for label, values in rows.items():
        print(f"| {label} | {statistics.median(values):.2f} | {max(values):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
