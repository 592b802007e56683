"""Pool inputs for the DRA tests, from the simulator's platform tables."""

from __future__ import annotations

from collections.abc import Mapping

from nvswitch_dp.dra.slices import DEFAULT_DRIVER, PoolInputs
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.layout import GpuSlot
from nvswitch_dp.partitions.table import PartitionTable


def table_of(name: str) -> PartitionTable:
    return PartitionTable.from_rows((pid, mods) for pid, mods, _ in platform(name).rows)


def inputs_for(
    name: str,
    *,
    node: str = "node-a",
    gpu_problems: Mapping[int, str] | None = None,
    partition_problems: Mapping[int, str] | None = None,
    missing: frozenset[int] = frozenset(),
) -> PoolInputs:
    """The pool inputs of a simulated ``name`` node: every GPU found (but ``missing``),
    IOMMU group 40 + module, NUMA node as the simulator wires it."""
    p = platform(name)
    gpus = {
        m: GpuSlot(m, address, 40 + m, p.numa_node(m))
        for m, address in p.module_map().items()
        if m not in missing
    }
    return PoolInputs(
        node,
        DEFAULT_DRIVER,
        name,
        table_of(name),
        gpus,
        gpu_problems or {},
        partition_problems or {},
    )
