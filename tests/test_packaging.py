"""What `make` does, read from make's own dry run (``make -n``): the image tag it builds
against the manifests, and how it gets promtool without a Prometheus service."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deployments"
IMAGE_NAME = "nvswitch-dp"


def make_dry_run(*targets: str) -> str:
    """The commands ``make`` would run for ``targets`` (all of them, as if out of date),
    none run; with no IMAGE or VENV from the environment to hide the Makefile's own."""
    assert shutil.which("make"), "make is the project's entry point: needed here"
    env = {k: v for k, v in os.environ.items() if k not in {"IMAGE", "VENV", "MAKEFLAGS"}}
    return subprocess.run(
        ["make", "-n", "-B", "--no-print-directory", *targets],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def kustomizations() -> list[Path]:
    """Every directory under deployments/ holding a Kustomization (not a Component)."""
    found = []
    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


def pod_images(doc: dict[str, Any]) -> list[str]:
    """The images of every container and init container of a workload object."""
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [c["image"] for key in ("containers", "initContainers") for c in spec.get(key, [])]


def deployed_images() -> dict[str, set[str]]:
    """This project's images as each kustomization renders them: directory -> images."""
    assert shutil.which("kubectl"), "kubectl is needed to render the kustomizations"
    images: dict[str, set[str]] = {}
    for directory in kustomizations():
        out = subprocess.run(
            ["kubectl", "kustomize", str(directory)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        ours = {
            image
            for doc in yaml.safe_load_all(out)
            if doc
            for image in pod_images(doc)
            if image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == IMAGE_NAME
        }
        images[str(directory.relative_to(ROOT))] = ours
    return images


def test_image_build_tags_the_version_every_manifest_deploys() -> None:
    (tag,) = re.findall(r"^docker build .*-t (\S+) \.$", make_dry_run("image-build"), re.M)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tag == f"{IMAGE_NAME}:{version}"
    images = deployed_images()
    assert "deployments/containers" in images and "deployments/dra" in images
    for directory, found in images.items():
        assert found == {tag}, f"{directory} deploys {found}, make image-build builds {tag}"
    containerfile = (ROOT / "Containerfile").read_text()
    assert set(re.findall(rf"-t ({IMAGE_NAME}:\S+)", containerfile)) == {tag}


def test_make_takes_promtool_out_of_the_package_without_installing_it() -> None:
    """Installing Debian's prometheus package starts a Prometheus server on :9090 (the
    daemon's port) on a systemd host; make must extract the two programs instead."""
    # One shell command per entry: make prints a recipe's continued lines as written.
    commands = make_dry_run("deps").replace("\\\n", " ").splitlines()
    installs = [c for c in commands if "apt-get install" in c]
    assert installs, "the wrk install is expected in the dry run"
    assert not [c for c in installs if "prometheus" in c]
    (extract,) = [c for c in commands if "dpkg-deb -x" in c]
    assert "apt-get download prometheus" in extract
    installed = re.search(
        r'install -m 0755 "\S+/usr/bin/promtool" "\S+/usr/bin/prometheus" (\S+)', extract
    )
    assert installed is not None, extract
    assert installed.group(1).rstrip("/").endswith("/bin")  # the virtualenv's


@pytest.mark.parametrize("program", ["promtool", "prometheus"])
def test_the_extracted_programs_sit_where_the_metrics_tests_look(program: str) -> None:
    from test_metrics import PROMETHEUS, PROMTOOL

    found = {"promtool": PROMTOOL, "prometheus": PROMETHEUS}[program]
    assert Path(found).name == program
    assert os.access(found, os.X_OK), f"{found}: run `make deps`"
