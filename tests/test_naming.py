"""Resource names follow the platform (partitions/naming.py): the model token of every
GPU name the project knows, the configured prefix kept as is, and the fallback."""

from __future__ import annotations

import logging

import pytest

from nvswitch_dp.fabric.platforms import PLATFORMS
from nvswitch_dp.fabric.types import FmGpu, FmPartition, FmReport
from nvswitch_dp.partitions.effects import Deactivate
from nvswitch_dp.partitions.naming import (
    FALLBACK_PREFIX,
    is_former_name,
    may_be_ours,
    model_token,
    resource_prefix,
)
from nvswitch_dp.partitions.node import NodeMachine
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.plugin.pod_resources import assigned_partitions, our_resources
from nvswitch_dp.ports import PodDevices
from nvswitch_dp.vfio.pci_ids import GPU_DEVICE_IDS


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("H200 SXM 141GB", "h200"),
        ("H200 NVL", "h200"),
        ("HGX B200", "b200"),
        ("B200", "b200"),
        ("H20 HBM3e", "h20"),
        ("H800", "h800"),
        ("A100 SXM4 80GB", "a100"),
        ("H100 SXM5 94GB", "h100"),
        ("some accelerator", None),
    ],
)
def test_model_token(name: str, token: str | None) -> None:
    assert model_token(name) == token


def test_every_known_gpu_has_a_model() -> None:
    assert all(model_token(name) for name in GPU_DEVICE_IDS.values())


def test_h200_names_are_unchanged_and_b200_gets_its_own() -> None:
    def prefix_of(platform: str) -> str:
        key = f"10de:{PLATFORMS[platform].gpu_device_id}"
        return resource_prefix("auto", [GPU_DEVICE_IDS[key]])

    assert prefix_of("hgx-h200") == "nvidia.com/gpu-h200"
    assert prefix_of("hgx-b200") == "nvidia.com/gpu-b200"
    assert prefix_of("hgx-h100") == "nvidia.com/gpu-h100"


def test_a_configured_prefix_is_used_as_is() -> None:
    assert resource_prefix("example.com/gpu", ["HGX B200"]) == "example.com/gpu"


def test_no_model_falls_back_and_says_how_to_name_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert resource_prefix("auto", []) == FALLBACK_PREFIX
    assert "plugin.resource_prefix" in caplog.text
    assert "no GPU found in sysfs" in caplog.text


def test_pods_admitted_under_the_former_default_names_keep_their_partition() -> None:
    """A B200 node upgraded in place: its resources become gpu-b200-*, but a VM admitted
    before holds nvidia.com/gpu-h200-2x; its partition stays held, never deactivated."""
    rows = [(pid, modules) for pid, modules, _ in PLATFORMS["hgx-b200"].rows]
    table = PartitionTable.from_rows(rows)
    report = FmReport(
        tuple(
            FmPartition(pid, pid == 4, tuple(FmGpu(m, 18, 18) for m in table[pid].sorted_modules))
            for pid in sorted(table.ids)
        )
    )
    prefix = resource_prefix("auto", ["HGX B200"])
    resources = {f"{prefix}-{size}x" for size in table.sizes}
    machine = NodeMachine(table, report, 0.0, grace=30.0, resources=resources)
    holdings = [PodDevices("ns", "vm", "c", "nvidia.com/gpu-h200-2x", ("partition-4",))]
    ours = our_resources(resources)
    for now in (1.0, 40.0, 100.0):
        machine.pod_resources(assigned_partitions(ours, holdings), now)
    assert not any(isinstance(e, Deactivate) for e in machine.take_effects())
    assert machine.snapshot().partitions[4].in_use
    # Names of other plugins are not ours; a name like ours counts only at start.
    assert not ours("nvidia.com/gpu") and not ours("example.com/gpu-b200-2x")
    assert may_be_ours("example.com/gpu-b200-2x") and not may_be_ours("nvidia.com/gpu")
    assert is_former_name("nvidia.com/gpu-h200-16x") and not is_former_name(f"{prefix}-2x")
