"""``nvswitch-dp status``'s rendering (pure): faults, drains and blockers are visible."""

from __future__ import annotations

from typing import Any

from nvswitch_dp.status import render

R = "nvidia.com/gpu-h200"


def gpu(module: int, **changes: Any) -> dict[str, Any]:
    base = {
        "module": module, "pci_address": f"0000:{module:02x}:00.0", "iommu_group": module,
        "numa_node": 0, "driver": "vfio-pci", "healthy": True, "fault": None,
        "drained": False, "partitions": [],
    }  # fmt: skip
    return {**base, **changes}


def partition(pid: int, modules: list[int], state: str, **changes: Any) -> dict[str, Any]:
    base = {
        "id": pid, "device_id": f"partition-{pid}", "resource": f"{R}-{len(modules)}x",
        "size": len(modules), "modules": modules, "state": state, "blocked_by": None,
        "fault": None,
    }  # fmt: skip
    return {**base, **changes}


NODE = {
    "platform": {"gpu_model": None, "gpu_count": 2, "partition_sizes": [1, 2], "simulated": None},
    "fabric_manager": {"backend": "fmpm", "reachable": False, "problem": "TIMEOUT"},
    "resources": [{"registered": True}, {"registered": False}],
    "pod_resources": {"reachable": None},
    "ready": False,
    "problems": ["Fabric Manager is unreachable: TIMEOUT"],
}


def test_render_shows_faults_drains_blockers_and_readiness() -> None:
    out = render(
        NODE,
        [gpu(1, healthy=False, fault="Xid 79"), gpu(2, drained=True)],
        [
            partition(0, [1, 2], "unhealthy", fault="GPU 1: Xid 79"),
            partition(1, [1], "unhealthy"),
            partition(2, [2], "blocked", blocked_by=7),
        ],
    )
    assert "Fabric Manager (fmpm): UNREACHABLE: TIMEOUT" in out
    assert "1/2 resources registered" in out and "PodResources: not consulted yet" in out
    assert "NOT READY: Fabric Manager is unreachable" in out
    assert "FAULT: Xid 79" in out and "ok (drained)" in out
    lines = out.splitlines()
    assert next(line for line in lines if line.startswith("health")).split() == ["health", "✗", "D"]
    row = next(line for line in lines if line.startswith("partition-0 "))
    assert "█  █  UNHEALTHY" in row and "fault: GPU 1: Xid 79" in row
    assert "·  █  blocked" in next(line for line in lines if line.startswith("partition-2 "))
    assert "blocked by partition-7" in out
