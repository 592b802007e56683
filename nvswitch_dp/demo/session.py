"""What both walk-throughs share: one shape from a new node to a served one, and back.

Each demo is one Trio program (:func:`run_session`):

    demo directory (a fresh temporary one) -> a simulated node with every GPU on the
    nvidia driver -> ``nvswitch-dp prepare-node --bind-vfio`` -> ``nvswitch-dp run
    --config FILE`` as a child process, beside the mode's kubelet (and, in DRA mode, API
    server and scheduler) -> the mode's walk-through -> the REST API with its bearer
    token -> serve until Ctrl-C (or stop at once with ``--no-wait``)

Rules, so that a demo never leaves anything behind however it ends:

- SIGINT, SIGTERM and SIGHUP all stop it the same way: Trio's signal receiver cancels
  the session, every ``finally`` runs (the daemon gets SIGTERM, the kubelet's sockets
  close) and the directory is removed last. A signal while the demo serves is the normal
  end (status 0); one before the walk-through ended is an interruption (status 130).
- Every child (``prepare-node``, the daemon) runs in its own session, so a Ctrl-C typed
  in the terminal reaches only the demo, which then stops them in order.
- A step that cannot complete raises :class:`DemoFailed`; the demo prints why, and the
  end of the daemon's log, and exits with status 1.
"""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio_asyncio
import yaml

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE_S = 10.0  # the daemon exits within 3 s of SIGTERM; past this it is killed
POLL_S = 0.02
LOG_TAIL_LINES = 30


class DemoFailed(Exception):
    """A step of the walk-through could not complete; the message says which and why."""


def say(text: str = "") -> None:
    """One line of the walk-through, at once (the demo's output is read as it comes)."""
    print(text, flush=True)


def command_line(command: list[str]) -> str:
    """``command`` as the user would type it: ``nvswitch-dp ...`` for our own module."""
    if command[1:3] == ["-m", "nvswitch_dp"]:
        command = ["nvswitch-dp", *command[3:]]
    return "$ " + shlex.join(command)


@dataclass
class Session:
    """One demo run: its directory, where the daemon's REST API is, and its token.

    ``serving`` is set once the walk-through is over (a signal then is the normal end);
    ``stopped_by`` names the signal that ended the session, if one did.
    """

    workdir: Path
    listen: str
    token: str
    serving: bool = False
    stopped_by: str | None = None

    @property
    def api_url(self) -> str:
        """The REST API's URL for a client on this machine."""
        host, _, port = self.listen.rpartition(":")
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
        return f"http://{host}:{port}"

    @property
    def token_file(self) -> Path:
        return self.workdir / "api-token"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def fm_state_file(self) -> Path:
        """The Fabric Manager simulator's state file (its active partitions)."""
        return self.state_dir / "fabricmanager.state"


Body = Callable[[Session], Awaitable[int]]


def run_session(prefix: str, api_listen: str, body: Body) -> int:
    """Run ``body`` in a fresh demo session (see the module docstring); the exit status."""
    return trio.run(_session, prefix, api_listen, body)


async def _session(prefix: str, api_listen: str, body: Body) -> int:
    status = 1
    # The receiver first, the directory second, and the directory removed before the
    # receiver closes: no signal can end the process while the directory exists.
    with trio.open_signal_receiver(*SIGNALS) as signals, _demo_directory(prefix) as workdir:
        session = Session(workdir, api_listen, secrets.token_urlsafe(24))
        try:
            async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, session, nursery.cancel_scope)
                status = await body(session)
                nursery.cancel_scope.cancel()
        except* DemoFailed as failures:
            for failure in failures.exceptions:
                say(f"\nthe demo failed: {failure}")
            status = 1
    if session.stopped_by is not None:
        return 0 if session.serving else 130
    return status


@contextmanager
def _demo_directory(prefix: str) -> Iterator[Path]:
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    say(f"demo directory: {workdir}")
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        say(f"removed {workdir}")


async def _stop_on_signal(
    signals: AsyncIterator[int], session: Session, scope: trio.CancelScope
) -> None:
    async for number in signals:
        session.stopped_by = signal.Signals(number).name
        if session.serving:
            say(f"\n{session.stopped_by}: stopping the daemon (SIGTERM)")
        else:
            say(f"\n{session.stopped_by}: interrupted; stopping everything")
        scope.cancel()
        return


# -- the node --------------------------------------------------------------------------


def write_config(session: Session, node_settings: dict[str, Any]) -> Path:
    """The daemon's configuration, ``<workdir>/config.yaml``: the REST API on the demo's
    address with its token file (written here, mode 0600), and ``node_settings`` (the
    node's roots, FM, the mode's sections). Returns its path."""
    session.token_file.write_text(session.token + "\n")
    session.token_file.chmod(0o600)
    config: dict[str, Any] = {
        "version": "v1",
        "state_dir": str(session.state_dir),
        "api": {"listen": session.listen, "token_file": str(session.token_file)},
        **node_settings,
    }
    path = session.workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def prepare_node(session: Session, platform_name: str, settings: dict[str, Any]) -> Path:
    """A simulated node with its GPUs on nvidia, prepared by ``prepare-node``; returns the
    configuration the daemon then runs with (no ``module_map``: the inventory has it).

    ``settings``: the mode's own configuration sections. Raises :class:`DemoFailed` when
    ``prepare-node`` fails (its output is shown first).
    """
    from nvswitch_dp.fabric.platforms import platform
    from nvswitch_dp.vfio.nvidia_smi_sim import install_nvidia_smi
    from nvswitch_dp.vfio.simulate import build_simulated_node

    node = build_simulated_node(
        session.workdir / "node", platform(platform_name), gpu_driver="nvidia"
    )
    nvidia_smi = install_nvidia_smi(node)
    node_settings = {
        "fabric_manager": {"backend": "simulator", "simulator_platform": platform_name},
        "vfio": {"sysfs_root": str(node.sysfs_root), "dev_root": str(node.dev_root)},
        **settings,
    }
    config = write_config(session, node_settings)
    command = [
        sys.executable, "-m", "nvswitch_dp", "prepare-node",
        "--config", str(config),
        "--proc-root", str(node.proc_root),
        "--nvidia-smi", str(nvidia_smi),
        "--bind-vfio",
    ]  # fmt: skip
    say(
        f"\n0. a new node: {len(node.module_map)} GPUs on the nvidia driver, no module_map "
        "in the configuration. Preparing it:"
    )
    say(command_line(command))
    result = await trio.run_process(
        command, capture_stdout=True, capture_stderr=True, check=False, start_new_session=True
    )
    for line in (result.stdout + result.stderr).decode(errors="replace").splitlines():
        say(f"   {line}")
    if result.returncode != 0:
        raise DemoFailed(f"prepare-node exited with status {result.returncode}")
    return config


# -- the daemon ------------------------------------------------------------------------


@dataclass
class Daemon:
    """The daemon as a child process; its output goes to ``log_path``."""

    process: trio.Process
    log_path: Path
    started_at: float

    def check_alive(self) -> None:
        """Raise :class:`DemoFailed`, with the end of the log, if the daemon has exited."""
        if self.process.poll() is not None:
            raise DemoFailed(
                f"the daemon exited with status {self.process.returncode}; its log ends:\n"
                + self.log_tail()
            )

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "   (no log)"
        return "\n".join(f"   | {line}" for line in lines[-LOG_TAIL_LINES:])


@asynccontextmanager
async def running_daemon(session: Session, config: Path) -> AsyncIterator[Daemon]:
    """``nvswitch-dp run --config CONFIG`` for the body of the block.

    Resource handling: the daemon runs in its own session, its output in
    ``<workdir>/daemon.log``. On exit (also when cancelled) it gets SIGTERM and
    ``STOP_GRACE_S`` to exit, else SIGKILL; it is always reaped. Errors: a failure inside
    the block that is not :class:`DemoFailed` is shown with the end of the daemon's log.
    """
    command = [sys.executable, "-m", "nvswitch_dp", "run", "--config", str(config)]
    say(f"\nthe configuration ({config}):")
    for line in config.read_text().splitlines():
        say(f"   {line}")
    say(command_line(command) + f"      (its log: {session.workdir / 'daemon.log'})")
    log_path = session.workdir / "daemon.log"
    with log_path.open("ab") as log:
        process = await trio.lowlevel.open_process(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    daemon = Daemon(process, log_path, time.monotonic())
    try:
        yield daemon
    finally:
        with trio.CancelScope(shield=True):
            status = await _stop(process)
        say(f"daemon exited with status {status}")


async def _stop(process: trio.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE_S):
            await process.wait()
    if process.returncode is None:
        process.kill()
    return await process.wait()


async def wait_until(
    predicate: Callable[[], bool], within: float, what: str, daemon: Daemon | None = None
) -> float:
    """Poll ``predicate`` until it holds; return the seconds it took.

    Raises :class:`DemoFailed` naming ``what`` after ``within`` seconds, or at once
    when ``daemon`` has exited.
    """
    began = time.monotonic()
    while not predicate():
        if daemon is not None:
            daemon.check_alive()
        if time.monotonic() - began > within:
            tail = f"; the daemon's log ends:\n{daemon.log_tail()}" if daemon else ""
            raise DemoFailed(f"waited {within:g} s for {what}{tail}")
        await trio.sleep(POLL_S)
    return time.monotonic() - began


# -- the REST API ----------------------------------------------------------------------


def _request(url: str, method: str, token: str | None) -> Any:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


async def rest(session: Session, path: str, *, method: str = "GET", auth: bool = False) -> Any:
    """The REST API's JSON answer for ``path`` (in a worker thread: the kubelet's servers
    go on meanwhile). Raises ``OSError`` (``urllib.error.HTTPError``) on failure."""
    token = session.token if auth else None
    return await trio.to_thread.run_sync(_request, session.api_url + path, method, token)


async def wait_for_api(session: Session, daemon: Daemon, within: float = 20.0) -> None:
    """Until the daemon's REST API answers ``/healthz``; raises :class:`DemoFailed`."""
    began = time.monotonic()
    while True:
        daemon.check_alive()
        try:
            await rest(session, "/healthz")
            return
        except OSError:
            if time.monotonic() - began > within:
                raise DemoFailed(
                    f"the REST API did not answer on {session.api_url} within {within:g} s; "
                    f"the daemon's log ends:\n{daemon.log_tail()}"
                ) from None
            await trio.sleep(0.05)


def curl_commands(session: Session, partition: int) -> list[str]:
    """Two commands a user can paste while the demo serves: a listing and an activation
    (a mutation, so the bearer token is required), both with the token."""
    header = f"Authorization: Bearer {session.token}"
    listing = ["curl", "-s", "-H", header, f"{session.api_url}/v1/partitions?state=free"]
    activate = [
        "curl", "-s", "-X", "POST", "-H", header,
        f"{session.api_url}/v1/partitions/{partition}/activate",
    ]  # fmt: skip
    return [shlex.join(listing), shlex.join(activate)]


async def show_rest_access(session: Session, step: int) -> None:
    """The walk-through's REST step: the token file, and the commands to try."""
    free = (await rest(session, "/v1/partitions?state=free"))["partitions"]
    # A 2-GPU partition if one is free: activating it blocks the least of the pool.
    candidates = sorted(free, key=lambda p: (p["size"] != 2, p["id"]))
    partition = candidates[0]["id"] if candidates else 0
    say(
        f"\n{step}. the REST API on {session.api_url}: reads are open, changes need the "
        f"bearer token from api.token_file ({session.token_file}). While the demo serves:"
    )
    listing, activate = curl_commands(session, partition)
    say(f"   $ {listing}")
    say(f"   $ {activate}")
    say(f"     (pre-warms free partition {partition}; POST .../deactivate undoes it)")


async def serve_until_interrupted(session: Session, daemon: Daemon, wait: bool) -> int:
    """The end of a walk-through: stop now (``wait`` false), or serve until a signal.

    Returns 0 (a signal ends the session from outside: this never returns then), or 1
    when the daemon stopped on its own.
    """
    session.serving = True
    if not wait:
        say("\nstopping the daemon (SIGTERM)")
        return 0
    say(f"\nThe daemon keeps serving (REST on {session.api_url}); press Ctrl-C to stop it.")
    await daemon.process.wait()
    say("the daemon stopped on its own")
    return 1
