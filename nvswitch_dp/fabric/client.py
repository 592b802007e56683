"""Building the Fabric Manager client the configuration names.

Kept apart from the daemon so that read-only commands (``nvswitch-dp doctor``) can reach
FM without importing the daemon and its HTTP stack (Hypercorn, Quart). The fmpm and
libnvfm backends are imported only when chosen: libnvfm loads a shared library.
"""

from __future__ import annotations

from pathlib import Path

from nvswitch_dp.config import Config
from nvswitch_dp.fabric.simulator import SimulatedFabricManager, SimulatorStore
from nvswitch_dp.ports import FabricManagerClient


def build_fabric_client(config: Config) -> FabricManagerClient:
    """The FM backend the configuration names."""
    fm = config.fabric_manager
    if fm.backend == "simulator":
        store = SimulatorStore(
            Path(config.state_dir) / "fabricmanager.state", fm.simulator_platform
        )
        return SimulatedFabricManager(store)
    if fm.backend == "fmpm":
        from nvswitch_dp.fabric.fmpm import FmpmFabricManager

        return FmpmFabricManager(
            command=[fm.fmpm_path],
            endpoint=fm.endpoint,
            timeout=fm.timeout_seconds,
            retries=fm.retries,
            state_dir=Path(config.state_dir),  # fmpm runs a killed daemon left are killed
        )
    from nvswitch_dp.fabric.libnvfm import LibnvfmFabricManager

    return LibnvfmFabricManager(
        library=fm.libnvfm_path, endpoint=fm.endpoint, timeout=fm.timeout_seconds
    )
