"""The API server's published rules for ``resource.k8s.io/v1`` ResourceSlices, as data checks.

Pure (no I/O). Two users: the slice builder's tests, and the API-server stand-in
(:mod:`nvswitch_dp.demo.apistore`), which answers 422 with these causes; so what we
publish is checked by the same rules a real API server applies.

Source: the Kubernetes 1.36 API types (``k8s.io/api`` ``resource/v1/types.go``, branch
release-1.36) and the API server's validation (``pkg/apis/resource/validation``):

- ``metadata.name``: a DNS subdomain (at most 253 characters).
- ``spec.driver``: a CSI driver name (at most 63 characters; lower-cased, a DNS subdomain).
- ``spec.pool.name``: at most 253 characters, "/"-separated DNS subdomains;
  ``generation`` >= 0; ``resourceSliceCount`` > 0.
- exactly one of ``nodeName``, ``nodeSelector``, ``allNodes``, ``perDeviceNodeSelection``.
- at most one of ``devices`` and ``sharedCounters`` (since 1.35).
- ``devices``: at most 128, or 64 when any device has taints, consumes counters or has list
  attributes; names unique, DNS labels; attributes + capacities at most 32 per device;
  attribute values at most 48; attribute names a C identifier (at most 32) optionally
  after a DNS-subdomain domain (at most 63) and "/"; exactly one value per attribute;
  string and version values at most 64 characters.
- ``consumesCounters``: at most 2 per device, one per counter set; counter set and counter
  names DNS labels; at most 32 counters per entry.
- ``sharedCounters``: at most 8 counter sets, names unique DNS labels, each with 1 to 32
  counters named by DNS labels.

1.34 also capped the counters consumed per slice at 1024; 1.35 and later have no such cap.
The pool-level rules the scheduler applies across slices (counter sets unique in the pool,
a consumed counter exists) are in :func:`check_pool`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_DEVICES = 128
MAX_DEVICES_ADVANCED = 64  # any device with taints, consumesCounters or list attributes
MAX_COUNTER_SETS = 8
MAX_COUNTERS_PER_SET = 32
MAX_CONSUMPTIONS_PER_DEVICE = 2
MAX_COUNTERS_PER_CONSUMPTION = 32
MAX_ATTRIBUTES_AND_CAPACITIES = 32
MAX_ATTRIBUTE_VALUES = 48
MAX_ATTRIBUTE_DOMAIN = 63
MAX_ATTRIBUTE_ID = 32
MAX_ATTRIBUTE_VALUE_LENGTH = 64
MAX_DRIVER_NAME = 63
MAX_POOL_NAME = 253
MAX_SUBDOMAIN = 253
MAX_LABEL = 63

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(-((0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(\.(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(\+([0-9a-zA-Z-]+(\.[0-9a-zA-Z-]+)*))?"
)
_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?")
_SCALAR_KINDS = ("int", "bool", "string", "version")
_LIST_KINDS = ("ints", "bools", "strings", "versions")


@dataclass(frozen=True, slots=True)
class Cause:
    """One broken rule, shaped like a ``StatusCause`` of the API server's 422 answer."""

    reason: str  # FieldValueInvalid, FieldValueRequired, FieldValueTooLong, ...
    field: str  # e.g. "spec.devices[3].name"
    message: str

    def as_status_cause(self) -> dict[str, str]:
        return {"reason": self.reason, "field": self.field, "message": self.message}


def is_dns_label(text: str) -> bool:
    return len(text) <= MAX_LABEL and _LABEL.fullmatch(text) is not None


def is_dns_subdomain(text: str) -> bool:
    return len(text) <= MAX_SUBDOMAIN and _SUBDOMAIN.fullmatch(text) is not None


def _name_causes(value: object, where: str, *, label: bool) -> list[Cause]:
    if not isinstance(value, str) or not value:
        return [Cause("FieldValueRequired", where, "Required value")]
    limit = MAX_LABEL if label else MAX_SUBDOMAIN
    if len(value) > limit:
        return [Cause("FieldValueTooLong", where, f"may not be more than {limit} bytes")]
    pattern = _LABEL if label else _SUBDOMAIN
    if pattern.fullmatch(value) is None:
        what = "RFC 1123 label" if label else "RFC 1123 subdomain"
        return [Cause("FieldValueInvalid", where, f"{value!r}: a lowercase {what} is required")]
    return []


def _qualified_name_causes(name: str, where: str) -> list[Cause]:
    domain, slash, ident = name.rpartition("/")
    causes: list[Cause] = []
    if slash:
        if not domain:
            causes.append(Cause("FieldValueRequired", where, "the domain must not be empty"))
        elif len(domain) > MAX_ATTRIBUTE_DOMAIN:
            causes.append(
                Cause("FieldValueTooLong", where, f"domain longer than {MAX_ATTRIBUTE_DOMAIN}")
            )
        elif _SUBDOMAIN.fullmatch(domain) is None:
            causes.append(Cause("FieldValueInvalid", where, f"{domain!r} is not a DNS subdomain"))
    if not ident:
        causes.append(Cause("FieldValueRequired", where, "the name must not be empty"))
    elif len(ident) > MAX_ATTRIBUTE_ID:
        causes.append(Cause("FieldValueTooLong", where, f"name longer than {MAX_ATTRIBUTE_ID}"))
    elif _C_IDENTIFIER.fullmatch(ident) is None:
        causes.append(Cause("FieldValueInvalid", where, f"{ident!r} is not a C identifier"))
    return causes


def _attribute_causes(value: object, where: str) -> tuple[list[Cause], int, bool]:
    """Causes, the number of values, and whether it is a list attribute."""
    if not isinstance(value, Mapping):
        return [Cause("FieldValueInvalid", where, "must be an object")], 0, False
    kinds = [k for k in (*_SCALAR_KINDS, *_LIST_KINDS) if value.get(k) is not None]
    if len(kinds) != 1:
        return [Cause("FieldValueInvalid", where, "exactly one value must be specified")], 0, False
    kind = kinds[0]
    items: list[Any] = list(value[kind]) if kind in _LIST_KINDS else [value[kind]]
    if kind in _LIST_KINDS and not items:
        return [Cause("FieldValueRequired", where, "a list must not be empty")], 0, True
    causes: list[Cause] = []
    for item in items:
        if kind.startswith("string") or kind.startswith("version"):
            if not isinstance(item, str):
                causes.append(Cause("FieldValueInvalid", where, "must be a string"))
            elif len(item) > MAX_ATTRIBUTE_VALUE_LENGTH:
                causes.append(
                    Cause(
                        "FieldValueTooLong",
                        where,
                        f"may not be more than {MAX_ATTRIBUTE_VALUE_LENGTH} bytes",
                    )
                )
            elif kind.startswith("version") and _SEMVER.fullmatch(item) is None:
                causes.append(Cause("FieldValueInvalid", where, "must be a semantic version"))
        elif kind.startswith("bool"):
            if not isinstance(item, bool):
                causes.append(Cause("FieldValueInvalid", where, "must be a boolean"))
        elif isinstance(item, bool) or not isinstance(item, int):
            causes.append(Cause("FieldValueInvalid", where, "must be an integer"))
    return causes, len(items), kind in _LIST_KINDS


def _counters_causes(counters: object, where: str, limit: int) -> list[Cause]:
    if not isinstance(counters, Mapping) or not counters:
        return [Cause("FieldValueRequired", where, "Required value")]
    causes: list[Cause] = []
    if len(counters) > limit:
        causes.append(Cause("FieldValueTooMany", where, f"must have at most {limit} items"))
    for name, counter in counters.items():
        causes += _name_causes(name, f"{where}[{name}]", label=True)
        quantity = counter.get("value") if isinstance(counter, Mapping) else None
        text = str(quantity) if isinstance(quantity, int | str) else ""
        if _QUANTITY.fullmatch(text) is None:
            causes.append(Cause("FieldValueInvalid", f"{where}[{name}].value", "not a quantity"))
    return causes


def _device_causes(device: object, where: str) -> tuple[list[Cause], bool, bool]:
    """Causes, whether the device uses an advanced feature, and whether it has lists."""
    if not isinstance(device, Mapping):
        return [Cause("FieldValueInvalid", where, "must be an object")], False, False
    causes = _name_causes(device.get("name"), f"{where}.name", label=True)
    attributes = device.get("attributes") or {}
    capacity = device.get("capacity") or {}
    if len(attributes) + len(capacity) > MAX_ATTRIBUTES_AND_CAPACITIES:
        causes.append(
            Cause(
                "FieldValueInvalid",
                where,
                "the total number of attributes and capacities must not exceed "
                f"{MAX_ATTRIBUTES_AND_CAPACITIES}",
            )
        )
    values = 0
    lists = False
    for name, value in attributes.items():
        key = f"{where}.attributes[{name}]"
        causes += _qualified_name_causes(str(name), key)
        more, count, is_list = _attribute_causes(value, key)
        causes += more
        values += count
        lists = lists or is_list
    if values > MAX_ATTRIBUTE_VALUES:
        causes.append(
            Cause(
                "FieldValueInvalid",
                where,
                f"the total number of attribute values must not exceed {MAX_ATTRIBUTE_VALUES}",
            )
        )
    for name in capacity:
        causes += _qualified_name_causes(str(name), f"{where}.capacity[{name}]")
    consumes = device.get("consumesCounters") or []
    if len(consumes) > MAX_CONSUMPTIONS_PER_DEVICE:
        causes.append(
            Cause(
                "FieldValueTooMany",
                f"{where}.consumesCounters",
                f"must have at most {MAX_CONSUMPTIONS_PER_DEVICE} items",
            )
        )
    seen: set[str] = set()
    for i, entry in enumerate(consumes):
        key = f"{where}.consumesCounters[{i}]"
        counter_set = entry.get("counterSet") if isinstance(entry, Mapping) else None
        causes += _name_causes(counter_set, f"{key}.counterSet", label=True)
        if isinstance(counter_set, str):
            if counter_set in seen:
                causes.append(Cause("FieldValueDuplicate", f"{key}.counterSet", counter_set))
            seen.add(counter_set)
        counters = entry.get("counters") if isinstance(entry, Mapping) else None
        causes += _counters_causes(counters, f"{key}.counters", MAX_COUNTERS_PER_CONSUMPTION)
    causes += _taint_causes(device.get("taints"), f"{where}.taints")
    advanced = bool(device.get("taints")) or bool(consumes) or lists
    return causes, advanced, lists


MAX_TAINTS_PER_DEVICE = 16
TAINT_EFFECTS = ("NoSchedule", "NoExecute", "None")
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _taint_causes(taints: Any, where: str) -> list[Cause]:
    """A device's taints: at most 16; key a label name (optional DNS-subdomain prefix of
    at most 253, "/", name of at most 63), value a label value (at most 63), effect one
    of NoSchedule, NoExecute, None."""
    if taints is None:
        return []
    if not isinstance(taints, list):
        return [Cause("FieldValueInvalid", where, "must be a list")]
    causes: list[Cause] = []
    if len(taints) > MAX_TAINTS_PER_DEVICE:
        causes.append(
            Cause("FieldValueTooMany", where, f"must have at most {MAX_TAINTS_PER_DEVICE} items")
        )
    for i, taint in enumerate(taints):
        at = f"{where}[{i}]"
        if not isinstance(taint, Mapping):
            causes.append(Cause("FieldValueInvalid", at, "must be an object"))
            continue
        key = taint.get("key")
        prefix, _, name = key.rpartition("/") if isinstance(key, str) else ("", "", "")
        if not isinstance(key, str) or not key:
            causes.append(Cause("FieldValueRequired", f"{at}.key", "Required value"))
        elif (
            len(name) > MAX_LABEL
            or _LABEL_NAME.fullmatch(name) is None
            or (prefix and (len(prefix) > MAX_SUBDOMAIN or not is_dns_subdomain(prefix)))
        ):
            causes.append(Cause("FieldValueInvalid", f"{at}.key", f"{key!r}: not a label name"))
        value = taint.get("value", "")
        if (
            not isinstance(value, str)
            or len(value) > MAX_LABEL
            or not _LABEL_VALUE.fullmatch(value)
        ):
            causes.append(
                Cause("FieldValueInvalid", f"{at}.value", f"{value!r}: not a label value")
            )
        if taint.get("effect") not in TAINT_EFFECTS:
            causes.append(
                Cause("FieldValueNotSupported", f"{at}.effect", f"must be one of {TAINT_EFFECTS}")
            )
    return causes


def check_slice(obj: Mapping[str, Any]) -> list[Cause]:
    """Every published rule ``obj`` (a ResourceSlice as JSON) breaks; empty when valid."""
    causes: list[Cause] = []
    if obj.get("apiVersion") != "resource.k8s.io/v1" or obj.get("kind") != "ResourceSlice":
        causes.append(
            Cause("FieldValueInvalid", "kind", "must be a resource.k8s.io/v1 ResourceSlice")
        )
    metadata = obj.get("metadata") or {}
    causes += _name_causes(metadata.get("name"), "metadata.name", label=False)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return [*causes, Cause("FieldValueRequired", "spec", "Required value")]
    driver = spec.get("driver")
    if not isinstance(driver, str) or not driver:
        causes.append(Cause("FieldValueRequired", "spec.driver", "Required value"))
    elif len(driver) > MAX_DRIVER_NAME:
        causes.append(
            Cause("FieldValueTooLong", "spec.driver", f"must be at most {MAX_DRIVER_NAME}")
        )
    elif _SUBDOMAIN.fullmatch(driver.lower()) is None:
        causes.append(Cause("FieldValueInvalid", "spec.driver", "must be a DNS subdomain"))
    pool = spec.get("pool")
    if not isinstance(pool, Mapping):
        causes.append(Cause("FieldValueRequired", "spec.pool", "Required value"))
    else:
        name = pool.get("name")
        if not isinstance(name, str) or not name:
            causes.append(Cause("FieldValueRequired", "spec.pool.name", "Required value"))
        elif len(name) > MAX_POOL_NAME:
            causes.append(
                Cause("FieldValueTooLong", "spec.pool.name", f"must be at most {MAX_POOL_NAME}")
            )
        else:
            for part in name.split("/"):
                causes += _name_causes(part, "spec.pool.name", label=False)
        generation = pool.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            causes.append(
                Cause("FieldValueInvalid", "spec.pool.generation", "must be an integer >= 0")
            )
        count = pool.get("resourceSliceCount")
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            causes.append(
                Cause(
                    "FieldValueInvalid", "spec.pool.resourceSliceCount", "must be greater than zero"
                )
            )
    selections = [
        f
        for f in ("nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection")
        if spec.get(f) not in (None, False, "")
    ]
    if len(selections) != 1:
        causes.append(
            Cause(
                "FieldValueRequired" if not selections else "FieldValueInvalid",
                "spec",
                "exactly one of `nodeName`, `nodeSelector`, `allNodes`, "
                "`perDeviceNodeSelection` is required",
            )
        )
    if spec.get("nodeName") not in (None, ""):
        causes += _name_causes(spec["nodeName"], "spec.nodeName", label=False)
    devices = spec.get("devices")
    counter_sets = spec.get("sharedCounters")
    if devices is not None and counter_sets is not None:
        causes.append(
            Cause(
                "FieldValueInvalid", "spec", "only one of `sharedCounters` or `devices` is allowed"
            )
        )
    causes += _devices_causes(devices or [])
    causes += _counter_sets_causes(counter_sets or [])
    return causes


def _devices_causes(devices: Sequence[Any]) -> list[Cause]:
    causes: list[Cause] = []
    names: set[str] = set()
    advanced = False
    for i, device in enumerate(devices):
        more, uses_advanced, _ = _device_causes(device, f"spec.devices[{i}]")
        causes += more
        advanced = advanced or uses_advanced
        name = device.get("name") if isinstance(device, Mapping) else None
        if isinstance(name, str):
            if name in names:
                causes.append(Cause("FieldValueDuplicate", f"spec.devices[{i}].name", name))
            names.add(name)
    limit = MAX_DEVICES_ADVANCED if advanced else MAX_DEVICES
    if len(devices) > limit:
        causes.append(
            Cause("FieldValueTooMany", "spec.devices", f"must have at most {limit} items")
        )
    return causes


def _counter_sets_causes(counter_sets: Sequence[Any]) -> list[Cause]:
    causes: list[Cause] = []
    if len(counter_sets) > MAX_COUNTER_SETS:
        causes.append(
            Cause(
                "FieldValueTooMany",
                "spec.sharedCounters",
                f"must have at most {MAX_COUNTER_SETS} items",
            )
        )
    names: set[str] = set()
    for i, counter_set in enumerate(counter_sets):
        where = f"spec.sharedCounters[{i}]"
        if not isinstance(counter_set, Mapping):
            causes.append(Cause("FieldValueInvalid", where, "must be an object"))
            continue
        name = counter_set.get("name")
        causes += _name_causes(name, f"{where}.name", label=True)
        if isinstance(name, str):
            if name in names:
                causes.append(Cause("FieldValueDuplicate", f"{where}.name", name))
            names.add(name)
        causes += _counters_causes(
            counter_set.get("counters"), f"{where}.counters", MAX_COUNTERS_PER_SET
        )
    return causes


def check_pool(slices: Iterable[Mapping[str, Any]]) -> list[str]:
    """What makes ``slices`` (all of one driver's pool) unusable to the scheduler; empty
    when the pool is complete and consistent: one generation, ``resourceSliceCount`` equal
    to the number of slices, counter sets unique in the pool, device names unique, every
    consumed counter declared, and no device consuming more of a counter than there is.
    """
    items = list(slices)
    problems: list[str] = []
    if not items:
        return ["the pool has no slice"]
    pools = {(s["spec"]["pool"]["name"], s["spec"]["driver"]) for s in items}
    if len(pools) != 1:
        problems.append(f"slices of several pools: {sorted(pools)}")
    generations = {s["spec"]["pool"]["generation"] for s in items}
    if len(generations) != 1:
        problems.append(f"slices of several generations: {sorted(generations)}")
    counts = {s["spec"]["pool"]["resourceSliceCount"] for s in items}
    if counts != {len(items)}:
        problems.append(f"resourceSliceCount {sorted(counts)} but {len(items)} slices")
    declared: dict[str, dict[str, int]] = {}
    for s in items:
        for counter_set in s["spec"].get("sharedCounters") or []:
            if counter_set["name"] in declared:
                problems.append(f"counter set {counter_set['name']} declared twice")
            declared[counter_set["name"]] = {
                k: int(v["value"]) for k, v in counter_set["counters"].items()
            }
    names: set[str] = set()
    for s in items:
        for device in s["spec"].get("devices") or []:
            if device["name"] in names:
                problems.append(f"device {device['name']} published twice")
            names.add(device["name"])
            for entry in device.get("consumesCounters") or []:
                have = declared.get(entry["counterSet"])
                if have is None:
                    problems.append(f"{device['name']}: no counter set {entry['counterSet']}")
                    continue
                for counter, value in entry["counters"].items():
                    if counter not in have or int(value["value"]) > have[counter]:
                        problems.append(
                            f"{device['name']}: {entry['counterSet']}/{counter} not available"
                        )
    return problems
