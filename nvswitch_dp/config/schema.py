"""The configuration's schema ``v1``: its constants, its frozen dataclasses and its error.

Values only: nothing here reads a file or the environment, or validates (that is
:mod:`nvswitch_dp.config.parse` and :mod:`nvswitch_dp.config.validators`). A
:class:`Config` built directly (``Config()``, tests) is trusted as given; one built from
text went through every check.

Ownership: each value owns its mappings (plain dicts); nobody mutates them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nvswitch_dp.partitions.units import UNIT_NAMES
from nvswitch_dp.partitions.view import Mode
from nvswitch_dp.vfio.pci_ids import default_gpu_device_ids

CONFIG_VERSION = "v1"
ENV_CONFIG_PATH = "HGX_H200_CONFIG_PATH"
ENV_LOG_LEVEL = "HGX_H200_LOG_LEVEL"
ENV_FMPM_ENDPOINT = "HGX_H200_FMPM_ENDPOINT"
ENV_SOCKET_PATH = "HGX_H200_SOCKET_PATH"

LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
LOG_FORMATS = ("text", "json")
FM_BACKENDS = ("fmpm", "libnvfm", "simulator")
ALLOCATION_UNITS = UNIT_NAMES
PLUGIN_MODES = tuple(mode.value for mode in Mode)
ENV_NODE_NAME = "NODE_NAME"  # DRA mode's node name (the downward API's spec.nodeName)
DEFAULT_DRA_DRIVER = "gpu.nvswitch-dp.io"
DEFAULT_KUBELET_PLUGINS_DIR = "/var/lib/kubelet/plugins"
MAX_DRIVER_NAME = 63  # resource.k8s.io: a driver name is a DNS subdomain of <= 63 chars
DEFAULT_STATE_DIR = "/var/lib/nvswitch-dp"


class ConfigError(Exception):
    """A configuration value, key or file is unacceptable.

    ``source`` is where it came from (a file path, ``<config>``, an environment variable,
    ``command line``), ``key`` the dotted key path (empty for whole-file problems).
    """

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


# ---------------------------------------------------------------------------- schema


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"  # one of LOG_LEVELS, lower case
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, slots=True)
class PluginConfig:
    directory: str = "/var/lib/kubelet/device-plugins"
    # "auto": nvidia.com/gpu-<model> of the node's GPUs (partitions/naming.py).
    resource_prefix: str = "auto"
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    release_grace_seconds: float = 30.0
    # What one kubelet device is: a whole partition, or one GPU of one (KubeVirt).
    allocation_unit: Literal["partition", "gpu"] = "partition"
    # How the node offers its partitions: kubelet device plugins, or a DRA driver.
    mode: Literal["device-plugin", "dra"] = "device-plugin"


@dataclass(frozen=True, slots=True)
class FabricManagerConfig:
    backend: Literal["fmpm", "libnvfm", "simulator"] = "fmpm"
    endpoint: str = "127.0.0.1"  # host (FM's TCP port 6666) or unix:/path (libnvfm only)
    fmpm_path: str = "/usr/bin/fmpm"
    libnvfm_path: str = "libnvfm.so.1"
    timeout_seconds: float = 10.0
    retries: int = 3
    # FM is listed this often: how soon a restarted FM is noticed and told set-activated
    # (benchmarks/daemon.py: within 2 s on every backend). A list is one call of the C
    # API, a read of the simulator's file, or one short fmpm run.
    reconcile_interval_seconds: float = 1.0
    simulator_platform: str = "hgx-h200"
    # /readyz answers 503 once every FM list (any cause: unreachable, garbled output)
    # has failed for this long.
    list_failure_window_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class VfioConfig:
    sysfs_root: str = "/sys"
    dev_root: str = "/dev"
    # "vvvv:dddd" (lower case) -> name; replaces the default table, never merges with it.
    gpu_device_ids: Mapping[str, str] = field(default_factory=default_gpu_device_ids)
    health_interval_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: str = "0.0.0.0:9090"  # HOST:PORT; IPv6 as [::]:9090
    token_file: str | None = None  # bearer token for mutating endpoints; None: refuse them
    open_reads: bool = True
    # /v1 requests are paced to this rate so REST load cannot starve the kubelet's
    # Allocate on the shared event loop; 0 turns pacing off.
    requests_per_second: float = 100.0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # REST connections open at once; lowered at start to what the descriptor limit
    # leaves after the kubelet/FM reserve (nvswitch_dp/limits.py). Beyond it a
    # connection is closed at once and counted.
    max_connections: int = 256


@dataclass(frozen=True, slots=True)
class DraConfig:
    """DRA mode (``plugin.mode: dra``); ignored in device-plugin mode."""

    driver_name: str = DEFAULT_DRA_DRIVER
    kubeconfig: str | None = None  # None: $KUBECONFIG, else the in-cluster service account
    node_name: str | None = None  # None: $NODE_NAME; required in DRA mode
    plugin_registry_dir: str = "/var/lib/kubelet/plugins_registry"
    plugin_dir: str | None = None  # None: /var/lib/kubelet/plugins/<driver_name>
    cdi_dir: str = "/var/run/cdi"

    @property
    def plugin_directory(self) -> str:
        """Where ``dra.sock`` (and the device metadata files) live."""
        if self.plugin_dir is not None:
            return self.plugin_dir
        return f"{DEFAULT_KUBELET_PLUGINS_DIR}/{self.driver_name}"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. Immutable; derive changed copies with :func:`with_overrides`.

    The mappings are plain dicts owned by this value: do not mutate them.
    """

    version: str = CONFIG_VERSION
    log: LogConfig = field(default_factory=LogConfig)
    plugin: PluginConfig = field(default_factory=PluginConfig)
    fabric_manager: FabricManagerConfig = field(default_factory=FabricManagerConfig)
    vfio: VfioConfig = field(default_factory=VfioConfig)
    module_map: Mapping[int, str] = field(default_factory=dict)  # module ID -> PCI address
    api: ApiConfig = field(default_factory=ApiConfig)
    state_dir: str = DEFAULT_STATE_DIR
    dra: DraConfig = field(default_factory=DraConfig)

    def as_dict(self) -> dict[str, Any]:
        """Plain data that :func:`parse_config` (as YAML) would turn back into this value."""
        return config_to_dict(self)


# The top-level keys that are sections (a dataclass each), by name.
SECTIONS: Mapping[str, type[Any]] = {
    "log": LogConfig,
    "plugin": PluginConfig,
    "fabric_manager": FabricManagerConfig,
    "vfio": VfioConfig,
    "api": ApiConfig,
    "dra": DraConfig,
}


def field_names(cls: type[Any]) -> tuple[str, ...]:
    """The keys a section (or the top level, for :class:`Config`) accepts, in order."""
    return tuple(f.name for f in dataclasses.fields(cls))


def config_to_dict(config: Config) -> dict[str, Any]:
    """``config`` as plain data (the YAML schema); :func:`~nvswitch_dp.config.parse_config`
    reads it back."""
    data = dataclasses.asdict(config)
    data["vfio"]["gpu_device_ids"] = dict(config.vfio.gpu_device_ids)
    data["module_map"] = dict(config.module_map)
    return data
