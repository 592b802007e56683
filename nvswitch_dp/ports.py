"""The seams between the daemon and the outside world, as small Protocols.

Production implementations live beside the I/O they do (``fabric/``, ``vfio/``,
``plugin/``); fakes with real behaviour live in ``tests/fakes.py``. The core
(``partitions/``) depends on none of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nvswitch_dp.fabric.types import FmReport

if TYPE_CHECKING:  # the controller imports this module; a runtime import would be a cycle
    from nvswitch_dp.controller import ContainerGrant


class FabricManagerClient(Protocol):
    """Fabric Manager's partition API, as every backend offers it.

    Errors: every method raises a :class:`~nvswitch_dp.fabric.types.FabricManagerError`
    subclass carrying FM's return code; a backend that cannot reach FM raises
    ``FmConnectionNotValid`` (or ``FmTimeout``).
    """

    name: str

    async def list_partitions(self) -> FmReport:
        """FM's partition table with each partition's ``isActive``."""
        ...

    async def activate(self, partition_id: int) -> None:
        """Activate one partition (FM: IN_USE if it or an overlapping one is active)."""
        ...

    async def deactivate(self, partition_id: int) -> None:
        """Deactivate one partition (FM: UNINITIALIZED if it is not active)."""
        ...

    async def set_activated(self, partition_ids: Sequence[int]) -> None:
        """Tell a restarted FM which partitions are still active (may be empty)."""
        ...


@dataclass(frozen=True, slots=True)
class PodDevices:
    """Devices of one resource the kubelet has assigned to one container."""

    namespace: str
    pod: str
    container: str
    resource_name: str
    device_ids: tuple[str, ...]


class PodResourcesClient(Protocol):
    """The kubelet's PodResources API (``List``).

    Errors: raises ``OSError`` or a gRPC error when the socket cannot be reached; callers
    must then release nothing.
    """

    async def list_assigned(self) -> Sequence[PodDevices]: ...


class PciKernel(Protocol):
    """The kernel's driver-binding interface: sysfs attribute writes and module loading.

    Production: :class:`nvswitch_dp.vfio.binding.SysfsKernel` (the write goes to the real
    sysfs file and the kernel acts on it; modules through ``modprobe``). Simulation:
    :class:`nvswitch_dp.vfio.simulate.SimulatedKernel`, which applies the kernel's rules to
    a simulated tree. Callers read the result back from sysfs; neither returns anything.

    Errors: ``OSError`` with the kernel's errno (``ENODEV`` for an unbind from a driver
    the device is not bound to, ``EBUSY``, ``EINVAL``, ``ENOENT`` for a missing
    attribute); :meth:`load_module` raises ``OSError`` when the module cannot be loaded,
    its message naming the module and the cause.
    """

    def write_attribute(self, path: Path, value: str) -> None:
        """Write ``value`` to the sysfs attribute ``path`` in one write, as ``tee`` does."""
        ...

    def load_module(self, name: str) -> None:
        """Load kernel module ``name`` (and what it depends on); loaded already: nothing."""
        ...


# -- DRA mode ------------------------------------------------------------------------------


class PartitionHolder(Protocol):
    """The node core, as DRA mode's Prepare and Unprepare use it: partitions held by claims.

    Every method runs on the daemon's Trio thread. The holder owns the partition state;
    callers own nothing they get back (a :class:`~nvswitch_dp.controller.ContainerGrant`
    is a value).
    """

    async def hold_for_claim(self, claim_uid: str, partition_id: int) -> ContainerGrant:
        """Hold and activate ``partition_id`` for the claim, atomically.

        Idempotent for the same uid and partition (a retried Prepare gets the same grant).
        Raises :class:`~nvswitch_dp.dra.errors.ClaimRefused` when the partition is
        blocked, unhealthy, held by another claim, or FM fails; nothing is left half done
        and the message says what to ask for or when to retry.
        """
        ...

    async def release_claim(self, claim_uid: str) -> None:
        """Drop the claim's hold and deactivate its partition; an unknown uid: nothing to do.

        An FM failure leaves the partition queued for deactivation (retried), not an error.
        """
        ...

    def restore_claims(self, holdings: Mapping[str, int]) -> None:
        """At start, from the checkpoint: claim uid -> partition held (never deactivated)."""
        ...


class ClaimReader(Protocol):
    """Reads ResourceClaims (``resource.k8s.io/v1``) from the API server.

    Errors: :class:`~nvswitch_dp.dra.errors.ClaimNotFound` when the API server answers
    404; :class:`~nvswitch_dp.dra.errors.ClaimUnreadable` for any other failure
    (unreachable, unauthorized, 5xx), with the cause in the message.
    """

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        """The ResourceClaim object as the API server returns it (a JSON dict)."""
        ...
