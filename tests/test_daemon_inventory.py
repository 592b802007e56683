"""The daemon's start-up join of FM's modules with sysfs, when the module map comes from
the node inventory: every disagreement refuses exactly its GPU, with the reason, and the
other GPUs are served (``nvswitch_dp.daemon.discover_node`` on a simulated H200)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvswitch_dp.config import Config, with_overrides
from nvswitch_dp.core import StartError, discover_node
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.fabric.types import FmGpu, FmPartition, FmReport
from nvswitch_dp.vfio.identity import SOURCE_NVML
from nvswitch_dp.vfio.inventory import INVENTORY_FILE, InventoryEntry, NodeInventory, save_inventory
from nvswitch_dp.vfio.simulate import build_simulated_node
from nvswitch_dp.vfio.simulate.faults import remove_device
from nvswitch_dp.vfio.simulate.node import SimulatedNode

H200 = platform("hgx-h200")
REPORT = FmReport(
    tuple(
        FmPartition(pid, False, tuple(FmGpu(m, links, links) for m in modules))
        for pid, modules, links in H200.rows
    )
)


@pytest.fixture
def node(tmp_path: Path) -> SimulatedNode:
    return build_simulated_node(tmp_path / "node", H200)  # every GPU on vfio-pci


def config_for(
    tmp_path: Path, node: SimulatedNode, module_map: dict[int, str] | None = None
) -> Config:
    return with_overrides(
        Config(),
        {
            "state_dir": str(tmp_path / "state"),
            "vfio.sysfs_root": str(node.sysfs_root),
            "vfio.dev_root": str(node.dev_root),
            "module_map": module_map or {},
        },
    )


def record(tmp_path: Path, node: SimulatedNode, **device_ids: str) -> None:
    """The inventory prepare-node would have written for ``node`` (``device_ids``:
    module name ``m3`` -> another recorded device ID)."""
    gpus = {
        address: InventoryEntry(
            module, device_ids.get(f"m{module}", "10de:2335"), f"GPU-{module}", None, SOURCE_NVML
        )
        for module, address in node.module_map.items()
    }
    save_inventory(tmp_path / "state" / INVENTORY_FILE, NodeInventory(gpus))


def test_every_module_is_served_from_the_inventory(tmp_path: Path, node: SimulatedNode) -> None:
    record(tmp_path, node)
    served = discover_node(config_for(tmp_path, node), REPORT)
    assert served.unmapped == {}
    assert {m: s.pci_address for m, s in served.gpus.items()} == dict(node.module_map)


def test_a_gpu_gone_from_its_inventoried_address_is_refused_alone(
    tmp_path: Path, node: SimulatedNode
) -> None:
    record(tmp_path, node)
    remove_device(node, node.module_map[6])
    served = discover_node(config_for(tmp_path, node), REPORT)
    assert set(served.gpus) == {1, 2, 3, 4, 5, 7, 8}
    assert "no configured GPU is there now" in served.unmapped[6]


def test_a_changed_device_id_is_refused_alone(tmp_path: Path, node: SimulatedNode) -> None:
    record(tmp_path, node, m2="10de:2330")
    served = discover_node(config_for(tmp_path, node), REPORT)
    assert set(served.gpus) == {1, 3, 4, 5, 6, 7, 8}
    assert "recorded 10de:2330" in served.unmapped[2]


def test_a_configured_map_contradicting_the_inventory_refuses_those_modules(
    tmp_path: Path, node: SimulatedNode
) -> None:
    record(tmp_path, node)
    swapped = {**node.module_map, 1: node.module_map[2], 2: node.module_map[1]}
    served = discover_node(config_for(tmp_path, node, swapped), REPORT)
    assert set(served.gpus) == {3, 4, 5, 6, 7, 8}
    assert "module_map puts module 1" in served.unmapped[1]


def test_no_map_and_no_inventory_serves_nothing_and_says_what_to_run(
    tmp_path: Path, node: SimulatedNode
) -> None:
    served = discover_node(config_for(tmp_path, node), REPORT)
    assert served.gpus == {}
    assert "run `nvswitch-dp prepare-node`" in served.unmapped[1]


def test_a_damaged_inventory_stops_the_start_unless_module_map_is_set(
    tmp_path: Path, node: SimulatedNode
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / INVENTORY_FILE).write_text("{}")
    with pytest.raises(StartError, match=r"node inventory .* must be an object with exactly"):
        discover_node(config_for(tmp_path, node), REPORT)
    served = discover_node(config_for(tmp_path, node, dict(node.module_map)), REPORT)
    assert len(served.gpus) == 8
