"""Regenerate the betterproto2 code in ``nvswitch_dp/proto`` from the ``.proto`` files.

Usage (from anywhere; the paths are found relative to this file)::

    .venv/bin/python tools/gen_proto.py           # rewrite nvswitch_dp/proto
    .venv/bin/python tools/gen_proto.py --check   # exit 1 if the committed code is stale

Determinism: the compiler formats its output by running ``ruff`` from the current
directory, so the look of the code would depend on whichever ruff configuration is found
there. :func:`generate` therefore runs protoc in an empty scratch directory holding a
``ruff.toml`` of its own (:data:`RUFF_CONFIG`), with the interpreter's ``bin`` directory
first on ``PATH`` (where the pinned ``ruff`` and ``protoc-gen-python_betterproto2`` live),
and feeds the ``.proto`` files in sorted order. The same pinned tools give the same bytes.

Errors: :class:`GenerationError` when protoc or the compiler plugin fails (its stderr is in
the message).
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
GENERATED_PACKAGE_DIR = REPO_ROOT / "nvswitch_dp" / "proto"

COMPILER_OPTIONS = "server_generation=async,client_generation=async"

# The compiler's formatting pass reads this instead of the project's pyproject.toml, so a
# change to the project's lint settings does not make the committed code stale.
RUFF_CONFIG = 'line-length = 100\ntarget-version = "py311"\n'

PACKAGE_INIT = '''"""betterproto2 code generated from ``proto/`` by ``tools/gen_proto.py``.

Do not edit: run the tool. Modules follow the proto packages: ``v1beta1`` is the
kubelet device plugin API, ``v1`` the kubelet PodResources API, ``pluginregistration``
the kubelet plugin registration API (used by DRA), and
``k8s.io.kubelet.pkg.apis.dra.v1`` / ``.v1beta1`` the kubelet DRA plugin API (the
package's full name is part of the gRPC method path the kubelet calls, so it is kept).
Python names differ from the proto names (``ID`` -> ``id``, ``NUMANode`` -> ``NumaNode``,
``deviceIDs`` -> ``device_i_ds``); the wire format is the kubelet's.
"""
'''


class GenerationError(RuntimeError):
    """protoc or the betterproto2 compiler plugin failed; the message carries its stderr."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` file under ``proto_root``, sorted for a stable protoc input."""
    return sorted(proto_root.rglob("*.proto"))


def generate(output_dir: Path, proto_root: Path = PROTO_ROOT) -> None:
    """Write the generated package into ``output_dir`` (created; existing files kept).

    The caller owns ``output_dir``. Raises :class:`GenerationError` if protoc fails.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    tool_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=tool_bin + os.pathsep + os.environ.get("PATH", ""))
    with tempfile.TemporaryDirectory(prefix="gen_proto_") as scratch:
        Path(scratch, "ruff.toml").write_text(RUFF_CONFIG)
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={proto_root.resolve()}",
            f"--python_betterproto2_out={output_dir.resolve()}",
            f"--python_betterproto2_opt={COMPILER_OPTIONS}",
            *(str(path.resolve()) for path in proto_files(proto_root)),
        ]
        result = subprocess.run(
            command, cwd=scratch, env=env, capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        raise GenerationError(
            f"protoc exited with {result.returncode}: {' '.join(command)}\n{result.stderr}"
        )
    (output_dir / "__init__.py").write_text(PACKAGE_INIT)


def generated_files(package_dir: Path) -> dict[str, bytes]:
    """Relative path -> content of every generated file (caches and bytecode skipped)."""
    files: dict[str, bytes] = {}
    for path in sorted(package_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files[path.relative_to(package_dir).as_posix()] = path.read_bytes()
    return files


def differences(committed_dir: Path, fresh_dir: Path) -> list[str]:
    """One line per file that is missing, extra or different in ``committed_dir``."""
    committed = generated_files(committed_dir)
    fresh = generated_files(fresh_dir)
    lines = []
    for name in sorted(committed.keys() | fresh.keys()):
        if name not in committed:
            lines.append(f"missing: {name}")
        elif name not in fresh:
            lines.append(f"not generated (stale extra file): {name}")
        elif committed[name] != fresh[name]:
            lines.append(f"differs: {name} ({_line_changes(committed[name], fresh[name])})")
    return lines


def _line_changes(committed: bytes, fresh: bytes) -> str:
    """``+A -R lines``: what regenerating would add to and remove from the committed file."""
    diff = difflib.unified_diff(
        committed.decode(errors="replace").splitlines(),
        fresh.decode(errors="replace").splitlines(),
        lineterm="",
        n=0,
    )
    added = removed = 0
    for line in diff:
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return f"+{added} -{removed} lines"


def regenerate(package_dir: Path = GENERATED_PACKAGE_DIR) -> None:
    """Replace ``package_dir`` with freshly generated code (generated aside, then swapped)."""
    with tempfile.TemporaryDirectory(prefix="gen_proto_out_") as scratch:
        fresh = Path(scratch) / "proto"
        generate(fresh)
        if package_dir.exists():
            shutil.rmtree(package_dir)
        shutil.copytree(fresh, package_dir)


def check(package_dir: Path = GENERATED_PACKAGE_DIR) -> list[str]:
    """Generate into a scratch directory and return how ``package_dir`` differs from it."""
    with tempfile.TemporaryDirectory(prefix="gen_proto_check_") as scratch:
        fresh = Path(scratch) / "proto"
        generate(fresh)
        return differences(package_dir, fresh)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed generated code differs from a fresh run",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        if stale:
            print(f"{GENERATED_PACKAGE_DIR} is stale; run tools/gen_proto.py:", file=sys.stderr)
            for line in stale:
                print(f"  {line}", file=sys.stderr)
            return 1
        print(f"{GENERATED_PACKAGE_DIR} is up to date")
        return 0
    regenerate()
    print(f"wrote {GENERATED_PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
