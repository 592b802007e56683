"""The ``nvswitch-dp`` command line.

    nvswitch-dp run [--config FILE] [--simulate PLATFORM] [--state-dir DIR]
                    [--plugin-dir DIR] [--pod-resources-socket PATH] [--api-listen HOST:PORT]
                    [--fm-backend simulator|fmpm|libnvfm] [--fmpm-path PATH] [--fm-endpoint HOST]
                    [--mode device-plugin|dra] [--node-name NAME] [--kubeconfig FILE]
                    [--driver-name NAME] [--plugin-registry-dir DIR] [--dra-plugin-dir DIR]
                    [--cdi-dir DIR]
    nvswitch-dp demo [--mode device-plugin|dra] [--platform NAME] [--api-listen HOST:PORT]
                     [--no-wait]
    nvswitch-dp doctor ...
    nvswitch-dp prepare-node ...     read module IDs into the node inventory, bind to vfio-pci
    nvswitch-dp status [--api URL] [--token-file FILE]

Precedence for ``run``: built-in defaults < config file (``--config`` or
``HGX_H200_CONFIG_PATH``) < ``HGX_H200_*`` environment overrides < command-line flags.
``NODE_NAME`` is read in DRA mode only (between the file and ``--node-name``). A bad
configuration prints the offending key and exits with status 2 before anything starts;
so does DRA mode without a node name.

``run --simulate`` keeps the kubelet's side of the simulated node under the state
directory (:func:`simulated_kubelet_paths`) unless a path is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from nvswitch_dp.config import (
    PLUGIN_MODES,
    Config,
    ConfigError,
    apply_dra_env,
    check_complete,
    load_config,
    with_overrides,
)
from nvswitch_dp.config.schema import DEFAULT_DRA_DRIVER
from nvswitch_dp.fabric.platforms import platform, platform_names
from nvswitch_dp.logs import configure_logging

log = logging.getLogger(__name__)

# What --help prints: plain text, not this module's docstring, whose reStructuredText
# markup (double backticks, roles) argparse would print as is.
DESCRIPTION = (
    "nvswitch-dp: a Kubernetes device plugin (or DRA driver) serving Fabric Manager's "
    "NVSwitch partitions to VMs through VFIO-PCI, and the tools to prepare and check a node."
)
RUN_DESCRIPTION = (
    "Run the daemon. Precedence: built-in defaults < the config file (--config or "
    "$HGX_H200_CONFIG_PATH) < HGX_H200_* environment overrides < these flags. NODE_NAME "
    "counts in DRA mode only. A bad configuration names the offending key and exits "
    "with status 2 before anything starts; so does DRA mode without a node name."
)


def simulated(config: Config, platform_name: str) -> Config:
    """Point ``config`` at a simulated node built under its state directory.

    Builds the fake sysfs and /dev tree, selects the FM simulator (unless another
    backend was asked for explicitly) and takes the platform's module map.
    """
    from nvswitch_dp.vfio.simulate import build_simulated_node

    state_dir = Path(config.state_dir)
    node = build_simulated_node(state_dir / "node", platform(platform_name))
    changes: dict[str, Any] = {
        "fabric_manager.simulator_platform": platform_name,
        "vfio.sysfs_root": str(node.sysfs_root),
        "vfio.dev_root": str(node.dev_root),
        "module_map": dict(node.module_map),
    }
    return with_overrides(config, changes, source=f"--simulate {platform_name}")


def simulated_kubelet_paths(config: Config, state_dir: Path, driver: str | None) -> dict[str, str]:
    """Where a simulated node keeps the kubelet's side: under ``state_dir``.

    Every kubelet path (device-plugin directory, PodResources socket, DRA registry and
    plugin directories, CDI directory) that ``config`` still has at its built-in host
    default comes back as a dotted key -> a path under ``state_dir``, so that ``run
    --simulate`` never writes a socket or a CDI spec into the host's
    ``/var/lib/kubelet`` or ``/var/run/cdi``. A path some layer set (file, environment)
    is kept, and so is one a flag gives (the caller applies flags over these). A file
    that repeats a host default cannot be told from no file: it moves too. Pure.
    """
    defaults = Config()
    driver = driver or config.dra.driver_name
    candidates = {
        "plugin.directory": (
            config.plugin.directory,
            defaults.plugin.directory,
            state_dir / "device-plugins",
        ),
        "plugin.pod_resources_socket": (
            config.plugin.pod_resources_socket,
            defaults.plugin.pod_resources_socket,
            state_dir / "pod-resources" / "kubelet.sock",
        ),
        "dra.plugin_registry_dir": (
            config.dra.plugin_registry_dir,
            defaults.dra.plugin_registry_dir,
            state_dir / "plugins_registry",
        ),
        "dra.plugin_dir": (config.dra.plugin_dir, None, state_dir / "plugins" / driver),
        "dra.cdi_dir": (config.dra.cdi_dir, defaults.dra.cdi_dir, state_dir / "cdi"),
    }
    return {
        key: str(path) for key, (value, default, path) in candidates.items() if value == default
    }


def build_run_config(args: argparse.Namespace, env: dict[str, str]) -> Config:
    """The configuration ``run`` uses: file, environment, then flags.

    The mode is settled first (file, then ``--mode``), since ``NODE_NAME`` counts only in
    DRA mode. Raises :class:`ConfigError`, also for DRA mode without a node name.
    """
    config = load_config(Path(args.config) if args.config else None, env)
    config = with_overrides(config, {"plugin.mode": args.mode})
    config = apply_dra_env(config, env)
    flags = {
        "state_dir": args.state_dir,
        "plugin.directory": args.plugin_dir,
        "plugin.pod_resources_socket": args.pod_resources_socket,
        "api.listen": args.api_listen,
        "fabric_manager.backend": args.fm_backend,
        "fabric_manager.fmpm_path": args.fmpm_path,
        "fabric_manager.endpoint": args.fm_endpoint,
        "plugin.release_grace_seconds": args.release_grace,
        "dra.node_name": args.node_name,
        "dra.kubeconfig": args.kubeconfig,
        "dra.driver_name": args.driver_name,
        "dra.plugin_registry_dir": args.plugin_registry_dir,
        "dra.plugin_dir": args.dra_plugin_dir,
        "dra.cdi_dir": args.cdi_dir,
    }
    if args.simulate:
        if args.fm_backend is None:
            flags["fabric_manager.backend"] = "simulator"
        state = Path(args.state_dir or config.state_dir)
        for key, path in simulated_kubelet_paths(config, state, args.driver_name).items():
            if flags[key] is None:
                flags[key] = path
    config = with_overrides(config, flags)
    if args.simulate:
        config = simulated(config, args.simulate)
    check_complete(config)
    return config


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run the device plugin daemon", description=RUN_DESCRIPTION)
    run.add_argument("--config", metavar="FILE", help="YAML configuration file")
    run.add_argument(
        "--simulate",
        metavar="PLATFORM",
        choices=platform_names(),
        help=f"run on a simulated node: {', '.join(platform_names())}",
    )
    run.add_argument("--state-dir", metavar="DIR")
    run.add_argument("--plugin-dir", metavar="DIR", help="the kubelet's device-plugin directory")
    run.add_argument("--pod-resources-socket", metavar="PATH")
    run.add_argument("--api-listen", metavar="HOST:PORT")
    run.add_argument("--fm-backend", choices=["simulator", "fmpm", "libnvfm"])
    run.add_argument("--fmpm-path", metavar="PATH")
    run.add_argument("--fm-endpoint", metavar="HOST")
    run.add_argument("--release-grace", metavar="SECONDS", type=float)
    run.add_argument(
        "--mode", choices=PLUGIN_MODES, help="device-plugin (the default) or dra (a DRA driver)"
    )
    dra = run.add_argument_group("DRA mode (--mode dra)")
    dra.add_argument("--node-name", metavar="NAME", help="this node's name (else $NODE_NAME)")
    dra.add_argument(
        "--kubeconfig", metavar="FILE", help="else $KUBECONFIG, else the in-cluster account"
    )
    dra.add_argument("--driver-name", metavar="NAME", help=f"default {DEFAULT_DRA_DRIVER}")
    dra.add_argument(
        "--plugin-registry-dir", metavar="DIR", help="default /var/lib/kubelet/plugins_registry"
    )
    dra.add_argument(
        "--dra-plugin-dir", metavar="DIR", help="default /var/lib/kubelet/plugins/<driver>"
    )
    dra.add_argument("--cdi-dir", metavar="DIR", help="default /var/run/cdi")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="nvswitch-dp", description=DESCRIPTION)
    sub = top.add_subparsers(dest="command", required=True)
    _add_run(sub)
    sub.add_parser(
        "doctor", help="preflight checks of the node (IOMMU, vfio, GPUs, FM)", add_help=False
    )
    sub.add_parser("status", help="the node's fabric map: GPUs against partitions", add_help=False)
    sub.add_parser(
        "prepare-node",
        help="read the GPUs' module IDs into the node inventory; bind them to vfio-pci",
        add_help=False,
    )
    demo = sub.add_parser("demo", help="the end-to-end walk-through on a simulated node")
    demo.add_argument("--platform", default="hgx-h200", choices=platform_names())
    demo.add_argument("--api-listen", default="127.0.0.1:9090", metavar="HOST:PORT")
    demo.add_argument(
        "--mode",
        choices=PLUGIN_MODES,
        default="device-plugin",
        help="dra: the daemon as a DRA driver, with API-server and kubelet stand-ins",
    )
    demo.add_argument(
        "--no-wait",
        action="store_true",
        help="stop after the walk-through instead of serving until Ctrl-C",
    )
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from nvswitch_dp.doctor import doctor_main

        return doctor_main(argv[1:])
    if argv[:1] == ["prepare-node"]:
        from nvswitch_dp.prepare_node import prepare_main

        return prepare_main(argv[1:])
    if argv[:1] == ["status"]:
        from nvswitch_dp.status import status_main

        return status_main(argv[1:])
    args = parser().parse_args(argv)
    if args.command == "run":
        # Until the daemon's own receiver is installed (importing it takes about a
        # second), a SIGTERM would kill the process with -15. Nothing needs cleaning up
        # yet, so exit 0 at once; Trio's receiver replaces this handler.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        # SIGHUP is ignored by the daemon (daemon.watch_signals); from the first moment.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if args.command == "demo":
        if args.mode == "dra":
            from nvswitch_dp.demo import run_dra_demo

            return run_dra_demo(args.platform, args.api_listen, wait=not args.no_wait)
        from nvswitch_dp.demo import run_demo

        return run_demo(args.platform, args.api_listen, wait=not args.no_wait)
    try:
        config = build_run_config(args, dict(os.environ))
    except ConfigError as exc:
        print(f"nvswitch-dp: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log.level, config.log.format)
    from nvswitch_dp.daemon import main_run

    return main_run(config)
