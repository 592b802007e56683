"""Metrics of the real daemon: promtool's lint, a real Prometheus server scraping it, the
label set the Grafana dashboard groups by, and the device counts by state."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvswitch_dp.metrics import Metrics
from testkit.harness import DaemonProcess, free_port, simulated_node
from testkit.kubelet import KubeletStandIn

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deployments" / "grafana" / "nvswitch-dp-dashboard.json"
R = "nvidia.com/gpu-h200"
RESOURCES = [f"{R}-{n}x" for n in (1, 2, 4, 8)]
# `make deps` extracts both programs from Debian's package into the virtualenv's bin
# directory, beside the interpreter (the package itself is not installed: its service
# would hold :9090); a system-wide install on PATH serves as well.
_SEARCH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
PROMTOOL = shutil.which("promtool", path=_SEARCH) or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus", path=_SEARCH) or "/usr/bin/prometheus"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[DaemonProcess, KubeletStandIn]]:
    with simulated_node(tmp_path) as running:
        yield running


def labels_by_family(exposition: str) -> dict[str, set[str]]:
    """Family name -> label names, from the text format (histogram suffixes folded)."""
    families: dict[str, set[str]] = {}
    for line in exposition.splitlines():
        match = re.match(r"([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? ", line)
        if line.startswith("#") or match is None:
            continue
        name = re.sub(r"_(bucket|sum|count|created)$", "", match.group(1))
        labels = set(re.findall(r"(\w+)=\"", match.group(2) or "")) - {"le"}
        families.setdefault(name, set()).update(labels)
    return families


def test_promtool_finds_nothing_to_lint_after_real_traffic(
    node: tuple[DaemonProcess, KubeletStandIn],
) -> None:
    daemon, kubelet = node
    kubelet.allocate(f"{R}-4x", ["partition-1"])
    status, text = daemon.get("/metrics")
    assert status == 200
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
    # The promised name stays, untyped so that the lint accepts its _total suffix.
    assert "# TYPE hgx_h200_devices_total untyped" in text
    assert f'hgx_h200_devices_total{{resource="{R}-8x",state="unhealthy"}} 1.0' in text
    assert f'hgx_h200_devices_total{{resource="{R}-4x",state="healthy"}} 2.0' in text
    assert 'hgx_h200_allocation_duration_seconds_count{resource="' + R + '-4x"} 1.0' in text
    assert "hgx_h200_fabric_manager_up 1.0" in text
    assert f'hgx_h200_resource_registered{{resource="{R}-1x"}} 1.0' in text
    assert (
        f'hgx_h200_partition_state{{partition="1",resource="{R}-4x",state="allocated"}} 1.0' in text
    )


def test_the_dashboard_groups_only_by_labels_the_metrics_have(
    node: tuple[DaemonProcess, KubeletStandIn],
) -> None:
    daemon, kubelet = node
    kubelet.allocate(f"{R}-1x", ["partition-7"])
    families = labels_by_family(daemon.get("/metrics")[1])
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    checked = 0
    for expr in exprs:
        for grouping, metric in re.findall(r"by \(([^)]*)\) \((?:\w+\()?(hgx_h200_\w+)", expr):
            name = re.sub(r"_(bucket|sum|count)$", "", metric)
            wanted = {label.strip() for label in grouping.split(",")} - {"le", "instance"}
            assert wanted <= families[name], f"{expr}: {name} has {families[name]}"
            checked += 1
    assert checked >= 4


def test_a_real_prometheus_scrapes_the_daemon(
    node: tuple[DaemonProcess, KubeletStandIn], tmp_path: Path
) -> None:
    daemon, _ = node
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: nvswitch-dp\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{daemon.port}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [
            PROMETHEUS, f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    query = urllib.parse.urlencode({"query": "hgx_h200_fabric_manager_up"})
    url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
    try:
        deadline = time.monotonic() + 30
        result: list[dict[str, object]] = []
        while not result:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    result = json.loads(response.read())["data"]["result"]
            except OSError:
                pass
            if not result:
                time.sleep(0.25)
        sample = result[0]
        assert sample["metric"] == {
            "__name__": "hgx_h200_fabric_manager_up",
            "instance": f"127.0.0.1:{daemon.port}",
            "job": "nvswitch-dp",
        }
        assert sample["value"][1] == "1"  # type: ignore[index]
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def test_device_counts_follow_the_book_at_scrape_time() -> None:
    metrics = Metrics()
    text = metrics.exposition().decode()
    assert "# TYPE hgx_h200_devices_total untyped" in text
    assert "hgx_h200_devices_total{" not in text  # no source yet: no samples, no error
    up = [True]
    metrics.observe_fabric(lambda: up[0])
    assert "hgx_h200_fabric_manager_up 1.0" in metrics.exposition().decode()
    up[0] = False
    assert "hgx_h200_fabric_manager_up 0.0" in metrics.exposition().decode()
