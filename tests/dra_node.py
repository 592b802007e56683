"""DRA test pieces: an in-memory claim store playing the API server, and a prepared node.

:class:`MemoryClaims` is a :class:`~nvswitch_dp.ports.ClaimReader` with real behaviour:
claims are stored objects, a deleted one answers :class:`ClaimNotFound` (404), a
store marked down answers :class:`ClaimUnreadable`, and every read returns a copy (a
caller cannot change what the "API server" holds).
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from nvswitch_dp.controller import PartitionController
from nvswitch_dp.dra.cdi import CdiDirectory
from nvswitch_dp.dra.checkpoint import Checkpoint
from nvswitch_dp.dra.driver import ClaimRef, DraDriver
from nvswitch_dp.dra.errors import ClaimNotFound, ClaimUnreadable
from nvswitch_dp.dra.holder import ControllerHolder
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.simulator import SimulatedFabricManager, SimulatorStore
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.layout import GpuSlot
from nvswitch_dp.partitions.node import NodeMachine
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.partitions.view import Mode

DRIVER = "gpu.nvswitch-dp.io"
NODE = "node-a"
R = "nvidia.com/gpu-h200"


class MemoryClaims:
    """ResourceClaims by (namespace, name), as an API server keeps them. See module doc."""

    def __init__(self) -> None:
        self._claims: dict[tuple[str, str], dict[str, Any]] = {}
        self.down: str | None = None  # set to a reason to play an unreachable API server
        self.reads = 0

    def put(self, claim: dict[str, Any]) -> None:
        meta = claim["metadata"]
        self._claims[(meta["namespace"], meta["name"])] = copy.deepcopy(claim)

    def delete(self, namespace: str, name: str) -> None:
        del self._claims[(namespace, name)]

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        self.reads += 1
        if self.down is not None:
            raise ClaimUnreadable(f"API server unreachable: {self.down}")
        try:
            return copy.deepcopy(self._claims[(namespace, name)])
        except KeyError:
            raise ClaimNotFound(namespace, name) from None


def allocated_claim(
    name: str,
    devices: Sequence[tuple[str, str]],
    *,
    namespace: str = "default",
    uid: str | None = None,
    driver: str = DRIVER,
    pool: str = NODE,
) -> dict[str, Any]:
    """A ``resource.k8s.io/v1`` ResourceClaim allocated with ``(request, device)`` pairs."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": namespace, "name": name, "uid": uid or str(uuid.uuid4())},
        "spec": {"devices": {"requests": [{"name": r} for r, _ in devices]}},
        "status": {
            "allocation": {
                "devices": {
                    "results": [
                        {"request": r, "driver": driver, "pool": pool, "device": d}
                        for r, d in devices
                    ]
                }
            }
        },
    }


def ref_of(claim: dict[str, Any]) -> ClaimRef:
    meta = claim["metadata"]
    return ClaimRef(meta["namespace"], meta["uid"], meta["name"])


@dataclass
class DraNode:
    """A simulated HGX H200 node in DRA mode: FM simulator, node machine and controller
    (its effect runner in ``nursery``), holder, driver."""

    root: Path
    store: SimulatorStore
    controller: PartitionController
    holder: ControllerHolder
    claims: MemoryClaims
    cdi: CdiDirectory
    checkpoint: Checkpoint
    driver: DraDriver
    runner: trio.CancelScope

    async def fm_active(self) -> list[int]:
        """FM's active set once every FM call the controller started has ended."""
        await self.controller.settle()
        return sorted(self.store.load().active)

    def inject(self, **faults: object) -> None:
        sim = self.store.load()
        for key, value in faults.items():
            setattr(sim.faults, key, value)
        self.store.save(sim)

    def spec(self, claim_uid: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cdi.spec_path(claim_uid).read_text())
        return data

    def stop(self) -> None:
        """Play the daemon's death: its FM calls stop (the FM state file stays)."""
        self.runner.cancel()


async def build_node(
    root: Path, nursery: trio.Nursery, *, claims: MemoryClaims | None = None
) -> DraNode:
    """A node whose FM state, CDI dir and checkpoint live under ``root`` (reused by a
    second call: a restarted daemon on the same node), built as the daemon does it: the
    checkpoint's claims go into the machine at start. The driver is started."""
    root.mkdir(parents=True, exist_ok=True)
    store = SimulatorStore(root / "fm.state", "hgx-h200")
    fabric = SimulatedFabricManager(store)
    report = await fabric.list_partitions()
    checkpoint = Checkpoint(root / "state" / "dra-checkpoint.json")
    restored = {uid: c.partition_id for uid, c in checkpoint.load().items()}
    machine = NodeMachine(
        PartitionTable.from_report(report),
        report,
        trio.current_time(),
        grace=0.2,
        mode=Mode.DRA,
        claims=restored,
    )
    h200 = platform("hgx-h200")
    gpus = {m: GpuSlot(m, addr, 10 + m, h200.numa_node(m)) for m, addr in h200.module_map().items()}
    controller = PartitionController(
        machine, fabric, gpus, resource_prefix=R, dev_root=Path("/dev"), metrics=Metrics()
    )
    runner = trio.CancelScope()

    async def run_effects(task_status: trio.TaskStatus[None]) -> None:
        with runner:
            await controller.run_effects(task_status=task_status)

    await nursery.start(run_effects)
    holder = ControllerHolder(controller)
    claims = claims or MemoryClaims()
    cdi = CdiDirectory(root / "cdi")
    driver = DraDriver(
        driver_name=DRIVER,
        node_name=NODE,
        table=machine.table,
        holder=holder,
        claims=claims,
        cdi=cdi,
        checkpoint=checkpoint,
    )
    await driver.start()
    return DraNode(root, store, controller, holder, claims, cdi, checkpoint, driver, runner)
