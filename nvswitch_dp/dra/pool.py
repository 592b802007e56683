"""What the node offers the scheduler now, as the publisher's inputs.

:func:`pool_inputs` renders the offering rulebook's answer
(:func:`~nvswitch_dp.partitions.offering.pool_offer`: which GPUs and partitions leave
the pool and why, and the order the scheduler's first fit should meet them in) for this
node and driver as :class:`~nvswitch_dp.dra.slices.PoolInputs`. A change of what is
prepared re-publishes the pool because the order changes with it: the scheduler takes
the first device that fits in the order the slice lists them. A claim allocated before
the pool catches up with the previous one is still correct (the counters see to that),
only placed by an older order.

A per-GPU device stays unless its GPU has a problem; it loses the ``partition<N>x``
attribute of every partition with a problem (see :mod:`nvswitch_dp.dra.slices`), so a
constrained KubeVirt claim can only land on a usable partition.

Pure but for :class:`PoolSource`, which adds the change counter the publisher waits on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nvswitch_dp.dra.slices import PoolInputs
from nvswitch_dp.partitions.layout import NodeLayout
from nvswitch_dp.partitions.offering import DRAINED, pool_offer
from nvswitch_dp.partitions.policy import KEEP_LARGEST, Policy
from nvswitch_dp.partitions.view import NodeView

__all__ = ["DRAINED", "PoolSource", "pool_inputs"]


def pool_inputs(
    view: NodeView,
    layout: NodeLayout,
    *,
    node_name: str,
    driver: str,
    platform: str,
    policy: Policy = KEEP_LARGEST,
) -> PoolInputs:
    """The pool the node offers at ``view``'s generation, for this node and driver."""
    offer = pool_offer(view, layout, policy)
    return PoolInputs(
        node_name=node_name,
        driver=driver,
        platform=platform,
        table=view.table,
        gpus=layout.gpus,
        gpu_problems=offer.gpu_problems,
        partition_problems=offer.partition_problems,
        order=offer.order,
        gpu_order=offer.gpu_order,
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
