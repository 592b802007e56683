"""The daemon's configuration: schema ``v1``, frozen dataclasses, strict parsing.

Precedence, lowest first (NVIDIA ``api/config/v1``'s order):

1. built-in defaults (the dataclass defaults below; ``Config()``);
2. the YAML file: ``--config FILE``, else ``$HGX_H200_CONFIG_PATH`` (see :func:`load_config`);
3. environment overrides: ``HGX_H200_LOG_LEVEL`` (``log.level``), ``HGX_H200_FMPM_ENDPOINT``
   (``fabric_manager.endpoint``), ``HGX_H200_SOCKET_PATH`` (``plugin.directory``; a path
   ending in ``.sock`` means the directory it is in). In DRA mode only, ``NODE_NAME``
   (``dra.node_name``; :func:`apply_dra_env`). An empty variable counts as unset;
4. command-line flags, applied with :func:`with_overrides`.

What no single layer can tell (DRA mode needs a node name) is checked once every layer is
applied, by :func:`check_complete`.

Every layer is validated by the same code, so a bad value from any of them raises
:class:`ConfigError` naming the source and the full key path, e.g.
``config.yaml: fabric_manager.timeout_seconds: must be a positive number, got -1``.
Unknown keys at any level are errors (never dropped silently), and so are duplicate keys.

Rule: :func:`parse_config` is pure (text in, value out; no file or environment access).
Only :func:`load_config` reads a file. A documented example is ``docs/config-example.yaml``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nvswitch_dp.fabric.platforms import platform_names
from nvswitch_dp.vfio.identity import MAX_MODULE_ID
from nvswitch_dp.vfio.pci_ids import (
    default_gpu_device_ids,
    normalize_device_key,
    normalize_pci_address,
)

CONFIG_VERSION = "v1"
ENV_CONFIG_PATH = "HGX_H200_CONFIG_PATH"
ENV_LOG_LEVEL = "HGX_H200_LOG_LEVEL"
ENV_FMPM_ENDPOINT = "HGX_H200_FMPM_ENDPOINT"
ENV_SOCKET_PATH = "HGX_H200_SOCKET_PATH"

LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
LOG_FORMATS = ("text", "json")
FM_BACKENDS = ("fmpm", "libnvfm", "simulator")
ALLOCATION_UNITS = ("partition", "gpu")  # nvswitch_dp.partitions.units.UNIT_NAMES
PLUGIN_MODES = ("device-plugin", "dra")  # nvswitch_dp.partitions.node.Mode values
ENV_NODE_NAME = "NODE_NAME"  # DRA mode's node name (the downward API's spec.nodeName)
DEFAULT_DRA_DRIVER = "gpu.nvswitch-dp.io"
DEFAULT_KUBELET_PLUGINS_DIR = "/var/lib/kubelet/plugins"
MAX_DRIVER_NAME = 63  # resource.k8s.io: a driver name is a DNS subdomain of <= 63 chars
# Longest suffix a resource name gets ("-16x"); the name part must stay within 63 chars.
_LONGEST_SIZE_SUFFIX = len("-16x")


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
    resource_prefix: str = "nvidia.com/gpu-h200"
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
    state_dir: str = "/var/lib/nvswitch-dp"  # must equal _DEFAULT_STATE_DIR
    dra: DraConfig = field(default_factory=DraConfig)

    def resource_name(self, size: int) -> str:
        """``nvidia.com/gpu-h200-4x`` for ``size`` 4. ``ValueError`` unless ``size >= 1``."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"partition size must be a positive integer, got {size!r}")
        return f"{self.plugin.resource_prefix}-{size}x"

    def as_dict(self) -> dict[str, Any]:
        """Plain data that :func:`parse_config` (as YAML) would turn back into this value."""
        return config_to_dict(self)


_DEFAULT_STATE_DIR = "/var/lib/nvswitch-dp"

_SECTIONS: dict[str, type[Any]] = {
    "log": LogConfig,
    "plugin": PluginConfig,
    "fabric_manager": FabricManagerConfig,
    "vfio": VfioConfig,
    "api": ApiConfig,
    "dra": DraConfig,
}


# ---------------------------------------------------------------------------- validators


class _Invalid(Exception):
    """A validator's complaint; turned into ConfigError with the key path and source."""


Validator = Callable[[Any], Any]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_number(value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise _Invalid(f"must be a positive number, got {_show(value)}")
    return float(value)


def _supervision_period(value: Any) -> float:
    # A restarted FM exits 60 s after its restart unless told set-activated, and an idle
    # daemon only learns of the restart at its next supervision.
    period = _positive_number(value)
    if period >= 30:
        raise _Invalid(
            f"must be below 30 seconds (a restarted Fabric Manager exits after 60 s "
            f"unless resumed), got {_show(value)}"
        )
    return period


def _non_negative_number(value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise _Invalid(f"must be a number >= 0, got {_show(value)}")
    return float(value)


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid(f"must be an integer >= 0, got {_show(value)}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(f"must be an integer >= 1, got {_show(value)}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _Invalid(f"must be a non-empty string, got {_show(value)}")
    return value


def _optional_string(value: Any) -> str | None:
    return None if value is None else _string(value)


def _choice(*choices: str, fold: bool = False) -> Validator:
    def check(value: Any) -> str:
        text = value.lower() if fold and isinstance(value, str) else value
        if text not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}, got {_show(value)}")
        return str(text)

    return check


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_HOST_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(\.{_HOST_LABEL})*$")


def _resource_prefix(value: Any) -> str:
    """``<domain>/<name>``: a Kubernetes extended resource name once ``-<n>x`` is added."""
    text = _string(value)
    domain, slash, name = text.partition("/")
    hint = "a Kubernetes extended resource name prefix like 'nvidia.com/gpu-h200'"
    if not slash or not domain or not name:
        raise _Invalid(f"must be {hint}, got {_show(value)}")
    if len(domain) > 253 or not _DNS_SUBDOMAIN.match(domain):
        raise _Invalid(f"domain {domain!r} is not a DNS subdomain (lower case); must be {hint}")
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        raise _Invalid(f"extended resources may not use the kubernetes.io domain, got {domain!r}")
    if not _QUALIFIED_NAME.match(name):
        raise _Invalid(
            f"name {name!r} must be letters, digits, '-', '_' or '.', starting and ending "
            "with a letter or digit"
        )
    if len(name) + _LONGEST_SIZE_SUFFIX > 63:
        raise _Invalid(
            f"name {name!r} is too long: with '-16x' appended it must be at most 63 characters"
        )
    return text


def _dns_subdomain(what: str, limit: int) -> Validator:
    def check(value: Any) -> str:
        text = _string(value)
        if len(text) > limit or not _DNS_SUBDOMAIN.match(text):
            raise _Invalid(
                f"must be {what}: a lower-case DNS subdomain of at most {limit} characters "
                f"(letters, digits, '-' and '.'), got {_show(value)}"
            )
        return text

    return check


def _optional(validator: Validator) -> Validator:
    def check(value: Any) -> Any:
        return None if value is None else validator(value)

    return check


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOSTNAME.match(text))
    return True


def _endpoint(value: Any) -> str:
    text = _string(value)
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise _Invalid(f"a Unix socket endpoint needs an absolute path, got {_show(value)}")
        return text
    if not _is_host(text):
        raise _Invalid(
            "must be an IP address or host name (FM's TCP port 6666), or unix:/path/to/socket,"
            f" got {_show(value)}"
        )
    return text


def _listen(value: Any) -> str:
    text = _string(value)
    hint = "must be HOST:PORT (IPv6 as [::]:9090)"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{hint}, got {_show(value)}") from None
        if not sep:
            raise _Invalid(f"{hint}, got {_show(value)}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host or not _is_host(host):
            raise _Invalid(f"{hint}, got {_show(value)}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _Invalid(f"port must be 0-65535, got {_show(value)}")
    return text


def _platform(value: Any) -> str:
    text = _string(value)
    if text not in platform_names():
        raise _Invalid(f"must be one of {', '.join(platform_names())}, got {_show(value)}")
    return text


# ---------------------------------------------------------------------------- parsing


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


class _Builder:
    """Turns plain data (parsed YAML) into a :class:`Config`, naming ``source`` in errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, key, message)

    def check(self, key: str, validator: Validator, value: Any) -> Any:
        try:
            return validator(value)
        except _Invalid as exc:
            raise self.fail(key, str(exc)) from None

    def mapping(self, key: str, raw: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(key or "(top level)", f"must be a mapping, got {_show(raw)}")
        for k in raw:
            if not isinstance(k, str) or k not in allowed:
                path = f"{key}.{k}" if key else str(k)
                raise self.fail(path, f"unknown key; known keys: {', '.join(allowed)}")
        return raw

    def section(self, name: str, cls: type[Any], raw: Any, validators: dict[str, Validator]) -> Any:
        values = self.mapping(name, raw, tuple(validators))
        parsed = {k: self.check(f"{name}.{k}", validators[k], v) for k, v in values.items()}
        return cls(**parsed)

    def gpu_device_ids(self, raw: Any) -> dict[str, str]:
        key = "vfio.gpu_device_ids"
        if not isinstance(raw, dict) or not raw:
            raise self.fail(
                key,
                f'must be a non-empty mapping like {{"10de:2335": "H200 SXM 141GB"}}, '
                f"got {_show(raw)}",
            )
        table: dict[str, str] = {}
        for k, v in raw.items():
            try:
                norm = normalize_device_key(str(k)) if isinstance(k, str) else None
            except ValueError:
                norm = None
            if norm is None:
                raise self.fail(f"{key}.{k}", "must be a vendor:device ID like '10de:2335'")
            if norm in table:
                raise self.fail(f"{key}.{k}", f"duplicate ID {norm}")
            table[norm] = self.check(f"{key}.{k}", _string, v)
        return table

    def module_map(self, raw: Any) -> dict[int, str]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(
                "module_map", f"must be a mapping of module ID to PCI address, got {_show(raw)}"
            )
        result: dict[int, str] = {}
        owners: dict[str, int] = {}
        for k, v in raw.items():
            path = f"module_map.{k}"
            module = _module_id(k)
            if module is None:
                raise self.fail(path, f"module ID must be an integer 1-{MAX_MODULE_ID}")
            if module in result:
                raise self.fail(path, f"module {module} is listed twice")
            if not isinstance(v, str):
                raise self.fail(
                    path,
                    f'must be a quoted PCI address like "0000:5d:00.0", got {_show(v)} '
                    "(unquoted, YAML may read an address such as 0000:18:00.0 as a number)",
                )
            try:
                address = normalize_pci_address(v)
            except ValueError as exc:
                raise self.fail(path, str(exc)) from None
            if address in owners:
                raise self.fail(path, f"{address} is already module {owners[address]}")
            owners[address] = module
            result[module] = address
        return dict(sorted(result.items()))

    def build(self, raw: Any) -> Config:
        if raw is None:
            raise self.fail("", f"empty configuration; write at least 'version: {CONFIG_VERSION}'")
        top = self.mapping("", raw, tuple(f.name for f in dataclasses.fields(Config)))
        if "version" not in top:
            raise self.fail("version", f"required; this daemon reads {CONFIG_VERSION}")
        if top["version"] != CONFIG_VERSION:
            got = _show(top["version"])
            raise self.fail("version", f"unsupported {got}; supported: {CONFIG_VERSION}")
        # gpu_device_ids is a mapping with its own checks; the rest are plain fields.
        vfio_raw = dict(self.mapping("vfio", top.get("vfio"), _field_names(VfioConfig)))
        ids = vfio_raw.pop("gpu_device_ids", None)
        vfio = self.section("vfio", VfioConfig, vfio_raw, _VFIO)
        if ids is not None or "gpu_device_ids" in (top.get("vfio") or {}):
            vfio = dataclasses.replace(vfio, gpu_device_ids=self.gpu_device_ids(ids))
        config = Config(
            version=CONFIG_VERSION,
            log=self.section("log", LogConfig, top.get("log"), _LOG),
            plugin=self.section("plugin", PluginConfig, top.get("plugin"), _PLUGIN),
            fabric_manager=self.section(
                "fabric_manager", FabricManagerConfig, top.get("fabric_manager"), _FABRIC
            ),
            vfio=vfio,
            module_map=self.module_map(top.get("module_map")),
            api=self.section("api", ApiConfig, top.get("api"), _API),
            state_dir=self.check("state_dir", _string, top.get("state_dir", _DEFAULT_STATE_DIR)),
            dra=self.section("dra", DraConfig, top.get("dra"), _DRA),
        )
        self.cross_check(config)
        return config

    def cross_check(self, config: Config) -> None:
        fm, api = config.fabric_manager, config.api
        if fm.endpoint.startswith("unix:") and fm.backend == "fmpm":
            raise self.fail(
                "fabric_manager.endpoint",
                f"{fm.endpoint!r} is a Unix socket, which only backend libnvfm can use "
                "(fmpm always connects over TCP)",
            )
        if (api.tls_cert_file is None) != (api.tls_key_file is None):
            missing = "api.tls_key_file" if api.tls_key_file is None else "api.tls_cert_file"
            raise self.fail(missing, "api.tls_cert_file and api.tls_key_file go together")


def _field_names(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _module_id(key: Any) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, str) and key.strip().isdigit():
        key = int(key)
    if isinstance(key, int) and 1 <= key <= MAX_MODULE_ID:
        return key
    return None


_LOG: dict[str, Validator] = {
    "level": _choice(*LOG_LEVELS, fold=True),
    "format": _choice(*LOG_FORMATS),
}
_PLUGIN: dict[str, Validator] = {
    "directory": _string,
    "resource_prefix": _resource_prefix,
    "pod_resources_socket": _string,
    "release_grace_seconds": _non_negative_number,
    "allocation_unit": _choice(*ALLOCATION_UNITS),
    "mode": _choice(*PLUGIN_MODES),
}
_FABRIC: dict[str, Validator] = {
    "backend": _choice(*FM_BACKENDS),
    "endpoint": _endpoint,
    "fmpm_path": _string,
    "libnvfm_path": _string,
    "timeout_seconds": _positive_number,
    "retries": _non_negative_int,
    "reconcile_interval_seconds": _supervision_period,
    "simulator_platform": _platform,
    "list_failure_window_seconds": _positive_number,
}
_VFIO: dict[str, Validator] = {
    "sysfs_root": _string,
    "dev_root": _string,
    "health_interval_seconds": _positive_number,
}
_API: dict[str, Validator] = {
    "listen": _listen,
    "token_file": _optional_string,
    "open_reads": _boolean,
    "requests_per_second": _non_negative_number,
    "tls_cert_file": _optional_string,
    "tls_key_file": _optional_string,
    "max_connections": _positive_int,
}


_DRA: dict[str, Validator] = {
    "driver_name": _dns_subdomain("a DRA driver name like 'gpu.nvswitch-dp.io'", MAX_DRIVER_NAME),
    "kubeconfig": _optional_string,
    # The pool and the slices' spec.nodeName: a node name is a DNS subdomain.
    "node_name": _optional(_dns_subdomain("a Kubernetes node name", 253)),
    "plugin_registry_dir": _string,
    "plugin_dir": _optional_string,
    "cdi_dir": _string,
}


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate YAML ``text``; ``source`` names it in error messages. Pure.

    Errors: :class:`ConfigError` for invalid YAML (with line and column), duplicate or
    unknown keys, a missing or unsupported ``version``, and any bad value.
    """
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(source, "", f"not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"not valid YAML: {exc}") from None
    return _Builder(source).build(raw)


def config_to_dict(config: Config) -> dict[str, Any]:
    """``config`` as plain data (the YAML schema); :func:`parse_config` reads it back."""
    data = dataclasses.asdict(config)
    data["vfio"]["gpu_device_ids"] = dict(config.vfio.gpu_device_ids)
    data["module_map"] = dict(config.module_map)
    return data


def with_overrides(
    config: Config, overrides: Mapping[str, Any], *, source: str = "command line"
) -> Config:
    """A copy of ``config`` with dotted keys set (``{"plugin.directory": "/x"}``).

    ``None`` values are skipped (an absent flag). The result is validated like a file, so
    a bad flag raises :class:`ConfigError` naming ``source`` and the key; so does an
    unknown key.
    """
    data = config_to_dict(config)
    changed = False
    for dotted, value in overrides.items():
        if value is None:
            continue
        head, _, rest = dotted.partition(".")
        target: Any = data
        if rest:
            if head not in _SECTIONS:
                raise ConfigError(source, dotted, "unknown key")
            target = data[head]
            if rest not in target:
                raise ConfigError(source, dotted, "unknown key")
            target[rest] = value
        elif head in data and head not in _SECTIONS and head != "version":
            data[head] = value
        else:
            raise ConfigError(source, dotted, "unknown key (or a whole section)")
        changed = True
    return _Builder(source).build(data) if changed else config


def env_overrides(env: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """``(variable, dotted key, value)`` for each set, non-empty ``HGX_H200_*`` override."""
    found: list[tuple[str, str, str]] = []
    for variable, key in (
        (ENV_LOG_LEVEL, "log.level"),
        (ENV_FMPM_ENDPOINT, "fabric_manager.endpoint"),
        (ENV_SOCKET_PATH, "plugin.directory"),
    ):
        value = env.get(variable, "").strip()
        if not value:
            continue
        if variable == ENV_SOCKET_PATH and value.endswith(".sock") and "/" in value:
            # The original design called it a socket path; our sockets are per resource,
            # so a socket path means the directory holding it.
            value = value.rsplit("/", 1)[0] or "/"
        found.append((variable, key, value))
    return found


def apply_dra_env(config: Config, env: Mapping[str, str]) -> Config:
    """``config`` with ``$NODE_NAME`` as ``dra.node_name`` when ``plugin.mode`` is ``dra``
    (device-plugin mode never reads it). Pure; raises :class:`ConfigError` for a value
    that is not a node name."""
    value = env.get(ENV_NODE_NAME, "").strip()
    if config.plugin.mode != "dra" or not value:
        return config
    return with_overrides(config, {"dra.node_name": value}, source=f"environment {ENV_NODE_NAME}")


def check_complete(config: Config, *, source: str = "configuration") -> None:
    """What only the whole configuration (every layer applied) can tell: in DRA mode a
    node name is required (``dra.node_name``, ``$NODE_NAME`` or ``--node-name``).

    Raises :class:`ConfigError` naming the key and where to give it. Pure.
    """
    if config.plugin.mode == "dra" and config.dra.node_name is None:
        raise ConfigError(
            source,
            "dra.node_name",
            "required in DRA mode (the pool and its ResourceSlices are named after the "
            f"node): give --node-name, set {ENV_NODE_NAME} (in a pod, from the downward "
            "API's spec.nodeName) or set dra.node_name",
        )


def apply_env(config: Config, env: Mapping[str, str]) -> Config:
    """``config`` with the ``HGX_H200_*`` overrides of ``env`` applied. Pure."""
    for variable, key, value in env_overrides(env):
        config = with_overrides(config, {key: value}, source=f"environment {variable}")
    return config


def load_config(path: Path | str | None, env: Mapping[str, str]) -> Config:
    """Read the file at ``path`` (else ``$HGX_H200_CONFIG_PATH``; else defaults only),
    then apply the environment overrides.

    Errors: :class:`ConfigError` for an
    unreadable file and for any invalid content or override.
    """
    if path is None:
        path = env.get(ENV_CONFIG_PATH, "").strip() or None
    if path is None:
        config = Config()
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), "", f"cannot read the file: {exc}") from None
        config = parse_config(text, str(path))
    return apply_env(config, env)
