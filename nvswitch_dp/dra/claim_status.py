"""What a prepared claim got, written into ``ResourceClaim.status.devices`` (KEP-4817).

For every device of this driver allocated to a prepared claim, one entry
``{driver, pool, device, conditions, data}`` (``AllocatedDeviceStatus`` of
``resource.k8s.io/v1``):

- ``conditions``: one ``Ready`` condition (``metav1.Condition``): ``True`` with reason
  ``Prepared`` while the partition is healthy; ``False`` with reason ``GPUFault`` or
  ``PartitionFault`` and the fault's text as the message when a GPU of the partition, or
  the partition itself, develops a fault while prepared; back to ``True`` when it clears.
  ``lastTransitionTime`` moves only when the status does.
- ``data``: the FM partition ID, its module IDs, the GPUs' PCI addresses and IOMMU groups
  (what a VM user needs, and what no other driver reports).

Rules, and why:

- **Never fails or delays Prepare.** The driver only says "this claim changed"
  (:meth:`ClaimStatusWriter.notify`); the writer's own task (:meth:`ClaimStatusWriter.run`)
  does the writes. A failed write is logged and retried at the next change or after
  ``retry_s``.
- **Through the status subresource** (``PUT .../resourceclaims/<name>/status``, RBAC
  ``update`` on ``resourceclaims/status``), read-modify-write: other drivers' entries are
  kept, ours replaced; a 409 re-reads.
- **A server without the field** (``DRAResourceClaimDeviceStatus`` off) drops it
  silently: the write's answer lacks it. That is said once in the log and the writer
  stops writing (nothing it writes would be kept).
- Only what changed is written: the last status written per claim is remembered, so a
  node change that does not touch a prepared claim's health costs nothing.

The entries are built by the pure :func:`device_statuses`; the rest is I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from nvswitch_dp.dra.checkpoint import PreparedClaim
from nvswitch_dp.dra.errors import ClaimNotFound
from nvswitch_dp.dra.kube import SliceConflict
from nvswitch_dp.partitions.layout import GpuSlot
from nvswitch_dp.partitions.view import NodeView
from nvswitch_dp.ports import ClaimStatusStore

log = logging.getLogger(__name__)

READY = "Ready"
RETRY_S = 10.0
CONFLICT_RETRIES = 3


@dataclass(frozen=True, slots=True)
class Health:
    """A prepared partition's health: ``problem`` None is Ready."""

    reason: str
    problem: str | None = None


HEALTHY = Health("Prepared")


def partition_health(view: NodeView, partition_id: int) -> Health:
    """The health of a held partition in ``view`` (pure): a GPU fault first, then the
    partition's own fault."""
    partition = view.table[partition_id]
    for module in partition.sorted_modules:
        fault = view.module_faults.get(module)
        if fault is not None:
            return Health("GPUFault", f"GPU module {module}: {fault}")
    fault = view.partitions[partition_id].fault
    if fault is not None:
        return Health("PartitionFault", fault)
    return HEALTHY


def device_statuses(
    entry: PreparedClaim,
    *,
    driver: str,
    pool: str,
    modules: Sequence[int],
    gpus: Mapping[int, GpuSlot],
    health: Health,
    since: str,
) -> list[dict[str, Any]]:
    """The ``status.devices`` entries of one prepared claim (pure): one per device of
    ``entry``, each with the ``Ready`` condition (transition time ``since``) and the
    partition's data."""
    slots = [gpus[m] for m in modules if m in gpus]
    data = {
        "partitionID": entry.partition_id,
        "modules": list(modules),
        "pciAddresses": [s.pci_address for s in slots],
        "iommuGroups": [s.iommu_group for s in slots],
    }
    condition = {
        "type": READY,
        "status": "True" if health.problem is None else "False",
        "reason": health.reason,
        "message": health.problem or f"FM partition {entry.partition_id} is active",
        "lastTransitionTime": since,
    }
    return [
        {
            "driver": driver,
            "pool": pool,
            "device": device,
            "conditions": [dict(condition)],
            "data": dict(data),
        }
        for _, device in entry.devices
    ]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ClaimStatusWriter:
    """Keeps ``status.devices`` of this node's prepared claims current. See the module
    docstring; start :meth:`run` in the daemon's nursery.

    ``prepared()`` returns the prepared claims now (uid -> entry; the driver's copy),
    ``view()`` the node, ``wait_changed()`` waits for the node to change. Observable:
    ``supported`` (None until a write was answered; False once the server was seen to
    drop the field), ``writes``, ``problem`` (the last failure, None after a success).
    Owns nothing but its memory of what it wrote.
    """

    def __init__(
        self,
        store: ClaimStatusStore,
        *,
        driver: str,
        pool: str,
        gpus: Mapping[int, GpuSlot],
        prepared: Callable[[], Mapping[str, PreparedClaim]],
        view: Callable[[], NodeView],
        wait_changed: Callable[[], Awaitable[None]],
        retry_s: float = RETRY_S,
    ) -> None:
        self._store = store
        self._driver = driver
        self._pool = pool
        self._gpus = gpus
        self._prepared = prepared
        self._view = view
        self._wait_changed = wait_changed
        self._retry_s = retry_s
        self._written: dict[str, tuple[Health, str]] = {}  # uid -> (health, since)
        self._wake = trio.Event()
        self.supported: bool | None = None
        self.writes = 0
        self.problem: str | None = None
        self._progress = trio.Event()

    def notify(self) -> None:
        """A claim was prepared or unprepared: look again soon. Never blocks or raises."""
        self._wake.set()

    async def wait_until(self, condition: Callable[[ClaimStatusWriter], bool]) -> None:
        """Return once ``condition(self)`` holds (checked after every pass)."""
        while not condition(self):
            await self._progress.wait()

    async def sync_once(self) -> None:
        """Write what differs from what was written; errors are logged, never raised
        (except cancellation)."""
        if self.supported is False:
            return
        view = self._view()
        prepared = {uid: e for uid, e in self._prepared().items() if e.cdi_ids}
        for uid in list(self._written):
            if uid not in prepared:
                del self._written[uid]  # unprepared: the claim is going away with its pod
        for uid, entry in prepared.items():
            if entry.partition_id not in view.table:
                continue
            health = partition_health(view, entry.partition_id)
            last = self._written.get(uid)
            if last is not None and last[0] == health:
                continue
            since = _now()
            try:
                written = await self._write(entry, health, since)
            except ClaimNotFound:
                continue  # deleted meanwhile: the orphan check unprepares it
            except Exception as exc:  # a status is a courtesy: never let it cost more
                self.problem = f"writing the status of claim {entry.namespace}/{entry.name}: {exc}"
                log.warning("claim status not written", extra={"error": self.problem})
                continue
            self.problem = None
            if not written:
                self.supported = False
                log.warning(
                    "the API server drops ResourceClaim status.devices "
                    "(DRAResourceClaimDeviceStatus is off): claim status is not written"
                )
                return
            self.supported = True
            self._written[uid] = (health, since)

    async def _write(self, entry: PreparedClaim, health: Health, since: str) -> bool:
        """Read, replace our entries, write through /status; True when the answer kept
        them. Raises the store's errors."""
        modules = self._modules(entry)
        ours = device_statuses(
            entry,
            driver=self._driver,
            pool=self._pool,
            modules=modules,
            gpus=self._gpus,
            health=health,
            since=since,
        )
        for attempt in range(CONFLICT_RETRIES + 1):
            claim = await self._store.get_claim(entry.namespace, entry.name)
            if (claim.get("metadata") or {}).get("uid") != entry.uid:
                raise ClaimNotFound(entry.namespace, entry.name)
            status = dict(claim.get("status") or {})
            others = [
                d
                for d in status.get("devices") or []
                if not (d.get("driver") == self._driver and d.get("pool") == self._pool)
            ]
            status["devices"] = others + ours
            claim["status"] = status
            try:
                answer = await self._store.update_claim_status(claim)
            except SliceConflict:  # 409: someone wrote the claim since our read
                if attempt < CONFLICT_RETRIES:
                    continue
                raise
            self.writes += 1
            kept = (answer.get("status") or {}).get("devices") or []
            return any(d.get("driver") == self._driver for d in kept)
        return True  # unreachable: the last attempt returns or raises

    def _modules(self, entry: PreparedClaim) -> list[int]:
        return sorted(self._view().table[entry.partition_id].module_ids)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write claim status until cancelled.

        Resource handling: holds nothing; a write cut by cancellation is redone by the
        next start (nothing is remembered across restarts, so a restart rewrites each
        prepared claim's status once). Error handling: never raises for API trouble; see
        :meth:`sync_once`.
        """
        task_status.started()
        while True:
            self._wake = trio.Event()
            seen = self._view().generation
            await self.sync_once()
            self._progress.set()
            self._progress = trio.Event()
            if self.supported is False:
                await trio.sleep_forever()
            with trio.move_on_after(self._retry_s if self.problem else float("inf")):
                async with trio.open_nursery() as nursery:

                    async def node_changed(since: int) -> None:
                        # By generation, not by the event alone: a change between the
                        # pass above and this wait must not be lost.
                        while self._view().generation == since:
                            await self._wait_changed()
                        nursery.cancel_scope.cancel()

                    async def notified() -> None:
                        await self._wake.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(node_changed, seen)
                    nursery.start_soon(notified)
