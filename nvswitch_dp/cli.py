"""The ``nvswitch-dp`` command line.

    nvswitch-dp run [--config FILE] [--simulate PLATFORM] [--state-dir DIR]
                    [--plugin-dir DIR] [--pod-resources-socket PATH] [--api-listen HOST:PORT]
                    [--fm-backend simulator|fmpm|libnvfm] [--fmpm-path PATH] [--fm-endpoint HOST]
    nvswitch-dp demo [--platform NAME] [--api-listen HOST:PORT]
    nvswitch-dp doctor ...
    nvswitch-dp status [--api URL] [--token-file FILE]

Precedence for ``run``: built-in defaults < config file (``--config`` or
``HGX_H200_CONFIG_PATH``) < ``HGX_H200_*`` environment overrides < command-line flags.
A bad configuration prints the offending key and exits with status 2 before anything
starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from nvswitch_dp.config import Config, ConfigError, load_config, with_overrides
from nvswitch_dp.fabric.platforms import platform, platform_names
from nvswitch_dp.logs import configure_logging

log = logging.getLogger(__name__)


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


def build_run_config(args: argparse.Namespace, env: dict[str, str]) -> Config:
    """The configuration ``run`` uses: file, environment, then flags."""
    config = load_config(Path(args.config) if args.config else None, env)
    flags = {
        "state_dir": args.state_dir,
        "plugin.directory": args.plugin_dir,
        "plugin.pod_resources_socket": args.pod_resources_socket,
        "api.listen": args.api_listen,
        "fabric_manager.backend": args.fm_backend,
        "fabric_manager.fmpm_path": args.fmpm_path,
        "fabric_manager.endpoint": args.fm_endpoint,
        "plugin.release_grace_seconds": args.release_grace,
    }
    if args.simulate:
        if args.fm_backend is None:
            flags["fabric_manager.backend"] = "simulator"
        if args.plugin_dir is None and "HGX_H200_SOCKET_PATH" not in env and not args.config:
            state = args.state_dir or config.state_dir
            flags["plugin.directory"] = str(Path(state) / "device-plugins")
    config = with_overrides(config, flags)
    if args.simulate:
        config = simulated(config, args.simulate)
    return config


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="run the device plugin daemon")
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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="nvswitch-dp", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    _add_run(sub)
    sub.add_parser(
        "doctor", help="preflight checks of the node (IOMMU, vfio, GPUs, FM)", add_help=False
    )
    sub.add_parser("status", help="the node's fabric map: GPUs against partitions", add_help=False)
    demo = sub.add_parser("demo", help="the end-to-end walk-through on a simulated node")
    demo.add_argument("--platform", default="hgx-h200", choices=platform_names())
    demo.add_argument("--api-listen", default="127.0.0.1:9090", metavar="HOST:PORT")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from nvswitch_dp.doctor import doctor_main

        return doctor_main(argv[1:])
    if argv[:1] == ["status"]:
        from nvswitch_dp.status import status_main

        return status_main(argv[1:])
    args = parser().parse_args(argv)
    if args.command == "demo":
        from nvswitch_dp.demo import run_demo

        return run_demo(args.platform, args.api_listen)
    try:
        config = build_run_config(args, dict(os.environ))
    except ConfigError as exc:
        print(f"nvswitch-dp: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log.level, config.log.format)
    from nvswitch_dp.daemon import main_run

    return main_run(config)
