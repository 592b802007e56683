"""The :class:`~nvswitch_dp.ports.PartitionHolder` DRA mode uses, over the controller.

The node state machine holds claims itself (rule N9 in ``partitions/node.py``: a claim
holds one partition under its UID until Unprepare). This adapter gives Prepare and
Unprepare the Protocol's shape: the controller's refusals become
:class:`~nvswitch_dp.dra.errors.ClaimRefused`, and restoring the checkpoint's holdings
checks them against what the machine took over at start (the machine is built with the
checkpointed claims, ``NodeMachine(..., claims=...)``, before any FM call is made).

Ownership: borrows the controller; holds no state of its own. Cancellation: a waiter
that gives up never interrupts the FM call (it belongs to the controller's effect
runner), and the claim stays held until Unprepare, so a cancelled Prepare leaves nothing
half done that a retried Prepare or an Unprepare does not finish.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from nvswitch_dp.controller import AllocationError, PartitionController
from nvswitch_dp.dra.errors import ClaimRefused
from nvswitch_dp.partitions.layout import ContainerGrant
from nvswitch_dp.partitions.state import StateError

log = logging.getLogger(__name__)


class ControllerHolder:
    """Partitions held by DRA claims, through the controller. See the module docstring.

    Errors: :meth:`hold_for_claim` raises :class:`ClaimRefused` with the machine's
    reason (the blocking partition or claim, the unhealthy GPU, the FM failure); the
    other methods do not raise.
    """

    def __init__(self, controller: PartitionController) -> None:
        self.controller = controller

    @property
    def holdings(self) -> Mapping[str, int]:
        """Claim uid -> partition held, as the machine has it now."""
        return dict(self.controller.view().claims)

    async def hold_for_claim(self, claim_uid: str, partition_id: int) -> ContainerGrant:
        """Hold and activate the partition for the claim; idempotent (see the Protocol)."""
        try:
            return await self.controller.hold_for_claim(claim_uid, partition_id)
        except (AllocationError, StateError) as exc:
            raise ClaimRefused(str(exc)) from None

    async def release_claim(self, claim_uid: str) -> None:
        """Drop the claim's hold; the controller deactivates the partition (retried on
        FM failure). Unknown uid: nothing to do."""
        self.controller.release_claim(claim_uid)

    def restore_claims(self, holdings: Mapping[str, int]) -> None:
        """Check the checkpoint's holdings against the machine's (see the module doc).

        A claim the machine could not take over (its partition blocked or faulty at
        start) is logged: the kubelet's retried Prepare holds it again, or is refused
        with the reason.
        """
        held = self.controller.view().claims
        for claim_uid, partition_id in holdings.items():
            if held.get(claim_uid) != partition_id:
                log.warning(
                    "checkpointed claim %s (partition %d) is not held after the restart; "
                    "its next Prepare holds it again",
                    claim_uid,
                    partition_id,
                )
