"""The partition controller: the one place where kubelet, operator and FM meet the core.

Ownership: the controller owns the :class:`PartitionBook`, talks to Fabric Manager
through a :class:`~nvswitch_dp.ports.FabricManagerClient`, and publishes every change on
its :class:`ChangeFeed`. The kubelet path (Allocate) and the REST path (manual
activation) both go through it, so the two can never disagree.

Concurrency: everything runs on one thread (Trio, with the asyncio loop of
trio-asyncio on top). Decisions are taken synchronously against the book, so two
requests can never both win a GPU; only the FM calls that follow a decision await.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from nvswitch_dp.fabric.types import (
    FabricManagerError,
    FmInUse,
    FmNotConfigured,
    FmReport,
    FmReturn,
)
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.state import (
    Claim,
    PartitionBook,
    PartitionView,
    Phase,
    StateError,
    UnknownPartition,
)
from nvswitch_dp.partitions.table import Partition
from nvswitch_dp.partitions.units import PARTITION_UNIT, AllocationUnit, UnitError
from nvswitch_dp.ports import FabricManagerClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a partition FM failed to activate (NVLINK_ERROR, GENERIC_ERROR) stays out of
# the pool before the scheduler may try it again.
ACTIVATION_FAULT_HOLD_S = 60.0

ANNOTATION_PREFIX = "nvswitch-dp.io"


@dataclass(frozen=True, slots=True)
class GpuSlot:
    """What the plugin hands out for one GPU: where it sits on PCI and in VFIO."""

    module_id: int
    pci_address: str
    iommu_group: int
    numa_node: int | None


class AllocationError(Exception):
    """An Allocate the plugin refuses; the message says which partition blocks it."""

    def __init__(self, message: str, *, kind: str = "refused") -> None:
        super().__init__(message)
        self.kind = kind  # "unknown" | "refused" | "fabric"


class ChangeFeed:
    """Wakes ListAndWatch streams (asyncio side) when the partition book changes.

    The Trio side calls :meth:`publish` synchronously; that only sets asyncio events,
    which is safe because both loops share one thread. :meth:`close` ends every stream.
    """

    def __init__(self) -> None:
        self.generation = 0
        self.closed = False
        self._waiters: set[asyncio.Event] = set()

    def publish(self) -> None:
        self.generation += 1
        for waiter in self._waiters:
            waiter.set()

    def close(self) -> None:
        self.closed = True
        self.publish()

    async def wait_beyond(self, generation: int) -> int:
        """Wait (asyncio) until something newer than ``generation`` is published."""
        while self.generation == generation and not self.closed:
            waiter = asyncio.Event()
            self._waiters.add(waiter)
            try:
                await waiter.wait()
            finally:
                self._waiters.discard(waiter)
        return self.generation


@dataclass
class AllocationPlan:
    """The outcome of the synchronous half of Allocate: what was claimed, what FM must do."""

    resource: str
    partitions: list[Partition]
    to_activate: list[int] = field(default_factory=list)
    to_await: list[int] = field(default_factory=list)
    # GPU modules in the order their addresses go out; empty: each partition's, in turn.
    module_order: tuple[int, ...] = ()

    @property
    def needs_fabric(self) -> bool:
        return bool(self.to_activate or self.to_await)

    @property
    def modules(self) -> tuple[int, ...]:
        """The GPUs granted, in the order of their PCI addresses (the request's order
        under the ``gpu`` unit, so KubeVirt's per-entry pops follow it)."""
        return self.module_order or tuple(m for p in self.partitions for m in p.sorted_modules)


@dataclass(frozen=True, slots=True)
class DeviceNode:
    container_path: str
    host_path: str


@dataclass(frozen=True, slots=True)
class ContainerGrant:
    """What a container receives for its partitions (mapped to the gRPC answer at the edge)."""

    devices: tuple[DeviceNode, ...]
    envs: Mapping[str, str]
    annotations: Mapping[str, str]


def pci_resource_env(resource_name: str) -> str:
    """KubeVirt's variable for a resource's PCI addresses (hyphens kept)."""
    return "PCI_RESOURCE_" + resource_name.upper().replace("/", "_").replace(".", "_")


class PartitionController:
    """See the module docstring. Errors: :class:`AllocationError` on the kubelet path,
    :class:`StateError` and :class:`FabricManagerError` on the operator path."""

    def __init__(
        self,
        book: PartitionBook,
        fabric: FabricManagerClient,
        gpus: Mapping[int, GpuSlot],
        *,
        resource_prefix: str,
        dev_root: Path,
        metrics: Metrics,
        unit: AllocationUnit = PARTITION_UNIT,
    ) -> None:
        self.book = book
        self.unit = unit  # what one kubelet device stands for (plugin.allocation_unit)
        metrics.count_devices_with(lambda partition: len(unit.device_ids(partition)))
        self.fabric = fabric
        self.gpus = dict(gpus)
        self.resource_prefix = resource_prefix
        self.dev_root = dev_root
        self.metrics = metrics
        self.feed = ChangeFeed()
        self.fabric_reachable = True
        self.fabric_problem: str | None = None
        self._activations: dict[int, trio.Event] = {}
        self._activation_faults: dict[int, tuple[str, float]] = {}  # reason, hold until
        self.wake_supervisor = trio.Event()
        self.resources: dict[str, int] = {
            self.resource_name(size): size for size in book.table.sizes
        }
        self.claimed_at: dict[int, float] = {}  # partition -> trio time of its last claim
        self.pending_deactivation: set[int] = set()  # released, FM deactivation to retry
        self.pod_resources_reachable: bool | None = None  # None: not consulted yet
        self.registered: dict[str, bool] = dict.fromkeys(self.resources, False)
        metrics.observe_partitions(self.views_with_resource)
        metrics.observe_fabric(lambda: self.fabric_reachable)
        for resource in self.resources:
            metrics.resource_registered.labels(resource=resource).set(0)

    def set_registered(self, resource: str, registered: bool) -> None:
        self.registered[resource] = registered
        self.metrics.resource_registered.labels(resource=resource).set(int(registered))

    @property
    def all_registered(self) -> bool:
        return all(self.registered.values())

    # -- naming ----------------------------------------------------------------------

    def resource_name(self, size: int) -> str:
        return f"{self.resource_prefix}-{size}x"

    def resource_of(self, partition: Partition) -> str:
        return self.resource_name(partition.size)

    def views_with_resource(self) -> list[tuple[PartitionView, str]]:
        return [(v, self.resource_of(v.partition)) for v in self.book.views()]

    def topology(self, partition: Partition) -> tuple[int, ...]:
        """NUMA nodes of the partition's GPUs (empty when sysfs does not know)."""
        nodes = {
            self.gpus[m].numa_node
            for m in partition.module_ids
            if m in self.gpus and self.gpus[m].numa_node is not None
        }
        return tuple(sorted(n for n in nodes if n is not None))

    # -- kubelet path ----------------------------------------------------------------

    def begin_allocation(self, resource: str, device_ids: Sequence[str]) -> AllocationPlan:
        """Claim every requested partition at once, or none (synchronous, atomic).

        Raises :class:`AllocationError` naming the device and, when another partition
        blocks it, that partition and its state.
        """
        size = self.resources.get(resource)
        if size is None:
            raise AllocationError(f"resource {resource} is not served here", kind="unknown")
        if not device_ids:
            raise AllocationError("the request names no device", kind="unknown")
        try:
            selection = self.unit.select(self.book.table, size, resource, device_ids)
        except UnitError as exc:
            raise AllocationError(str(exc), kind=exc.kind) from None
        wanted = list(selection.partition_ids)
        plan = AllocationPlan(
            resource,
            [self.book.table[pid] for pid in wanted],
            module_order=selection.module_order,
        )
        now = trio.current_time()
        claimed: list[tuple[int, Claim]] = []
        try:
            for pid in wanted:
                claim = self.book.claim(pid)
                claimed.append((pid, claim))
                self.claimed_at[pid] = now
                self.pending_deactivation.discard(pid)
                if claim is Claim.ACTIVATE:
                    plan.to_activate.append(pid)
                    self._activations[pid] = trio.Event()
                elif claim is Claim.WAIT:
                    plan.to_await.append(pid)
        except StateError as exc:
            self._undo_claims(claimed)
            raise AllocationError(
                f"cannot allocate {self.book.table[wanted[len(claimed)]].device_id}: {exc}; "
                "the scheduler will retry once the node reports the change"
            ) from None
        finally:
            self.feed.publish()
        return plan

    async def complete_allocation(self, plan: AllocationPlan) -> None:
        """Activate in FM what :meth:`begin_allocation` claimed; roll back on failure.

        Raises :class:`AllocationError` (kind "fabric") after undoing this request's
        claims and activations, so state stays consistent.
        """
        attempted: list[int] = []
        try:
            for pid in plan.to_activate:
                attempted.append(pid)
                await self._activate_claimed(pid)
            for pid in plan.to_await:
                event = self._activations.get(pid)
                if event is not None:
                    await event.wait()
                if not self.book.in_use(pid):
                    raise AllocationError(
                        f"activation of partition {pid} failed while this request waited",
                        kind="fabric",
                    )
        except (FabricManagerError, AllocationError) as exc:
            failed = attempted[-1] if isinstance(exc, FabricManagerError) else None
            for pid in plan.to_activate:
                if pid not in attempted:  # never started: still ACTIVATING in the book
                    self._activations.pop(pid, None)
                    self.book.activation_failed(pid)
                elif pid != failed:  # activated for this request: undo it
                    self.book.release(pid)
                    await self._deactivate_quietly(pid)
            for pid in plan.to_await:
                self.book.release(pid)
            self.feed.publish()
            if isinstance(exc, AllocationError):
                raise
            raise AllocationError(
                f"Fabric Manager could not activate partition {failed}: {exc}", kind="fabric"
            ) from exc

    async def release(self, partition_id: int) -> None:
        """No pod holds the partition any more: drop the claim and deactivate it in FM.

        A failed deactivation leaves it active and queued for
        :meth:`retry_pending_deactivations`; it is never retried while claimed again.
        """
        if not self.book.in_use(partition_id):
            return
        log.info("releasing partition %d: no pod holds it", partition_id)
        self.book.release(partition_id)
        self.claimed_at.pop(partition_id, None)
        self.feed.publish()
        self.pending_deactivation.add(partition_id)
        await self.retry_pending_deactivations()

    async def retry_pending_deactivations(self) -> None:
        """Deactivate released partitions FM still has active; errors are logged."""
        for pid in sorted(self.pending_deactivation):
            if self.book.in_use(pid) or self.book.phase(pid) is not Phase.ACTIVE:
                self.pending_deactivation.discard(pid)
                continue
            try:
                await self.deactivate(pid)
            except (FabricManagerError, StateError) as exc:
                log.warning("deactivating released partition %d failed: %s", pid, exc)
            else:
                self.pending_deactivation.discard(pid)

    async def abandon(self, plan: AllocationPlan) -> None:
        """Undo a completed allocation (a later container of the same call failed)."""
        for partition in plan.partitions:
            self.book.release(partition.partition_id)
            if partition.partition_id in plan.to_activate:
                await self._deactivate_quietly(partition.partition_id)
        self.feed.publish()

    def grant(self, plan: AllocationPlan) -> ContainerGrant:
        """Devices, environment and annotations for the container (pure)."""
        addresses: list[str] = []
        groups: list[int] = []
        for module in plan.modules:
            slot = self.gpus[module]
            addresses.append(slot.pci_address)
            if slot.iommu_group not in groups:
                groups.append(slot.iommu_group)
        vfio = self.dev_root / "vfio"
        devices = [DeviceNode("/dev/vfio/vfio", str(vfio / "vfio"))]
        devices += [DeviceNode(f"/dev/vfio/{g}", str(vfio / str(g))) for g in groups]
        ids = ",".join(str(p.partition_id) for p in plan.partitions)
        modules = ",".join(":".join(str(m) for m in p.sorted_modules) for p in plan.partitions)
        envs = {
            pci_resource_env(plan.resource): ",".join(addresses),
            "NVSWITCH_DP_PARTITION_IDS": ids,
            "NVSWITCH_DP_PARTITION_MODULES": modules,
        }
        annotations = {
            f"{ANNOTATION_PREFIX}/partition-ids": ids,
            f"{ANNOTATION_PREFIX}/pci-addresses": ",".join(addresses),
        }
        return ContainerGrant(tuple(devices), envs, annotations)

    # -- operator path ---------------------------------------------------------------

    async def activate(self, partition_id: int) -> None:
        """Activate a partition no pod holds (pre-warming). Raises StateError / FM errors."""
        self.book.begin_activation(partition_id)
        self._activations[partition_id] = trio.Event()
        self.feed.publish()
        try:
            await self._activate_claimed(partition_id)
        finally:
            self.feed.publish()

    async def deactivate(self, partition_id: int, *, force: bool = False) -> None:
        """Deactivate an active partition; refused while a pod holds it unless ``force``."""
        if force and self.book.in_use(partition_id):
            log.warning("forced deactivation of partition %d, held by a pod", partition_id)
            self.metrics.count_operation("force_deactivate", "requested")
        self.book.begin_deactivation(partition_id, force=force)
        self.feed.publish()
        try:
            await self._call_fabric("deactivate", self.fabric.deactivate, partition_id)
        except FabricManagerError as exc:
            if exc.code == FmReturn.UNINITIALIZED:
                self.book.deactivated(partition_id)  # FM already had it inactive
            else:
                self.book.deactivation_failed(partition_id)
                raise
        else:
            self.book.deactivated(partition_id)
        finally:
            self.feed.publish()

    def drain(self, module_id: int) -> None:
        """Take a GPU out of the pool; partitions in use on it keep running until released.

        Raises :class:`StateError` for a GPU in no partition.
        """
        self.book.drain(module_id)
        log.info("GPU module %d drained", module_id)
        self.feed.publish()

    def undrain(self, module_id: int) -> None:
        """Return a drained GPU to the pool."""
        if module_id not in self.book.table.module_ids:
            raise StateError(f"GPU {module_id} is in no partition")
        self.book.undrain(module_id)
        log.info("GPU module %d undrained", module_id)
        self.feed.publish()

    # -- FM --------------------------------------------------------------------------

    async def _activate_claimed(self, partition_id: int) -> None:
        event = self._activations.setdefault(partition_id, trio.Event())
        succeeded = False
        try:
            try:
                await self._call_fabric("activate", self.fabric.activate, partition_id)
            except FmInUse:
                # Idempotent: FM may already have it active (a restart, a lost answer).
                report = await self._call_fabric("list", self.fabric.list_partitions)
                if partition_id not in report.active_ids:
                    raise
            except FabricManagerError as exc:
                if exc.code in (FmReturn.NVLINK_ERROR, FmReturn.GENERIC_ERROR):
                    # FM cannot serve this partition now; keep it out of the pool for a
                    # while rather than let the scheduler hit it again at once.
                    reason = f"activation failed with {exc.code_name}"
                    until = trio.current_time() + ACTIVATION_FAULT_HOLD_S
                    self._activation_faults[partition_id] = (reason, until)
                    self.book.set_partition_fault(partition_id, reason)
                raise
            succeeded = True
        finally:
            if succeeded:
                self.book.activated(partition_id)
            else:
                self.book.activation_failed(partition_id)
            self._activations.pop(partition_id, None)
            event.set()
            self.feed.publish()

    async def _deactivate_quietly(self, partition_id: int) -> None:
        try:
            await self.deactivate(partition_id)
        except (FabricManagerError, StateError) as exc:
            log.error("could not roll back partition %d: %s", partition_id, exc)

    def _undo_claims(self, claimed: Iterable[tuple[int, Claim]]) -> None:
        for pid, claim in claimed:
            if claim is Claim.ACTIVATE:
                self._activations.pop(pid, None)
                self.book.activation_failed(pid)
            else:
                self.book.release(pid)

    async def _call_fabric(
        self, operation: str, call: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        try:
            result = await call(*args)
        except FabricManagerError as exc:
            self.metrics.count_operation(operation, exc.code_name)
            self._note_reachability(exc)
            raise
        self.metrics.count_operation(operation, "SUCCESS")
        self._note_reachability(None)
        return result

    def _note_reachability(self, exc: FabricManagerError | None) -> None:
        """Track whether FM answers at all; FM trouble keeps new partitions out of the pool."""
        code = exc.code if exc is not None else FmReturn.SUCCESS
        if code in (FmReturn.CONNECTION_NOT_VALID, FmReturn.TIMEOUT):
            fault: str | None = f"Fabric Manager unreachable: {exc}"
        elif code == FmReturn.NOT_CONFIGURED:
            fault = "Fabric Manager is starting or restarting (waiting for set-activated)"
        elif exc is not None:
            return  # FM answered: a refusal says nothing about reachability
        else:
            fault = None
        self.fabric_reachable = code not in (FmReturn.CONNECTION_NOT_VALID, FmReturn.TIMEOUT)
        self.fabric_problem = fault
        if self.book.set_fabric_fault(fault):
            self.feed.publish()
            if fault is not None:
                self.wake_supervisor.set()  # trouble began: supervise now, not next period

    def set_gpu_fault(self, module_id: int, reason: str | None) -> None:
        """Record a GPU's hardware/VFIO problem (None when it is fine again)."""
        if self.book.set_module_fault(module_id, reason):
            if reason is None:
                log.info("GPU module %d is healthy again", module_id)
            else:
                log.warning("GPU module %d: %s", module_id, reason)
            self.feed.publish()

    async def supervise_once(self) -> None:
        """One supervision round: list, resume a restarted FM, reconcile, derive faults.

        FM errors are counted, reflected in reachability and the fabric fault, and never
        raised: the next round tries again.
        """
        try:
            report = await self._call_fabric("list", self.fabric.list_partitions)
        except FmNotConfigured:
            if not await self.resume_fabric():
                return
            try:
                report = await self._call_fabric("list", self.fabric.list_partitions)
            except FabricManagerError as exc:
                log.warning("listing partitions after set-activated failed: %s", exc)
                return
        except FabricManagerError as exc:
            log.warning("supervision: %s", exc)
            return
        self.apply_report(report)

    async def resume_fabric(self) -> bool:
        """Tell a restarted FM which partitions are still active: exactly those in use.

        FM refuses everything until it hears this, and exits if it does not within 60 s.
        Returns whether FM accepted it.
        """
        in_use = sorted(self.book.in_use_ids)
        log.warning("Fabric Manager restarted; telling it partitions %s are still in use", in_use)
        try:
            await self._call_fabric("set_activated", self.fabric.set_activated, in_use)
        except FabricManagerError as exc:
            log.error("set-activated failed: %s", exc)
            return False
        return True

    def apply_report(self, report: FmReport) -> None:
        """Take FM's active set and per-GPU link state into the book."""
        corrected = self.book.observe_active(report.active_ids)
        if corrected:
            log.warning(
                "Fabric Manager disagreed on partitions %s; took FM's word", sorted(corrected)
            )
        now = trio.current_time()
        for pid, (_, until) in list(self._activation_faults.items()):
            if now >= until:
                del self._activation_faults[pid]
        reported = {p.partition_id: p for p in report.partitions}
        for partition in self.book.table:
            problems = []
            fm_partition = reported.get(partition.partition_id)
            gpus = {g.physical_id: g for g in fm_partition.gpus} if fm_partition else {}
            for module in partition.sorted_modules:
                gpu = gpus.get(module)
                if gpu is None:
                    problems.append(f"GPU {module} is missing from Fabric Manager's report")
                elif gpu.nvlinks_degraded:
                    problems.append(
                        f"GPU {module} has {gpu.nvlinks_available} of {gpu.max_nvlinks} NVLinks"
                    )
            if partition.partition_id in self._activation_faults:
                problems.append(self._activation_faults[partition.partition_id][0])
            self.book.set_partition_fault(partition.partition_id, "; ".join(problems) or None)
        self.feed.publish()

    def view(self, partition_id: int) -> PartitionView:
        if partition_id not in self.book.table:
            raise UnknownPartition(partition_id)
        return self.book.view(partition_id)
