"""The command-line arguments the node tools share (``doctor``, ``prepare-node``).

Both read the daemon's configuration the way an operator on the node expects: ``--config``,
else ``$HGX_H200_CONFIG_PATH``, else ``/etc/nvswitch-dp/config.yaml`` when it exists,
else the built-in defaults; and both take the node's roots from it unless a flag names
them (so a container with the host's trees mounted elsewhere can point at them).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from nvswitch_dp.config import ENV_CONFIG_PATH, Config, load_config
from nvswitch_dp.vfio.inventory import INVENTORY_FILE

DEFAULT_CONFIG = Path("/etc/nvswitch-dp/config.yaml")


@dataclass(frozen=True, slots=True)
class NodePaths:
    """The node's trees and its inventory file, as the flags (else the configuration)
    name them."""

    sysfs: Path
    dev: Path
    proc: Path
    inventory: Path  # <state dir>/node-inventory.json


def add_node_arguments(parser: argparse.ArgumentParser, *, proc_help: str) -> None:
    """``--config``, ``--proc-root``, ``--sysfs-root``, ``--dev-root``, ``--state-dir``."""
    parser.add_argument(
        "--config", metavar="FILE", help="daemon config (default: $HGX_H200_CONFIG_PATH)"
    )
    parser.add_argument("--proc-root", metavar="DIR", default="/proc", help=proc_help)
    parser.add_argument(
        "--sysfs-root", metavar="DIR", help="default: vfio.sysfs_root from the config"
    )
    parser.add_argument("--dev-root", metavar="DIR", help="default: vfio.dev_root from the config")
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the node inventory is (default: state_dir from the config)",
    )


def load_node_config(args: argparse.Namespace) -> Config:
    """The configuration named by ``args.config`` or the environment (module docstring).

    Errors: :class:`~nvswitch_dp.config.ConfigError` naming the key; ``OSError`` for a
    file that cannot be read.
    """
    env = dict(os.environ)
    path = args.config or env.get(ENV_CONFIG_PATH)
    if path is None and DEFAULT_CONFIG.exists():
        path = str(DEFAULT_CONFIG)
    return load_config(Path(path) if path else None, env)


def node_paths(args: argparse.Namespace, config: Config) -> NodePaths:
    """Where the node's trees and inventory are: each flag of :func:`add_node_arguments`
    given, else the configuration's value (``--proc-root`` has its own default)."""
    return NodePaths(
        sysfs=Path(args.sysfs_root or config.vfio.sysfs_root),
        dev=Path(args.dev_root or config.vfio.dev_root),
        proc=Path(args.proc_root),
        inventory=Path(args.state_dir or config.state_dir) / INVENTORY_FILE,
    )
