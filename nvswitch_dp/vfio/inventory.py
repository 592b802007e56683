"""The node inventory: which FM module each GPU is, remembered past the nvidia driver.

Only the NVIDIA driver can say which PCI function is which FM module, and only while the
GPU is bound to it; once the GPU is on ``vfio-pci`` NVML and ``nvidia-smi`` no longer see
it. ``nvswitch-dp prepare-node`` therefore reads the module IDs while it still can and
writes them here, and the daemon takes its module map from this file when the
configuration sets none. A GPU now on ``vfio-pci`` keeps the module it had when the
driver last saw it.

File ``<state-dir>/node-inventory.json`` (JSON, one object)::

    {"version": 1,
     "gpus": {"0000:00:06.0": {"module_id": 8, "device_id": "10de:2335",
                               "uuid": "GPU-...", "serial": "1650000000001",
                               "source": "nvml"}}}

keyed by PCI address in sysfs form; ``uuid`` and ``serial`` may be ``null``. Written
only through :func:`save_inventory` (the project's one durable-write helper: a reader
sees the old file or the new one, never a mix).

Rules, all pure (:func:`merge_discovered`, :func:`resolve_module_map`):

- What the driver reports now wins over what the file says for that address (a
  re-seated GPU is re-read); an address the driver cannot see keeps its entry.
- Two addresses with one module ID is an error naming both: never written.
- The daemon does not guess. Where the node and the inventory disagree (an inventoried
  address with no GPU, a device ID changed, a configured GPU the inventory does not
  know) or a configured ``module_map`` contradicts the inventory, it refuses exactly
  those GPUs, says which and why, and serves the rest.

Errors: :class:`InventoryFileError` for a file that exists but is not exactly this
format (it names the file, the problem and the fix); :class:`InventoryConflict` when a
merge would give one module two addresses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvswitch_dp.files import write_atomically
from nvswitch_dp.vfio.identity import MAX_FIELD_CHARS, MAX_MODULE_ID, GpuIdentity, is_module_id
from nvswitch_dp.vfio.pci_ids import normalize_device_key, normalize_pci_address

INVENTORY_VERSION = 1
INVENTORY_FILE = "node-inventory.json"
# A real node has at most 16 GPUs; a file much larger than that many entries is not ours.
MAX_INVENTORY_BYTES = 1 << 20
_ENTRY_KEYS = frozenset({"module_id", "device_id", "uuid", "serial", "source"})
_TOP_KEYS = frozenset({"version", "gpus"})


class InventoryFileError(Exception):
    """The inventory file exists but cannot be trusted; the message names the file, the
    problem and what to do."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(
            f"node inventory {path}: {problem}. Move it aside (`mv {path} {path}.bad`) and "
            "run `nvswitch-dp prepare-node` with the GPUs on the nvidia driver to write it "
            "again, or set module_map in the configuration"
        )
        self.path = path
        self.problem = problem


class InventoryConflict(Exception):
    """Recording what was discovered would give one module ID two PCI addresses."""


@dataclass(frozen=True, slots=True)
class InventoryEntry:
    """One GPU as last reported by the driver. ``device_id`` is ``"10de:2335"``."""

    module_id: int
    device_id: str
    uuid: str | None
    serial: str | None
    source: str


@dataclass(frozen=True, slots=True)
class NodeInventory:
    """PCI address (sysfs form) -> :class:`InventoryEntry`. Immutable."""

    gpus: Mapping[str, InventoryEntry] = field(default_factory=dict)

    def module_map(self) -> dict[int, str]:
        """Module ID -> PCI address, as the configuration's ``module_map`` would say it."""
        return {e.module_id: a for a, e in sorted(self.gpus.items())}

    def to_json(self) -> str:
        gpus = {
            address: {
                "module_id": e.module_id,
                "device_id": e.device_id,
                "uuid": e.uuid,
                "serial": e.serial,
                "source": e.source,
            }
            for address, e in sorted(self.gpus.items())
        }
        return json.dumps({"version": INVENTORY_VERSION, "gpus": gpus}, indent=2) + "\n"


# ---------------------------------------------------------------------------- the file


def _optional_string(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, str) and len(value) <= MAX_FIELD_CHARS):
        return value
    raise ValueError(f"{where}: must be a string of at most {MAX_FIELD_CHARS} characters or null")


def _entry(address: str, raw: Any) -> InventoryEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"gpus.{address}: must be an object")
    keys = set(raw)
    if keys != _ENTRY_KEYS:
        missing, unknown = sorted(_ENTRY_KEYS - keys), sorted(keys - _ENTRY_KEYS)
        raise ValueError(f"gpus.{address}: missing keys {missing}, unknown keys {unknown}")
    module = raw["module_id"]
    if not is_module_id(module):
        raise ValueError(f"gpus.{address}.module_id: must be an integer 1-{MAX_MODULE_ID}")
    if not isinstance(raw["device_id"], str):
        raise ValueError(f"gpus.{address}.device_id: must be a string like '10de:2335'")
    source = raw["source"]
    if not isinstance(source, str) or len(source) > 32:
        raise ValueError(f"gpus.{address}.source: must be a short string")
    return InventoryEntry(
        module_id=module,
        device_id=normalize_device_key(raw["device_id"]),
        uuid=_optional_string(raw["uuid"], f"gpus.{address}.uuid"),
        serial=_optional_string(raw["serial"], f"gpus.{address}.serial"),
        source=source,
    )


def parse_inventory(text: str, path: Path) -> NodeInventory:
    """The inventory in ``text`` (read from ``path``, which messages name).

    Errors: :class:`InventoryFileError` unless ``text`` is exactly the format of the
    module docstring, with one address per module.
    """
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise InventoryFileError(path, f"not JSON ({exc})") from None
    if not isinstance(raw, dict) or set(raw) != _TOP_KEYS:
        raise InventoryFileError(path, f"must be an object with exactly {sorted(_TOP_KEYS)}")
    if raw["version"] != INVENTORY_VERSION:
        raise InventoryFileError(
            path, f"version {raw['version']!r}; this daemon reads version {INVENTORY_VERSION}"
        )
    if not isinstance(raw["gpus"], dict):
        raise InventoryFileError(path, "gpus: must be an object keyed by PCI address")
    gpus: dict[str, InventoryEntry] = {}
    owners: dict[int, str] = {}
    try:
        for key, value in raw["gpus"].items():
            address = normalize_pci_address(key)
            entry = _entry(address, value)
            if address in gpus:
                raise ValueError(f"gpus: {address} is listed twice")
            if entry.module_id in owners:
                raise ValueError(
                    f"module {entry.module_id} is at both {owners[entry.module_id]} and {address}"
                )
            owners[entry.module_id] = address
            gpus[address] = entry
    except ValueError as exc:
        raise InventoryFileError(path, str(exc)) from None
    return NodeInventory(gpus)


def load_inventory(path: Path) -> NodeInventory | None:
    """The inventory at ``path``; ``None`` when there is no such file (a new node).

    Errors: :class:`InventoryFileError` for a damaged file or one larger than
    :data:`MAX_INVENTORY_BYTES`; ``OSError`` when it exists but cannot be read.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_INVENTORY_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_INVENTORY_BYTES:
        raise InventoryFileError(path, f"larger than {MAX_INVENTORY_BYTES} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise InventoryFileError(path, "not UTF-8 text") from None
    return parse_inventory(text, path)


def save_inventory(path: Path, inventory: NodeInventory) -> None:
    """Replace the file at ``path`` durably (blocking; ``OSError`` from the file system)."""
    write_atomically(path, inventory.to_json().encode(), mode=0o644)


# ---------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Merge:
    """The inventory after a discovery, and one line per change it made (empty: none)."""

    inventory: NodeInventory
    changes: tuple[str, ...]


def merge_discovered(
    old: NodeInventory | None,
    discovered: Iterable[GpuIdentity],
    device_ids: Mapping[str, str],
) -> Merge:
    """Record ``discovered`` (each with a module ID) over ``old``.

    ``device_ids`` maps each discovered address to its ``"10de:2335"`` from sysfs. An
    entry for an address not discovered now is kept as it was (its GPU may be on
    vfio-pci, where no driver reports it).

    Errors: :class:`InventoryConflict` naming both addresses when a module ID would end
    up at two addresses (a stale entry for a GPU moved elsewhere must be resolved by
    hand: the file says which); ``ValueError`` for an identity without a module ID.
    """
    gpus = dict(old.gpus) if old is not None else {}
    changes: list[str] = []
    for identity in discovered:
        if not is_module_id(identity.module_id):
            raise ValueError(f"GPU {identity.address}: no module ID 1-{MAX_MODULE_ID} to record")
        entry = InventoryEntry(
            module_id=identity.module_id,
            device_id=device_ids[identity.address],
            uuid=identity.uuid,
            serial=identity.serial,
            source=identity.source,
        )
        before = gpus.get(identity.address)
        if before is None:
            changes.append(f"{identity.address}: module {entry.module_id} recorded")
        elif (before.module_id, before.device_id, before.uuid) != (
            entry.module_id,
            entry.device_id,
            entry.uuid,
        ):
            changes.append(
                f"{identity.address}: was module {before.module_id} ({before.device_id}, "
                f"{before.uuid}), now module {entry.module_id} ({entry.device_id}, {entry.uuid})"
            )
        gpus[identity.address] = entry
    by_module: dict[int, list[str]] = {}
    for address, entry in gpus.items():
        by_module.setdefault(entry.module_id, []).append(address)
    clashes = [
        f"module {m} at {' and '.join(sorted(a))}"
        for m, a in sorted(by_module.items())
        if len(a) > 1
    ]
    if clashes:
        raise InventoryConflict(
            f"{'; '.join(clashes)}: an inventoried GPU the driver cannot see now claims a "
            "module another GPU reports; check the hardware, then remove the stale entry "
            "from the inventory"
        )
    return Merge(NodeInventory(dict(sorted(gpus.items()))), tuple(changes))


@dataclass(frozen=True, slots=True)
class ModuleResolution:
    """The module map the daemon uses, and what it refuses.

    ``module_map``: module ID -> PCI address, only modules that passed every check.
    ``refused``: module ID -> why it is not served (the daemon marks its partitions
    unusable with that reason). ``problems``: one line per refusal or GPU left out, for
    the log. ``source``: ``"config"``, ``"inventory"`` or ``"none"``.
    """

    module_map: Mapping[int, str]
    refused: Mapping[int, str]
    problems: tuple[str, ...]
    source: str


def resolve_module_map(
    configured: Mapping[int, str],
    inventory: NodeInventory | None,
    present: Mapping[str, str],
) -> ModuleResolution:
    """Decide the module map from the configuration, else the inventory, against the node.

    ``present``: address -> ``"10de:2335"`` of every configured GPU sysfs shows now.
    With ``configured`` set it is the map, and every module it contradicts the inventory
    on (the inventory records another module at its address, or its module at another
    address) is refused. Without it the inventory is the map, and a module is refused
    when its address shows no GPU or a GPU with another device ID; a present GPU the
    inventory does not know is left out with a problem line. Neither: an empty map.
    """
    refused: dict[int, str] = {}
    problems: list[str] = []
    if configured:
        if inventory is not None:
            by_module = inventory.module_map()
            for module, address in sorted(configured.items()):
                entry = inventory.gpus.get(address)
                recorded = by_module.get(module)
                if entry is not None and entry.module_id != module:
                    refused[module] = (
                        f"module_map puts module {module} at {address}, but the driver "
                        f"reported module {entry.module_id} there (node inventory); fix "
                        "module_map or remove it"
                    )
                elif recorded is not None and recorded != address:
                    refused[module] = (
                        f"module_map puts module {module} at {address}, but the driver "
                        f"reported it at {recorded} (node inventory); fix module_map or "
                        "remove it"
                    )
        problems += refused.values()
        kept = {m: a for m, a in configured.items() if m not in refused}
        return ModuleResolution(kept, refused, tuple(problems), "config")
    if inventory is None:
        return ModuleResolution({}, {}, (), "none")
    kept = {}
    for address, entry in sorted(inventory.gpus.items()):
        now = present.get(address)
        if now is None:
            refused[entry.module_id] = (
                f"the node inventory puts module {entry.module_id} at {address}, but no "
                "configured GPU is there now; if the GPU was moved or replaced, run "
                "`nvswitch-dp prepare-node` with it on the nvidia driver"
            )
        elif now != entry.device_id:
            refused[entry.module_id] = (
                f"the GPU at {address} is {now} now, but the node inventory recorded "
                f"{entry.device_id} (module {entry.module_id}): a different GPU; run "
                "`nvswitch-dp prepare-node` with it on the nvidia driver"
            )
        else:
            kept[entry.module_id] = address
    problems += refused.values()
    problems += [
        f"GPU {address} ({device}) is not in the node inventory and will not be served; "
        "run `nvswitch-dp prepare-node` with it on the nvidia driver"
        for address, device in sorted(present.items())
        if address not in inventory.gpus
    ]
    return ModuleResolution(kept, refused, tuple(problems), "inventory")
