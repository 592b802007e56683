"""A DRA-mode node with its cluster played around it (end-to-end tests, demo, benchmarks).

Pieces, all real processes or real servers over real sockets:

- the API-server stand-in (:class:`~testkit.apiserver.ApiServer`, HTTP, in a
  thread of this process), whose :class:`~testkit.apiserver.ApiStore`
  outlives it, so :meth:`DraCluster.api_down` / :meth:`DraCluster.api_up` play an outage
  on the same port with the same objects;
- the grpcio DRA kubelet stand-in (:class:`~testkit.dra_kubelet.DraKubeletStandIn`)
  watching the node's plugin registry directory;
- the scheduler, played by :class:`~testkit.dra_allocator.Allocator` over the
  slices the daemon published and the allocations already written in the store;
- the daemon, ``nvswitch-dp run --mode dra --simulate PLATFORM`` as a child process
  (:class:`~testkit.harness.DaemonProcess`).

Ownership: :class:`DraCluster` owns the API server, the kubelet stand-in and the daemon
processes it starts; the caller owns ``workdir``. Waits raise ``TimeoutError`` naming what
they waited for.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nvswitch_dp.dra.cdi import CdiDirectory
from nvswitch_dp.dra.slices import DEFAULT_DRIVER
from testkit.apiserver import ApiServer, ApiStore
from testkit.dra_allocator import Allocator, Claim
from testkit.dra_kubelet import ClaimSpec, DraKubeletStandIn, PrepareAnswer
from testkit.harness import DaemonProcess

NODE = "hgx-node-1"
TOKEN = "standin-token"
NAMESPACE = "default"
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

    # -- what the API server holds

    def slices(self) -> list[dict[str, Any]]:
        return [
            s
            for s in self.store.slices()
            if s["spec"]["nodeName"] == self.node_name and s["spec"]["driver"] == self.driver
        ]

    def devices(self) -> set[str]:
        """Names of the devices the node's slices offer now: published, and not tainted
        ``NoSchedule``/``NoExecute`` (those the scheduler does not allocate)."""
        return {
            d["name"]
            for s in self.slices()
            for d in s["spec"].get("devices") or []
            if not any(
                t.get("effect") in ("NoSchedule", "NoExecute") for t in d.get("taints") or []
            )
        }

    def taints(self) -> dict[str, list[tuple[str, str]]]:
        """Device name -> its taints as (key, value), for every device published."""
        return {
            d["name"]: [(t["key"], t.get("value", "")) for t in d.get("taints") or []]
            for s in self.slices()
            for d in s["spec"].get("devices") or []
        }

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

        def complete() -> bool:
            found = self.slices()
            if not found:
                return False
            generations = {s["spec"]["pool"]["generation"] for s in found}
            count = found[0]["spec"]["pool"]["resourceSliceCount"]
            return len(generations) == 1 and len(found) == count

        self.wait(complete, timeout, f"the pool of {self.node_name} to be published")

    # -- the scheduler and the claims

    def allocator(self) -> Allocator:
        """The scheduler's view: the published pool, minus what claims hold already."""
        allocator = Allocator.from_slices(self.slices())
        for (resource, _, _), obj in list(self.store.objects.items()):
            if resource != "resourceclaims":
                continue
            allocation = (obj.get("status") or {}).get("allocation") or {}
            for result in (allocation.get("devices") or {}).get("results") or []:
                if result.get("driver") == self.driver and result.get("device") in (
                    allocator.devices
                ):
                    allocator.allocated.add(result["device"])
        return allocator

    def create_claim(
        self,
        claim: Claim,
        *,
        name: str | None = None,
        namespace: str = NAMESPACE,
        pod_claim_name: str | None = None,
        devices: Sequence[str] | None = None,
    ) -> ClaimSpec:
        """Create a ResourceClaim for ``claim`` and allocate it as the scheduler would
        (``devices`` forces the allocation instead, as a misbehaving scheduler might).

        ``pod_claim_name`` marks it as generated from a template for that pod claim.
        Raises ``LookupError`` when the scheduler finds no allocation.
        """
        name = name or f"claim-{uuid.uuid4().hex[:8]}"
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if pod_claim_name is not None:
            metadata["annotations"] = {"resource.kubernetes.io/pod-claim-name": pod_claim_name}
        requests = [
            {
                "name": r.name,
                "exactly": {"deviceClassName": _class_name(r, self.driver), "count": r.count},
            }
            for r in claim.requests
        ]
        spec: dict[str, Any] = {"devices": {"requests": requests}}
        if claim.match_attribute:
            spec["devices"]["constraints"] = [
                {
                    "requests": [r.name for r in claim.requests],
                    "matchAttribute": f"{self.driver}/{claim.match_attribute}",
                }
            ]
        created = self.store.create(
            "resourceclaims",
            namespace,
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaim",
                "metadata": metadata,
                "spec": spec,
            },
        )
        if devices is None:
            # The scheduler retries a pod while a pool is being updated (incomplete: a
            # new generation not wholly written yet); so does this, within 10 s.
            allocator = self.allocator()
            deadline = time.monotonic() + 10.0
            while allocator.unusable is not None and time.monotonic() < deadline:
                time.sleep(0.01)
                allocator = self.allocator()
            found = allocator.allocate(claim)
            if found is None:
                self.store.delete("resourceclaims", namespace, name)
                raise LookupError(f"the scheduler finds no allocation for {claim}")
            devices = found
        slots = [r.name for r in claim.requests for _ in range(r.count)]
        results = [
            {"request": request, "driver": self.driver, "pool": self.node_name, "device": device}
            for request, device in zip(slots, devices, strict=True)
        ]
        created["status"] = {"allocation": {"devices": {"results": results}}}
        self.store.update("resourceclaims", namespace, name, created, status=True)
        return ClaimSpec(namespace, created["metadata"]["uid"], name)

    def delete_claim(self, claim: ClaimSpec) -> None:
        self.store.delete("resourceclaims", claim.namespace, claim.name)

    def allocated(self, claim: ClaimSpec) -> list[str]:
        obj = self.store.get("resourceclaims", claim.namespace, claim.name)
        results = obj["status"]["allocation"]["devices"]["results"]
        return [r["device"] for r in results]

    def prepare(self, claim: ClaimSpec) -> PrepareAnswer:
        return self.kubelet.prepare(self.driver, [claim])[claim.uid]

    def unprepare(self, claim: ClaimSpec) -> str:
        return self.kubelet.unprepare(self.driver, [claim])[claim.uid]

    # -- the node

    def fm_active(self) -> list[int]:
        """FM's active partitions, from the simulator's state file."""
        assert self.daemon is not None
        if not self.daemon.fm_state_file.exists():  # written on the simulator's first change
            return []
        data = json.loads(self.daemon.fm_state_file.read_text())
        return sorted(int(p) for p in data["active"])

    def cdi_spec(self, claim: ClaimSpec) -> dict[str, Any] | None:
        path = self.cdi.spec_path(claim.uid)
        if not path.exists():
            return None
        spec: dict[str, Any] = json.loads(path.read_text())
        return spec

    def vfio_group(self, module_id: int) -> Path:
        """The simulated ``/dev/vfio/<group>`` node of a GPU module."""
        assert self.daemon is not None
        _, body = self.daemon.get(f"/v1/gpus/{module_id}")
        return self.state_dir / "node" / "dev" / "vfio" / str(body["iommu_group"])


def _class_name(request: Any, driver: str) -> str:
    device_class = request.device_class
    if device_class.kind == "gpu":
        return f"gpu.{driver}"
    return f"partition-{device_class.size}x.{driver}"


@contextmanager
def dra_cluster(workdir: Path, **kwargs: Any) -> Iterator[DraCluster]:
    """A started :class:`DraCluster` whose daemon runs and has published its pool."""
    with DraCluster(workdir, **kwargs) as cluster:
        cluster.start_daemon()
        cluster.wait_published()
        yield cluster
