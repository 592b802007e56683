"""What the node may offer, and in what order: the one rulebook both modes render.

Device-plugin mode (:func:`kubelet_offer`): every partition of a size is listed, Healthy
exactly when the book says so (rule P5 in ``state.py``: a partition in use is Healthy
unless its own hardware is faulty; any other exactly when it is available), so the
kubelet's books drop every partition that overlaps one in use, in every size.

DRA mode (:func:`pool_offer`): the scheduler counts GPUs itself (one shared counter per
GPU), so what leaves the pool is what its counters cannot see. A device with a problem
"leaves the pool": the DRA edge leaves it out of the ResourceSlices or, where the API
server keeps device taints, publishes it with a ``NoSchedule`` taint saying why. The
rules, and why:

- **GPU problems** (the GPU, and every partition and per-GPU device containing it, leave
  the pool): a hardware or VFIO fault of the GPU (``module_faults``), and a drained GPU.
  Neither can be handed to a new claim, whatever the partition.
- **Partition problems** apply only to partitions *no claim holds*. A claimed partition
  is the scheduler's own allocation: removing it would say nothing the counters do not,
  and the partitions overlapping it are kept out by those counters (the scheduler counts
  its allocated claims), so neither is a problem here. A partition no claim holds leaves
  the pool when:

  * it is unhealthy on its own (``fault``: an NVLink or FM problem with it, a failed
    activation held out for a while): Prepare would refuse it;
  * it overlaps a partition that is occupied (active, being activated or deactivated,
    or its state unknown) but *not held by a claim*: an operator's pre-warm, a partition
    found active at start, one being deactivated after its Unprepare. The scheduler never
    allocated those, so its counters do not cover their GPUs; without this it would
    allocate an overlapping partition that Prepare must refuse. The occupied partition
    itself stays (a claim can take it over);
  * Fabric Manager is unreachable or restarting (``fabric_problem``): nothing new can be
    activated until it answers, so nothing new is offered; claimed partitions stay, their
    GPUs are still the VMs'.

**Order** (why a change of what is prepared re-publishes the pool): the scheduler takes
the first device that fits in the order the slice lists them, so the devices are listed
in the allocation policy's order for what is free now
(:func:`~nvswitch_dp.partitions.policy.placement_order`, ``gpu_order``): first fit over
the list is the policy's choice. A claim allocated before the pool catches up with the
previous one is still correct (the counters see to that), only placed by an older order.

A per-GPU device stays unless its GPU has a problem; it loses the ``partition<N>x``
attribute of every partition with a problem (see :mod:`nvswitch_dp.dra.slices`), so a
constrained KubeVirt claim can only land on a usable partition.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nvswitch_dp.partitions.layout import NodeLayout
from nvswitch_dp.partitions.policy import KEEP_LARGEST, Policy, gpu_order, placement_order
from nvswitch_dp.partitions.state import Phase
from nvswitch_dp.partitions.table import Partition
from nvswitch_dp.partitions.view import FabricStatus, NodeView

# The texts of the problems, which the DRA edge also turns into taint keys.
DRAINED = "drained by an operator"
FABRIC_PREFIX = "Fabric Manager is "
OCCUPIED_PREFIX = "shares a GPU with partition "


def kubelet_offer(view: NodeView, size: int) -> list[tuple[Partition, bool]]:
    """Every partition of ``size`` with whether the kubelet may hand it out (Healthy),
    in the table's order (the kubelet asks GetPreferredAllocation for placement)."""
    return [(p, view.healthy(p.partition_id)) for p in view.table.of_size(size)]


@dataclass(frozen=True, slots=True)
class PoolOffer:
    """What DRA mode offers at one generation (see the module docstring)."""

    gpu_problems: Mapping[int, str]  # module -> why the GPU and its devices are out
    partition_problems: Mapping[int, str]  # partition -> why it is out
    order: tuple[int, ...]  # partitions, in the policy's order for what is free now
    gpu_order: tuple[int, ...]  # GPUs, likewise


def _occupied(view: NodeView, partition_id: int) -> bool:
    partition = view.partitions[partition_id]
    return partition.in_use or partition.phase is not Phase.INACTIVE


def pool_offer(view: NodeView, layout: NodeLayout, policy: Policy = KEEP_LARGEST) -> PoolOffer:
    """The pool the node offers at ``view``'s generation (see the module docstring),
    its devices listed in ``policy``'s order for what is free now."""
    table = view.table
    gpu_problems: dict[int, str] = dict(view.module_faults)
    for module in sorted(view.drained_modules):
        gpu_problems.setdefault(module, DRAINED)
    claimed = set(view.claims.values())
    unclaimed_occupied = {pid for pid in table.ids if pid not in claimed and _occupied(view, pid)}
    fabric = (
        None
        if view.fabric is FabricStatus.UP
        else f"{FABRIC_PREFIX}{view.fabric.value}: {view.fabric_problem or 'no answer'}"
    )
    partition_problems: dict[int, str] = {}
    for pid in table.ids:
        if pid in claimed:
            continue
        fault = view.partitions[pid].fault
        blockers = sorted(o for o in table.overlapping(pid) if o in unclaimed_occupied)
        if fabric is not None:
            partition_problems[pid] = fabric
        elif fault is not None:
            partition_problems[pid] = fault
        elif blockers:
            partition_problems[pid] = (
                f"{OCCUPIED_PREFIX}{blockers[0]}, which is "
                f"{view.partitions[blockers[0]].state.value} without a claim"
            )
    # What the scheduler can still allocate, as far as the node knows: available in the
    # node's book (nothing held or occupied shares a GPU with it) and in the pool.
    free = frozenset(
        pid
        for pid in view.available_ids()
        if pid not in partition_problems
        and all(m in layout.gpus and m not in gpu_problems for m in table[pid].module_ids)
    )
    return PoolOffer(
        gpu_problems=gpu_problems,
        partition_problems=partition_problems,
        order=tuple(placement_order(table, free, policy=policy)),
        gpu_order=tuple(gpu_order(table, free, policy=policy)),
    )


__all__ = [
    "DRAINED",
    "FABRIC_PREFIX",
    "OCCUPIED_PREFIX",
    "PoolOffer",
    "kubelet_offer",
    "pool_offer",
]
