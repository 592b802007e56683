"""The seams of the daemon, as small Protocols: every one is here.

Outward (the world the daemon drives): :class:`FabricManagerClient`,
:class:`PodResourcesClient`, :class:`PciKernel`, and in DRA mode :class:`ClaimReader`,
:class:`SliceStore`, :class:`ClaimStatusStore`, :class:`CdiSpecs`,
:class:`PreparedClaimStore`, :class:`DeviceMetadata`. Production implementations live
beside the I/O they do (``fabric/``, ``vfio/``, ``plugin/``, ``dra/``); the stand-ins with
real behaviour live in ``tests/`` and ``testkit/``.

Inward (what the edges may ask of the node): :class:`KubeletSide` (the device plugin's
gRPC services and watchers), :class:`OperatorSide` (the REST API) and
:class:`PartitionHolder` (DRA Prepare/Unprepare). The controller implements the first
two; the edges read :class:`~nvswitch_dp.partitions.view.NodeView` pictures and call
these methods, never the controller's machine. The core (``partitions/``) imports none
of this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nvswitch_dp.dra.cdi import CdiMount
from nvswitch_dp.dra.checkpoint import PreparedClaim
from nvswitch_dp.fabric.types import FmReport
from nvswitch_dp.partitions.layout import Allocation, ContainerGrant, NodeLayout
from nvswitch_dp.partitions.state import PartitionView
from nvswitch_dp.partitions.view import NodeView


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


# -- what the edges ask of the node --------------------------------------------------------


class ChangeStream(Protocol):
    """The node's generation, followed from the asyncio side (ListAndWatch streams)."""

    @property
    def generation(self) -> int: ...

    @property
    def closed(self) -> bool:
        """True once the daemon stops: every stream ends."""
        ...

    async def wait_beyond(self, generation: int) -> int:
        """Wait (asyncio) until the generation is newer than ``generation`` or the stream
        closes; the generation then."""
        ...


class NodeReader(Protocol):
    """The node as every edge reads it: fixed facts and an immutable picture."""

    @property
    def layout(self) -> NodeLayout: ...

    def view(self) -> NodeView:
        """The node now (immutable; cached per generation)."""
        ...

    def partition_view(self, partition_id: int) -> PartitionView:
        """One partition now. Raises :class:`~nvswitch_dp.partitions.state.UnknownPartition`."""
        ...

    async def wait_changed(self) -> None:
        """Wait (Trio) until the node's generation moves."""
        ...


class KubeletSide(NodeReader, Protocol):
    """What the device-plugin mode's gRPC services and watchers ask of the node.

    Errors: :meth:`allocate` and :meth:`wait_allocation` raise
    :class:`~nvswitch_dp.partitions.refusal.AllocationError`, whose ``kind`` the edge maps
    to a gRPC status; the other methods do not raise.
    """

    @property
    def feed(self) -> ChangeStream: ...

    def allocate(self, resource: str, containers: Sequence[Sequence[str]]) -> Allocation:
        """One Allocate: every container's devices taken at once, or none."""
        ...

    async def wait_allocation(self, allocation: Allocation) -> Allocation:
        """Wait (Trio) until the allocation's FM work ends."""
        ...

    def forget(self, request_id: int) -> None:
        """The caller is done with a request (answered, failed or cancelled)."""
        ...

    def grants(self, allocation: Allocation) -> list[ContainerGrant]:
        """What each container of a granted allocation receives."""
        ...

    def set_registered(self, resource: str, registered: bool) -> None:
        """Whether the kubelet has the resource registered now (readiness)."""
        ...

    def pod_resources(self, assigned: set[int] | None) -> None:
        """One PodResources reading: partitions some container holds (None: unreadable)."""
        ...


class OperatorSide(NodeReader, Protocol):
    """What the REST API's operator commands ask of the node.

    Errors: :meth:`activate` and :meth:`deactivate` raise
    :class:`~nvswitch_dp.partitions.state.StateError` (refused, the message says why) or
    :class:`~nvswitch_dp.fabric.types.FabricManagerError`; :meth:`drain` and
    :meth:`undrain` raise ``StateError`` for an unknown GPU.
    """

    async def activate(self, partition_id: int) -> None:
        """Pre-warm a partition nobody holds."""
        ...

    async def deactivate(self, partition_id: int, *, force: bool = False) -> None:
        """Deactivate; refused while held unless ``force``."""
        ...

    def drain(self, module_id: int) -> None:
        """Take a GPU out of the pool."""
        ...

    def undrain(self, module_id: int) -> None:
        """Put a drained GPU back into the pool."""
        ...


# -- DRA mode ------------------------------------------------------------------------------


class PartitionHolder(Protocol):
    """The node core, as DRA mode's Prepare and Unprepare use it: partitions held by claims.

    Every method runs on the daemon's Trio thread. The holder owns the partition state;
    callers own nothing they get back (a :class:`~nvswitch_dp.partitions.layout.ContainerGrant`
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


class SliceStore(Protocol):
    """The API calls the publisher makes (:class:`~nvswitch_dp.dra.kube.KubeClient`).

    Failures raise :class:`~nvswitch_dp.dra.kube.KubeError` subclasses; a stale update
    or an existing name raises :class:`~nvswitch_dp.dra.kube.SliceConflict`."""

    async def list_slices(self, node_name: str, driver: str) -> list[dict[str, Any]]: ...

    async def create_slice(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def update_slice(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def delete_slice(self, name: str) -> None: ...

    async def dry_run_create_slice(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create ``obj`` with ``dryRun=All``: validated, admitted and answered as the server
        would store it, but not stored."""
        ...


class ClaimStatusStore(Protocol):
    """The API calls (:class:`~nvswitch_dp.dra.kube.KubeClient`). ``update_claim_status``
    raises :class:`~nvswitch_dp.dra.kube.SliceConflict` on 409 and other
    :class:`~nvswitch_dp.dra.kube.KubeError` subclasses otherwise."""

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]: ...

    async def update_claim_status(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...


class CdiSpecs(Protocol):
    """The CDI spec directory (:class:`nvswitch_dp.dra.cdi.CdiDirectory`).

    Both methods block on disk and are called from a worker thread; both are idempotent.
    """

    def write(
        self, claim_uid: str, grant: ContainerGrant, *, mounts: Sequence[CdiMount] = ()
    ) -> str:
        """Write the claim's spec (with ``mounts`` as read-only bind mounts); return its
        qualified CDI device ID. Raises OSError."""
        ...

    def remove(self, claim_uid: str) -> None:
        """Delete the claim's spec (already gone: fine). Raises OSError."""
        ...


class PreparedClaimStore(Protocol):
    """The on-node checkpoint of prepared claims (:class:`~nvswitch_dp.dra.checkpoint.Checkpoint`).

    Both methods block on disk and are called from a worker thread.
    """

    def load(self) -> Mapping[str, PreparedClaim]:
        """Claim uid -> entry; an absent checkpoint is empty. Raises on a corrupt one."""
        ...

    def save(self, claims: Mapping[str, PreparedClaim]) -> None:
        """Replace the checkpoint atomically with ``claims``. Raises OSError."""
        ...


class DeviceMetadata(Protocol):
    """KEP-5304 device metadata files (:class:`nvswitch_dp.dra.metadata.DeviceMetadataFiles`).

    The methods block on disk and are called from a worker thread; all are idempotent.
    """

    def write(
        self, claim: Mapping[str, Any], devices: Sequence[tuple[str, str]]
    ) -> Sequence[CdiMount]:
        """Write the files of ``claim`` for ``(request, device)`` pairs; their mounts."""
        ...

    def mounts(self, claim_uid: str) -> Sequence[CdiMount]:
        """The mounts of the files already written for the claim."""
        ...

    def remove(self, claim_uid: str) -> None:
        """Remove the claim's files (none: fine)."""
        ...
