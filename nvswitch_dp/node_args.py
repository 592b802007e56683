"""The command-line arguments the node tools share (``doctor``, ``prepare-node``).

Both read the daemon's configuration the way an operator on the node expects: ``--config``,
else ``$HGX_H200_CONFIG_PATH``, else ``/etc/nvswitch-dp/config.yaml`` when it exists,
else the built-in defaults; and both take the node's roots from it unless a flag names
them (so a container with the host's trees mounted elsewhere can point at them).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nvswitch_dp.config import Config, load_config

DEFAULT_CONFIG = Path("/etc/nvswitch-dp/config.yaml")


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
    path = args.config or env.get("HGX_H200_CONFIG_PATH")
    if path is None and DEFAULT_CONFIG.exists():
        path = str(DEFAULT_CONFIG)
    return load_config(Path(path) if path else None, env)
