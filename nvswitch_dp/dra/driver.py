"""Prepare and Unprepare: the kubelet's DRA calls, claim by claim, on the node core.

What a Prepare of one claim does, in this order (each step safe to repeat):

1. A claim already prepared (in the checkpoint) is answered from the checkpoint: the
   hold is asserted again and the CDI spec rewritten, the API server is not asked.
2. Otherwise read the ResourceClaim (:class:`~nvswitch_dp.ports.ClaimReader`), check its
   UID against the kubelet's, and take ``status.allocation.devices.results[]`` of this
   driver. A result in another pool (another node) is refused.
3. Map the allocated device names to ONE Fabric Manager partition
   (:func:`resolve_partition`): one ``partition-<id>``, or ``gpu-<m>`` devices whose
   modules are exactly one partition's. Anything else is refused with a message that
   says what to ask for.
4. Checkpoint the claim as *preparing* (uid -> partition) before anything is held, so an
   Unprepare after a crash at any later point still knows what to release.
5. Hold the partition (:class:`~nvswitch_dp.ports.PartitionHolder`, atomic: activated
   in FM or nothing), write the CDI spec, checkpoint the claim as *prepared*.
   A failure at 5 undoes what 5 did and drops the checkpoint entry. With a
   :class:`DeviceMetadata` store, the claim's KEP-5304 device metadata files are
   written in 5 too (before the CDI spec, which mounts them into the container).

Unprepare releases the hold, removes the CDI spec and drops the checkpoint entry; an
unknown claim is a success. A periodic check (:meth:`DraDriver.collect_orphans`)
unprepares checkpointed claims the API server no longer knows (404, or the name now
belongs to a claim with another UID), since no kubelet will ever unprepare those.

Errors: every per-claim failure becomes that claim's error text (the kubelet retries);
nothing here fails a whole kubelet call. Cancellation: steps 4-5 and each Unprepare run
shielded, so a kubelet call deadline cannot stop them half way; their awaits are FM
calls (bounded by the FM backends' timeouts) and small file writes in worker threads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import trio

from nvswitch_dp.config.schema import DEFAULT_DRA_DRIVER
from nvswitch_dp.dra.cdi import CdiMount
from nvswitch_dp.dra.checkpoint import PreparedClaim
from nvswitch_dp.dra.errors import ClaimNotFound, ClaimRefused, ClaimUnreadable
from nvswitch_dp.dra.uid import is_claim_uid, validate_claim_uid
from nvswitch_dp.echo import clipped
from nvswitch_dp.partitions.layout import ContainerGrant
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.ports import (
    CdiSpecs,
    ClaimReader,
    DeviceMetadata,
    PartitionHolder,
    PreparedClaimStore,
)

log = logging.getLogger(__name__)

DEFAULT_DRIVER_NAME = DEFAULT_DRA_DRIVER
ORPHAN_CHECK_PERIOD_S = 60.0

_PARTITION_DEVICE = re.compile(r"partition-(0|[1-9][0-9]*)")
_GPU_DEVICE = re.compile(r"gpu-(0|[1-9][0-9]*)")


# -- values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimRef:
    """A claim as the kubelet names it (the request's ``Claim`` message)."""

    namespace: str
    uid: str
    name: str

    def __str__(self) -> str:
        # Every field is the client's: bounded before it reaches an error or a log line.
        return f"{clipped(self.namespace)}/{clipped(self.name)} ({clipped(self.uid)})"


@dataclass(frozen=True, slots=True)
class PreparedDevice:
    """One allocated device as answered to the kubelet."""

    requests: tuple[str, ...]
    pool: str
    device: str
    cdi_device_ids: tuple[str, ...]


def is_prepared(entry: PreparedClaim) -> bool:
    """Whether a checkpoint entry is complete. An entry without CDI IDs marks a Prepare
    under way (recorded before the partition is held); after a restart the kubelet's
    retried Prepare finishes it, or its Unprepare releases it."""
    return bool(entry.cdi_ids)


@dataclass(frozen=True, slots=True)
class PrepareResult:
    """The answer for one claim: its devices, or the error text (then no devices)."""

    devices: tuple[PreparedDevice, ...] = ()
    error: str = ""


# -- pure decisions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllocatedDevice:
    """One entry of ``status.allocation.devices.results`` for this driver."""

    request: str
    pool: str
    device: str


def allocated_devices(
    claim: Mapping[str, Any], ref: ClaimRef, *, driver: str, pool: str
) -> list[AllocatedDevice]:
    """This driver's results of an allocated ResourceClaim object (pure).

    Checks the UID and that every result of this driver is in ``pool`` (this node).
    Results of other drivers are left to them. Raises :class:`ClaimRefused`.
    """
    metadata = claim.get("metadata") or {}
    uid = metadata.get("uid")
    if uid != ref.uid:
        raise ClaimRefused(
            f"ResourceClaim {ref.namespace}/{ref.name} has UID {uid}, not {ref.uid}: the "
            "claim the kubelet asked for was deleted (and perhaps created again)"
        )
    allocation = (claim.get("status") or {}).get("allocation")
    if not allocation:
        raise ClaimRefused(f"ResourceClaim {ref} is not allocated yet")
    results = (allocation.get("devices") or {}).get("results") or []
    ours: list[AllocatedDevice] = []
    for result in results:
        if not isinstance(result, Mapping) or result.get("driver") != driver:
            continue
        device = AllocatedDevice(
            str(result.get("request", "")),
            str(result.get("pool", "")),
            str(result.get("device", "")),
        )
        if device.pool != pool:
            raise ClaimRefused(
                f"ResourceClaim {ref}: device {device.device} of request {device.request} "
                f"is in pool {device.pool!r}, not this node's pool {pool!r}"
            )
        ours.append(device)
    return ours


def _hint(table: PartitionTable, driver: str, size: int | None = None) -> str:
    sizes = table.sizes
    wanted = size if size in sizes else None
    if wanted is None:
        listed = ", ".join(map(str, sizes))
        return (
            f"partitions on this node have {listed} GPUs; ask for one device of class "
            f"partition-<N>x.{driver}, or N requests of class gpu.{driver} with a "
            f"constraint matchAttribute {driver}/partition<N>x"
        )
    return (
        f"ask for one device of class partition-{wanted}x.{driver}, or {wanted} requests "
        f"of class gpu.{driver} with a constraint matchAttribute {driver}/partition{wanted}x"
    )


def resolve_partition(devices: Sequence[str], table: PartitionTable, *, driver: str) -> int:
    """The one FM partition that allocated device names stand for (pure).

    Accepted: exactly one ``partition-<id>`` of the table, or ``gpu-<module>`` devices
    whose modules are exactly one partition's. Raises :class:`ClaimRefused` otherwise,
    saying which device classes and constraint to ask for.
    """
    partitions: list[int] = []
    modules: list[int] = []
    for name in devices:
        if match := _PARTITION_DEVICE.fullmatch(name):
            partitions.append(int(match.group(1)))
        elif match := _GPU_DEVICE.fullmatch(name):
            modules.append(int(match.group(1)))
        else:
            raise ClaimRefused(
                f"device {name!r} is not one {driver} publishes (partition-<id> or gpu-<module>)"
            )
    if not partitions and not modules:
        raise ClaimRefused(f"no device of {driver} is allocated; {_hint(table, driver)}")
    if partitions and modules:
        whole = ", ".join(f"partition-{p}" for p in partitions)
        gpus = ", ".join(f"gpu-{m}" for m in modules)
        raise ClaimRefused(
            f"the claim mixes partition devices ({whole}) with GPU devices ({gpus}); a "
            f"claim gets one partition: {_hint(table, driver)}"
        )
    if partitions:
        if len(partitions) > 1:
            names = ", ".join(f"partition-{p}" for p in partitions)
            raise ClaimRefused(
                f"the claim was allocated {len(partitions)} partitions ({names}); a claim gets "
                "one partition (count: 1), use one claim per partition"
            )
        pid = partitions[0]
        if pid not in table:
            raise ClaimRefused(
                f"partition-{pid} is not in this node's Fabric Manager table; "
                f"{_hint(table, driver)}"
            )
        return pid
    if len(set(modules)) != len(modules):
        raise ClaimRefused(f"the claim names a GPU twice ({sorted(modules)})")
    wanted = frozenset(modules)
    for partition in table:
        if partition.module_ids == wanted:
            return partition.partition_id
    listed = ",".join(map(str, sorted(wanted)))
    unknown = sorted(wanted - table.module_ids)
    if unknown:
        detail = f"GPUs {unknown} are in no Fabric Manager partition of this node"
    else:
        detail = f"GPUs {listed} are not one Fabric Manager partition"
    raise ClaimRefused(f"{detail}; {_hint(table, driver, len(wanted))}")


# -- the driver ----------------------------------------------------------------------


class DraDriver:
    """Prepares and unprepares claims on this node. See the module docstring.

    Ownership: the driver owns the checkpoint's contents (a copy lives in memory) and the
    CDI specs it writes; it borrows the holder, the claim reader, the CDI directory and the
    checkpoint store. Everything runs on the Trio thread; operations on one claim UID are
    serialised, different claims proceed concurrently.

    Call :meth:`start` once before serving the kubelet.
    """

    def __init__(
        self,
        *,
        driver_name: str,
        node_name: str,
        table: PartitionTable,
        holder: PartitionHolder,
        claims: ClaimReader,
        cdi: CdiSpecs,
        checkpoint: PreparedClaimStore,
        metadata: DeviceMetadata | None = None,
    ) -> None:
        self.driver_name = driver_name
        self.metadata = metadata
        self.node_name = node_name
        self.table = table
        self.holder = holder
        self.claims = claims
        self.cdi = cdi
        self.checkpoint = checkpoint
        self._prepared: dict[str, PreparedClaim] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._checkpoint_lock = trio.Lock()
        self._started = False
        # Called (synchronously, must not raise) whenever a claim is prepared or dropped:
        # the claim-status writer's notify. Keeps status writes off Prepare's path.
        self.on_change: Callable[[], None] = lambda: None

    @property
    def pool(self) -> str:
        """This node's pool name (the node name)."""
        return self.node_name

    @property
    def prepared(self) -> Mapping[str, PreparedClaim]:
        """Checkpointed claims (uid -> entry), a copy."""
        return dict(self._prepared)

    async def start(self, loaded: Mapping[str, PreparedClaim] | None = None) -> None:
        """Give the checkpoint's holdings to the holder (never deactivated): ``loaded``,
        the checkpoint as the caller already read it, or read now when None.

        Raises whatever the checkpoint store raises for a corrupt checkpoint: the daemon
        must not start beside prepared claims it cannot read.
        """
        if loaded is None:
            loaded = await trio.to_thread.run_sync(self.checkpoint.load)
        self._prepared = dict(loaded)
        self.holder.restore_claims({uid: c.partition_id for uid, c in self._prepared.items()})
        self._started = True
        if self._prepared:
            log.info("restored %d checkpointed claims", len(self._prepared))

    # -- the kubelet's calls

    async def prepare(self, claims: Sequence[ClaimRef]) -> dict[str, PrepareResult]:
        """NodePrepareResources: claim uid -> devices or error, one entry per claim."""
        self._check_started()
        results: dict[str, PrepareResult] = {}

        async def one(ref: ClaimRef) -> None:
            results[ref.uid] = await self.prepare_claim(ref)

        async with trio.open_nursery() as nursery:
            for ref in _unique(claims):
                nursery.start_soon(one, ref)
        return results

    async def unprepare(self, claims: Sequence[ClaimRef]) -> dict[str, str]:
        """NodeUnprepareResources: claim uid -> error text ("" when done), one per claim."""
        self._check_started()
        results: dict[str, str] = {}

        async def one(ref: ClaimRef) -> None:
            results[ref.uid] = await self.unprepare_claim(ref.uid)

        async with trio.open_nursery() as nursery:
            for ref in _unique(claims):
                nursery.start_soon(one, ref)
        return results

    async def prepare_claim(self, ref: ClaimRef) -> PrepareResult:
        """Prepare one claim; never raises for the claim's own problems."""
        async with self._lock(ref.uid):
            try:
                devices = await self._prepare(ref)
            except (ClaimRefused, ClaimNotFound, ClaimUnreadable) as exc:
                log.warning("prepare %s refused: %s", ref, exc)
                return PrepareResult(error=str(exc))
            except (OSError, ValueError) as exc:  # CDI spec, checkpoint, a malformed UID
                log.error("prepare %s failed: %s", ref, exc)
                return PrepareResult(error=f"preparing claim {ref} failed on the node: {exc}")
            except Exception as exc:  # a bug must cost this claim only, not the whole call
                log.exception("prepare %s failed unexpectedly", ref)
                return PrepareResult(error=f"preparing claim {ref} failed: internal error {exc!r}")
        return PrepareResult(devices=devices)

    async def unprepare_claim(self, claim_uid: str) -> str:
        """Unprepare one claim; "" when done (or never prepared), else the error text."""
        async with self._lock(claim_uid):
            with trio.CancelScope(shield=True):
                try:
                    await self._unprepare(claim_uid)
                except (OSError, ValueError) as exc:
                    log.error("unprepare %s failed: %s", clipped(claim_uid), exc)
                    return f"unpreparing claim {clipped(claim_uid)} failed on the node: {exc}"
                except Exception as exc:  # as in prepare_claim: one claim, not the call
                    log.exception("unprepare %s failed unexpectedly", clipped(claim_uid))
                    return f"unpreparing claim {clipped(claim_uid)} failed: internal error {exc!r}"
        return ""

    # -- restart cleanup

    async def collect_orphans(self) -> list[str]:
        """Unprepare checkpointed claims the API server no longer knows; return their UIDs.

        A claim is an orphan when reading it answers 404, or its name now belongs to a
        claim with another UID. A read that fails otherwise (API server down) keeps the
        claim: nothing prepared is touched on a guess.
        """
        orphans: list[str] = []
        for uid, entry in list(self._prepared.items()):
            try:
                claim = await self.claims.get_claim(entry.namespace, entry.name)
            except ClaimNotFound:
                pass
            except ClaimUnreadable as exc:
                log.info("cannot check claim %s/%s now: %s", entry.namespace, entry.name, exc)
                continue
            else:
                if (claim.get("metadata") or {}).get("uid") == uid:
                    continue
            log.warning(
                "claim %s/%s (%s) is gone from the API server; unpreparing it",
                entry.namespace,
                entry.name,
                uid,
            )
            if not await self.unprepare_claim(uid):
                orphans.append(uid)
        return orphans

    async def watch_orphans(
        self,
        period: float = ORPHAN_CHECK_PERIOD_S,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run :meth:`collect_orphans` now and every ``period`` seconds until cancelled.

        Resource handling: owns nothing but its timer. Error handling: the check itself
        does not raise for API-server trouble (see :meth:`collect_orphans`).
        """
        task_status.started()
        while True:
            await self.collect_orphans()
            await trio.sleep(period)

    # -- internals

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("DraDriver.start() must run before the kubelet is served")

    def _lock(self, uid: str) -> _UidLock:
        return _UidLock(self._locks, uid)

    async def _prepare(self, ref: ClaimRef) -> tuple[PreparedDevice, ...]:
        validate_claim_uid(ref.uid)  # before it names a file, not after FM activated
        entry = self._prepared.get(ref.uid)
        if entry is not None and is_prepared(entry):
            # Idempotent retry: the kubelet asks again (a lost answer, its own restart).
            with trio.CancelScope(shield=True):
                grant = await self.holder.hold_for_claim(ref.uid, entry.partition_id)
                mounts: Sequence[CdiMount] = ()
                if self.metadata is not None:
                    mounts = await trio.to_thread.run_sync(self.metadata.mounts, ref.uid)
                await self._write_spec(ref.uid, grant, mounts)
            return self._answer(entry)
        claim = await self.claims.get_claim(ref.namespace, ref.name)
        devices = allocated_devices(claim, ref, driver=self.driver_name, pool=self.pool)
        if not devices:
            return ()  # nothing of ours in this claim
        pid = resolve_partition([d.device for d in devices], self.table, driver=self.driver_name)
        if entry is not None and entry.partition_id != pid:
            raise ClaimRefused(
                f"claim {ref} is being prepared with partition {entry.partition_id}, but the "
                f"API server now allocates partition {pid}; unprepare it first"
            )
        with trio.CancelScope(shield=True):
            answered = await self._hold_and_record(ref, pid, devices, claim)
        return answered

    async def _write_spec(
        self, claim_uid: str, grant: ContainerGrant, mounts: Sequence[CdiMount]
    ) -> str:
        if not mounts:  # the call CdiSpecs implementations without mounts know
            cdi_id: str = await trio.to_thread.run_sync(self.cdi.write, claim_uid, grant)
            return cdi_id
        write = partial(self.cdi.write, claim_uid, grant, mounts=mounts)
        cdi_id = await trio.to_thread.run_sync(write)
        return cdi_id

    async def _hold_and_record(
        self,
        ref: ClaimRef,
        pid: int,
        devices: Sequence[AllocatedDevice],
        claim: Mapping[str, Any] | None = None,
    ) -> tuple[PreparedDevice, ...]:
        preparing = PreparedClaim(
            uid=ref.uid,
            namespace=ref.namespace,
            name=ref.name,
            partition_id=pid,
            devices=tuple(((d.request,), d.device) for d in devices),
            cdi_ids=(),
        )
        await self._record(ref.uid, preparing)
        try:
            grant = await self.holder.hold_for_claim(ref.uid, pid)
        except BaseException:
            await self._forget_quietly(ref.uid)
            raise
        try:
            mounts: Sequence[CdiMount] = ()
            if self.metadata is not None and claim is not None:
                pairs = [(d.request, d.device) for d in devices]
                mounts = await trio.to_thread.run_sync(self.metadata.write, claim, pairs)
            cdi_id = await self._write_spec(ref.uid, grant, mounts)
            prepared = replace(preparing, cdi_ids=(cdi_id,))
            await self._record(ref.uid, prepared)
        except BaseException:
            await self.holder.release_claim(ref.uid)
            try:
                await trio.to_thread.run_sync(self.cdi.remove, ref.uid)
                if self.metadata is not None:
                    await trio.to_thread.run_sync(self.metadata.remove, ref.uid)
            except OSError as exc:
                log.error("claim %s: could not remove its CDI spec: %s", ref, exc)
            await self._forget_quietly(ref.uid)
            raise
        log.info("prepared claim %s: partition %d", ref, pid)
        return self._answer(prepared)

    def _answer(self, entry: PreparedClaim) -> tuple[PreparedDevice, ...]:
        # Every device carries the claim's one CDI device: the partition is all or
        # nothing, so a container given any of its requests gets all of its GPUs.
        return tuple(
            PreparedDevice(requests, self.pool, device, entry.cdi_ids)
            for requests, device in entry.devices
        )

    async def _unprepare(self, claim_uid: str) -> None:
        if not is_claim_uid(claim_uid):
            return  # Prepare refuses such a UID, so nothing was ever prepared under it
        entry = self._prepared.get(claim_uid)
        # Always ask the holder: after a crash it may hold what the checkpoint lost.
        await self.holder.release_claim(claim_uid)
        await trio.to_thread.run_sync(self.cdi.remove, claim_uid)
        if self.metadata is not None:
            await trio.to_thread.run_sync(self.metadata.remove, claim_uid)
        if entry is not None:
            await self._record(claim_uid, None)
            log.info("unprepared claim %s: partition %d", claim_uid, entry.partition_id)

    async def _record(self, claim_uid: str, entry: PreparedClaim | None) -> None:
        """Set (or, with None, drop) one claim's entry: write the checkpoint, then adopt
        it in memory, so a failed write changes nothing. Writes are serialised and each
        starts from the latest contents: claims prepared concurrently never lose one
        another's entries."""
        async with self._checkpoint_lock:
            claims = dict(self._prepared)
            if entry is None:
                claims.pop(claim_uid, None)
            else:
                claims[claim_uid] = entry
            await trio.to_thread.run_sync(self.checkpoint.save, claims)
            self._prepared = claims
        self.on_change()

    async def _forget_quietly(self, claim_uid: str) -> None:
        if claim_uid not in self._prepared:
            return
        try:
            await self._record(claim_uid, None)
        except OSError as exc:
            # The entry stays; Unprepare or the orphan check removes it later.
            log.error("claim %s: could not drop it from the checkpoint: %s", claim_uid, exc)


class _UidLock:
    """One lock per claim UID, dropped from the table when nobody holds or awaits it."""

    def __init__(self, table: dict[str, trio.Lock], uid: str) -> None:
        self._table = table
        self._uid = uid

    async def __aenter__(self) -> None:
        lock = self._table.setdefault(self._uid, trio.Lock())
        await lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        lock = self._table[self._uid]
        lock.release()
        if not lock.locked() and lock.statistics().tasks_waiting == 0:
            del self._table[self._uid]


def _unique(claims: Sequence[ClaimRef]) -> list[ClaimRef]:
    """The request's claims, one per UID (a repeated UID is answered once)."""
    seen: dict[str, ClaimRef] = {}
    for ref in claims:
        seen.setdefault(ref.uid, ref)
    return list(seen.values())
