"""``nvswitch-dp demo`` as a user runs it: from GPUs on nvidia to a served node, and back."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit.harness import free_port


def test_demo_prepares_the_node_then_serves_from_the_inventory_and_stops_cleanly() -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "nvswitch_dp", "demo", "--no-wait",
            "--api-listen", f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "8 GPUs on the nvidia driver, no module_map in the configuration" in out
    assert "8 GPU(s) (10de:2335 H200 SXM 141GB): 8 on nvidia, 0 on vfio-pci" in out
    assert "every GPU is on vfio-pci with a viable IOMMU group" in out
    assert "module map from the node inventory" in out
    assert "1. registered 4 resources" in out
    assert "PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X=0000:5d:00.0,0000:3a:00.0,0000:2a:00.0" in out
    assert "daemon exited with status 0" in out


@pytest.mark.parametrize("mode", ["device-plugin", "dra"])
def test_a_demo_stopped_by_sigterm_stops_its_daemon_and_leaves_no_directory(mode: str) -> None:
    port = free_port()
    demo = subprocess.Popen(
        [
            sys.executable, "-m", "nvswitch_dp", "demo", "--mode", mode,
            "--api-listen", f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert demo.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, "".join(lines)  # the demo ended before serving
            lines.append(line)
            if "keeps serving" in line:
                break
        directory = Path(lines[0].removeprefix("demo directory: ").strip())
        assert directory.is_dir()
        demo.send_signal(signal.SIGTERM)  # not Ctrl-C: what a terminal closing or kill sends
        out, _ = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, "".join(lines) + out
    assert "daemon exited with status 0" in out
    assert not directory.exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # nothing serves the demo's port any more
