"""The partition controller: runs the node state machine's effects, and nothing else decides.

Ownership: the controller owns the :class:`~nvswitch_dp.partitions.node.NodeMachine`
(every rule lives there), talks to Fabric Manager through a
:class:`~nvswitch_dp.ports.FabricManagerClient`, and wakes the edges when the machine's
generation moves. The kubelet path (Allocate), the DRA path (claims), the REST path
(operator commands) and the watchers (FM supervision, PodResources, VFIO health) all turn
into machine events here, so none of them can disagree. Edges read
:meth:`PartitionController.view`, an immutable picture, and :attr:`layout`, the node's
fixed facts.

FM calls: the machine asks for them; :meth:`run_effects` (a daemon task) runs each in its
own task under a deadline, and feeds the outcome back: succeeded, failed, or *unknown*
when the call was cancelled, timed out or its process died. The feedback is synchronous
and sits in a ``finally``, so it happens even while the task is being cancelled; the
machine settles unknown outcomes by asking FM. A caller that stops waiting (a cancelled
Allocate) never interrupts an FM call: the call belongs to the runner.

Concurrency: one thread (Trio, with trio-asyncio's asyncio loop on top). Events are
synchronous, so two requests can never both win a GPU.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import trio

from nvswitch_dp.echo import clipped
from nvswitch_dp.fabric.types import FabricManagerError, FmReturn, error_for, fm_return_name
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.effects import (
    Activate,
    Deactivate,
    Effect,
    Failed,
    ListFabric,
    Outcome,
    SetActivated,
    Succeeded,
    Unknown,
)
from nvswitch_dp.partitions.layout import (
    Allocation,
    ContainerGrant,
    GpuSlot,
    NodeLayout,
    container_grant,
)
from nvswitch_dp.partitions.node import NodeMachine
from nvswitch_dp.partitions.refusal import AllocationError, Refusal
from nvswitch_dp.partitions.requests import DuplicatePartition
from nvswitch_dp.partitions.state import PartitionView, StateError, UnknownPartition
from nvswitch_dp.partitions.units import PARTITION_UNIT, AllocationUnit, Selection, UnitError
from nvswitch_dp.partitions.view import Mode, NodeView, RequestResult, RequestStatus
from nvswitch_dp.ports import FabricManagerClient

log = logging.getLogger(__name__)

# Backstop for one FM call when the backend's own timeout fails to fire.
DEFAULT_CALL_DEADLINE_S = 60.0
# The most device IDs one Allocate may name, all containers together. The largest node
# has 16 GPUs: with allocation_unit gpu a resource has at most a few dozen devices.
MAX_DEVICE_IDS_PER_REQUEST = 256


class ChangeFeed:
    """Wakes ListAndWatch streams (asyncio side) when the machine's generation moves.

    Only the controller calls :meth:`notify`, after every event; that only sets asyncio
    events, which is safe because both loops share one thread. :meth:`close` ends every
    stream.
    """

    def __init__(self, generation: Callable[[], int]) -> None:
        self._generation = generation
        self.closed = False
        self._waiters: set[asyncio.Event] = set()

    @property
    def generation(self) -> int:
        return self._generation()

    def notify(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    def close(self) -> None:
        self.closed = True
        self.notify()

    async def wait_beyond(self, generation: int) -> int:
        """Wait (asyncio) until the generation is newer than ``generation``."""
        while self.generation == generation and not self.closed:
            waiter = asyncio.Event()
            self._waiters.add(waiter)
            try:
                await waiter.wait()
            finally:
                self._waiters.discard(waiter)
        return self.generation


class PartitionController:
    """See the module docstring. Errors: :class:`AllocationError` on the kubelet path,
    :class:`StateError` and :class:`FabricManagerError` on the operator path."""

    def __init__(
        self,
        machine: NodeMachine,
        fabric: FabricManagerClient,
        gpus: Mapping[int, GpuSlot],
        *,
        resource_prefix: str,
        dev_root: Path,
        metrics: Metrics,
        unit: AllocationUnit = PARTITION_UNIT,
        call_deadline: float = DEFAULT_CALL_DEADLINE_S,
        gpu_model: str | None = None,
    ) -> None:
        self.machine = machine
        self.fabric = fabric
        self.dev_root = dev_root
        self.call_deadline = call_deadline
        self.metrics = metrics
        table = machine.table
        self.layout = NodeLayout(
            gpus=MappingProxyType(dict(gpus)),
            resources=MappingProxyType(
                {f"{resource_prefix}-{size}x": size for size in table.sizes}
            ),
            resource_prefix=resource_prefix,
            fabric_name=fabric.name,
            unit=unit,
            gpu_model=gpu_model,
        )
        self.feed = ChangeFeed(lambda: self.machine.generation)
        self._changed = trio.Event()
        self._outcome = trio.Event()  # set after every FM outcome (settle)
        self._effects_ready = trio.Event()
        self._supervise_wakeup = trio.Event()
        self._seen_generation = machine.generation
        self._overlap_said: str | None = None
        metrics.count_devices_with(lambda partition: len(unit.device_ids(partition)))
        metrics.observe_partitions(self._views_with_resource)
        metrics.observe_fabric(lambda: self.view().fabric_reachable)
        if machine.mode is Mode.DEVICE_PLUGIN:  # DRA mode registers no resources
            for resource in self.layout.resources:
                machine.set_registered(resource, False)  # readiness waits for every one
                metrics.resource_registered.labels(resource=resource).set(0)

    # -- reading -------------------------------------------------------------------

    def view(self) -> NodeView:
        """The node now, immutable (cached per generation by the machine)."""
        return self.machine.snapshot()

    def partition_view(self, partition_id: int) -> PartitionView:
        """Raises :class:`UnknownPartition`."""
        return self.view().view(partition_id)

    def _views_with_resource(self) -> list[tuple[PartitionView, str]]:
        view = self.view()
        return [(v, self.layout.resource_of(v.partition)) for v in view.partitions.values()]

    # -- events --------------------------------------------------------------------

    def _after_event(self) -> None:
        """Start the effects the machine asked for and wake whoever follows it."""
        if self.machine.has_effects:
            self._effects_ready.set()
        if self.machine.supervision_wanted:
            self._supervise_wakeup.set()
        if self.machine.generation != self._seen_generation:
            self._seen_generation = self.machine.generation
            self._say_fabric_overlap()
            self.feed.notify()
            self._changed.set()
            self._changed = trio.Event()

    def _say_fabric_overlap(self) -> None:
        """Log FM's overlapping active partitions once per change, and count it (N11)."""
        overlap = self.machine.snapshot().fabric_overlap
        if overlap == self._overlap_said:
            return
        self._overlap_said = overlap
        if overlap is not None:
            self.metrics.fabric_overlap_reports.inc()
            log.error(
                "%s: FM forbids this, so its state is damaged; nothing is deactivated for "
                "it (either may be a VM's) and /readyz says so until FM reports it gone. "
                "Deactivate the one no VM uses (fmpm -d ID) or restart Fabric Manager",
                overlap,
            )
        else:
            log.warning("Fabric Manager no longer reports overlapping partitions active")

    async def wait_changed(self) -> None:
        """Wait (Trio) until the machine's generation moves."""
        await self._changed.wait()

    # -- kubelet path --------------------------------------------------------------

    def allocate(self, resource: str, containers: Sequence[Sequence[str]]) -> Allocation:
        """One kubelet Allocate: every container's devices taken at once, or none.

        Raises :class:`AllocationError` naming the device and, when another partition
        blocks it, that partition and its state. The caller awaits
        :meth:`wait_allocation` when the result is pending, and calls :meth:`forget`.
        """
        size = self.layout.resources.get(resource)
        if size is None:
            raise AllocationError(f"resource {resource} is not served here", kind=Refusal.UNKNOWN)
        if not containers or not any(containers):
            raise AllocationError("the request names no device", kind=Refusal.UNKNOWN)
        table = self.machine.table
        # Bounded before any per-device work: a 4 MB message holds 300,000 IDs, and every
        # check below must stay linear in what remains.
        named = sum(len(devices) for devices in containers)
        if named > MAX_DEVICE_IDS_PER_REQUEST:
            raise AllocationError(
                f"the request names {named} device IDs; at most "
                f"{MAX_DEVICE_IDS_PER_REQUEST} are accepted (a node has at most a few dozen "
                "devices per resource): send each device once",
                kind=Refusal.INVALID,
            )
        selections: list[Selection] = []
        for devices in containers:
            seen: set[str] = set()
            for device in devices:
                if device in seen:
                    raise AllocationError(
                        f"device {clipped(device)} is named twice in one request; the "
                        "kubelet never does this: send each device once",
                        kind=Refusal.INVALID,
                    )
                seen.add(device)
            try:
                selections.append(self.layout.unit.select(table, size, resource, devices))
            except UnitError as exc:
                raise AllocationError(str(exc), kind=exc.kind) from None
        wanted = [pid for s in selections for pid in s.partition_ids]
        try:
            rid = self.machine.allocate(wanted, trio.current_time())
        except DuplicatePartition as exc:
            raise AllocationError(
                f"{table[exc.partition_id].device_id} is requested by two containers of one "
                "request; a device goes to one container",
                kind=Refusal.INVALID,
            ) from None
        except StateError as exc:
            raise AllocationError(
                f"cannot allocate: {exc}; the scheduler will retry once the node reports the change"
            ) from None
        finally:
            self._after_event()
        return Allocation(rid, resource, tuple(selections), self.machine.result(rid))

    async def wait_allocation(self, allocation: Allocation) -> Allocation:
        """Wait until the allocation's FM work ends. Raises :class:`AllocationError`
        (kind ``fabric``) when it failed; the machine has already undone it."""
        result = await self._wait(allocation.request_id)
        if result.status is RequestStatus.FAILED:
            raise AllocationError(result.error or "allocation failed", kind=Refusal.FABRIC)
        return Allocation(allocation.request_id, allocation.resource, allocation.containers, result)

    def forget(self, request_id: int) -> None:
        """The caller is done with a request (answered, failed or cancelled)."""
        self.machine.forget(request_id)

    def grants(self, allocation: Allocation) -> list[ContainerGrant]:
        table = self.machine.table
        return [
            container_grant(
                self.layout,
                self.dev_root,
                allocation.resource,
                [table[pid] for pid in selection.partition_ids],
                selection.module_order,
            )
            for selection in allocation.containers
        ]

    async def _wait(self, request_id: int) -> RequestResult:
        while (result := self.machine.result(request_id)).status is RequestStatus.PENDING:
            await self._changed.wait()
        return result

    # -- DRA path ------------------------------------------------------------------

    async def hold_for_claim(self, claim_uid: str, partition_id: int) -> ContainerGrant:
        """Hold and activate ``partition_id`` for DRA claim ``claim_uid`` (idempotent).

        Raises :class:`AllocationError` (the machine has undone a failed activation).
        """
        try:
            result = await self._request(
                lambda now: self.machine.claim(claim_uid, partition_id, now)
            )
        except StateError as exc:
            raise AllocationError(str(exc)) from None
        if result.status is RequestStatus.FAILED:
            raise AllocationError(result.error or "activation failed", kind=Refusal.FABRIC)
        partition = self.machine.table[partition_id]
        resource = self.layout.resource_of(partition)
        return container_grant(self.layout, self.dev_root, resource, [partition])

    def release_claim(self, claim_uid: str) -> None:
        """Unprepare: drop the claim; its partition is deactivated by the runner."""
        self.machine.release_claim(claim_uid, trio.current_time())
        self._after_event()

    # -- operator path -------------------------------------------------------------

    async def activate(self, partition_id: int) -> None:
        """Pre-warm a partition. Raises StateError (refused) or FabricManagerError."""
        await self._operator(
            "activate", lambda now: self.machine.operator_activate(partition_id, now)
        )

    async def deactivate(self, partition_id: int, *, force: bool = False) -> None:
        """Deactivate; refused while held unless ``force``. Raises as :meth:`activate`."""
        if force and self.view().view(partition_id).in_use:
            # Counted here, logged (with who asked) by the operator's edge.
            self.metrics.count_operation("force_deactivate", "requested")
        await self._operator(
            "deactivate",
            lambda now: self.machine.operator_deactivate(partition_id, now, force=force),
        )

    async def _request(self, start: Callable[[float], int]) -> RequestResult:
        """Start a machine request (``start`` raises StateError to refuse it), wait for
        its end and forget it; a cancelled wait forgets it too (the machine still rolls
        back a failure of what it took)."""
        try:
            rid = start(trio.current_time())
        finally:
            self._after_event()
        try:
            return await self._wait(rid)
        finally:
            self.machine.forget(rid)

    async def _operator(self, operation: str, start: Callable[[float], int]) -> None:
        result = await self._request(start)
        if result.status is RequestStatus.FAILED:
            code = result.code if result.code is not None else FmReturn.TIMEOUT
            raise error_for(code, operation, result.error or "")

    def drain(self, module_id: int) -> None:
        """Take a GPU out of the pool. Raises :class:`StateError` for an unknown GPU."""
        try:
            self.machine.drain(module_id)
        finally:
            self._after_event()
        log.info("GPU module %d drained", module_id)

    def undrain(self, module_id: int) -> None:
        try:
            self.machine.undrain(module_id)
        finally:
            self._after_event()
        log.info("GPU module %d undrained", module_id)

    # -- watchers ------------------------------------------------------------------

    def set_gpu_fault(self, module_id: int, reason: str | None) -> None:
        """Record a GPU's hardware/VFIO problem (None when it is fine again)."""
        if self.machine.gpu_fault(module_id, reason):
            if reason is None:
                log.info("GPU module %d is healthy again", module_id)
            else:
                log.warning("GPU module %d: %s", module_id, reason)
        self._after_event()

    def set_registered(self, resource: str, registered: bool) -> None:
        self.machine.set_registered(resource, registered)
        self.metrics.resource_registered.labels(resource=resource).set(int(registered))
        self._after_event()

    def pod_resources(self, assigned: set[int] | None) -> None:
        """One PodResources reading (None: unreadable)."""
        self.machine.pod_resources(assigned, trio.current_time())
        self._after_event()

    def supervise(self) -> None:
        self.machine.supervise(trio.current_time())
        self._after_event()

    def tick(self) -> None:
        self.machine.tick(trio.current_time())
        self._after_event()

    async def wait_supervision(self, interval: float) -> None:
        """Sleep until the next supervision is due: ``interval`` after the last one, or
        sooner when the machine's own delay shrinks meanwhile (trouble began: every
        second) or it asks for supervision at once."""
        start = trio.current_time()
        while (due := start + self.machine.supervision_delay(interval)) > trio.current_time():
            with trio.move_on_at(due):
                async with trio.open_nursery() as nursery:

                    async def woken(event: trio.Event) -> None:
                        await event.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(woken, self._supervise_wakeup)
                    nursery.start_soon(woken, self._changed)
        self._supervise_wakeup = trio.Event()

    # -- running FM calls ----------------------------------------------------------

    async def run_effects(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every FM call the machine asks for, each in its own task, until cancelled.

        Resource handling: owns the FM calls; cancelling this task cancels them (their
        outcome is fed back as unknown, and a backend kills its subprocess). Error
        handling: FM errors become ``Failed`` outcomes, anything else ``Unknown``; none
        escapes.
        """
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                for effect in self.machine.take_effects():
                    nursery.start_soon(self._run_effect, effect)
                await self._effects_ready.wait()
                self._effects_ready = trio.Event()

    async def _run_effect(self, effect: Effect) -> None:
        operation = _OPERATION[type(effect)]
        outcome: Outcome = Unknown("cancelled before Fabric Manager answered")
        try:
            with trio.move_on_after(self.call_deadline) as scope:
                outcome = await self._call(effect)
            if scope.cancelled_caught:
                outcome = Unknown(f"no answer within {self.call_deadline:g}s")
        except FabricManagerError as exc:
            outcome = Failed(exc.code, str(exc))
        except Exception as exc:  # a backend bug: FM may have done it or not
            log.exception("Fabric Manager %s failed unexpectedly", operation)
            outcome = Unknown(f"{type(exc).__name__}: {exc}")
        finally:
            # Synchronous, so it happens even while this task is being cancelled.
            self.metrics.count_operation(operation, _result_label(outcome))
            if isinstance(effect, ListFabric) and not isinstance(outcome, Succeeded):
                self.metrics.fabric_list_failures.inc()
            if isinstance(outcome, Failed):
                log.warning("Fabric Manager %s: %s", operation, outcome.message)
            elif isinstance(outcome, Unknown):
                log.warning("Fabric Manager %s: outcome unknown (%s)", operation, outcome.reason)
            self.machine.fm_outcome(effect.op, outcome, trio.current_time())
            self._after_event()
            self._outcome.set()
            self._outcome = trio.Event()

    async def _call(self, effect: Effect) -> Outcome:
        if isinstance(effect, Activate):
            await self.fabric.activate(effect.partition_id)
        elif isinstance(effect, Deactivate):
            await self.fabric.deactivate(effect.partition_id)
        elif isinstance(effect, SetActivated):
            log.warning(
                "Fabric Manager restarted; telling it partitions %s are still in use",
                list(effect.partition_ids),
            )
            await self.fabric.set_activated(effect.partition_ids)
        else:
            return Succeeded(await self.fabric.list_partitions())
        return Succeeded()

    async def settle(self) -> None:
        """Wait until no FM call is in flight (tests and benchmarks)."""
        while self.machine.in_flight():
            await self._outcome.wait()


_OPERATION: dict[type, str] = {
    Activate: "activate",
    Deactivate: "deactivate",
    SetActivated: "set_activated",
    ListFabric: "list",
}


def _result_label(outcome: Outcome) -> str:
    if isinstance(outcome, Succeeded):
        return "SUCCESS"
    if isinstance(outcome, Failed):
        return fm_return_name(outcome.code)
    return "UNKNOWN"


__all__ = [
    "Allocation",
    "AllocationError",
    "ChangeFeed",
    "PartitionController",
    "UnknownPartition",
]
