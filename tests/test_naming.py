"""Resource names follow the platform (partitions/naming.py): the model token of every
GPU name the project knows, the configured prefix kept as is, and the fallback."""

from __future__ import annotations

import logging

import pytest

from nvswitch_dp.fabric.platforms import PLATFORMS
from nvswitch_dp.partitions.naming import FALLBACK_PREFIX, model_token, resource_prefix
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
