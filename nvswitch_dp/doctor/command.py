"""``nvswitch-dp doctor``: arguments, the node (real or simulated) and FM to ask, output.

Imports nothing of the daemon or the REST API (no Hypercorn, no Quart): the FM client
comes from :func:`nvswitch_dp.fabric.client.build_fabric_client`, and only the backend
the configuration names is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nvswitch_dp.config import Config, ConfigError, with_overrides
from nvswitch_dp.doctor.facts import DEFAULT_FM_CONFIG, VFIO_MODULES, FmAnswer, Roots
from nvswitch_dp.doctor.fm import ListPartitions, ask_fabric_manager, find_fm_client
from nvswitch_dp.doctor.report import exit_code, format_report, run_checks
from nvswitch_dp.node_args import add_node_arguments, load_node_config
from nvswitch_dp.vfio.inventory import INVENTORY_FILE
from nvswitch_dp.vfio.pci_ids import GPU_DEVICE_IDS


def doctor_parser() -> argparse.ArgumentParser:
    """The ``doctor`` subcommand's own parser (plain-text help)."""
    p = argparse.ArgumentParser(
        prog="nvswitch-dp doctor",
        description="Check that this node is ready for the device plugin. Checks that "
        "depend on a failed one are skipped, so the first failure is the one to fix first.",
    )
    add_node_arguments(p, proc_help="default: /proc")
    p.add_argument(
        "--fm-config", metavar="FILE", default=str(DEFAULT_FM_CONFIG), help="fabricmanager.cfg"
    )
    p.add_argument("--simulate", metavar="PLATFORM", help="check a simulated node instead")
    p.add_argument("--no-fm", action="store_true", help="do not contact Fabric Manager")
    return p


@dataclass(frozen=True, slots=True)
class Inputs:
    """What the checks run on: where the node's trees are, what is configured, FM."""

    roots: Roots
    gpu_device_ids: Mapping[str, str]
    module_map: Mapping[int, str]
    list_partitions: ListPartitions | None = None
    fm: FmAnswer | None = None  # an answer known without asking (a missing client)
    inventory_path: Path | None = None


def _simulated_roots(base: Path, platform_name: str) -> tuple[Roots, dict[int, str], str]:
    """A simulated node under ``base``: the vfio simulator's sysfs and /dev, plus a
    /proc, hugepages and an FM config in Shared NVSwitch mode."""
    from nvswitch_dp.fabric.platforms import platform
    from nvswitch_dp.vfio.simulate import build_simulated_node

    plat = platform(platform_name)
    node = build_simulated_node(base / "node", plat)
    proc = base / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cmdline").write_text("BOOT_IMAGE=/vmlinuz ro intel_iommu=on iommu=pt\n")
    (proc / "modules").write_text(
        "".join(f"{m} 16384 0 - Live 0x0000000000000000\n" for m in (*VFIO_MODULES, "vfio"))
    )
    sysfs = Path(node.sysfs_root)
    pool = sysfs / "kernel" / "mm" / "hugepages" / "hugepages-1048576kB"
    if not (pool / "nr_hugepages").exists():
        pool.mkdir(parents=True, exist_ok=True)
        (pool / "nr_hugepages").write_text("512\n")
    fm_config = base / "fabricmanager.cfg"
    fm_config.write_text(
        "FABRIC_MODE=1\nFM_CMD_BIND_INTERFACE=127.0.0.1\nFM_CMD_PORT_NUMBER=6666\n"
    )
    roots = Roots(proc=proc, sysfs=sysfs, dev=Path(node.dev_root), fm_config=fm_config)
    return roots, dict(node.module_map), f"10de:{plat.gpu_device_id}"


def _simulated_inputs(
    platform_name: str, base: Path, list_partitions: ListPartitions | None, no_fm: bool
) -> Inputs:
    """A simulated node under ``base`` and, unless told otherwise, the FM simulator."""
    roots, module_map, gpu_id = _simulated_roots(base, platform_name)
    name = GPU_DEVICE_IDS.get(gpu_id, platform_name)
    if list_partitions is None and not no_fm:
        from nvswitch_dp.fabric.simulator import SimulatedFabricManager, SimulatorStore

        store = SimulatorStore(base / "fabricmanager.state", platform_name)
        list_partitions = SimulatedFabricManager(store).list_partitions
    return Inputs(roots, {gpu_id: name}, module_map, list_partitions)


def _node_inputs(
    args: argparse.Namespace,
    config: Config,
    list_partitions: ListPartitions | None,
    scratch: Path,
) -> Inputs:
    """This node, as the arguments and the configuration name it, and its FM client.

    A client that is not there (no ``fmpm`` at ``fabric_manager.fmpm_path``, no
    loadable libnvfm) becomes an answer saying so; FM is then not asked.
    """
    roots = Roots(
        proc=Path(args.proc_root),
        sysfs=Path(args.sysfs_root or config.vfio.sysfs_root),
        dev=Path(args.dev_root or config.vfio.dev_root),
        fm_config=Path(args.fm_config),
    )
    fm: FmAnswer | None = None
    if list_partitions is None and not args.no_fm:
        backend = config.fabric_manager.backend
        client, missing = find_fm_client(config.fabric_manager)
        if missing is not None:
            fm = FmAnswer(client_missing=missing, backend=backend)
        else:
            try:
                list_partitions = _fm_lister(config, scratch)
            except (ImportError, OSError, ValueError) as exc:
                error = f"cannot set up the {backend} client: {exc}"
                fm = FmAnswer(error=error, backend=backend, client=client)
            else:
                fm = FmAnswer(backend=backend, client=client)  # completed once asked
    return Inputs(
        roots,
        dict(config.vfio.gpu_device_ids),
        dict(config.module_map),
        list_partitions,
        fm,
        Path(args.state_dir or config.state_dir) / INVENTORY_FILE,
    )


def _fm_lister(config: Config, scratch: Path) -> ListPartitions:
    """The configured client's "list partitions".

    The fmpm backend gets ``scratch`` as its state directory: its first call kills every
    fmpm run another process recorded under its state directory (what a killed daemon
    left), and the daemon running on this node may have one in flight, an activate
    that a read-only check must not cut. The simulator keeps the configured state
    directory: its FM state is there.
    """
    from nvswitch_dp.fabric.client import build_fabric_client

    if config.fabric_manager.backend == "fmpm":
        config = with_overrides(config, {"state_dir": str(scratch)}, source="doctor")
    client = build_fabric_client(config)
    return client.list_partitions


def _answer(inputs: Inputs, timeout: float, no_fm: bool) -> FmAnswer | None:
    """FM's answer: asked now through the lister, keeping what was known of the client."""
    known = inputs.fm
    if no_fm:
        return None
    if inputs.list_partitions is None or (known is not None and known.asked):
        return known  # a missing client, a client that could not be set up, or nothing
    answer = ask_fabric_manager(inputs.list_partitions, timeout=timeout)
    if known is None:
        return answer
    return dataclasses.replace(answer, backend=known.backend, client=known.client)


def doctor_main(
    argv: list[str] | None = None, *, list_partitions: ListPartitions | None = None
) -> int:
    """``nvswitch-dp doctor``: print the report, return the exit status.

    0: no check failed; 1: a check failed; 2: bad arguments or configuration.
    ``list_partitions`` replaces the FM client the configuration names (tests).
    """
    args = doctor_parser().parse_args(argv)
    try:
        config = load_node_config(args)
    except (ConfigError, OSError) as exc:
        print(f"nvswitch-dp doctor: configuration error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nvswitch-dp-doctor-") as tmp:
        if args.simulate:
            from nvswitch_dp.fabric.platforms import platform_names

            if args.simulate not in platform_names():
                print(
                    f"nvswitch-dp doctor: unknown platform {args.simulate!r}; known: "
                    f"{', '.join(platform_names())}",
                    file=sys.stderr,
                )
                return 2
            inputs = _simulated_inputs(args.simulate, Path(tmp), list_partitions, args.no_fm)
        else:
            inputs = _node_inputs(args, config, list_partitions, Path(tmp))
        timeout = float(config.fabric_manager.timeout_seconds) * 2
        results = run_checks(
            inputs.roots,
            gpu_device_ids=inputs.gpu_device_ids,
            module_map=inputs.module_map,
            fm=_answer(inputs, timeout, args.no_fm),
            inventory_path=inputs.inventory_path,
        )
    sys.stdout.write(format_report(results))
    return exit_code(results)
