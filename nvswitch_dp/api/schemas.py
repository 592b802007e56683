"""The JSON the REST API answers with, built from the node's immutable view.

Each builder matches a schema of ``openapi.yaml`` (``Partition``, ``Gpu``, ``Node``);
schemathesis checks every answer of the running daemon against them. The builders read
only a :class:`~nvswitch_dp.partitions.layout.NodeLayout` (fixed facts) and a
:class:`~nvswitch_dp.partitions.view.NodeView` (one generation of the node state
machine), so one answer never mixes two states; the one I/O is :func:`gpu_driver`, a
``readlink`` in sysfs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvswitch_dp.echo import clipped
from nvswitch_dp.partitions.layout import NodeLayout
from nvswitch_dp.partitions.state import PartitionView, State
from nvswitch_dp.partitions.view import NodeView
from nvswitch_dp.vfio.discovery import read_function

# The default of fabric_manager.list_failure_window_seconds.
DEFAULT_LIST_FAILURE_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the app knows of the node beyond the controller (fixed at start).

    ``sysfs_root`` is where GPU drivers are read (None: not read, ``driver`` is null);
    ``simulated`` the simulator's platform name, None on real hardware.
    """

    sysfs_root: Path | None = None
    gpu_model: str | None = None
    simulated: str | None = None


def partition_json(layout: NodeLayout, view: PartitionView) -> dict[str, Any]:
    partition = view.partition
    return {
        "id": partition.partition_id,
        "device_id": partition.device_id,
        "resource": layout.resource_of(partition),
        "size": partition.size,
        "modules": list(partition.sorted_modules),
        "pci_addresses": [
            layout.gpus[m].pci_address for m in partition.sorted_modules if m in layout.gpus
        ],
        "state": view.state.value,
        "phase": view.phase.value,
        "in_use": view.in_use,
        "healthy": view.healthy,
        "blocked_by": view.blocker,
        "fault": view.fault,
    }


def gpu_driver(sysfs_root: Path | None, pci_address: str | None) -> str | None:
    """The kernel driver bound to the GPU now (``vfio-pci``), None when unbound or unknown."""
    if sysfs_root is None or pci_address is None:
        return None
    function = read_function(sysfs_root, pci_address)
    return function.driver if function is not None else None


def gpu_json(layout: NodeLayout, node: NodeView, facts: NodeFacts, module: int) -> dict[str, Any]:
    """One GPU by module ID; ``KeyError`` for a module in no partition."""
    if module not in node.table.module_ids:
        raise KeyError(module)
    slot = layout.gpus.get(module)
    address = slot.pci_address if slot is not None else None
    fault = node.module_faults.get(module)
    return {
        "module": module,
        "pci_address": address,
        "iommu_group": slot.iommu_group if slot is not None else None,
        "numa_node": slot.numa_node if slot is not None else None,
        "driver": gpu_driver(facts.sysfs_root, address),
        "healthy": fault is None,
        "fault": fault,
        "drained": module in node.drained_modules,
        "partitions": sorted(p.partition_id for p in node.table.containing(module)),
    }


def gpus_json(layout: NodeLayout, node: NodeView, facts: NodeFacts) -> list[dict[str, Any]]:
    return [gpu_json(layout, node, facts, m) for m in sorted(node.table.module_ids)]


def readiness_problems(
    node: NodeView,
    extra: Sequence[str] = (),
    *,
    now: float | None = None,
    list_window: float = DEFAULT_LIST_FAILURE_WINDOW_S,
) -> list[str]:
    """Why the daemon is not ready (empty when it is); ``extra``: the edges' own.
    ``now`` (the clock of ``lists_failing_since``) enables the failing-list check."""
    problems = [
        f"{resource} is not registered with the kubelet"
        for resource, registered in sorted(node.registered.items())
        if not registered
    ]
    if not node.fabric_reachable:
        problems.append(f"Fabric Manager is unreachable: {node.fabric_problem}")
    problems.extend(fabric_problems(node, now=now, list_window=list_window))
    problems.extend(extra)
    return problems


def fabric_problems(
    node: NodeView, *, now: float | None, list_window: float = DEFAULT_LIST_FAILURE_WINDOW_S
) -> list[str]:
    """FM reporting an impossible state, or FM lists failing for longer than
    ``list_window`` seconds (``fabric_manager.list_failure_window_seconds``)."""
    problems = []
    if node.fabric_overlap is not None:
        problems.append(
            f"{node.fabric_overlap}; FM forbids this: deactivate the one no VM uses "
            "(fmpm -d ID) or restart Fabric Manager"
        )
    since = node.lists_failing_since
    if now is not None and since is not None and now - since >= list_window:
        problems.append(
            f"every Fabric Manager list has failed for {now - since:.0f}s "
            f"(the last: {clipped(node.list_failure or 'unknown', 200)})"
        )
    return problems


def node_json(
    layout: NodeLayout, node: NodeView, facts: NodeFacts, extra_problems: Sequence[str] = ()
) -> dict[str, Any]:
    table = node.table
    views = list(node.partitions.values())
    by_state = dict.fromkeys((s.value for s in State), 0)
    for view in views:
        by_state[view.state.value] += 1
    problems = readiness_problems(node, extra_problems)
    return {
        "platform": {
            "gpu_model": facts.gpu_model,
            "gpu_count": len(table.module_ids),
            "partition_sizes": list(table.sizes),
            "simulated": facts.simulated,
        },
        "fabric_manager": {
            "backend": layout.fabric_name,
            "reachable": node.fabric_reachable,
            "problem": node.fabric_problem,
        },
        "resources": [
            {
                "resource": resource,
                "size": size,
                "registered": node.registered.get(resource, False),
                "partitions": len(table.of_size(size)),
            }
            for resource, size in sorted(layout.resources.items(), key=lambda r: r[1])
        ],
        "pod_resources": {"reachable": node.pod_resources_reachable},
        "partitions": {"total": len(views), "by_state": by_state},
        "ready": not problems,
        "problems": problems,
    }
