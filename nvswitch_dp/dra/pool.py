"""What the node offers the scheduler now: the publisher's inputs, from the node core.

:func:`pool_inputs` turns the node machine's picture
(:class:`~nvswitch_dp.partitions.node.NodeView`)
and the node's fixed facts (:class:`~nvswitch_dp.controller.NodeLayout`) into
:class:`~nvswitch_dp.dra.slices.PoolInputs`. A device with a problem "leaves the pool"
below: it is left out, or, where the API server keeps device taints, published with a
``NoSchedule`` taint saying why (:mod:`nvswitch_dp.dra.slices`). The rules, and why:

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

Pure: no I/O, no clock. :class:`PoolSource` adds the change counter the publisher waits on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nvswitch_dp.dra.slices import DRAINED, FABRIC_PREFIX, OCCUPIED_PREFIX, PoolInputs
from nvswitch_dp.partitions.layout import NodeLayout
from nvswitch_dp.partitions.policy import KEEP_LARGEST, Policy, gpu_order, placement_order
from nvswitch_dp.partitions.state import Phase
from nvswitch_dp.partitions.view import FabricStatus, NodeView

__all__ = ["DRAINED", "PoolSource", "pool_inputs"]


def _occupied(view: NodeView, partition_id: int) -> bool:
    partition = view.partitions[partition_id]
    return partition.in_use or partition.phase is not Phase.INACTIVE


def pool_inputs(
    view: NodeView,
    layout: NodeLayout,
    *,
    node_name: str,
    driver: str,
    platform: str,
    policy: Policy = KEEP_LARGEST,
) -> PoolInputs:
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
    return PoolInputs(
        node_name=node_name,
        driver=driver,
        platform=platform,
        table=table,
        gpus=layout.gpus,
        gpu_problems=gpu_problems,
        partition_problems=partition_problems,
        order=placement_order(table, free, policy=policy),
        gpu_order=gpu_order(table, free, policy=policy),
    )


@dataclass
class PoolSource:
    """The publisher's ``source`` and ``wait_for_change`` over a live node.

    ``view``/``layout`` read the controller; ``wait_changed`` waits (Trio) until the
    node machine's generation moves. The change counter moves only when the inputs do,
    so a machine change that does not touch the pool (a claim's bookkeeping, an FM list)
    costs the API server nothing. Owns no resource.
    """

    view: Callable[[], NodeView]
    layout: NodeLayout
    wait_changed: Callable[[], Awaitable[None]]
    node_name: str
    driver: str
    platform: str
    policy: Policy = KEEP_LARGEST
    _last: PoolInputs | None = None
    _changes: int = 0

    def inputs(self) -> PoolInputs:
        """The pool now; moves the change counter when it differs from the last one."""
        current = pool_inputs(
            self.view(),
            self.layout,
            node_name=self.node_name,
            driver=self.driver,
            platform=self.platform,
            policy=self.policy,
        )
        last = self._last
        if (
            last is None
            or last.gpu_problems != current.gpu_problems
            or last.partition_problems != current.partition_problems
            or last.order != current.order
            or last.gpu_order != current.gpu_order
        ):
            self._last = current
            self._changes += 1
        return current

    async def wait_for_change(self, last: int) -> int:
        """Return the change counter once it differs from ``last`` (``-1``: at once)."""
        while True:
            self.inputs()
            if self._changes != last:
                return self._changes
            await self.wait_changed()
