"""Run every benchmark in turn (``make bench``); each prints its own Markdown table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["daemon.py", "churn.py", "fm_ops.py", "rest.py", "dra.py", "prepare_node.py"]


def main() -> int:
    failed = 0
    for name in BENCHMARKS:
        print(f"\n## {name}\n", flush=True)
        failed += subprocess.run([sys.executable, str(HERE / name)], check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
