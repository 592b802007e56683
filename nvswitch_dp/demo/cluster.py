"""The cluster's side of DRA for one node: the objects in the API server and the scheduler.

The DRA demo (and the end-to-end tests, through ``testkit/dra_cluster.py``) play the
control plane with two pieces of this package: the objects of an API server
(:class:`~nvswitch_dp.demo.apistore.ApiStore`, served over HTTP by
:mod:`nvswitch_dp.demo.apiserver`) and the scheduler's allocator
(:mod:`nvswitch_dp.demo.dra_allocator`). :class:`ControlPlane` joins them for one node
and one driver: what the node published, and claims created and allocated as
kube-scheduler would allocate them.

Also here, as plain values both kubelets (the demo's grpclib one and the tests' grpcio
one) answer with: :class:`ClaimSpec` and :class:`PrepareAnswer`; and the two facts the
walk-through reads off the node: FM's active partitions (the simulator's state file) and
a claim's CDI spec.

Synchronous; ``create_claim`` may sleep (up to 10 s) while a pool is being rewritten,
so Trio code calls it in a worker thread.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvswitch_dp.demo.apistore import ApiStore
from nvswitch_dp.demo.dra_allocator import Allocator, Claim, Request
from nvswitch_dp.dra.cdi import CdiDirectory

NAMESPACE = "default"
POOL_RETRY_S = 10.0  # how long create_claim waits for an incomplete pool to complete


@dataclass(frozen=True)
class ClaimSpec:
    """A claim as the kubelet names it in Prepare and Unprepare."""

    namespace: str
    uid: str
    name: str


@dataclass
class PrepareAnswer:
    """The answer for one claim: devices as dicts, and the error text ("" on success)."""

    devices: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    @property
    def cdi_device_ids(self) -> list[str]:
        """Every CDI device ID of every device, in order, without repeats."""
        ids: list[str] = []
        for device in self.devices:
            for cdi_id in device["cdi_device_ids"]:
                if cdi_id not in ids:
                    ids.append(cdi_id)
        return ids


def pool_complete(slices: Sequence[dict[str, Any]]) -> bool:
    """Whether ``slices`` (one node's, one driver's) are a whole pool: every slice of one
    generation, as many as ``resourceSliceCount`` says (the scheduler allocates from
    nothing less)."""
    if not slices:
        return False
    generations = {s["spec"]["pool"]["generation"] for s in slices}
    count = slices[0]["spec"]["pool"]["resourceSliceCount"]
    return len(generations) == 1 and len(slices) == count


class ControlPlane:
    """The API server's objects for one node's pool, and the scheduler over them.

    Ownership: borrows ``store`` (the caller owns it and the servers in front of it).
    Errors: :meth:`create_claim` raises ``LookupError`` when the scheduler finds no
    allocation; the store's :class:`~nvswitch_dp.demo.apistore.ApiError` passes through.
    """

    def __init__(self, store: ApiStore, node_name: str, driver: str) -> None:
        self.store = store
        self.node_name = node_name
        self.driver = driver

    def slices(self) -> list[dict[str, Any]]:
        """The ResourceSlices this node's driver published."""
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
        Raises ``LookupError`` when the scheduler finds no allocation (the claim is
        deleted again).
        """
        name = name or f"claim-{uuid.uuid4().hex[:8]}"
        body = self._claim_object(claim, name, namespace, pod_claim_name)
        created = self.store.create("resourceclaims", namespace, body)
        if devices is None:
            found = self._schedule(claim)
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

    def _claim_object(
        self, claim: Claim, name: str, namespace: str, pod_claim_name: str | None
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if pod_claim_name is not None:
            metadata["annotations"] = {"resource.kubernetes.io/pod-claim-name": pod_claim_name}
        requests = [
            {"name": r.name, "exactly": {"deviceClassName": self.class_name(r), "count": r.count}}
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
        return {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": metadata,
            "spec": spec,
        }

    def _schedule(self, claim: Claim) -> Sequence[str] | None:
        # The scheduler retries a pod while a pool is being updated (incomplete: a new
        # generation not wholly written yet); so does this, for a while.
        allocator = self.allocator()
        deadline = time.monotonic() + POOL_RETRY_S
        while allocator.unusable is not None and time.monotonic() < deadline:
            time.sleep(0.01)
            allocator = self.allocator()
        return allocator.allocate(claim)

    def class_name(self, request: Request) -> str:
        """The DeviceClass ``request`` names: ``gpu.<driver>`` or ``partition-<N>x.<driver>``."""
        device_class = request.device_class
        if device_class.kind == "gpu":
            return f"gpu.{self.driver}"
        return f"partition-{device_class.size}x.{self.driver}"

    def delete_claim(self, claim: ClaimSpec) -> None:
        self.store.delete("resourceclaims", claim.namespace, claim.name)

    def allocated(self, claim: ClaimSpec) -> list[str]:
        """The devices the claim's allocation names, in request order."""
        obj = self.store.get("resourceclaims", claim.namespace, claim.name)
        results = obj["status"]["allocation"]["devices"]["results"]
        return [r["device"] for r in results]


def fm_active(fm_state_file: Path) -> list[int]:
    """FM's active partitions, from the simulator's state file (none before it is written:
    the simulator writes it on its first change)."""
    if not fm_state_file.exists():
        return []
    data = json.loads(fm_state_file.read_text())
    return sorted(int(p) for p in data["active"])


def cdi_spec(cdi_dir: Path, claim: ClaimSpec) -> dict[str, Any] | None:
    """The CDI spec the driver wrote for ``claim``, or None when there is none."""
    path = CdiDirectory(cdi_dir).spec_path(claim.uid)
    if not path.exists():
        return None
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec
