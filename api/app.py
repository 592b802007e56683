"""The REST control API: inventory, health, readiness, metrics.

Ownership: the app borrows the daemon's :class:`PartitionController`; it never touches
the partition book except through it. Every route here is described in ``openapi.yaml``.
"""

from __future__ import annotations

from typing import Any

from quart import Response, jsonify
from quart_trio import QuartTrio

from nvswitch_dp.controller import PartitionController
from nvswitch_dp.partitions.state import PartitionView

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def partition_json(controller: PartitionController, view: PartitionView) -> dict[str, Any]:
    partition = view.partition
    return {
        "id": partition.partition_id,
        "device_id": partition.device_id,
        "resource": controller.resource_of(partition),
        "size": partition.size,
        "modules": list(partition.sorted_modules),
        "pci_addresses": [
            controller.gpus[m].pci_address for m in partition.sorted_modules if m in controller.gpus
        ],
        "state": view.state.value,
        "phase": view.phase.value,
        "in_use": view.in_use,
        "healthy": view.healthy,
        "blocked_by": view.blocker,
        "fault": view.fault,
    }


def readiness_problems(controller: PartitionController) -> list[str]:
    """Why the daemon is not ready (empty when it is)."""
    problems = [
        f"{resource} is not registered with the kubelet"
        for resource, registered in sorted(controller.registered.items())
        if not registered
    ]
    if not controller.fabric_reachable:
        problems.append(f"Fabric Manager is unreachable: {controller.fabric_problem}")
    return problems


def create_app(controller: PartitionController) -> QuartTrio:
    """The ASGI app serving ``controller``'s node."""
    app = QuartTrio("nvswitch_dp")

    @app.get("/v1/partitions")
    async def list_partitions() -> Response:
        return jsonify(
            {"partitions": [partition_json(controller, v) for v in controller.book.views()]}
        )

    @app.get("/healthz")
    async def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response | tuple[Response, int]:
        problems = readiness_problems(controller)
        body = jsonify({"ready": not problems, "problems": problems})
        return (body, 503) if problems else body

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(controller.metrics.exposition(), content_type=PROMETHEUS_CONTENT_TYPE)

    return app
