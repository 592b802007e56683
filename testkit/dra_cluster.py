"""A DRA-mode node with its cluster played around it (end-to-end tests, demo, benchmarks).

Pieces, all real processes or real servers over real sockets:

- the API-server stand-in (:class:`~nvswitch_dp.demo.apiserver.ApiServer`, HTTP, in a
  thread of this process), whose :class:`~nvswitch_dp.demo.apistore.ApiStore`
  outlives it, so :meth:`DraCluster.api_down` / :meth:`DraCluster.api_up` play an outage
  on the same port with the same objects;
- the grpcio DRA kubelet stand-in (:class:`~testkit.dra_kubelet.DraKubeletStandIn`)
  watching the node's plugin registry directory;
- the scheduler, played by :class:`~nvswitch_dp.demo.dra_allocator.Allocator` over the
  slices the daemon published and the allocations already written in the store (the
  demo's :class:`~nvswitch_dp.demo.cluster.ControlPlane`, which this delegates to);
- the daemon, ``nvswitch-dp run --mode dra --simulate PLATFORM`` as a child process
  (:class:`~testkit.harness.DaemonProcess`).

Ownership: :class:`DraCluster` owns the API server, the kubelet stand-in and the daemon
processes it starts; the caller owns ``workdir``. Waits raise ``TimeoutError`` naming what
they waited for.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nvswitch_dp.demo.apiserver import ApiServer
from nvswitch_dp.demo.apistore import ApiStore
from nvswitch_dp.demo.cluster import (
    NAMESPACE,
    ClaimSpec,
    ControlPlane,
    PrepareAnswer,
    cdi_spec,
    fm_active,
    pool_complete,
)
from nvswitch_dp.demo.dra_allocator import Allocator, Claim
from nvswitch_dp.dra.cdi import CdiDirectory
from nvswitch_dp.dra.slices import DEFAULT_DRIVER
from testkit.dra_kubelet import DraKubeletStandIn
from testkit.harness import DaemonProcess

NODE = "hgx-node-1"
TOKEN = "standin-token"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


class DraCluster:
    """See the module docstring. Use it as a context manager (stops everything)."""

    def __init__(
        self,
        workdir: Path,
        *,
        platform: str = "hgx-h200",
        node_name: str = NODE,
        driver: str = DEFAULT_DRIVER,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.platform = platform
        self.node_name = node_name
        self.driver = driver
        self.extra_args = list(extra_args)
        self.store = ApiStore()
        self.api = ApiServer(self.store, token=TOKEN)
        self.state_dir = workdir / "state"
        self.registry_dir = workdir / "plugins_registry"
        self.plugin_dir = workdir / "plugins" / driver
        self.cdi_dir = workdir / "cdi"
        self.kubeconfig = workdir / "kubeconfig"
        self.kubelet = DraKubeletStandIn(self.registry_dir)
        self.daemon: DaemonProcess | None = None
        self.cdi = CdiDirectory(self.cdi_dir)
        longest = self.plugin_dir / "dra.sock"
        if len(str(longest).encode()) > MAX_SOCKET_PATH:
            raise ValueError(
                f"{longest} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} "
                "bytes): use a shorter workdir"
            )

    # -- lifecycle

    def __enter__(self) -> DraCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.api.start()
        self.api.write_kubeconfig(self.kubeconfig)
        self.kubelet.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.daemon is not None:
                self.daemon.terminate()
        finally:
            self.kubelet.stop()
            self.api.stop()

    def start_daemon(self, *, timeout: float = 30.0, api_port: int | None = None) -> DaemonProcess:
        """Start the daemon (a fresh process on the same node) and wait for its REST API
        and the kubelet's registration of the driver. ``api_port``: the REST API's port
        on 127.0.0.1 (default: a free one)."""
        registrations = self.kubelet.registrations
        listen = ["--api-listen", f"127.0.0.1:{api_port}"] if api_port is not None else []
        daemon = DaemonProcess(
            self.workdir,
            self.workdir / "device-plugins",
            platform=self.platform,
            extra_args=[
                "--mode", "dra",
                "--node-name", self.node_name,
                "--kubeconfig", str(self.kubeconfig),
                "--driver-name", self.driver,
                "--plugin-registry-dir", str(self.registry_dir),
                "--dra-plugin-dir", str(self.plugin_dir),
                "--cdi-dir", str(self.cdi_dir),
                *listen,
                *self.extra_args,
            ],
        )  # fmt: skip
        if api_port is not None:
            daemon.port = api_port  # the later --api-listen wins
        self.daemon = daemon.start()
        daemon.wait_api(timeout)

        def registered() -> bool:
            return (
                self.driver in self.kubelet.registered()
                and self.kubelet.registrations > registrations
            )

        self.wait(registered, timeout, f"the kubelet to register {self.driver}")
        return daemon

    def kill_daemon(self) -> None:
        """SIGKILL the daemon (no cleanup of any kind) and reap it."""
        assert self.daemon is not None and self.daemon.process is not None
        self.daemon.process.send_signal(signal.SIGKILL)
        self.daemon.process.wait(timeout=10)

    def api_down(self) -> None:
        """Stop the API server: connections refused, open ones closed; objects kept."""
        self.api.stop()

    def api_up(self) -> None:
        """Serve the same objects again on the same port."""
        self.api = ApiServer(self.store, token=TOKEN, port=self.api.port).start()

    # -- what the API server holds, and the scheduler (nvswitch_dp.demo.cluster)

    @property
    def control(self) -> ControlPlane:
        """The API server's objects for this node, and the scheduler over them."""
        return ControlPlane(self.store, self.node_name, self.driver)

    def slices(self) -> list[dict[str, Any]]:
        return self.control.slices()

    def devices(self) -> set[str]:
        """See :meth:`ControlPlane.devices`."""
        return self.control.devices()

    def taints(self) -> dict[str, list[tuple[str, str]]]:
        return self.control.taints()

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.daemon is not None:
                self.daemon.check_alive()
            if time.monotonic() > deadline:
                log = self.daemon.log_text()[-2000:] if self.daemon is not None else ""
                raise TimeoutError(f"waited {timeout} s for {what}; the daemon's log ends:\n{log}")
            time.sleep(0.02)

    def wait_published(self, timeout: float = 20.0) -> None:
        """Until the pool is complete in the API server (every slice of one generation)."""
        self.wait(
            lambda: pool_complete(self.slices()),
            timeout,
            f"the pool of {self.node_name} to be published",
        )

    def allocator(self) -> Allocator:
        return self.control.allocator()

    def create_claim(
        self,
        claim: Claim,
        *,
        name: str | None = None,
        namespace: str = NAMESPACE,
        pod_claim_name: str | None = None,
        devices: Sequence[str] | None = None,
    ) -> ClaimSpec:
        """See :meth:`ControlPlane.create_claim`."""
        return self.control.create_claim(
            claim, name=name, namespace=namespace, pod_claim_name=pod_claim_name, devices=devices
        )

    def delete_claim(self, claim: ClaimSpec) -> None:
        self.control.delete_claim(claim)

    def allocated(self, claim: ClaimSpec) -> list[str]:
        return self.control.allocated(claim)

    def prepare(self, claim: ClaimSpec) -> PrepareAnswer:
        return self.kubelet.prepare(self.driver, [claim])[claim.uid]

    def unprepare(self, claim: ClaimSpec) -> str:
        return self.kubelet.unprepare(self.driver, [claim])[claim.uid]

    # -- the node

    def fm_active(self) -> list[int]:
        """FM's active partitions, from the simulator's state file."""
        assert self.daemon is not None
        return fm_active(self.daemon.fm_state_file)

    def cdi_spec(self, claim: ClaimSpec) -> dict[str, Any] | None:
        return cdi_spec(self.cdi_dir, claim)

    def vfio_group(self, module_id: int) -> Path:
        """The simulated ``/dev/vfio/<group>`` node of a GPU module."""
        assert self.daemon is not None
        _, body = self.daemon.get(f"/v1/gpus/{module_id}")
        return self.state_dir / "node" / "dev" / "vfio" / str(body["iommu_group"])


@contextmanager
def dra_cluster(workdir: Path, **kwargs: Any) -> Iterator[DraCluster]:
    """A started :class:`DraCluster` whose daemon runs and has published its pool."""
    with DraCluster(workdir, **kwargs) as cluster:
        cluster.start_daemon()
        cluster.wait_published()
        yield cluster
