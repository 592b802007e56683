"""The package as a user installs it: our wheel, no extras, in a fresh virtual environment.

Builds the wheel from a copy of what the image copies (``pyproject.toml``, ``README.md``,
``nvswitch_dp/``; a stale ``build/`` in the work tree can then not slip old modules in),
installs it into a new venv without ``--system-site-packages`` and without extras, and
runs the commands a first hour needs from there, outside the repository: both demos and
``doctor --simulate``. The dependencies come from the package index, as for any user
(pip's cache makes a second run quick); about a minute in all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from testkit.harness import free_port

REPO = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 120


def _run(command: list[str], cwd: Path, timeout: float = RUN_TIMEOUT_S) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{out}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "nvswitch_dp",
        source / "nvswitch_dp",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    dist = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), "."]
    _run(build, source, INSTALL_TIMEOUT_S)
    (built,) = dist.glob("nvswitch_dp-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` directory of a fresh venv with the wheel installed (no extras)."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], venv.parent)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], venv, INSTALL_TIMEOUT_S)
    return venv / "bin"


def test_the_wheel_installs_one_top_level_package_and_no_test_code(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["nvswitch_dp"]
        (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        paths = [line.split(",")[0] for line in archive.read(record).decode().splitlines()]
    tops = {p.split("/")[0] for p in paths if p}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"nvswitch_dp"}, tops
    assert "nvswitch_dp/demo/kubelet.py" in paths
    assert "nvswitch_dp/demo/apiserver.py" in paths
    assert not [p for p in paths if "testkit" in p or p.startswith("tests/")]


def test_the_installed_demo_needs_no_development_package(installed: Path, tmp_path: Path) -> None:
    out = _run([str(installed / "pip"), "list", "--format=freeze"], tmp_path)
    names = {line.split("==")[0].lower() for line in out.splitlines()}
    assert "nvswitch-dp" in names
    assert not names & {"grpcio", "grpcio-tools", "pytest", "hypothesis"}, names


@pytest.mark.parametrize("mode", ["device-plugin", "dra"])
def test_the_installed_demo_runs_in_both_modes(installed: Path, tmp_path: Path, mode: str) -> None:
    command = [str(installed / "nvswitch-dp"), "demo", "--mode", mode, "--no-wait"]
    out = _run([*command, "--api-listen", f"127.0.0.1:{free_port()}"], tmp_path)
    assert "daemon exited with status 0" in out
    assert "/readyz" in out
    assert "Traceback" not in out


def test_the_installed_doctor_checks_a_simulated_node(installed: Path, tmp_path: Path) -> None:
    out = _run([str(installed / "nvswitch-dp"), "doctor", "--simulate", "hgx-h200"], tmp_path)
    assert "0 failed" in out
