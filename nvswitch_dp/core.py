"""The start-up both modes share, and the tasks both run: config -> FM -> node -> machine.

:func:`start_core` is the one start: it builds the FM client (``fabric/client.py``), waits
for FM's first report (resuming a restarted FM with what the mode says is held), joins
FM's module IDs with the GPUs in sysfs, builds the node machine the mode asks for, and
starts, in the daemon's nursery, the tasks every mode needs::

    run_effects          every FM call the node machine asks for
    serve_api            the REST API (nvswitch_dp/api/server.py)
    supervise_fabric     list FM every period (at once on trouble)
    watch_gpu_health     VFIO state of every GPU

The modes (``plugin/mode.py``, ``dra/mode.py``) then start their own edges. Every
decision is the node machine's (``partitions/node.py``); these tasks only feed it events
and run its effects.

Errors: :class:`StartError` when the node cannot be served as configured (FM reports
overlapping partitions active, an unreadable node inventory, a mode's own reasons); the
daemon logs its message as one ``cannot start:`` line and exits 1.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import hypercorn.config
import trio

from nvswitch_dp.api.app import create_app
from nvswitch_dp.api.server import ConnectionGate, rest_config, serve_api
from nvswitch_dp.config import ApiConfig, Config
from nvswitch_dp.controller import PartitionController
from nvswitch_dp.fabric.client import build_fabric_client
from nvswitch_dp.fabric.types import FabricManagerError, FmNotConfigured, FmReport
from nvswitch_dp.limits import open_fd_count, rest_connection_limit
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.layout import GpuSlot
from nvswitch_dp.partitions.naming import resource_prefix
from nvswitch_dp.partitions.node import NodeMachine, resume_list_at_start
from nvswitch_dp.partitions.state import OverlappingActive
from nvswitch_dp.partitions.table import PartitionTable
from nvswitch_dp.partitions.units import allocation_unit
from nvswitch_dp.ports import FabricManagerClient
from nvswitch_dp.vfio.discovery import PciGpu, build_inventory, discover_gpus, vfio_problem
from nvswitch_dp.vfio.inotify import DirectoryWatch
from nvswitch_dp.vfio.inventory import (
    INVENTORY_FILE,
    InventoryFileError,
    ModuleResolution,
    load_inventory,
    resolve_module_map,
)

log = logging.getLogger(__name__)

FM_START_BACKOFF_MAX_S = 5.0
# How long to wait for PodResources before resuming a restarted FM blind (FM exits 60 s
# after its restart unless told which partitions are still active).
FM_RESUME_PATIENCE_S = 30.0


class StartError(Exception):
    """The daemon cannot start as configured; the message says what is wrong and what
    to do. The daemon logs it as one ``cannot start:`` line and exits 1."""


@dataclass(frozen=True)
class Node:
    """What the daemon learned at start about the GPUs FM names."""

    gpus: dict[int, GpuSlot]
    unmapped: dict[int, str]  # module ID -> why it has no usable PCI function
    found: Mapping[str, PciGpu]  # every GPU sysfs showed, by PCI address

    def model(self) -> str | None:
        """The marketing name of the node's GPUs (the first served one's), if any."""
        for slot in self.gpus.values():
            gpu = self.found.get(slot.pci_address)
            if gpu is not None:
                return gpu.name
        return None


# FM's table, its first report, the time and the resource prefix -> the mode's machine.
MachineFactory = Callable[[PartitionTable, FmReport, float, str], NodeMachine]
HeldPartitions = Callable[[], Awaitable[set[int] | None]]


async def first_report(
    fabric: FabricManagerClient,
    held: Callable[[], Awaitable[set[int] | None]],
    *,
    patience: float = FM_RESUME_PATIENCE_S,
) -> FmReport:
    """FM's table, waiting for FM as long as it takes (it may still be starting).

    If FM was restarted while we were down it refuses to list until someone names the
    partitions still active; ``held`` says which (from PodResources, or the DRA
    checkpoint), and :func:`~nvswitch_dp.partitions.node.resume_list_at_start` decides
    what to tell FM, naming none after ``patience`` seconds rather than let FM exit.
    """
    delay = 0.1
    not_configured_since: float | None = None
    while True:
        try:
            return await fabric.list_partitions()
        except FmNotConfigured as exc:
            now = trio.current_time()
            not_configured_since = not_configured_since or now
            holdings = await held()
            ids = resume_list_at_start(holdings, now - not_configured_since, patience)
            if ids is None:
                log.warning("%s; holdings unreadable, cannot resume it yet", exc)
            else:
                if holdings is None:
                    log.error("holdings still unreadable: resuming FM with no partition")
                log.warning("Fabric Manager restarted; set-activated %s", list(ids))
                try:
                    await fabric.set_activated(ids)
                except FabricManagerError as set_exc:
                    log.error("set-activated failed: %s", set_exc)
        except FabricManagerError as exc:
            log.warning("Fabric Manager not answering yet (%s); retrying in %.1fs", exc, delay)
        await trio.sleep(delay)
        delay = min(delay * 2, FM_START_BACKOFF_MAX_S)


def node_module_map(config: Config, found: Sequence[PciGpu]) -> ModuleResolution:
    """The module map to serve with: ``module_map`` from the configuration when set,
    else the node inventory ``prepare-node`` wrote, checked against ``found``
    (:func:`~nvswitch_dp.vfio.inventory.resolve_module_map` says what is refused).

    Errors: :class:`StartError` when the configuration sets no ``module_map`` and the
    inventory exists but cannot be read (the daemon would otherwise serve a node whose
    GPUs it cannot name). With a ``module_map``, a damaged inventory is logged and the
    configuration is used unchecked.
    """
    path = Path(config.state_dir) / INVENTORY_FILE
    try:
        inventory = load_inventory(path)
    except (InventoryFileError, OSError) as exc:
        if not config.module_map:
            raise StartError(str(exc)) from None
        log.error("%s; using module_map from the configuration unchecked", exc)
        inventory = None
    present = {g.address: g.key for g in found}
    resolution = resolve_module_map(config.module_map, inventory, present)
    if resolution.source == "inventory":
        log.info(
            "module map from the node inventory %s: %s",
            path,
            dict(sorted(resolution.module_map.items())),
        )
    for problem in resolution.problems:
        log.error("%s", problem)
    return resolution


def find_gpus(config: Config) -> Sequence[PciGpu]:
    """The GPUs sysfs shows whose ``vendor:device`` is in ``vfio.gpu_device_ids``
    (synchronous I/O; the daemon's one scan at start)."""
    sysfs, dev = Path(config.vfio.sysfs_root), Path(config.vfio.dev_root)
    return discover_gpus(sysfs, dev, config.vfio.gpu_device_ids)


def discover_node(config: Config, report: FmReport, found: Sequence[PciGpu] | None = None) -> Node:
    """Join FM's module IDs with the GPUs ``found`` in sysfs (scanned now when None).

    Errors: :class:`StartError` from :func:`node_module_map`.
    """
    found = find_gpus(config) if found is None else found
    resolution = node_module_map(config, found)
    # Lenient: a GPU that fell off the bus must not take its healthy neighbours down;
    # its partitions turn Unhealthy instead.
    inventory = build_inventory(resolution.module_map, found, strict=False)
    for warning in inventory.warnings:
        log.warning("%s", warning)
    gpus: dict[int, GpuSlot] = {}
    unmapped: dict[int, str] = {}
    modules = sorted({g.physical_id for p in report.partitions for g in p.gpus})
    for module in modules:
        gpu = inventory.gpus.get(module)
        if module in resolution.refused:
            unmapped[module] = resolution.refused[module]
        elif module in inventory.missing:
            unmapped[module] = inventory.missing[module]
        elif gpu is None:
            unmapped[module] = (
                f"module {module} has no PCI address: {_NO_ADDRESS[resolution.source]}"
            )
        elif gpu.iommu_group is None:
            unmapped[module] = f"GPU {gpu.address} has no IOMMU group (is the IOMMU on?)"
        else:
            gpus[module] = GpuSlot(module, gpu.address, gpu.iommu_group, gpu.numa_node)
    return Node(gpus, unmapped, {g.address: g for g in found})


_NO_ADDRESS = {
    "config": "not in module_map",
    "inventory": "not in the node inventory (run `nvswitch-dp prepare-node`)",
    "none": "no module_map in the configuration and no node inventory (run "
    "`nvswitch-dp prepare-node` with the GPUs on the nvidia driver)",
}


async def start_core(
    config: Config,
    nursery: trio.Nursery,
    *,
    held: HeldPartitions,
    machine_for: MachineFactory,
    stopping: list[Callable[[], None]],
    readiness: Callable[[], Sequence[str]] | None = None,
) -> tuple[PartitionController, Node]:
    """The shared start (module docstring): returns the running controller and the node.

    ``held`` says which partitions are in use when FM must be resumed at start;
    ``machine_for`` builds the mode's node machine from FM's table, its first report and
    the resource prefix (raising ``StateError`` subclasses, which a mode may translate);
    what must run when a stop signal comes (closing the change feed) is appended to
    ``stopping`` as soon as it exists; ``readiness`` replaces the REST API's ``/readyz``
    check (DRA mode). Raises :class:`StartError` (see the module docstring).
    """
    fabric = build_fabric_client(config)
    report = await first_report(fabric, held)
    # Sysfs is read once FM has answered (it may have waited long: GPUs bound meanwhile
    # count), and names the resources (plugin.resource_prefix: auto).
    found = find_gpus(config)
    prefix = resource_prefix(config.plugin.resource_prefix, (g.name for g in found))
    node = discover_node(config, report, found)
    table = PartitionTable.from_report(report)
    try:
        machine = machine_for(table, report, trio.current_time(), prefix)
    except OverlappingActive as exc:
        raise StartError(overlap_refusal(exc)) from None
    controller = build_controller(config, machine, fabric, node, prefix)
    stopping.append(controller.feed.close)
    log.info("Fabric Manager (%s) reports %d partitions", fabric.name, len(table))
    await nursery.start(controller.run_effects)
    rest_rate = config.api.requests_per_second or None
    app = create_app(
        controller, controller.metrics, config, rest_rate=rest_rate, readiness=readiness
    )
    gate = connection_gate(config.api, controller.metrics)
    await nursery.start(serve_api, app, api_config(config.api), gate)
    interval = config.fabric_manager.reconcile_interval_seconds
    await nursery.start(supervise_fabric, controller, interval)
    await nursery.start(watch_gpu_health, controller, config, config.vfio.health_interval_seconds)
    return controller, node


def build_controller(
    config: Config,
    machine: NodeMachine,
    fabric: FabricManagerClient,
    node: Node,
    resource_prefix: str,
) -> PartitionController:
    """The controller over ``machine``, configured by ``config``; GPUs without a usable
    PCI function are recorded as faults at once (their partitions leave the pool)."""
    fm = config.fabric_manager
    controller = PartitionController(
        machine,
        fabric,
        node.gpus,
        resource_prefix=resource_prefix,
        dev_root=Path(config.vfio.dev_root),
        metrics=Metrics(),
        unit=allocation_unit(config.plugin.allocation_unit),
        call_deadline=call_deadline(fm.timeout_seconds, fm.retries),
        gpu_model=node.model(),
    )
    for module, reason in node.unmapped.items():
        log.error("GPU module %d: %s", module, reason)
        controller.set_gpu_fault(module, reason)
    return controller


def call_deadline(timeout: float, retries: int) -> float:
    """The runner's backstop for one FM call: every attempt's timeout plus backoff."""
    return timeout * (retries + 1) + 5.0 * (retries + 1)


def overlap_refusal(exc: OverlappingActive) -> str:
    """The refusal to start when FM reports overlapping partitions active: nothing is
    deactivated (either may be a VM's), the operator decides."""
    return (
        f"{exc} (Fabric Manager itself forbids this, so its state is damaged); nothing was "
        "deactivated. Find which one a VM uses, deactivate the other with `fmpm -d ID` "
        "(or restart Fabric Manager), then start the daemon again"
    )


async def supervise_fabric(
    controller: PartitionController,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ask the machine to supervise FM every ``interval`` seconds, at once when an FM
    call anywhere reports trouble, and every second while the trouble lasts (rule N7).

    Error handling: none to do; FM errors are outcomes the machine takes in.
    """
    task_status.started()
    while True:
        await controller.wait_supervision(interval)
        controller.supervise()


async def watch_gpu_health(
    controller: PartitionController,
    config: Config,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep each GPU's VFIO state in the book; a problem makes its partitions Unhealthy.

    Event-driven for ``/dev/vfio`` (inotify: a group node removed or created is seen at
    once), polled every ``interval`` for what sysfs gives no events for (driver
    bindings, group membership). When inotify is unavailable it only polls.
    """
    sysfs, dev = Path(config.vfio.sysfs_root), Path(config.vfio.dev_root)

    def check_all() -> None:
        for module, slot in controller.layout.gpus.items():
            controller.set_gpu_fault(module, vfio_problem(sysfs, dev, slot.pci_address))

    try:
        watch: DirectoryWatch | None = DirectoryWatch.open(dev / "vfio")
    except OSError as exc:
        log.warning("no inotify on %s (%s); polling every %.1fs", dev / "vfio", exc, interval)
        watch = None
    try:
        check_all()
        task_status.started()
        while True:
            with trio.move_on_after(interval):
                if watch is not None:
                    await watch.wait()
                else:
                    await trio.sleep_forever()
            check_all()
    finally:
        if watch is not None:
            watch.close()


def api_config(api: ApiConfig) -> hypercorn.config.Config:
    """Hypercorn's configuration for the REST API: ``api.listen``, and TLS when
    ``api.tls_cert_file``/``api.tls_key_file`` are set (the config parser ensures both or
    neither). A missing or bad certificate fails the daemon's start (``OSError`` /
    ``ssl.SSLError`` from Hypercorn), never a silent fallback to plain HTTP."""
    config = hypercorn.config.Config()
    config.bind = [api.listen]
    if api.tls_cert_file is not None and api.tls_key_file is not None:
        config.certfile = api.tls_cert_file
        config.keyfile = api.tls_key_file
    config.accesslog = None
    # A Logger instance is used as is: its records go through our handlers, once.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    return rest_config(config)  # idle and read deadlines (nvswitch_dp/api/server.py)


def connection_gate(api: ApiConfig, metrics: Metrics) -> ConnectionGate:
    """The REST connection limit: ``api.max_connections``, lowered to what the descriptor
    limit leaves after the kubelet/FM reserve (:mod:`nvswitch_dp.limits`)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = rest_connection_limit(api.max_connections, soft, open_fd_count())
    if limit < api.max_connections:
        log.warning(
            "REST connections limited to %d (api.max_connections is %d) by the file "
            "descriptor limit %d; raise the limit (ulimit -n, the container runtime's "
            "LimitNOFILE) to serve more",
            limit,
            api.max_connections,
            soft,
        )
    return ConnectionGate(limit, metrics)
