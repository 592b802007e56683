"""What each Fabric Manager operation costs through each backend.

    python benchmarks/fm_ops.py [--iterations N] [--backends simulator,fmpm,libnvfm]

Backends: the simulator in-process (state file read and written per call), ``fmpm``
through the fake fmpm program (one Python process per call, as the real tool is one
process per call), and ``libnvfm`` through the fake ``libnvfm.so`` built here with gcc
(ctypes in a worker thread). Each iteration runs activate(3), list, deactivate(3),
set-activated([]) and times each call. Prints a Markdown table of p50/p99 in ms.
Measures our side of the seam only: a real FM adds its own work (NVLink training makes
a real activation take seconds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from nvswitch_dp.fabric.fmpm import FmpmFabricManager
from nvswitch_dp.fabric.libnvfm import LibnvfmFabricManager
from nvswitch_dp.fabric.simulator import SimulatedFabricManager, SimulatorStore
from nvswitch_dp.ports import FabricManagerClient

FAKE_LIBNVFM = Path(__file__).resolve().parent.parent / "tests" / "fakes" / "libnvfm_fake.c"
OPERATIONS = ("list", "activate", "deactivate", "set-activated")


def build_fake_libnvfm(out_dir: Path) -> Path:
    """Compile the fake libnvfm with gcc; ``RuntimeError`` if there is no gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is needed to build the fake libnvfm")
    out = out_dir / "libnvfm_fake.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(FAKE_LIBNVFM)], check=True)
    return out


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def measure(fm: FabricManagerClient, iterations: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("activate", lambda: fm.activate(3)),
        ("list", fm.list_partitions),
        ("deactivate", lambda: fm.deactivate(3)),
        ("set-activated", lambda: fm.set_activated([])),
    ]
    await fm.list_partitions()  # warm-up: imports, library load, first connect
    for _ in range(iterations):
        for op, call in calls:
            start = time.perf_counter()
            await call()
            timings[op].append((time.perf_counter() - start) * 1000)
    return timings


async def run(backends: list[str], iterations: int, work: Path) -> str:
    rows = ["| backend | operation | p50 ms | p99 ms | n |", "|---|---|---:|---:|---:|"]
    for name in backends:
        fm: FabricManagerClient
        if name == "simulator":
            fm = SimulatedFabricManager(SimulatorStore(work / "sim.state", "hgx-h200"))
        elif name == "fmpm":
            command = [sys.executable, "-m", "nvswitch_dp.fabric.fmpm_sim"]
            command += ["--state-file", str(work / "fmpm.state")]
            fm = FmpmFabricManager(command, "127.0.0.1", timeout=30, retries=0)
        elif name == "libnvfm":
            os.environ["NVSWITCH_DP_FAKE_NVFM_STATE"] = str(work / "nvfm.state")
            fm = LibnvfmFabricManager(build_fake_libnvfm(work), "127.0.0.1", timeout=30)
        else:
            raise SystemExit(f"unknown backend {name!r}")
        timings = await measure(fm, iterations)
        if isinstance(fm, LibnvfmFabricManager):
            await fm.aclose()
        for op in OPERATIONS:
            samples = timings[op]
            rows.append(
                f"| {name} | {op} | {statistics.median(samples):.3f} "
                f"| {percentile(samples, 0.99):.3f} | {len(samples)} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--backends", default="simulator,fmpm,libnvfm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fm-ops-") as tmp:
        table = trio.run(run, args.backends.split(","), args.iterations, Path(tmp))
    print(table)


if __name__ == "__main__":
    main()
