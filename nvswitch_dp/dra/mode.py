"""DRA mode: the daemon as a Dynamic Resource Allocation driver (``plugin.mode: dra``).

Before the shared start (:func:`nvswitch_dp.core.start_core`) the checkpoint of prepared
claims is read: its claims go into the node machine (their partitions are held, never
deactivated), and a checkpoint that cannot be read stops the start. Then this mode adds
its edges to the daemon's nursery::

    PoolPublisher.run          the node's ResourceSlices in the API server
    ClaimStatusWriter.run      status.devices of the claims prepared here
    serve_dra_plugin           DRAPlugin on dra.sock + Registration on <driver>-reg.sock;
                               served afresh when removed
    DraDriver.watch_orphans    unprepare claims the API server forgot

No PodResources polling and no release grace for claims: the kubelet's Unprepare
releases them. ``/readyz`` reports the kubelet's registration, the slices and FM.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from nvswitch_dp.api.schemas import fabric_problems
from nvswitch_dp.config import Config
from nvswitch_dp.controller import PartitionController
from nvswitch_dp.core import MachineFactory, Node, StartError, start_core
from nvswitch_dp.dra.cdi import CdiDirectory
from nvswitch_dp.dra.checkpoint import Checkpoint, CheckpointError, PreparedClaim
from nvswitch_dp.dra.claim_status import ClaimStatusWriter
from nvswitch_dp.dra.driver import DraDriver
from nvswitch_dp.dra.holder import ControllerHolder
from nvswitch_dp.dra.kube import KubeClient, KubeConfigError, load_config
from nvswitch_dp.dra.kubelet import RegistrationState, serve_dra_plugin
from nvswitch_dp.dra.metadata import DeviceMetadataFiles, published_attributes
from nvswitch_dp.dra.pool import PoolSource
from nvswitch_dp.dra.publish import PoolPublisher
from nvswitch_dp.dra.slices import PoolInputs, build_pool
from nvswitch_dp.fabric.platforms import PLATFORMS
from nvswitch_dp.fabric.types import FmReport
from nvswitch_dp.partitions.node import NodeMachine
from nvswitch_dp.partitions.state import OverlappingActive, StateError
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.partitions.view import Mode

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "dra-checkpoint.json"
CLOSE_GRACE_S = 2.0


def node_platform(config: Config, node: Node) -> str:
    """The ``platform`` attribute of the node's devices: the simulator's platform, else
    the known board whose GPU PCI device ID and GPU count match this node ("" if none)."""
    if config.fabric_manager.backend == "simulator":
        return config.fabric_manager.simulator_platform
    for slot in node.gpus.values():
        gpu = node.found.get(slot.pci_address)
        if gpu is None:
            continue
        for board in PLATFORMS.values():
            if board.gpu_device_id == gpu.device_id and board.gpu_count == len(node.gpus):
                return board.name
    return ""


@dataclass
class DraHealth:
    """What ``/readyz`` reports in DRA mode, filled in as the edges start."""

    registration: RegistrationState
    publisher: PoolPublisher | None = None
    controller: PartitionController | None = None

    def problems(self, list_window: float) -> list[str]:
        """Why the node is not ready: the kubelet has not registered the driver, the
        slices are not published as the node is, FM is unreachable, reports an
        impossible state or has failed every list for ``list_window`` seconds."""
        problems: list[str] = []
        if self.registration.problem is not None:
            problems.append(self.registration.problem)
        if self.publisher is None:
            problems.append("ResourceSlices not published yet")
        elif self.publisher.problem is not None:
            problems.append(self.publisher.problem)
        if self.controller is None:
            problems.append("the node is starting")
        else:
            node = self.controller.view()
            if not node.fabric_reachable:
                problems.append(f"Fabric Manager is unreachable: {node.fabric_problem}")
            problems += fabric_problems(node, now=trio.current_time(), list_window=list_window)
        return problems


async def load_prepared(checkpoint: Checkpoint) -> Mapping[str, PreparedClaim]:
    """The checkpoint's prepared claims, read once at start (the machine is built with
    their holdings, the driver starts from them). Raises :class:`StartError` when it
    cannot be read (the message names the file and the fix)."""
    try:
        checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
        return await trio.to_thread.run_sync(checkpoint.load)
    except (CheckpointError, OSError) as exc:
        raise StartError(str(exc)) from None


def claims_machine(
    config: Config, checkpoint: Checkpoint, claims: Mapping[str, int]
) -> MachineFactory:
    """The machine factory of DRA mode: the checkpoint's claims are held from the first
    event on, so nothing the machine decides at start can deactivate a prepared
    partition. A claim naming a partition FM does not have is a :class:`StartError`."""

    def build(table: PartitionTable, report: FmReport, now: float, prefix: str) -> NodeMachine:
        grace = config.plugin.release_grace_seconds
        try:
            return NodeMachine(table, report, now, grace=grace, mode=Mode.DRA, claims=claims)
        except OverlappingActive:
            raise
        except StateError as exc:
            raise StartError(
                f"checkpoint {checkpoint.path} names a partition Fabric Manager does not "
                f"report ({exc}); is this the node that wrote it?"
            ) from None

    return build


async def start_dra(
    config: Config, nursery: trio.Nursery, stopping: list[Callable[[], None]]
) -> PartitionController:
    """Start DRA mode in ``nursery``; the controller once the kubelet's sockets are
    served (the first publishing round has ended, published or not: the API server may
    be down, which ``/readyz`` reports). ``stopping``: see
    :func:`~nvswitch_dp.core.start_core`.

    Errors: :class:`StartError` for no node name, no usable kubeconfig, a checkpoint
    that cannot be read or names partitions FM does not have.
    """
    dra = config.dra
    if dra.node_name is None:  # the CLI checks this; a caller building Config may not
        raise StartError("DRA mode needs dra.node_name (--node-name or NODE_NAME)")
    try:
        kube_config = load_config(dra.kubeconfig)
    except KubeConfigError as exc:
        raise StartError(str(exc)) from None
    checkpoint = Checkpoint(Path(config.state_dir) / CHECKPOINT_FILE)
    prepared = await load_prepared(checkpoint)
    claims = {uid: entry.partition_id for uid, entry in prepared.items()}
    health = DraHealth(RegistrationState())
    window = config.fabric_manager.list_failure_window_seconds

    async def held() -> set[int]:
        return set(claims.values())

    controller, node = await start_core(
        config,
        nursery,
        held=held,
        machine_for=claims_machine(config, checkpoint, claims),
        stopping=stopping,
        readiness=lambda: health.problems(window),
    )
    health.controller = controller
    log.info(
        "DRA driver %s on node %s, %d prepared claims in the checkpoint",
        dra.driver_name,
        dra.node_name,
        len(claims),
    )
    kube = KubeClient(kube_config)
    nursery.start_soon(_close_on_exit, kube.aclose)
    await _start_edges(config, nursery, controller, node, kube, checkpoint, prepared, health)
    return controller


async def _start_edges(
    config: Config,
    nursery: trio.Nursery,
    controller: PartitionController,
    node: Node,
    kube: KubeClient,
    checkpoint: Checkpoint,
    prepared: Mapping[str, PreparedClaim],
    health: DraHealth,
) -> None:
    """The DRA driver, its slices, its claims' status and the kubelet's sockets."""
    dra = config.dra
    node_name = dra.node_name or ""
    cdi = CdiDirectory(dra.cdi_dir)
    await trio.to_thread.run_sync(cdi.discard_partial_writes)
    platform_name = node_platform(config, node)
    plugin_dir = Path(dra.plugin_directory)
    table = controller.view().table
    # The metadata files carry each device's attributes as published on a healthy
    # node: what a device is does not change with its health.
    healthy = PoolInputs(node_name, dra.driver_name, platform_name, table, node.gpus, {}, {})
    metadata = DeviceMetadataFiles(
        plugin_dir / "metadata",
        driver=dra.driver_name,
        pool=node_name,
        attributes=published_attributes(build_pool(healthy, 0)),
    )
    driver = DraDriver(
        driver_name=dra.driver_name,
        node_name=node_name,
        table=table,
        holder=ControllerHolder(controller),
        claims=kube,
        cdi=cdi,
        checkpoint=checkpoint,
        metadata=metadata,
    )
    await driver.start(prepared)
    source = PoolSource(
        view=controller.view,
        layout=controller.layout,
        wait_changed=controller.wait_changed,
        node_name=node_name,
        driver=dra.driver_name,
        platform=platform_name,
    )
    health.publisher = PoolPublisher(kube, source.inputs, source.wait_for_change)
    await nursery.start(health.publisher.run)
    claim_status = ClaimStatusWriter(
        kube,
        driver=dra.driver_name,
        pool=node_name,
        gpus=controller.layout.gpus,
        prepared=lambda: driver.prepared,
        view=controller.view,
        wait_changed=controller.wait_changed,
    )
    driver.on_change = claim_status.notify
    await nursery.start(claim_status.run)
    registry = Path(dra.plugin_registry_dir)
    serve = partial(serve_dra_plugin, driver, registry_dir=registry, plugin_dir=plugin_dir)
    await nursery.start(partial(serve, state=health.registration))
    await nursery.start(driver.watch_orphans)


async def _close_on_exit(close: Callable[[], Awaitable[None]]) -> None:
    """Sleep until cancelled, then run ``close`` shielded, within :data:`CLOSE_GRACE_S`."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE_S):
            await close()
