"""Device-plugin mode: the node's partitions as kubelet device-plugin resources.

After the shared start (:func:`nvswitch_dp.core.start_core`), this mode adds its edges to
the daemon's nursery::

    watch_pod_resources     PodResources readings -> the machine (it decides releases)
    serve_resource x N      one grpclib server + registration per partition size

At start, a restarted FM is resumed with the partitions PodResources shows held; whatever
FM has active is held until PodResources says otherwise (rule N6 in
``partitions/node.py``), so nothing a pod may use is deactivated by a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio

from nvswitch_dp.config import Config
from nvswitch_dp.controller import PartitionController
from nvswitch_dp.core import start_core
from nvswitch_dp.fabric.types import FmReport
from nvswitch_dp.partitions.node import NodeMachine
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.plugin.lifecycle import serve_resource
from nvswitch_dp.plugin.pod_resources import (
    GrpcPodResourcesClient,
    partitions_held,
    release_check_interval,
    watch_pod_resources,
)

log = logging.getLogger(__name__)


async def start_device_plugin(
    config: Config, nursery: trio.Nursery, stopping: list[Callable[[], None]]
) -> PartitionController:
    """Start the device-plugin mode in ``nursery``; the controller once every resource
    serves (registration with the kubelet goes on in the background). ``stopping``: see
    :func:`~nvswitch_dp.core.start_core`.

    Errors: :class:`~nvswitch_dp.core.StartError` from the shared start; ``OSError``
    when the plugin directory cannot be created.
    """
    pods = GrpcPodResourcesClient(Path(config.plugin.pod_resources_socket))
    grace = config.plugin.release_grace_seconds

    def machine_for(
        table: PartitionTable, report: FmReport, now: float, prefix: str
    ) -> NodeMachine:
        # Whatever FM has active may be in use: held until PodResources says otherwise.
        resources = [f"{prefix}-{size}x" for size in table.sizes]
        return NodeMachine(table, report, now, grace=grace, resources=resources)

    controller, _ = await start_core(
        config,
        nursery,
        held=lambda: partitions_held(pods),
        machine_for=machine_for,
        stopping=stopping,
    )
    resources = controller.layout.resources
    log.info("serving %s", ", ".join(resources))
    await nursery.start(watch_pod_resources, controller, pods, release_check_interval(grace))
    plugin_dir = Path(config.plugin.directory)
    plugin_dir.mkdir(parents=True, exist_ok=True)
    for resource in resources:
        await nursery.start(serve_resource, controller, resource, plugin_dir, controller.metrics)
    return controller
