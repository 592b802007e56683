"""The node's DRA pool as ResourceSlices of ``resource.k8s.io/v1``: a pure builder.

One pool per node, named after the node. The slices (JSON dicts, ready to send):

- **counters** (``<node>-<driver>-counters``): one counter set per baseboard
  (``baseboard-0`` holds modules 1-8, ``baseboard-1`` modules 9-16), one counter
  ``gpu-<module>`` of value 1 per GPU. Since 1.35 a slice holds devices *or* shared
  counters, never both, so counters have their own slice(s) of the same pool.
- **devices** (``<node>-<driver>-devices-<i>``): one device ``partition-<fm id>`` per FM
  partition, consuming the counters of its GPUs (one entry per baseboard it touches), and
  one device ``gpu-<module>`` per GPU (for KubeVirt, one device per request), consuming its
  one counter. With every counter at 1 the scheduler can never hand out two devices that
  share a GPU, whatever mix of partition and per-GPU devices is asked for.

Per-GPU devices carry ``partition<N>x``: the FM ID of *the* N-GPU partition holding the GPU,
so that N requests constrained by ``matchAttribute: <driver>/partition<N>x`` land on exactly
one FM partition. Where FM's table puts a GPU in several partitions of one size (the 16-GPU
tables put each GPU in three 8-GPU partitions), one attribute can name only one of them:
the builder picks, per size, disjoint partitions by ascending ID (on the 16-GPU tables the
two baseboard partitions); the others are reachable as partition devices only.

Problems, on an API server **without device taints** (``build_pool(..., taints=False)``):
a GPU with a problem (fault, drain, missing from PCI) leaves the pool, and so does every
partition containing it; a partition with a problem leaves the pool. **With device
taints** (``DRADeviceTaints``: beta in 1.36, GA target 1.37; the publisher finds out
which, see :mod:`nvswitch_dp.dra.publish`), such a device stays, with one ``NoSchedule``
taint per kind of problem whose key and value say why (:func:`taints_for`), so an
operator sees *why* it cannot be allocated; the scheduler skips it unless a claim
tolerates the taint. ``NoExecute`` is never used: we never evict a VM. A GPU missing from
PCI leaves the pool either way (there is nothing to describe). Either way the per-GPU
devices lose the ``partition<N>x`` attribute of a partition with a problem (so no
constrained claim can land on it), and counters stay: they describe the hardware, not
its health. A sick device is never published untainted.

Order: the scheduler's allocator takes the first device that fits in the order a slice
lists them, and the order of the slices within a pool is not defined (the scheduler
gathers them through a map), so the devices go into as few slices as the limit allows
(one on every table we know: 23 devices on HGX H200, 51 on HGX A100 16-GPU) in the order
:class:`PoolInputs` gives: partition devices smallest size first, each size in the
policy's order, then the per-GPU devices.

Everything here is pure; :mod:`nvswitch_dp.dra.validation` holds the published limits
this module respects.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nvswitch_dp.config.schema import DEFAULT_DRA_DRIVER
from nvswitch_dp.dra import validation
from nvswitch_dp.partitions.layout import GpuSlot
from nvswitch_dp.partitions.offering import DRAINED, FABRIC_PREFIX, OCCUPIED_PREFIX
from nvswitch_dp.partitions.table import Partition, PartitionTable

API_VERSION = "resource.k8s.io/v1"
KIND = "ResourceSlice"
DEFAULT_DRIVER = DEFAULT_DRA_DRIVER
PCI_BUS_ID = "resource.kubernetes.io/pciBusID"
GPUS_PER_BASEBOARD = 8
# Every device consumes counters, so a device slice holds at most 64 devices.
DEVICES_PER_SLICE = validation.MAX_DEVICES_ADVANCED
COUNTER_SETS_PER_SLICE = validation.MAX_COUNTER_SETS
TAINT_EFFECT = "NoSchedule"
MAX_TAINTS_PER_DEVICE = 16
COUNTERS_SLICE_SUFFIX = "counters"
DEVICES_SLICE_SUFFIX = "devices"
_HASH_LENGTH = 10

Slice = dict[str, Any]


class PoolError(ValueError):
    """The table cannot be published within the published limits (the message says why)."""


@dataclass(frozen=True)
class PoolInputs:
    """Everything the pool depends on; a change of any field may change the slices.

    ``gpus`` maps module ID to where the GPU sits (a module of the table missing here is
    treated as a problem: it cannot be handed out). ``gpu_problems`` and
    ``partition_problems`` map a module or partition ID to why it must leave the pool.
    ``order`` and ``gpu_order`` are the partition and module IDs in the order the devices
    are listed (the scheduler takes the first that fits: this order *is* the placement
    policy, see :func:`~nvswitch_dp.partitions.policy.placement_order`); IDs they leave
    out follow by ID, so the default lists everything by ID.
    """

    node_name: str
    driver: str
    platform: str
    table: PartitionTable
    gpus: Mapping[int, GpuSlot]
    gpu_problems: Mapping[int, str]
    partition_problems: Mapping[int, str]
    order: tuple[int, ...] = ()
    gpu_order: tuple[int, ...] = ()


def baseboard_of(module_id: int) -> int:
    """The baseboard (counter set index) of a module: 1-8 -> 0, 9-16 -> 1."""
    if module_id < 1:
        raise PoolError(f"module IDs start at 1, got {module_id}")
    return (module_id - 1) // GPUS_PER_BASEBOARD


def counter_set_name(baseboard: int) -> str:
    return f"baseboard-{baseboard}"


def counter_name(module_id: int) -> str:
    return f"gpu-{module_id}"


def partition_device_name(partition_id: int) -> str:
    return f"partition-{partition_id}"


def gpu_device_name(module_id: int) -> str:
    return f"gpu-{module_id}"


def partition_attribute(size: int) -> str:
    """The per-GPU attribute naming the ``size``-GPU partition that holds the GPU."""
    return f"partition{size}x"


def slice_name(node_name: str, driver: str, suffix: str) -> str:
    """``<node>-<driver with dots as dashes>-<suffix>``, a valid DNS subdomain of at most
    253 characters; a node name too long for that is cut and followed by a hash of the
    whole node name, so names stay unique and deterministic."""
    base = f"{node_name}-{driver.replace('.', '-')}"
    name = f"{base}-{suffix}"
    if len(name) <= validation.MAX_SUBDOMAIN:
        return name
    digest = hashlib.sha256(f"{node_name}/{driver}".encode()).hexdigest()[:_HASH_LENGTH]
    room = validation.MAX_SUBDOMAIN - len(suffix) - _HASH_LENGTH - 2
    head = base[:room].rstrip("-.")
    return f"{head}-{digest}-{suffix}"


def gpu_partitions(table: PartitionTable) -> dict[int, dict[int, int]]:
    """Module -> size -> the FM ID published as its ``partition<size>x`` attribute.

    Per size, partitions are taken by ascending ID when they share no GPU with one taken
    already: every GPU gets at most one partition per size, and N GPUs sharing a value are
    exactly that partition's GPUs."""
    chosen: dict[int, dict[int, int]] = {m: {} for m in table.module_ids}
    for size in table.sizes:
        covered: set[int] = set()
        for p in sorted(table.of_size(size), key=lambda q: q.partition_id):
            if covered.isdisjoint(p.module_ids):
                covered |= p.module_ids
                for m in p.module_ids:
                    chosen[m][size] = p.partition_id
    return chosen


def _consumes(modules: Sequence[int]) -> list[dict[str, Any]]:
    by_set: dict[int, list[int]] = {}
    for m in sorted(modules):
        by_set.setdefault(baseboard_of(m), []).append(m)
    return [
        {
            "counterSet": counter_set_name(b),
            "counters": {counter_name(m): {"value": "1"} for m in mods},
        }
        for b, mods in sorted(by_set.items())
    ]


def _label_value(text: str) -> str:
    """``text`` as a label value: lower case, runs of other characters as one "-", at most
    63 characters, starting and ending alphanumeric ("unknown" if nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[: validation.MAX_LABEL].rstrip("-") or "unknown"


def _gpu_taint_key(driver: str, reason: str) -> str:
    return f"{driver}/{'drained' if reason == DRAINED else 'gpu-fault'}"


def _partition_taint(driver: str, reason: str) -> dict[str, str]:
    if reason.startswith(FABRIC_PREFIX):
        state = reason.removeprefix(FABRIC_PREFIX).split(":", 1)[0]
        return {"key": f"{driver}/fabric-manager", "value": _label_value(state)}
    if reason.startswith(OCCUPIED_PREFIX):
        other = reason.removeprefix(OCCUPIED_PREFIX).split(",", 1)[0].split(" ", 1)[0]
        return {"key": f"{driver}/occupied", "value": _label_value(f"partition-{other}")}
    return {"key": f"{driver}/partition-fault", "value": _label_value(reason)}


def taints_for(
    inputs: PoolInputs, *, partition: Partition | None = None, module: int | None = None
) -> list[dict[str, str]]:
    """The ``NoSchedule`` taints of one device: a partition (one taint per kind of GPU
    problem, value ``modules-<m>-<m>``, and one for the partition's own problem) or a GPU
    (its problem, the value a label-value form of the reason). Keys are
    ``<driver>/gpu-fault``, ``/drained``, ``/partition-fault``, ``/occupied`` (an
    unclaimed occupant shares a GPU), ``/fabric-manager`` (value: its state). At most
    5 taints, under the 16 a device may carry. Empty when the device has no problem."""
    driver = inputs.driver
    taints: list[dict[str, str]] = []
    if partition is not None:
        by_key: dict[str, list[int]] = {}
        for m in partition.sorted_modules:
            reason = inputs.gpu_problems.get(m)
            if reason is not None:
                by_key.setdefault(_gpu_taint_key(driver, reason), []).append(m)
        for key, mods in sorted(by_key.items()):
            value = _label_value("modules-" + "-".join(map(str, mods)))
            taints.append({"key": key, "value": value})
        own = inputs.partition_problems.get(partition.partition_id)
        if own is not None:
            taints.append(_partition_taint(driver, own))
    elif module is not None and module in inputs.gpu_problems:
        reason = inputs.gpu_problems[module]
        taints.append({"key": _gpu_taint_key(driver, reason), "value": _label_value(reason)})
    return [{**t, "effect": TAINT_EFFECT} for t in taints[:MAX_TAINTS_PER_DEVICE]]


def _usable(p: Partition, inputs: PoolInputs) -> bool:
    return p.partition_id not in inputs.partition_problems and all(
        m in inputs.gpus and m not in inputs.gpu_problems for m in p.module_ids
    )


def _partition_device(p: Partition, inputs: PoolInputs) -> dict[str, Any]:
    numa = [inputs.gpus[m].numa_node for m in p.sorted_modules]
    numa_text = (
        "" if None in numa else ",".join(str(n) for n in sorted({n for n in numa if n is not None}))
    )
    return {
        "name": partition_device_name(p.partition_id),
        "attributes": {
            "kind": {"string": "partition"},
            "size": {"int": p.size},
            "partitionID": {"int": p.partition_id},
            "modules": {"string": ",".join(str(m) for m in p.sorted_modules)},
            "numaNodes": {"string": numa_text},
            "platform": {"string": inputs.platform},
        },
        "consumesCounters": _consumes(p.sorted_modules),
    }


def _gpu_device(
    module_id: int, inputs: PoolInputs, partitions: Mapping[int, int], usable: set[int]
) -> dict[str, Any]:
    slot = inputs.gpus[module_id]
    attributes: dict[str, dict[str, Any]] = {
        "kind": {"string": "gpu"},
        "moduleID": {"int": module_id},
        "platform": {"string": inputs.platform},
        PCI_BUS_ID: {"string": slot.pci_address},
    }
    if slot.numa_node is not None:
        attributes["numaNode"] = {"int": slot.numa_node}
    for size, pid in sorted(partitions.items()):
        if pid in usable:
            attributes[partition_attribute(size)] = {"int": pid}
    return {
        "name": gpu_device_name(module_id),
        "attributes": attributes,
        "consumesCounters": _consumes([module_id]),
    }


def _ordered(first: Sequence[int], every: Sequence[int]) -> list[int]:
    """``first`` (those in ``every``, once each), then the rest of ``every`` by value."""
    known = set(every)
    head = list(dict.fromkeys(i for i in first if i in known))
    return head + sorted(known - set(head))


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)] or [[]]


def build_pool(inputs: PoolInputs, generation: int, *, taints: bool = False) -> list[Slice]:
    """The ResourceSlices of the node's pool at ``generation``, in a fixed order (counters
    first, then devices): pure and deterministic, so equal inputs give equal slices.
    ``taints``: publish devices with problems tainted (the API server keeps device
    taints) instead of leaving them out (module docstring).

    Raises :class:`PoolError` when the table cannot be published within the limits (a
    partition over more than two baseboards, a baseboard of more than 32 GPUs) and
    ``ValueError`` for a negative generation.
    """
    if generation < 0:
        raise ValueError(f"pool generation must be >= 0, got {generation}")
    table = inputs.table
    modules = sorted(table.module_ids)
    for p in table:
        if len({baseboard_of(m) for m in p.module_ids}) > validation.MAX_CONSUMPTIONS_PER_DEVICE:
            raise PoolError(
                f"partition {p.partition_id} spans more than "
                f"{validation.MAX_CONSUMPTIONS_PER_DEVICE} baseboards: a device may consume "
                f"from at most {validation.MAX_CONSUMPTIONS_PER_DEVICE} counter sets"
            )
    boards: dict[int, list[int]] = {}
    for m in modules:
        boards.setdefault(baseboard_of(m), []).append(m)
    counter_sets = [
        {
            "name": counter_set_name(b),
            "counters": {counter_name(m): {"value": "1"} for m in mods},
        }
        for b, mods in sorted(boards.items())
    ]
    usable = {p.partition_id for p in table if _usable(p, inputs)}
    present = {p.partition_id for p in table if all(m in inputs.gpus for m in p.module_ids)}
    chosen = gpu_partitions(table)
    devices = []
    for pid in _ordered(inputs.order, table.ids):
        if pid in usable or (taints and pid in present):
            device = _partition_device(table[pid], inputs)
            if pid not in usable:
                device["taints"] = taints_for(inputs, partition=table[pid])
            devices.append(device)
    for m in _ordered(inputs.gpu_order, modules):
        if m not in inputs.gpus or (m in inputs.gpu_problems and not taints):
            continue
        device = _gpu_device(m, inputs, chosen[m], usable)
        if m in inputs.gpu_problems:
            device["taints"] = taints_for(inputs, module=m)
        devices.append(device)
    specs: list[dict[str, Any]] = [
        {"sharedCounters": chunk} for chunk in _chunks(counter_sets, COUNTER_SETS_PER_SLICE)
    ]
    names = [
        slice_name(inputs.node_name, inputs.driver, COUNTERS_SLICE_SUFFIX)
        if i == 0
        else slice_name(inputs.node_name, inputs.driver, f"{COUNTERS_SLICE_SUFFIX}-{i}")
        for i in range(len(specs))
    ]
    if devices:
        # A pool whose every device left (all GPUs faulty) is the counters slice alone.
        for i, chunk in enumerate(_chunks(devices, DEVICES_PER_SLICE)):
            specs.append({"devices": chunk})
            names.append(slice_name(inputs.node_name, inputs.driver, f"{DEVICES_SLICE_SUFFIX}-{i}"))
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name},
            "spec": {
                "driver": inputs.driver,
                "pool": {
                    "name": inputs.node_name,
                    "generation": generation,
                    "resourceSliceCount": len(specs),
                },
                "nodeName": inputs.node_name,
                **spec,
            },
        }
        for name, spec in zip(names, specs, strict=True)
    ]


def comparable_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` without what the API server adds: a taint's ``timeAdded`` ("added
    automatically during create or update if not set")."""
    out = dict(spec)
    if out.get("devices"):
        out["devices"] = [
            {**d, "taints": [{k: v for k, v in t.items() if k != "timeAdded"} for t in d["taints"]]}
            if d.get("taints")
            else d
            for d in out["devices"]
        ]
    return out


def without_generation(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A slice's name and spec with ``pool.generation`` left out: what tells whether the
    pool's content changed (server-set metadata such as ``resourceVersion`` and a taint's
    ``timeAdded`` are dropped)."""
    spec = comparable_spec(obj["spec"])
    spec["pool"] = {k: v for k, v in spec["pool"].items() if k != "generation"}
    return {"name": obj["metadata"]["name"], "spec": spec}


def taints_dropped(sent: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    """Whether the API server dropped the device taints of slice ``sent`` (answered as
    ``stored``): a server without ``DRADeviceTaints`` drops the field silently."""
    kept = {d["name"]: d for d in stored.get("spec", {}).get("devices") or []}
    return any(
        d.get("taints") and not (kept.get(d["name"]) or {}).get("taints")
        for d in sent["spec"].get("devices") or []
    )
