"""The daemon: one nursery tree, one shutdown path.

    trio.run(run_daemon)
    └── trio_asyncio.open_loop()            grpclib's asyncio loop, above everything
        └── daemon nursery
            ├── watch_signals               SIGTERM/SIGINT -> ShutdownError (first of all);
            │                               SIGHUP logged and ignored
            │   (first_report: wait for FM, resume a restarted one; runs in the body)
            ├── run_effects                 every FM call the node machine asks for
            ├── serve_api                   Quart-Trio on Hypercorn (nvswitch_dp/api/server.py:
            │                               connections capped, idle/read deadlines)
            ├── supervise_fabric            list FM every period (at once on trouble)
            ├── watch_gpu_health            VFIO state of every GPU
            ├── watch_pod_resources         PodResources readings -> the machine
            └── serve_resource  x N         one grpclib server + registration per size

In DRA mode (``plugin.mode: dra``, :func:`run_dra_daemon`) the kubelet's device-plugin
servers and the PodResources watcher are replaced by the DRA driver's edges:

    trio.run(run_daemon)
    └── trio_asyncio.open_loop()
        └── daemon nursery
            ├── watch_signals               SIGTERM/SIGINT -> ShutdownError
            │   (first_report: FM resumed with the checkpoint's partitions; in the body)
            ├── run_effects                 every FM call the node machine asks for
            ├── serve_api                   Quart-Trio; /readyz: kubelet, slices, FM
            ├── supervise_fabric            list FM every period (at once on trouble)
            ├── watch_gpu_health            VFIO state of every GPU
            ├── PoolPublisher.run           the node's ResourceSlices in the API server
            ├── serve_dra_plugin            DRAPlugin on dra.sock + Registration on
            │                               <driver>-reg.sock; served afresh when removed
            └── DraDriver.watch_orphans     unprepare claims the API server forgot

Before any of these the checkpoint of prepared claims is read: its claims go into the
node machine (their partitions are held, never deactivated), and a checkpoint that cannot
be read stops the start (:class:`StartError`). No PodResources polling and no release
grace for claims: the kubelet's Unprepare releases them.

The signal watcher starts before anything else, so a signal while FM is still
unreachable at start ends the daemon cleanly too. A signal closes the change feed (every
ListAndWatch stream ends cleanly), then raises :class:`ShutdownError`, which cancels the
nursery; each task's cleanup (closing servers and removing sockets) runs under a
shielded deadline, and :func:`main_run` turns the ShutdownError into exit status 0. The
shape follows hypercorn's ``trio/run.py``. Every decision is the node machine's
(``partitions/node.py``); the tasks here only feed it events and run its effects.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hypercorn.config
import trio
import trio_asyncio

from nvswitch_dp.api.app import create_app
from nvswitch_dp.api.schemas import DEFAULT_LIST_FAILURE_WINDOW_S, fabric_problems
from nvswitch_dp.api.server import ConnectionGate, rest_config, serve_api
from nvswitch_dp.config import ApiConfig, Config
from nvswitch_dp.controller import GpuSlot, PartitionController
from nvswitch_dp.fabric.client import build_fabric_client
from nvswitch_dp.fabric.platforms import PLATFORMS
from nvswitch_dp.fabric.types import FabricManagerError, FmNotConfigured, FmReport
from nvswitch_dp.limits import open_fd_count, raise_nofile_limit, rest_connection_limit
from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.node import Mode, NodeMachine, resume_list_at_start
from nvswitch_dp.partitions.state import OverlappingActive, StateError
from nvswitch_dp.partitions.table import PartitionTable, partition_id_of
from nvswitch_dp.partitions.units import allocation_unit
from nvswitch_dp.plugin.grpc_trio import tolerate_os_errors
from nvswitch_dp.plugin.lifecycle import serve_resource
from nvswitch_dp.plugin.pod_resources import GrpcPodResourcesClient, watch_pod_resources
from nvswitch_dp.ports import FabricManagerClient, PodResourcesClient
from nvswitch_dp.vfio.discovery import (
    PciGpu,
    build_inventory,
    discover_gpus,
    read_function,
    vfio_problem,
)
from nvswitch_dp.vfio.inotify import DirectoryWatch
from nvswitch_dp.vfio.inventory import (
    INVENTORY_FILE,
    InventoryFileError,
    ModuleResolution,
    load_inventory,
    resolve_module_map,
)

if TYPE_CHECKING:
    from nvswitch_dp.dra.kubelet import RegistrationState
    from nvswitch_dp.dra.publish import PoolPublisher

log = logging.getLogger(__name__)

FM_START_BACKOFF_MAX_S = 5.0
STREAM_DRAIN_S = 0.05
# How long to wait for PodResources before resuming a restarted FM blind (FM exits 60 s
# after its restart unless told which partitions are still active).
FM_RESUME_PATIENCE_S = 30.0


class ShutdownError(Exception):
    """Raised by :func:`watch_signals` to end the daemon's nursery; not an error."""


class StartError(Exception):
    """The daemon cannot start as configured (DRA mode: an unreadable checkpoint, no
    usable kubeconfig); the message says what is wrong and what to do. :func:`main_run`
    logs it and exits 1."""


@dataclass(frozen=True)
class Node:
    """What the daemon learned at start about the GPUs FM names."""

    gpus: dict[int, GpuSlot]
    unmapped: dict[int, str]  # module ID -> why it has no usable PCI function


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


async def partitions_held(pods: PodResourcesClient, resource_prefix: str) -> set[int] | None:
    """Partition IDs that pods hold in any of our resources; None if PodResources fails."""
    try:
        holdings = await pods.list_assigned()
    except Exception:  # unreadable for whatever reason: we know nothing
        return None
    held: set[int] = set()
    for holding in holdings:
        if holding.resource_name.startswith(resource_prefix + "-"):
            for device in holding.device_ids:
                with contextlib.suppress(ValueError):
                    held.add(partition_id_of(device))
    return held


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


def discover_node(config: Config, report: FmReport) -> Node:
    """Join FM's module IDs with the PCI functions found in sysfs (synchronous I/O).

    Errors: :class:`StartError` from :func:`node_module_map`.
    """
    sysfs, dev = Path(config.vfio.sysfs_root), Path(config.vfio.dev_root)
    found = discover_gpus(sysfs, dev, config.vfio.gpu_device_ids)
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
    return Node(gpus, unmapped)


_NO_ADDRESS = {
    "config": "not in module_map",
    "inventory": "not in the node inventory (run `nvswitch-dp prepare-node`)",
    "none": "no module_map in the configuration and no node inventory (run "
    "`nvswitch-dp prepare-node` with the GPUs on the nvidia driver)",
}


SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def watch_signals(
    on_signal: Callable[[], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Wait for SIGTERM or SIGINT, call ``on_signal``, raise :class:`ShutdownError`.

    SIGHUP is logged and ignored: the configuration is read once at start, so there is
    nothing to reload, and a hang-up (a closed terminal, a node agent's blanket signal)
    must not stop a daemon whose partitions VMs are using. Once shutdown begins, further
    SIGTERM/SIGINT/SIGHUP are ignored (:func:`_ignore_signals_while_stopping`), so a second
    Ctrl-C cannot interrupt the cleanup that removes the sockets; the cleanup is bounded by
    its own deadlines, and SIGKILL still ends the process at once.
    """
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.warning(
                    "received SIGHUP; ignored (the configuration is read only at start: "
                    "restart the daemon to change it; SIGTERM stops it)"
                )
                continue
            log.info("received %s; shutting down", signal.Signals(signum).name)
            _ignore_signals_while_stopping()
            on_signal()
            # Let every ListAndWatch stream send its end before the cancellation closes
            # the connections (a checkpoint alone is not enough for the asyncio side).
            await trio.sleep(STREAM_DRAIN_S)
            raise ShutdownError(signal.Signals(signum).name)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_handlers_before_stop: dict[int, Any] = {}


def _ignore_signals_while_stopping() -> None:
    """Ignore SIGTERM/SIGINT/SIGHUP from now on (the receiver's exit would otherwise put
    back Trio's KeyboardInterrupt handler, and a second Ctrl-C would cut the cleanup);
    :func:`main_run` restores the handlers once ``trio.run`` has returned."""
    for signum in _STOP_SIGNALS:
        previous = signal.signal(signum, signal.SIG_IGN)
        _handlers_before_stop.setdefault(signum, previous)
    log.info("further signals are ignored while shutting down")


def _restore_signals() -> None:
    for signum, handler in _handlers_before_stop.items():
        signal.signal(signum, handler)
    _handlers_before_stop.clear()


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


def release_check_interval(grace: float) -> float:
    """How often to read PodResources: a few times per grace period, at most every 5 s."""
    return min(max(grace / 3, 0.1), 5.0)


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


async def run_daemon(
    config: Config,
    *,
    task_status: trio.TaskStatus[PartitionController] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until a signal (ShutdownError) or cancellation.

    ``task_status.started`` receives the controller once every resource serves.
    In DRA mode this is :func:`run_dra_daemon`.
    """
    if config.plugin.mode == "dra":
        await run_dra_daemon(config, task_status=task_status)
        return
    controller: PartitionController | None = None

    def on_signal() -> None:
        if controller is not None:
            controller.feed.close()

    async with trio_asyncio.open_loop() as loop, trio.open_nursery() as nursery:
        tolerate_os_errors(loop)
        await nursery.start(watch_signals, on_signal)
        fabric = build_fabric_client(config)
        pods = GrpcPodResourcesClient(Path(config.plugin.pod_resources_socket))
        prefix = config.plugin.resource_prefix
        report = await first_report(fabric, lambda: partitions_held(pods, prefix))
        node = discover_node(config, report)
        table = PartitionTable.from_report(report)
        grace = config.plugin.release_grace_seconds
        resources = [f"{prefix}-{size}x" for size in table.sizes]
        try:
            # Whatever FM has active may be in use: held until PodResources says otherwise.
            machine = NodeMachine(
                table, report, trio.current_time(), grace=grace, resources=resources
            )
        except OverlappingActive as exc:
            raise StartError(overlap_refusal(exc)) from None
        controller = build_controller(config, machine, fabric, node)
        log.info(
            "Fabric Manager (%s) reports %d partitions; serving %s",
            fabric.name,
            len(table),
            ", ".join(controller.layout.resources),
        )
        await nursery.start(controller.run_effects)
        await nursery.start(
            serve_api,
            create_app(controller, config, rest_rate=config.api.requests_per_second or None),
            api_config(config.api),
            connection_gate(config.api, controller.metrics),
        )
        await nursery.start(
            supervise_fabric, controller, config.fabric_manager.reconcile_interval_seconds
        )
        await nursery.start(
            watch_gpu_health, controller, config, config.vfio.health_interval_seconds
        )
        await nursery.start(watch_pod_resources, controller, pods, release_check_interval(grace))
        plugin_dir = Path(config.plugin.directory)
        plugin_dir.mkdir(parents=True, exist_ok=True)
        for resource in controller.layout.resources:
            await nursery.start(serve_resource, controller, resource, plugin_dir)
        task_status.started(controller)


def build_controller(
    config: Config, machine: NodeMachine, fabric: FabricManagerClient, node: Node
) -> PartitionController:
    """The controller over ``machine``, configured by ``config``; GPUs without a usable
    PCI function are recorded as faults at once (their partitions leave the pool)."""
    fm = config.fabric_manager
    controller = PartitionController(
        machine,
        fabric,
        node.gpus,
        resource_prefix=config.plugin.resource_prefix,
        dev_root=Path(config.vfio.dev_root),
        metrics=Metrics(),
        unit=allocation_unit(config.plugin.allocation_unit),
        call_deadline=call_deadline(fm.timeout_seconds, fm.retries),
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


# Exit statuses of `nvswitch-dp run` (the README lists them).
EXIT_OK = 0  # stopped by SIGTERM/SIGINT, cleanly
EXIT_REFUSED = 1  # refused to start (StartError): one "cannot start:" line says why
EXIT_CONFIG = 2  # the configuration is invalid (cli.py, before anything starts)
EXIT_INTERNAL = 70  # an unexpected error ended the daemon (EX_SOFTWARE): a bug, logged


def main_run(config: Config) -> int:
    """Run the daemon in this process; :data:`EXIT_OK` after a clean shutdown on a
    signal, :data:`EXIT_REFUSED` when it cannot start (:class:`StartError`, one log line
    with the cause and the fix), :data:`EXIT_INTERNAL` for anything else (logged with its
    traceback). The soft file-descriptor limit is raised to the hard one first."""
    soft, hard = raise_nofile_limit()
    log.info("file descriptor limit %d (hard %d)", soft, hard)
    failed: list[StartError] = []
    crashed: list[BaseException] = []
    try:
        trio.run(run_daemon, config)
    except* ShutdownError:
        pass
    except* StartError as group:
        failed = list(_leaves(group, StartError))
    except* Exception as group:
        crashed = list(group.exceptions)
    finally:
        _restore_signals()
    for error in failed:
        log.error("cannot start: %s", error)
    for crash in crashed:
        log.critical("internal error, exiting with %d", EXIT_INTERNAL, exc_info=crash)
    if failed:
        return EXIT_REFUSED
    return EXIT_INTERNAL if crashed else EXIT_OK


def _leaves(group: BaseExceptionGroup[BaseException], kind: type[StartError]) -> list[StartError]:
    """Every ``kind`` in ``group``, however deep: a refusal raised inside the nursery
    arrives wrapped once per nursery (and once more by trio-asyncio's loop)."""
    found: list[StartError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found += _leaves(exc, kind)
        elif isinstance(exc, kind):
            found.append(exc)
    return found


# -- DRA mode ---------------------------------------------------------------------------


CHECKPOINT_FILE = "dra-checkpoint.json"


def node_platform(config: Config, gpus: Mapping[int, GpuSlot]) -> str:
    """The ``platform`` attribute of the node's devices: the simulator's platform, else
    the known board whose GPU PCI device ID and GPU count match this node ("" if none)."""
    if config.fabric_manager.backend == "simulator":
        return config.fabric_manager.simulator_platform
    sysfs = Path(config.vfio.sysfs_root)
    for slot in gpus.values():
        function = read_function(sysfs, slot.pci_address)
        if function is None or not function.device_id:
            continue
        for board in PLATFORMS.values():
            if board.gpu_device_id == function.device_id and board.gpu_count == len(gpus):
                return board.name
    return ""


def dra_readiness(
    registration: RegistrationState,
    publisher: PoolPublisher | None,
    controller: PartitionController,
    list_window: float = DEFAULT_LIST_FAILURE_WINDOW_S,
) -> list[str]:
    """Why a DRA-mode node is not ready: the kubelet has not registered the driver, the
    slices are not published as the node is, FM is unreachable, reports an impossible
    state or has failed every list for ``list_window`` seconds (empty when ready)."""
    problems: list[str] = []
    if registration.problem is not None:
        problems.append(registration.problem)
    if publisher is None:
        problems.append("ResourceSlices not published yet")
    elif publisher.problem is not None:
        problems.append(publisher.problem)
    node = controller.view()
    if not node.fabric_reachable:
        problems.append(f"Fabric Manager is unreachable: {node.fabric_problem}")
    problems += fabric_problems(node, now=trio.current_time(), list_window=list_window)
    return problems


async def run_dra_daemon(
    config: Config,
    *,
    task_status: trio.TaskStatus[PartitionController] = trio.TASK_STATUS_IGNORED,
) -> None:
    """DRA mode: the daemon as a DRA driver (the tree in the module docstring).

    ``task_status.started`` receives the controller once the kubelet's sockets are
    served (the first publishing round has ended, published or not: the API server may
    be down, which ``/readyz`` reports). Raises :class:`StartError` for a checkpoint that
    cannot be read, one naming partitions FM does not have, or no usable kubeconfig.
    """
    from nvswitch_dp.dra.cdi import CdiDirectory
    from nvswitch_dp.dra.checkpoint import Checkpoint, CheckpointError
    from nvswitch_dp.dra.claim_status import ClaimStatusWriter
    from nvswitch_dp.dra.driver import DraDriver
    from nvswitch_dp.dra.holder import ControllerHolder
    from nvswitch_dp.dra.kube import KubeClient, KubeConfigError, load_config
    from nvswitch_dp.dra.kubelet import RegistrationState, serve_dra_plugin
    from nvswitch_dp.dra.metadata import DeviceMetadataFiles, published_attributes
    from nvswitch_dp.dra.pool import PoolSource
    from nvswitch_dp.dra.publish import PoolPublisher
    from nvswitch_dp.dra.slices import PoolInputs, build_pool

    dra = config.dra
    if dra.node_name is None:  # the CLI checks this; a caller building Config may not
        raise StartError("DRA mode needs dra.node_name (--node-name or NODE_NAME)")
    node_name = dra.node_name
    controller: PartitionController | None = None
    state_dir = Path(config.state_dir)
    checkpoint = Checkpoint(state_dir / CHECKPOINT_FILE)
    try:
        kube_config = load_config(dra.kubeconfig)
    except KubeConfigError as exc:
        raise StartError(str(exc)) from None

    async with trio_asyncio.open_loop() as loop, trio.open_nursery() as nursery:
        tolerate_os_errors(loop)
        await nursery.start(watch_signals, lambda: None)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            prepared = await trio.to_thread.run_sync(checkpoint.load)
        except (CheckpointError, OSError) as exc:
            raise StartError(str(exc)) from None
        restored = {uid: entry.partition_id for uid, entry in prepared.items()}
        fabric = build_fabric_client(config)

        async def held() -> set[int]:
            return set(restored.values())

        report = await first_report(fabric, held)
        node = discover_node(config, report)
        table = PartitionTable.from_report(report)
        try:
            # The checkpoint's claims are held from the first event on: nothing the
            # machine decides at start can deactivate a prepared partition.
            machine = NodeMachine(
                table,
                report,
                trio.current_time(),
                grace=config.plugin.release_grace_seconds,
                mode=Mode.DRA,
                claims=restored,
            )
        except OverlappingActive as exc:
            raise StartError(overlap_refusal(exc)) from None
        except StateError as exc:
            raise StartError(
                f"checkpoint {checkpoint.path} names a partition Fabric Manager does not "
                f"report ({exc}); is this the node that wrote it?"
            ) from None
        controller = build_controller(config, machine, fabric, node)
        log.info(
            "Fabric Manager (%s) reports %d partitions; DRA driver %s on node %s, "
            "%d prepared claims in the checkpoint",
            fabric.name,
            len(table),
            dra.driver_name,
            node_name,
            len(restored),
        )
        await nursery.start(controller.run_effects)
        registration = RegistrationState()
        publisher: PoolPublisher | None = None
        ctl = controller

        def readiness() -> list[str]:
            return dra_readiness(
                registration,
                publisher,
                ctl,
                config.fabric_manager.list_failure_window_seconds,
            )

        await nursery.start(
            serve_api,
            create_app(
                controller,
                config,
                rest_rate=config.api.requests_per_second or None,
                readiness=readiness,
            ),
            api_config(config.api),
            connection_gate(config.api, controller.metrics),
        )
        await nursery.start(
            supervise_fabric, controller, config.fabric_manager.reconcile_interval_seconds
        )
        await nursery.start(
            watch_gpu_health, controller, config, config.vfio.health_interval_seconds
        )
        kube = KubeClient(kube_config)
        nursery.start_soon(_close_on_exit, kube.aclose)
        cdi = CdiDirectory(dra.cdi_dir)
        await trio.to_thread.run_sync(cdi.discard_partial_writes)
        platform_name = node_platform(config, node.gpus)
        plugin_dir = Path(dra.plugin_directory)
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
        try:
            await driver.start()
        except CheckpointError as exc:  # changed under our feet since it was read above
            raise StartError(str(exc)) from None
        source = PoolSource(
            view=controller.view,
            layout=controller.layout,
            wait_changed=controller.wait_changed,
            node_name=node_name,
            driver=dra.driver_name,
            platform=platform_name,
        )
        publisher = PoolPublisher(kube, source.inputs, source.wait_for_change)
        await nursery.start(publisher.run)
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
        await nursery.start(
            partial(
                serve_dra_plugin,
                driver,
                registry_dir=Path(dra.plugin_registry_dir),
                plugin_dir=plugin_dir,
                state=registration,
            )
        )
        await nursery.start(driver.watch_orphans)
        task_status.started(controller)


CLOSE_GRACE_S = 2.0


async def _close_on_exit(close: Callable[[], Awaitable[None]]) -> None:
    """Sleep until cancelled, then run ``close`` shielded, within :data:`CLOSE_GRACE_S`."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE_S):
            await close()
