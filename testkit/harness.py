"""Run the real daemon as a process on a simulated node (tests, demo-like tools, benchmarks).

Ownership: a :class:`DaemonProcess` owns its subprocess and nothing else; the caller owns
the directories and the kubelet stand-in.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testkit.kubelet import KubeletStandIn


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DaemonProcess:
    """``nvswitch-dp run --simulate PLATFORM`` as a child process (``platform=None``: plain
    ``run``, the node named by a ``--config`` in ``extra_args``)."""

    def __init__(
        self,
        workdir: Path,
        plugin_dir: Path,
        *,
        platform: str | None = "hgx-h200",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        command_prefix: list[str] | None = None,
    ) -> None:
        """``command_prefix`` runs the daemon under another command (e.g. ``prlimit
        --nofile=256:256``), which must exec it so that signals reach the daemon."""
        self.workdir = workdir
        self.plugin_dir = plugin_dir
        self.state_dir = workdir / "state"
        self.port = free_port()
        # platform None: no --simulate; the node comes from a --config in extra_args
        # (a tree prepared with prepare-node, say).
        simulate = ["--simulate", platform] if platform is not None else []
        self.command = [
            *(command_prefix or []),
            sys.executable, "-m", "nvswitch_dp", "run",
            *simulate,
            "--state-dir", str(self.state_dir),
            "--plugin-dir", str(plugin_dir),
            "--api-listen", f"127.0.0.1:{self.port}",
            *(extra_args or []),
        ]  # fmt: skip
        self.env = env
        self.log_path = workdir / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._log_start = 0  # where this process's lines begin in the shared log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fm_state_file(self) -> Path:
        return self.state_dir / "fabricmanager.state"

    def start(self) -> DaemonProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self._log_start = log.tell()
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        log.close()
        return self

    def log_text(self) -> str:
        """The whole log: every process started in this directory appends to it."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def own_log_text(self) -> str:
        """What this process wrote (the log from where it began)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        """GET ``path`` from the REST API: (status, decoded JSON or text)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                body = response.read()
                status = response.status
                content_type = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            body, status, content_type = exc.read(), exc.code, exc.headers.get("Content-Type", "")
        if "json" in content_type:
            return status, json.loads(body)
        return status, body.decode()

    def wait_api(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                self.get("/healthz")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"REST API not up after {timeout}s:\n{self.log_text()}"
                    ) from None
                time.sleep(0.05)

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log_text()}")

    def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; return (exit status, seconds it took to exit)."""
        assert self.process is not None
        if self.process.poll() is not None:
            return self.process.returncode, 0.0
        begin = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        return code, time.monotonic() - begin


@contextlib.contextmanager
def simulated_node(
    workdir: Path,
    *,
    platform: str | None = "hgx-h200",
    sizes: tuple[int, ...] = (1, 2, 4, 8),
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    resource_prefix: str = "nvidia.com/gpu-h200",
    command_prefix: list[str] | None = None,
) -> Iterator[tuple[DaemonProcess, KubeletStandIn]]:
    """A kubelet stand-in and the daemon on a simulated node, registered and serving REST.

    Ownership: creates ``workdir/device-plugins``; stops both on exit (SIGTERM first).
    Errors: ``TimeoutError`` when the resources do not register or the API does not
    come up.
    """
    from testkit.kubelet import KubeletStandIn

    plugin_dir = workdir / "device-plugins"
    plugin_dir.mkdir(parents=True, exist_ok=True)
    with KubeletStandIn(plugin_dir) as kubelet:
        daemon = DaemonProcess(
            workdir,
            plugin_dir,
            platform=platform,
            extra_args=extra_args,
            env=env,
            command_prefix=command_prefix,
        ).start()
        try:
            kubelet.wait_registered([f"{resource_prefix}-{n}x" for n in sizes], timeout=30)
            daemon.wait_api()
            yield daemon, kubelet
        finally:
            daemon.terminate()
