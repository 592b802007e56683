"""Keep the node's ResourceSlices in the API server equal to what the node offers.

The publisher is the only writer of its node's slices (of its driver). Each round it reads
them back, compares them with :func:`~nvswitch_dp.dra.slices.build_pool` of the node's
current :class:`~nvswitch_dp.dra.slices.PoolInputs`, and writes only when they differ:

- **generation**: unchanged content keeps the generation found in the API server (a
  restart bumps nothing); changed content, or slices of mixed generations left by an
  interrupted round, get ``max(found, last published) + 1`` on every slice of the pool.
- **order**: create or update every wanted slice first, then delete the stale ones (any
  other slice of this node and driver). Until the last wanted slice is written the pool
  at the new generation is incomplete (fewer slices than ``resourceSliceCount``), which
  the scheduler waits out; it never sees old and new devices mixed.
- **409** (another writer, or a list that was already stale): read again and redo the
  round, up to ``conflict_retries`` times before backing off.
- **API server down** (no answer, 5xx, 429) or a refusal (4xx): ``problem`` says why
  (for ``/readyz``), and the round is retried after a backoff that doubles from
  ``backoff_first_s`` up to ``backoff_cap_s``, from fresh inputs. Nothing else is touched:
  prepared claims and the partitions they hold are none of the publisher's business.
- **bursts**: a change (a claim prepared changes the order the devices are listed in)
  is published at once, but a round that wrote is followed by at least
  ``min_interval_s`` before the next one, and the next one reads the inputs as they
  are then: a burst of changes costs one write per ``min_interval_s``, not one per
  change (measured: ``tests/test_dra_placement_e2e.py`` reports the writes of a burst of
  50 Prepares). A round whose inputs equal what the API server holds writes nothing.
- **taints**: devices with a problem are published tainted (``NoSchedule``, the key and
  value saying why) where the API server keeps device taints, and left out where it does
  not (:mod:`nvswitch_dp.dra.slices`). Which it is, is asked before the first write: a
  dry-run create of a probe slice with one tainted device (:meth:`SliceStore.
  supports_device_taints`; nothing is stored). Every write is read back too: a server
  that drops the taints of a slice we sent (``DRADeviceTaints`` turned off, a downgrade)
  switches the publisher to leaving devices out, and the round is redone at once, so no
  sick device stays published untainted longer than one write. Said once in the log. A
  server without taints is asked again at every resync (it may have been upgraded).
- **resync**: with no node change a round still runs every ``resync_s`` (a read, and a
  write only if someone changed or removed our slices).

Slices are left in place on shutdown: a restarted daemon finds them equal and writes
nothing, and the scheduler keeps seeing the node's devices meanwhile.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from nvswitch_dp.dra.kube import KubeError, SliceConflict
from nvswitch_dp.dra.slices import (
    API_VERSION,
    KIND,
    PoolInputs,
    build_pool,
    comparable_spec,
    slice_name,
    taints_dropped,
    without_generation,
)
from nvswitch_dp.ports import SliceStore

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0  # an outage of the API server is retried at least this often
RESYNC_S = 60.0
MIN_INTERVAL_S = 0.5  # between two rounds that write: bounds the writes of a burst
CONFLICT_RETRIES = 5


def _generation(obj: Mapping[str, Any]) -> int:
    return int(obj["spec"]["pool"]["generation"])


TAINT_PROBE_SUFFIX = "taint-probe"


def taint_probe(node_name: str, driver: str) -> dict[str, Any]:
    """The slice the taint probe dry-runs: this node's, this driver's, one tainted device."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": slice_name(node_name, driver, TAINT_PROBE_SUFFIX)},
        "spec": {
            "driver": driver,
            "pool": {"name": node_name, "generation": 0, "resourceSliceCount": 1},
            "nodeName": node_name,
            "devices": [
                {
                    "name": "probe",
                    "taints": [
                        {"key": f"{driver}/probe", "value": "probe", "effect": "NoSchedule"}
                    ],
                }
            ],
        },
    }


class PoolPublisher:
    """Publishes one node's pool; run it with ``await nursery.start(publisher.run)``.

    ``source()`` returns the node's inputs now (synchronous, cheap, no I/O);
    ``wait_for_change(last)`` returns the node's change counter once it differs from
    ``last`` (``-1`` never matches, so the first call answers at once).

    Observable state (read by ``/readyz``, metrics and tests): ``problem`` (``None`` once
    the pool in the API server matches the node), ``generation`` (the pool generation last
    seen or written), ``writes`` (rounds that wrote), ``rounds`` (rounds finished, either
    way), ``taints`` (whether devices with problems are published tainted: ``None``
    until the server was asked; pass ``False`` to never taint). :meth:`wait_until` waits
    for a condition on them.
    """

    def __init__(
        self,
        store: SliceStore,
        source: Callable[[], PoolInputs],
        wait_for_change: Callable[[int], Awaitable[int]],
        *,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        resync_s: float = RESYNC_S,
        conflict_retries: int = CONFLICT_RETRIES,
        min_interval_s: float = MIN_INTERVAL_S,
        taints: bool | None = None,
    ) -> None:
        if not 0 < backoff_first_s <= backoff_cap_s:
            raise ValueError("backoff must satisfy 0 < backoff_first_s <= backoff_cap_s")
        self._store = store
        self._source = source
        self._wait_for_change = wait_for_change
        self._backoff_first_s = backoff_first_s
        self._backoff_cap_s = backoff_cap_s
        self._resync_s = resync_s
        self._conflict_retries = conflict_retries
        if min_interval_s < 0:
            raise ValueError("min_interval_s must be >= 0")
        self._min_interval_s = min_interval_s
        self.taints = taints
        self._ask_taints = taints is None  # False from the caller: never taint, never ask
        self._reprobe = False
        self.problem: str | None = "ResourceSlices not published yet"
        self.generation = 0
        self.writes = 0
        self.rounds = 0
        self._progress = trio.Event()

    async def wait_until(self, condition: Callable[[PoolPublisher], bool]) -> None:
        """Return once ``condition(self)`` holds (checked after every round)."""
        while not condition(self):
            await self._progress.wait()

    def _round_done(self) -> None:
        self.rounds += 1
        self._progress.set()
        self._progress = trio.Event()

    async def publish_once(self, inputs: PoolInputs) -> bool:
        """One round for ``inputs``: read, compare, write what differs, delete the stale.
        True when it wrote. Raises :class:`~nvswitch_dp.dra.kube.KubeError` (a
        :class:`~nvswitch_dp.dra.kube.SliceConflict` only once the re-reads ran out)."""
        if self.taints is None or self._reprobe:
            probe = taint_probe(inputs.node_name, inputs.driver)
            answer = await self._store.dry_run_create_slice(probe)
            self._reprobe = False
            self._set_taints(not taints_dropped(probe, answer))
        for _ in range(self._conflict_retries + 2):
            existing = await self._store.list_slices(inputs.node_name, inputs.driver)
            found = {s["metadata"]["name"]: s for s in existing}
            taints = bool(self.taints)
            wanted = build_pool(inputs, 0, taints=taints)
            generations = {_generation(s) for s in existing}
            if (
                len(generations) == 1
                and set(found) == {w["metadata"]["name"] for w in wanted}
                and all(
                    without_generation(found[w["metadata"]["name"]]) == without_generation(w)
                    for w in wanted
                )
            ):
                self.generation = generations.pop()
                return False
            generation = max(generations | {self.generation}) + 1
            dropped = False
            try:
                for obj in build_pool(inputs, generation, taints=taints):
                    name = obj["metadata"]["name"]
                    current = found.get(name)
                    stored: dict[str, Any] | None = None
                    if current is None:
                        stored = await self._store.create_slice(obj)
                    elif comparable_spec(current["spec"]) != comparable_spec(obj["spec"]):
                        version = current["metadata"]["resourceVersion"]
                        obj["metadata"] = {"name": name, "resourceVersion": version}
                        stored = await self._store.update_slice(obj)
                    if taints and stored is not None and taints_dropped(obj, stored):
                        # Sick devices are in the API server untainted: redo at once
                        # without them.
                        self._set_taints(False)
                        dropped = True
                        break
                if not dropped:
                    for name in sorted(set(found) - {w["metadata"]["name"] for w in wanted}):
                        await self._store.delete_slice(name)
            except SliceConflict as exc:
                log.info("slice conflict, reading again", extra={"error": str(exc)})
                continue
            if dropped:
                self.generation = generation
                continue
            self.generation = generation
            self.writes += 1
            log.info(
                "published the pool",
                extra={"generation": generation, "slices": len(wanted), "node": inputs.node_name},
            )
            return True
        raise SliceConflict(
            f"ResourceSlices of {inputs.node_name} still conflicting after "
            f"{self._conflict_retries + 1} reads: another writer keeps changing them"
        )

    def _set_taints(self, supported: bool) -> None:
        if supported == self.taints:
            return
        self.taints = supported
        if supported:
            log.info("the API server keeps device taints: devices with problems are tainted")
        else:
            log.warning(
                "the API server drops device taints (DRADeviceTaints is off): devices with "
                "problems are left out of the pool instead"
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish until cancelled.

        Resource handling: holds no resource of its own (the store's connections belong to
        its owner); a round cut short by cancellation leaves slices the next start
        completes, since every round starts from a fresh read. ``task_status.started()`` is
        called after the first round, published or not, so the daemon's start does not
        wait for the API server; ``problem`` tells the difference.

        Error handling: :class:`~nvswitch_dp.dra.kube.KubeError` is never raised: it sets
        ``problem`` and the round is retried with capped backoff. Errors of the inputs
        (:class:`~nvswitch_dp.dra.slices.PoolError`: a table that cannot be published)
        propagate: no retry can fix them.
        """
        started = False
        delay = self._backoff_first_s
        node_change = await self._wait_for_change(-1)
        while True:
            inputs = self._source()
            try:
                wrote = await self.publish_once(inputs)
            except KubeError as exc:
                self.problem = f"ResourceSlices not published ({exc}); retrying in {delay:g} s"
                log.warning("publishing the pool failed", extra={"error": str(exc)})
                self._round_done()
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(delay)
                delay = min(delay * 2, self._backoff_cap_s)
                continue
            self.problem = None
            delay = self._backoff_first_s
            self._round_done()
            if not started:
                task_status.started()
                started = True
            if wrote and self._min_interval_s > 0:
                # Coalesce a burst: what changes meanwhile goes out in the next round.
                await trio.sleep(self._min_interval_s)
            with trio.move_on_after(self._resync_s if self._resync_s > 0 else math.inf) as resync:
                node_change = await self._wait_for_change(node_change)
            if resync.cancelled_caught and self.taints is False and self._ask_taints:
                # An upgraded API server (or the gate turned on) is noticed at a resync.
                self._reprobe = True
