"""Shared test helpers: a controller with its effect runner on a simulated node."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from nvswitch_dp.controller import PartitionController
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.simulator import SimulatedFabricManager, SimulatorStore, inject_fault
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.layout import GpuSlot
from nvswitch_dp.partitions.node import NodeMachine
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.partitions.units import PARTITION_UNIT, AllocationUnit

R = "nvidia.com/gpu-h200"


def fm_active(store: SimulatorStore) -> list[int]:
    if not store.path.exists():  # the simulator writes its file on the first change
        return []
    data: dict[str, list[int]] = json.loads(store.path.read_text())
    return sorted(data["active"])


def inject(store: SimulatorStore, *specs: str, **faults: object) -> None:
    """Inject simulator faults: specs as the CLI takes them, or fault fields directly."""
    sim = store.load()
    for spec in specs:
        inject_fault(sim, spec)
    for key, value in faults.items():
        setattr(sim.faults, key, value)
    store.save(sim)


def ops(controller: PartitionController, operation: str, result: str) -> float:
    value = controller.metrics.registry.get_sample_value(
        "hgx_h200_partition_operations_total", {"operation": operation, "result": result}
    )
    return value or 0.0


@asynccontextmanager
async def running_controller(
    tmp_path: Path, *, grace: float = 30.0, unit: AllocationUnit = PARTITION_UNIT
) -> AsyncIterator[tuple[PartitionController, SimulatorStore]]:
    """A controller on a simulated H200 with its effect runner in a nursery."""
    store = SimulatorStore(tmp_path / "fm.state", "hgx-h200")
    fabric = SimulatedFabricManager(store)
    report = await fabric.list_partitions()
    table = PartitionTable.from_report(report)
    machine = NodeMachine(table, report, trio.current_time(), grace=grace)
    h200 = platform("hgx-h200")
    gpus = {m: GpuSlot(m, addr, 10 + m, h200.numa_node(m)) for m, addr in h200.module_map().items()}
    controller = PartitionController(
        machine,
        fabric,
        gpus,
        resource_prefix=R,
        dev_root=Path("/dev"),
        metrics=Metrics(),
        unit=unit,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run_effects)
        yield controller, store
        nursery.cancel_scope.cancel()


async def allocate(controller: PartitionController, resource: str, *devices: str) -> None:
    allocation = controller.allocate(resource, [list(devices)])
    try:
        await controller.wait_allocation(allocation)
    finally:
        controller.forget(allocation.request_id)
