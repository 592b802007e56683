"""The fault campaign: seeded random faults against the real daemon; prints what broke.

    python benchmarks/faults.py [--seed 1] [--steps 2000] [--backend simulator|fmpm|both]
                                [--verbose] [--script 'kind=arg;kind=arg;...']
                                [--workdir DIR] [--reconcile S] [--grace S] [--slack S]

For each backend: a fresh simulated HGX H200 node (``nvswitch-dp run --simulate
hgx-h200`` as a process, the grpcio kubelet and PodResources stand-ins, the REST API with
a token file; ``fmpm`` runs the ``nvswitch-dp-fmpm-sim`` fake), then ``--steps`` seeded
steps with the invariants checked after each (see :mod:`testkit.faults`).
Prints a Markdown table per backend (steps, faults injected by kind, violations, worst
convergence time against the bound) and every violation with its step, seed and the
steps since the last settle, which ``--script`` replays. Exits 1 when anything was
violated. Supervision period 1 s, release grace 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.faults import (
    BACKENDS,
    CHECKS,
    CampaignResult,
    CampaignSettings,
    parse_script,
    run_campaign,
)


def report(result: CampaignResult, settings: CampaignSettings) -> str:
    worst = result.worst_convergence_s
    median = statistics.median(result.convergence_s) if result.convergence_s else None
    by_check: dict[str, int] = {}
    for v in result.violations:
        by_check[v.check] = by_check.get(v.check, 0) + 1
    lines = [
        f"### backend `{result.backend}`, seed {result.seed}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| steps | {result.steps} |",
        f"| wall time (s) | {result.seconds:.0f} |",
        f"| faults injected | {sum(result.faults.values())} |",
    ]
    lines += [f"| - {kind} | {n} |" for kind, n in sorted(result.faults.items())]
    lines += [f"| violations | {len(result.violations)} |"]
    lines += [f"| - {CHECKS[check]} | {n} |" for check, n in sorted(by_check.items())]
    lines += [
        f"| settles (convergence measured) | {len(result.convergence_s)} |",
        f"| convergence median / worst (s) | "
        f"{_s(median)} / {_s(worst)} (bound {settings.bound_s:g} s "
        f"+ {settings.slack_s:g} s slack + slow activations in flight) |",
        f"| FM subprocesses alive after a daemon SIGKILL | {result.orphaned_fm_processes} |",
        f"| - still alive once the next daemon served | {result.fm_processes_outliving_restart} |",
    ]
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    parser.add_argument("--verbose", action="store_true", help="print every step as it runs")
    parser.add_argument("--script", help="replay these steps instead of generating them")
    parser.add_argument("--reconcile", type=float, default=1.0, help="supervision period (s)")
    parser.add_argument("--grace", type=float, default=2.0, help="release grace (s)")
    parser.add_argument("--slack", type=float, default=2.0, help="allowed beyond the bound")
    parser.add_argument(
        "--workdir", type=Path, help="keep each node (daemon.log, FM state) in DIR/BACKEND"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    script = parse_script(args.script) if args.script else None
    settings = CampaignSettings(args.reconcile, args.grace, args.slack)
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    started = time.monotonic()

    def show(line: str) -> None:
        print(f"[{time.monotonic() - started:8.2f}] {line}", flush=True)

    results = []
    for backend in backends:
        with contextlib.ExitStack() as stack:
            if args.workdir is not None:
                workdir = args.workdir / backend
                if workdir.exists():
                    parser.error(f"{workdir} exists; pick a new --workdir")
            else:
                prefix = f"nvswitch-dp-faults-{backend}-"
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
            result = run_campaign(
                workdir,
                backend,
                args.seed,
                args.steps,
                script=script,
                settings=settings,
                log=show if args.verbose else None,
            )
        results.append(result)
        print(report(result, settings), flush=True)
        print()
        for violation in result.violations:
            print(f"- {violation}")
        if result.violations:
            print()
    return 1 if any(r.violations for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
