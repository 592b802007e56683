"""``nvswitch-dp demo`` as a user runs it: from GPUs on nvidia to a served node, and back."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from testkit.harness import free_port

DEMO_TIMEOUT_S = 120


def demo_command(*args: str) -> list[str]:
    """The installed ``nvswitch-dp`` script beside this interpreter (what a user runs),
    else the module."""
    script = Path(sys.executable).parent / "nvswitch-dp"
    if script.exists():
        return [str(script), "demo", *args]
    return [sys.executable, "-m", "nvswitch_dp", "demo", *args]


def run_demo(*args: str) -> str:
    result = subprocess.run(
        demo_command("--no-wait", "--api-listen", f"127.0.0.1:{free_port()}", *args),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    return out


def test_the_device_plugin_demo_prepares_the_node_allocates_and_shows_the_release() -> None:
    out = run_demo()
    assert "8 GPUs on the nvidia driver, no module_map in the configuration" in out
    assert "8 GPU(s) (10de:2335 H200 SXM 141GB): 8 on nvidia, 0 on vfio-pci" in out
    assert "every GPU is on vfio-pci with a viable IOMMU group" in out
    assert "1. registered 4 resources" in out
    # PCI addresses in module order, with no module_map configured: from the inventory.
    assert "PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X=0000:5d:00.0,0000:3a:00.0,0000:2a:00.0" in out
    assert "the 7 partitions sharing a GPU with partition-1 left the pool" in out
    assert "PodResources: reachable" in out  # the status map, read off the daemon
    release = out.split("6. the pod ends", 1)[1]
    assert "Fabric Manager active partitions [1] -> []" in release
    assert "UNHEALTHY" not in release.split("7. the REST API", 1)[0]
    assert "daemon exited with status 0" in out


def test_the_dra_demo_prepares_claims_and_prints_one_command_line() -> None:
    port = free_port()
    out = run_demo("--mode", "dra", "--api-listen", f"127.0.0.1:{port}")
    assert "the pool of hgx-node-1 is published" in out
    assert "a claim allocated three GPUs (gpu-5, gpu-6, gpu-7) is refused" in out
    assert "Fabric Manager active partitions: []; CDI specs removed: True" in out
    assert "8. /readyz: {'ready': True, 'problems': []}" in out
    # The daemon's command line names each option once; the address is in the config.
    (command,) = [line for line in out.splitlines() if line.startswith("$ nvswitch-dp run")]
    options = [word for word in shlex.split(command) if word.startswith("--")]
    assert len(options) == len(set(options)), command
    assert out.count(f"listen: 127.0.0.1:{port}") == 1


# -- a demo that serves, stopped as a user stops it --------------------------------------


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, whatever session it runs in."""
    children = _children()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def serving_demo(mode: str, port: int) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """The demo, started and read up to "keeps serving"; killed if still there at the end."""
    demo = subprocess.Popen(
        demo_command("--mode", mode, "--api-listen", f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(DEMO_TIMEOUT_S, demo.kill)  # a hung demo ends readline()
    watchdog.start()
    assert demo.stdout is not None
    lines: list[str] = []
    try:
        while not lines or "keeps serving" not in lines[-1]:
            line = demo.stdout.readline()
            assert line, "the demo ended before serving:\n" + "".join(lines)
            lines.append(line)
        yield demo, lines
    finally:
        watchdog.cancel()
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def call(command: str, *, with_token: bool = True) -> tuple[int, Any]:
    """Run a printed ``curl`` command's method, header and URL with urllib."""
    words = shlex.split(command)
    assert words[0] == "curl"
    method = words[words.index("-X") + 1] if "-X" in words else "GET"
    request = urllib.request.Request(words[-1], method=method)
    if with_token:
        name, _, value = words[words.index("-H") + 1].partition(": ")
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.mark.parametrize("mode", ["device-plugin", "dra"])
def test_a_serving_demo_answers_its_curl_commands_and_sigterm_leaves_nothing(mode: str) -> None:
    port = free_port()
    with serving_demo(mode, port) as (demo, lines):
        directory = Path(lines[0].removeprefix("demo directory: ").strip())
        assert directory.is_dir()
        listing, activation = [
            line.strip().removeprefix("$ ") for line in lines if line.strip().startswith("$ curl")
        ]
        status, body = call(listing)
        assert status == 200, body
        assert body["partitions"] and {p["state"] for p in body["partitions"]} == {"free"}
        assert call(activation, with_token=False)[0] == 401  # the token is what it takes
        status, body = call(activation)
        assert status == 200, body
        assert f"/partitions/{body['id']}/activate" in activation

        children = descendants(demo.pid)
        assert children, "the demo runs its daemon as a child process"
        demo.send_signal(signal.SIGTERM)  # not Ctrl-C: what a terminal closing or kill sends
        out, _ = demo.communicate(timeout=30)
    assert demo.returncode == 0, "".join(lines) + out
    assert "daemon exited with status 0" in out
    assert not [pid for pid in children if running(pid)]
    assert not directory.exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # nothing serves the demo's port any more
