"""Fixtures shared by the test modules. Keep each small; helpers go in their own modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from sysfs_helpers import FakeSysfs

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.vfio.simulate import build_simulated_node
from nvswitch_dp.vfio.simulate.node import SimulatedNode


@pytest.fixture
def fake_sysfs(tmp_path: Path) -> FakeSysfs:
    """Factory: ``fake_sysfs()`` writes a simulated HGX H200 node (sysfs + /dev) under
    ``tmp_path``; ``fake_sysfs("hgx-a100-16", name="b")`` another platform or a second node.
    Inject faults with the helpers in :mod:`nvswitch_dp.vfio.simulate.faults`."""

    def build(platform_name: str = "hgx-h200", *, name: str = "node") -> SimulatedNode:
        return build_simulated_node(tmp_path / name, platform(platform_name))

    return build
