"""From text to a checked :class:`~nvswitch_dp.config.Config`: YAML that refuses duplicate
keys, then a builder that walks the schema, checks every value with
:mod:`nvswitch_dp.config.validators`, refuses unknown keys, and checks the rules that
join two values.

Pure: text or plain data in, a value or :class:`~nvswitch_dp.config.ConfigError` out
(naming the source and the dotted key path); no file or environment access.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from nvswitch_dp.config.schema import (
    ALLOCATION_UNITS,
    CONFIG_VERSION,
    DEFAULT_STATE_DIR,
    FM_BACKENDS,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_DRIVER_NAME,
    PLUGIN_MODES,
    ApiConfig,
    Config,
    ConfigError,
    DraConfig,
    FabricManagerConfig,
    LogConfig,
    PluginConfig,
    VfioConfig,
    field_names,
)
from nvswitch_dp.config.validators import (
    Invalid,
    Validator,
    boolean,
    choice,
    dns_subdomain,
    endpoint,
    int_at_least,
    listen,
    module_id,
    non_negative_number,
    optional,
    optional_string,
    platform,
    positive_number,
    resource_prefix,
    show,
    string,
    supervision_period,
)
from nvswitch_dp.vfio.identity import MAX_MODULE_ID
from nvswitch_dp.vfio.pci_ids import normalize_device_key, normalize_pci_address


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
        except Invalid as exc:
            raise self.fail(key, str(exc)) from None

    def mapping(self, key: str, raw: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(key or "(top level)", f"must be a mapping, got {show(raw)}")
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
                f"got {show(raw)}",
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
            table[norm] = self.check(f"{key}.{k}", string, v)
        return table

    def module_map(self, raw: Any) -> dict[int, str]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.fail(
                "module_map", f"must be a mapping of module ID to PCI address, got {show(raw)}"
            )
        result: dict[int, str] = {}
        owners: dict[str, int] = {}
        for k, v in raw.items():
            path = f"module_map.{k}"
            module = module_id(k)
            if module is None:
                raise self.fail(path, f"module ID must be an integer 1-{MAX_MODULE_ID}")
            if module in result:
                raise self.fail(path, f"module {module} is listed twice")
            if not isinstance(v, str):
                raise self.fail(
                    path,
                    f'must be a quoted PCI address like "0000:5d:00.0", got {show(v)} '
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
        top = self.mapping("", raw, field_names(Config))
        if "version" not in top:
            raise self.fail("version", f"required; this daemon reads {CONFIG_VERSION}")
        if top["version"] != CONFIG_VERSION:
            got = show(top["version"])
            raise self.fail("version", f"unsupported {got}; supported: {CONFIG_VERSION}")
        # gpu_device_ids is a mapping with its own checks; the rest are plain fields.
        vfio_raw = dict(self.mapping("vfio", top.get("vfio"), field_names(VfioConfig)))
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
            state_dir=self.check("state_dir", string, top.get("state_dir", DEFAULT_STATE_DIR)),
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


_LOG: dict[str, Validator] = {
    "level": choice(*LOG_LEVELS, fold=True),
    "format": choice(*LOG_FORMATS),
}
_PLUGIN: dict[str, Validator] = {
    "directory": string,
    "resource_prefix": resource_prefix,
    "pod_resources_socket": string,
    "release_grace_seconds": non_negative_number,
    "allocation_unit": choice(*ALLOCATION_UNITS),
    "mode": choice(*PLUGIN_MODES),
}
_FABRIC: dict[str, Validator] = {
    "backend": choice(*FM_BACKENDS),
    "endpoint": endpoint,
    "fmpm_path": string,
    "libnvfm_path": string,
    "timeout_seconds": positive_number,
    "retries": int_at_least(0),
    "reconcile_interval_seconds": supervision_period,
    "simulator_platform": platform,
    "list_failure_window_seconds": positive_number,
}
_VFIO: dict[str, Validator] = {
    "sysfs_root": string,
    "dev_root": string,
    "health_interval_seconds": positive_number,
}
_API: dict[str, Validator] = {
    "listen": listen,
    "token_file": optional_string,
    "open_reads": boolean,
    "requests_per_second": non_negative_number,
    "tls_cert_file": optional_string,
    "tls_key_file": optional_string,
    "max_connections": int_at_least(1),
}


_DRA: dict[str, Validator] = {
    "driver_name": dns_subdomain("a DRA driver name like 'gpu.nvswitch-dp.io'", MAX_DRIVER_NAME),
    "kubeconfig": optional_string,
    # The pool and the slices' spec.nodeName: a node name is a DNS subdomain.
    "node_name": optional(dns_subdomain("a Kubernetes node name", 253)),
    "plugin_registry_dir": string,
    "plugin_dir": optional_string,
    "cdi_dir": string,
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
    return build_config(raw, source)


def build_config(raw: Any, source: str) -> Config:
    """Plain data (parsed YAML, or :func:`~nvswitch_dp.config.schema.config_to_dict` output
    with changes) validated into a :class:`Config`. Pure.

    Errors: :class:`ConfigError` naming ``source`` and the key, as :func:`parse_config`.
    """
    return _Builder(source).build(raw)
