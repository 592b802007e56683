"""The node inventory: its file, merging what the driver reports, and the daemon's
decision of which module map to serve with (configuration, inventory, neither)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvswitch_dp.vfio.identity import SOURCE_NVIDIA_SMI, SOURCE_NVML, GpuIdentity
from nvswitch_dp.vfio.inventory import (
    INVENTORY_VERSION,
    MAX_INVENTORY_BYTES,
    InventoryConflict,
    InventoryEntry,
    InventoryFileError,
    NodeInventory,
    load_inventory,
    merge_discovered,
    resolve_module_map,
    save_inventory,
)

H200 = "10de:2335"
ADDRESSES = {1: "0000:5d:00.0", 2: "0000:3a:00.0", 3: "0000:2a:00.0", 4: "0000:18:00.0"}


def _entry(module: int, device: str = H200) -> InventoryEntry:
    return InventoryEntry(module, device, f"GPU-{module:08d}", f"16500000000{module:02d}", "nvml")


def _inventory(modules: dict[int, str] = ADDRESSES) -> NodeInventory:
    return NodeInventory({a: _entry(m) for m, a in modules.items()})


def _identity(address: str, module: int | None, uuid: str = "GPU-x") -> GpuIdentity:
    return GpuIdentity(address, module, uuid, "1", SOURCE_NVML)


def test_file_round_trips_and_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node-inventory.json"
    assert load_inventory(path) is None  # a new node
    save_inventory(path, _inventory())
    assert load_inventory(path) == _inventory()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert json.loads(path.read_text())["version"] == INVENTORY_VERSION


def _valid() -> dict[str, object]:
    return json.loads(_inventory().to_json())  # type: ignore[no-any-return]


def _with(change: dict[str, object]) -> str:
    raw = _valid()
    raw.update(change)
    return json.dumps(raw)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not JSON"),
        ("[]", "must be an object with exactly"),
        (_with({"version": 2}), "version 2; this daemon reads version 1"),
        (_with({"extra": 1}), "must be an object with exactly"),
        (_with({"gpus": []}), "gpus: must be an object keyed by PCI address"),
        (_with({"gpus": {"5d:00.0": {}}}), "is not a PCI address"),
        (
            _with({"gpus": {"0000:5d:00.0": {"module_id": 1}}}),
            "missing keys ['device_id', 'serial', 'source', 'uuid']",
        ),
        (
            _with(
                {
                    "gpus": {
                        a: {
                            "module_id": 1,
                            "device_id": H200,
                            "uuid": None,
                            "serial": None,
                            "source": "nvml",
                        }
                        for a in ("0000:5d:00.0", "0000:18:00.0")
                    }
                }
            ),
            "module 1 is at both 0000:5d:00.0 and 0000:18:00.0",
        ),
        (
            _with(
                {
                    "gpus": {
                        "0000:5d:00.0": {
                            "module_id": True,
                            "device_id": H200,
                            "uuid": None,
                            "serial": None,
                            "source": "nvml",
                        }
                    }
                }
            ),
            "module_id: must be an integer",
        ),
    ],
)
def test_damaged_file_names_file_problem_and_fix(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "node-inventory.json"
    path.write_text(text)
    with pytest.raises(InventoryFileError) as caught:
        load_inventory(path)
    assert problem in str(caught.value)
    assert str(path) in str(caught.value)
    assert "nvswitch-dp prepare-node" in str(caught.value)


def test_oversized_and_binary_files_are_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "node-inventory.json"
    path.write_bytes(b" " * (MAX_INVENTORY_BYTES + 1))
    with pytest.raises(InventoryFileError, match="larger than"):
        load_inventory(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(InventoryFileError, match="not UTF-8"):
        load_inventory(path)


def test_merge_records_new_gpus_and_keeps_those_the_driver_cannot_see() -> None:
    old = _inventory({1: ADDRESSES[1], 2: ADDRESSES[2]})
    found = [_identity(ADDRESSES[3], 3), _identity(ADDRESSES[4], 4)]
    merge = merge_discovered(old, found, {ADDRESSES[3]: H200, ADDRESSES[4]: H200})
    assert merge.inventory.module_map() == {m: ADDRESSES[m] for m in (1, 2, 3, 4)}
    assert merge.inventory.gpus[ADDRESSES[1]] == old.gpus[ADDRESSES[1]]  # on vfio-pci now
    assert merge.changes == (
        f"{ADDRESSES[3]}: module 3 recorded",
        f"{ADDRESSES[4]}: module 4 recorded",
    )


def test_merge_of_the_same_facts_changes_nothing() -> None:
    old = _inventory({1: ADDRESSES[1]})
    entry = old.gpus[ADDRESSES[1]]
    again = GpuIdentity(ADDRESSES[1], 1, entry.uuid, entry.serial, SOURCE_NVIDIA_SMI)
    merge = merge_discovered(old, [again], {ADDRESSES[1]: H200})
    assert merge.changes == ()
    assert merge.inventory.module_map() == old.module_map()


def test_a_reseated_gpu_is_read_again_and_the_change_said() -> None:
    old = _inventory({1: ADDRESSES[1]})
    merge = merge_discovered(old, [_identity(ADDRESSES[1], 5, "GPU-new")], {ADDRESSES[1]: H200})
    assert merge.inventory.module_map() == {5: ADDRESSES[1]}
    assert "was module 1" in merge.changes[0] and "now module 5" in merge.changes[0]


def test_merge_refuses_one_module_at_two_addresses() -> None:
    old = _inventory({1: ADDRESSES[1]})
    with pytest.raises(InventoryConflict, match=r"module 1 at 0000:18:00\.0 and 0000:5d:00\.0"):
        merge_discovered(old, [_identity(ADDRESSES[4], 1)], {ADDRESSES[4]: H200})


def test_merge_refuses_an_identity_without_module() -> None:
    with pytest.raises(ValueError, match="no module ID"):
        merge_discovered(None, [_identity(ADDRESSES[1], None)], {ADDRESSES[1]: H200})


PRESENT = {a: H200 for a in ADDRESSES.values()}


def test_inventory_is_the_map_when_the_configuration_has_none() -> None:
    r = resolve_module_map({}, _inventory(), PRESENT)
    assert (r.source, dict(r.module_map), dict(r.refused), r.problems) == (
        "inventory",
        ADDRESSES,
        {},
        (),
    )


def test_configuration_wins_and_nothing_without_either() -> None:
    r = resolve_module_map(ADDRESSES, None, PRESENT)
    assert (r.source, dict(r.module_map)) == ("config", ADDRESSES)
    r = resolve_module_map({}, None, PRESENT)
    assert (r.source, dict(r.module_map), r.problems) == ("none", {}, ())


def test_an_inventoried_address_with_no_gpu_refuses_only_that_module() -> None:
    present = {a: H200 for m, a in ADDRESSES.items() if m != 2}
    r = resolve_module_map({}, _inventory(), present)
    assert set(r.module_map) == {1, 3, 4}
    assert "no configured GPU is there now" in r.refused[2]
    assert ADDRESSES[2] in r.refused[2]


def test_a_changed_device_id_refuses_only_that_module() -> None:
    present = {**PRESENT, ADDRESSES[3]: "10de:2330"}
    r = resolve_module_map({}, _inventory(), present)
    assert set(r.module_map) == {1, 2, 4}
    assert "is 10de:2330 now, but the node inventory recorded 10de:2335" in r.refused[3]


def test_a_gpu_the_inventory_does_not_know_is_left_out_and_said() -> None:
    present = {**PRESENT, "0000:9a:00.0": H200}
    r = resolve_module_map({}, _inventory(), present)
    assert dict(r.module_map) == ADDRESSES
    assert r.problems == (
        "GPU 0000:9a:00.0 (10de:2335) is not in the node inventory and will not be served; "
        "run `nvswitch-dp prepare-node` with it on the nvidia driver",
    )


def test_a_configured_map_contradicting_the_inventory_refuses_those_modules() -> None:
    swapped = {**ADDRESSES, 1: ADDRESSES[2], 2: ADDRESSES[1]}
    r = resolve_module_map(swapped, _inventory(), PRESENT)
    assert set(r.refused) == {1, 2}
    assert dict(r.module_map) == {3: ADDRESSES[3], 4: ADDRESSES[4]}
    assert "but the driver reported module 2 there" in r.refused[1]
    moved = {**ADDRESSES, 4: "0000:9a:00.0"}
    r = resolve_module_map(moved, _inventory(), {**PRESENT, "0000:9a:00.0": H200})
    assert set(r.refused) == {4}
    assert "reported it at 0000:18:00.0" in r.refused[4]


@given(
    st.dictionaries(st.sampled_from(sorted(ADDRESSES.values())), st.integers(1, 8)),
    st.dictionaries(st.integers(1, 8), st.sampled_from(sorted(ADDRESSES.values()))),
    st.dictionaries(
        st.sampled_from(sorted(ADDRESSES.values())), st.sampled_from([H200, "10de:2330"])
    ),
)
def test_what_is_served_never_contradicts_the_inventory_or_the_node(
    recorded: dict[str, int], configured: dict[int, str], present: dict[str, str]
) -> None:
    if len(set(recorded.values())) != len(recorded) or len(set(configured.values())) != len(
        configured
    ):
        return  # the file and the configuration parsers refuse these
    inventory = NodeInventory({a: _entry(m) for a, m in recorded.items()})
    r = resolve_module_map(configured, inventory, present)
    for module, address in r.module_map.items():
        assert module not in r.refused
        entry = inventory.gpus.get(address)
        if entry is not None:
            assert entry.module_id == module  # never a module the driver contradicted
        if not configured:
            assert present.get(address) == H200  # the GPU recorded is the GPU there
    assert set(r.module_map) | set(r.refused) == set(configured or inventory.module_map())
