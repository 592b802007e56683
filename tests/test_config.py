"""Configuration: schema, strict validation with key paths, precedence, the example file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from nvswitch_dp.config import (
    ALLOCATION_UNITS,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    parse_config,
    with_overrides,
)
from nvswitch_dp.partitions.units import UNIT_NAMES, allocation_unit
from nvswitch_dp.vfio.pci_ids import GPU_DEVICE_IDS, normalize_pci_address

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "config-example.yaml"


def _v1(body: str) -> str:
    return "version: v1\n" + body


# ---------------------------------------------------------------------------- defaults


def test_minimal_file_is_the_defaults() -> None:
    config = parse_config("version: v1\n")
    assert config == Config()
    assert config.log.level == "info"
    assert config.log.format == "text"
    assert config.plugin.directory == "/var/lib/kubelet/device-plugins"
    assert config.plugin.resource_prefix == "auto"
    assert config.plugin.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert config.plugin.release_grace_seconds == 30
    assert config.plugin.allocation_unit == "partition"
    assert config.fabric_manager.backend == "fmpm"
    assert config.fabric_manager.endpoint == "127.0.0.1"
    assert config.fabric_manager.fmpm_path == "/usr/bin/fmpm"
    assert config.fabric_manager.libnvfm_path == "libnvfm.so.1"
    assert config.fabric_manager.timeout_seconds == 10
    assert config.fabric_manager.retries == 3
    assert config.fabric_manager.reconcile_interval_seconds == 1
    assert config.fabric_manager.simulator_platform == "hgx-h200"
    assert config.vfio.sysfs_root == "/sys"
    assert config.vfio.dev_root == "/dev"
    assert dict(config.vfio.gpu_device_ids) == dict(GPU_DEVICE_IDS)
    assert config.vfio.health_interval_seconds == 5
    assert config.module_map == {}
    assert config.api.listen == "0.0.0.0:9090"
    assert config.api.token_file is None
    assert config.api.open_reads is True
    assert config.api.tls_cert_file is None
    assert config.api.tls_key_file is None
    assert config.state_dir == "/var/lib/nvswitch-dp"


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().state_dir = "/tmp"  # type: ignore[misc]


def test_resource_prefix_is_auto_or_a_resource_name() -> None:
    assert parse_config(_v1("plugin: {resource_prefix: auto}\n")).plugin.resource_prefix == "auto"
    prefix = parse_config(_v1("plugin: {resource_prefix: example.com/h}\n")).plugin.resource_prefix
    assert prefix == "example.com/h"


# ---------------------------------------------------------------------------- example files


def _schema_keys() -> list[tuple[str, int]]:
    """Every key of the schema with its indentation in the YAML file."""
    defaults = Config()
    keys: list[tuple[str, int]] = []
    for top in dataclasses.fields(defaults):
        keys.append((top.name, 0))
        section = getattr(defaults, top.name)
        if dataclasses.is_dataclass(section):
            keys += [(f.name, 2) for f in dataclasses.fields(section)]
    return keys


def test_the_example_file_parses() -> None:
    config = parse_config(EXAMPLE.read_text(), str(EXAMPLE))
    assert sorted(config.module_map) == list(range(1, 9))
    assert config.vfio.gpu_device_ids["10de:2335"] == "H200 SXM 141GB"


def _is_sibling_key(line: str, indent: int) -> bool:
    body = line[indent:]
    return line.startswith(" " * indent) and body[:1].isalpha() and ":" in body


@pytest.mark.parametrize(("key", "indent"), _schema_keys(), ids=lambda v: str(v))
def test_the_example_file_comments_every_key(key: str, indent: int) -> None:
    lines = EXAMPLE.read_text().splitlines()
    prefix = " " * indent + f"{key}:"
    index = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    assert index is not None, f"{key} is missing from the example"
    above = index - 1
    # Sibling keys grouped under one comment (sysfs_root and dev_root) share it.
    while _is_sibling_key(lines[above], indent):
        above -= 1
    assert lines[above].strip().startswith("#"), f"{key} has no comment above it"


def test_round_trip_through_plain_data() -> None:
    config = parse_config(EXAMPLE.read_text())
    assert parse_config(yaml.safe_dump(config_to_dict(config))) == config
    assert config.as_dict() == config_to_dict(config)


# ---------------------------------------------------------------------------- bad configs

BAD = [
    # (case id, YAML, key path in the message, words in the message)
    ("not-yaml", "version: v1\nlog: [unclosed\n", "", "not valid YAML"),
    ("empty", "", "", "empty configuration"),
    ("list", "- a\n", "(top level)", "must be a mapping"),
    ("no-version", "log: {level: info}\n", "version", "required"),
    ("v2", "version: v2\n", "version", "unsupported 'v2'"),
    ("unknown-top", _v1("partitions: {}\n"), "partitions", "unknown key"),
    ("unknown-nested", _v1("plugin: {socket: /x}\n"), "plugin.socket", "unknown key"),
    ("unknown-deep", _v1("fabric_manager: {timeout: 3}\n"), "fabric_manager.timeout", "known"),
    ("duplicate", _v1("log: {}\nlog: {}\n"), "", "duplicate key 'log'"),
    ("duplicate-nested", _v1("log: {level: info, level: debug}\n"), "", "duplicate key"),
    ("section-scalar", _v1("log: loud\n"), "log", "must be a mapping"),
    ("level", _v1("log: {level: verbose}\n"), "log.level", "debug, info, warn, warning, error"),
    ("format", _v1("log: {format: xml}\n"), "log.format", "text, json"),
    ("directory", _v1("plugin: {directory: ''}\n"), "plugin.directory", "non-empty string"),
    ("directory-int", _v1("plugin: {directory: 3}\n"), "plugin.directory", "got 3"),
    (
        "prefix-no-domain",
        _v1("plugin: {resource_prefix: gpu-h200}\n"),
        "plugin.resource_prefix",
        "extended resource",
    ),
    (
        "prefix-upper-domain",
        _v1("plugin: {resource_prefix: NVIDIA.com/gpu}\n"),
        "plugin.resource_prefix",
        "DNS subdomain",
    ),
    (
        "prefix-k8s",
        _v1("plugin: {resource_prefix: kubernetes.io/gpu}\n"),
        "plugin.resource_prefix",
        "kubernetes.io",
    ),
    (
        "prefix-chars",
        _v1("plugin: {resource_prefix: nvidia.com/gpu h200}\n"),
        "plugin.resource_prefix",
        "letters, digits",
    ),
    (
        "prefix-long",
        _v1(f"plugin: {{resource_prefix: nvidia.com/{'g' * 60}}}\n"),
        "plugin.resource_prefix",
        "too long",
    ),
    (
        "grace",
        _v1("plugin: {release_grace_seconds: -5}\n"),
        "plugin.release_grace_seconds",
        "number >= 0, got -5",
    ),
    (
        "unit",
        _v1("plugin: {allocation_unit: gpus}\n"),
        "plugin.allocation_unit",
        "must be one of partition, gpu, got 'gpus'",
    ),
    (
        "unit-case",
        _v1("plugin: {allocation_unit: GPU}\n"),
        "plugin.allocation_unit",
        "one of partition, gpu",
    ),
    ("unit-null", _v1("plugin: {allocation_unit: null}\n"), "plugin.allocation_unit", "got null"),
    ("unit-int", _v1("plugin: {allocation_unit: 4}\n"), "plugin.allocation_unit", "got 4"),
    (
        "backend",
        _v1("fabric_manager: {backend: nvml}\n"),
        "fabric_manager.backend",
        "fmpm, libnvfm, simulator",
    ),
    (
        "timeout",
        _v1("fabric_manager: {timeout_seconds: -1}\n"),
        "fabric_manager.timeout_seconds",
        "must be a positive number, got -1",
    ),
    (
        "timeout-zero",
        _v1("fabric_manager: {timeout_seconds: 0}\n"),
        "fabric_manager.timeout_seconds",
        "positive",
    ),
    (
        "timeout-string",
        _v1("fabric_manager: {timeout_seconds: 10s}\n"),
        "fabric_manager.timeout_seconds",
        "got '10s'",
    ),
    (
        "timeout-bool",
        _v1("fabric_manager: {timeout_seconds: true}\n"),
        "fabric_manager.timeout_seconds",
        "got true",
    ),
    (
        "timeout-nan",
        _v1("fabric_manager: {timeout_seconds: .nan}\n"),
        "fabric_manager.timeout_seconds",
        "positive",
    ),
    ("retries", _v1("fabric_manager: {retries: 1.5}\n"), "fabric_manager.retries", "integer"),
    ("retries-negative", _v1("fabric_manager: {retries: -1}\n"), "fabric_manager.retries", ">= 0"),
    (
        "reconcile",
        _v1("fabric_manager: {reconcile_interval_seconds: 0}\n"),
        "fabric_manager.reconcile_interval_seconds",
        "positive",
    ),
    (
        "reconcile-beyond-fm-restart-window",
        _v1("fabric_manager: {reconcile_interval_seconds: 60}\n"),
        "fabric_manager.reconcile_interval_seconds",
        "below 30 seconds",
    ),
    (
        "platform",
        _v1("fabric_manager: {simulator_platform: dgx-h200}\n"),
        "fabric_manager.simulator_platform",
        "hgx-h200",
    ),
    (
        "endpoint",
        _v1("fabric_manager: {endpoint: 'fm host'}\n"),
        "fabric_manager.endpoint",
        "IP address or host name",
    ),
    (
        "endpoint-port",
        _v1("fabric_manager: {endpoint: '127.0.0.1:6666'}\n"),
        "fabric_manager.endpoint",
        "host name",
    ),
    (
        "endpoint-relative-unix",
        _v1("fabric_manager: {backend: libnvfm, endpoint: 'unix:fm'}\n"),
        "fabric_manager.endpoint",
        "absolute path",
    ),
    (
        "endpoint-unix-fmpm",
        _v1("fabric_manager: {endpoint: 'unix:/run/fm.sock'}\n"),
        "fabric_manager.endpoint",
        "only backend libnvfm",
    ),
    (
        "health",
        _v1("vfio: {health_interval_seconds: 0}\n"),
        "vfio.health_interval_seconds",
        "positive",
    ),
    ("sysfs", _v1("vfio: {sysfs_root: null}\n"), "vfio.sysfs_root", "non-empty string"),
    ("ids-empty", _v1("vfio: {gpu_device_ids: {}}\n"), "vfio.gpu_device_ids", "non-empty"),
    ("ids-null", _v1("vfio: {gpu_device_ids: null}\n"), "vfio.gpu_device_ids", "non-empty"),
    (
        "ids-key",
        _v1("vfio: {gpu_device_ids: {h200: x}}\n"),
        "vfio.gpu_device_ids.h200",
        "vendor:device",
    ),
    (
        "ids-dup",
        _v1("vfio: {gpu_device_ids: {'10de:2335': a, '10DE:2335': b}}\n"),
        "vfio.gpu_device_ids.10DE:2335",
        "duplicate",
    ),
    (
        "ids-name",
        _v1("vfio: {gpu_device_ids: {'10de:2335': ''}}\n"),
        "vfio.gpu_device_ids.10de:2335",
        "non-empty string",
    ),
    ("map-list", _v1("module_map: [a]\n"), "module_map", "must be a mapping"),
    ("map-zero", _v1("module_map: {0: '0000:5d:00.0'}\n"), "module_map.0", "1-16"),
    ("map-17", _v1("module_map: {17: '0000:5d:00.0'}\n"), "module_map.17", "1-16"),
    ("map-name", _v1("module_map: {gpu1: '0000:5d:00.0'}\n"), "module_map.gpu1", "integer"),
    ("map-address", _v1("module_map: {1: '5d:00.0'}\n"), "module_map.1", "PCI address"),
    ("map-function", _v1("module_map: {1: '0000:5d:00.8'}\n"), "module_map.1", "PCI address"),
    ("map-device", _v1("module_map: {1: '0000:5d:20.0'}\n"), "module_map.1", "PCI address"),
    ("map-unquoted", _v1("module_map: {1: 0000:18:00.0}\n"), "module_map.1", "quoted"),
    (
        "map-dup-address",
        _v1("module_map: {1: '0000:5d:00.0', 2: '0000:5D:00.0'}\n"),
        "module_map.2",
        "already module 1",
    ),
    (
        "map-dup-module",
        _v1("module_map: {1: '0000:5d:00.0', '1': '0000:3a:00.0'}\n"),
        "module_map.1",
        "listed twice",
    ),
    ("listen-no-port", _v1("api: {listen: 0.0.0.0}\n"), "api.listen", "HOST:PORT"),
    ("listen-bare-v6", _v1("api: {listen: '::9090'}\n"), "api.listen", "[::]:9090"),
    ("listen-port", _v1("api: {listen: '0.0.0.0:70000'}\n"), "api.listen", "0-65535"),
    ("listen-bad-v6", _v1("api: {listen: '[zz]:9090'}\n"), "api.listen", "HOST:PORT"),
    ("open-reads", _v1("api: {open_reads: 'yes please'}\n"), "api.open_reads", "true or false"),
    ("rest-pace", _v1("api: {requests_per_second: -5}\n"), "api.requests_per_second", "-5"),
    ("token", _v1("api: {token_file: ''}\n"), "api.token_file", "non-empty"),
    ("tls-half", _v1("api: {tls_cert_file: /c.pem}\n"), "api.tls_key_file", "go together"),
    ("state-dir", _v1("state_dir: []\n"), "state_dir", "non-empty string"),
]


@pytest.mark.parametrize(("text", "key", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_configs_name_the_key_and_the_source(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "node.yaml")
    error = caught.value
    assert error.source == "node.yaml"
    assert error.key == key
    assert words in error.message
    assert str(error).startswith(f"node.yaml: {key}: " if key else "node.yaml: ")


def test_the_message_reads_naturally() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_v1("fabric_manager:\n  timeout_seconds: -1\n"), "/etc/nvswitch-dp.yaml")
    assert str(caught.value) == (
        "/etc/nvswitch-dp.yaml: fabric_manager.timeout_seconds: must be a positive number, got -1"
    )


def test_yaml_errors_give_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^f.yaml: not valid YAML at line 3, column 10: "):
        parse_config("version: v1\nlog:\n  level: ]\n", "f.yaml")
    with pytest.raises(ConfigError, match=r"at line 3, column 1: duplicate key 'log'"):
        parse_config("version: v1\nlog: {}\nlog: {}\n", "f.yaml")


# ---------------------------------------------------------------------------- good values

GOOD = [
    ("log: {level: WARN}\n", lambda c: c.log.level == "warn"),
    ("log: {level: warning, format: json}\n", lambda c: c.log.format == "json"),
    ("log:\n", lambda c: c.log == Config().log),  # an empty section is all defaults
    ("plugin: {release_grace_seconds: 0}\n", lambda c: c.plugin.release_grace_seconds == 0),
    ("plugin: {allocation_unit: gpu}\n", lambda c: c.plugin.allocation_unit == "gpu"),
    ("plugin: {allocation_unit: partition}\n", lambda c: c.plugin.allocation_unit == "partition"),
    ("fabric_manager: {timeout_seconds: 0.5}\n", lambda c: c.fabric_manager.timeout_seconds == 0.5),
    ("fabric_manager: {retries: 0}\n", lambda c: c.fabric_manager.retries == 0),
    (
        "fabric_manager: {endpoint: fm.example.org}\n",
        lambda c: c.fabric_manager.endpoint == "fm.example.org",
    ),
    ("fabric_manager: {endpoint: '::1'}\n", lambda c: c.fabric_manager.endpoint == "::1"),
    (
        "fabric_manager: {backend: libnvfm, endpoint: 'unix:/run/nvidia-fabricmanager/socket'}\n",
        lambda c: c.fabric_manager.endpoint.startswith("unix:/"),
    ),
    (
        "fabric_manager: {backend: simulator, simulator_platform: hgx-a100-16}\n",
        lambda c: c.fabric_manager.simulator_platform == "hgx-a100-16",
    ),
    (
        "vfio: {gpu_device_ids: {'0x10DE:0x2335': mine}}\n",
        lambda c: dict(c.vfio.gpu_device_ids) == {"10de:2335": "mine"},
    ),
    ("module_map: {'3': '00000000:5D:00.0'}\n", lambda c: c.module_map == {3: "0000:5d:00.0"}),
    ("module_map: {16: '0001:ff:1f.7'}\n", lambda c: c.module_map == {16: "0001:ff:1f.7"}),
    ("module_map:\n", lambda c: c.module_map == {}),
    ("api: {listen: '[::]:9090'}\n", lambda c: c.api.listen == "[::]:9090"),
    ("api: {listen: 'localhost:0'}\n", lambda c: c.api.listen == "localhost:0"),
    (
        "api: {tls_cert_file: /c.pem, tls_key_file: /k.pem, open_reads: false}\n",
        lambda c: c.api.tls_key_file == "/k.pem" and not c.api.open_reads,
    ),
]


@pytest.mark.parametrize(("body", "holds"), GOOD, ids=[g[0].split(":")[0] for g in GOOD])
def test_good_values(body: str, holds: object) -> None:
    config = parse_config(_v1(body))
    assert callable(holds) and holds(config)


def test_module_map_is_ordered_by_module() -> None:
    config = parse_config(_v1("module_map: {2: '0000:3a:00.0', 1: '0000:5d:00.0'}\n"))
    assert list(config.module_map) == [1, 2]


@given(
    domain=st.integers(0, 0xFFFF),
    bus=st.integers(0, 0xFF),
    device=st.integers(0, 0x1F),
    function=st.integers(0, 7),
)
def test_pci_addresses_normalize_from_any_case_and_nvidia_smi_form(
    domain: int, bus: int, device: int, function: int
) -> None:
    canonical = f"{domain:04x}:{bus:02x}:{device:02x}.{function}"
    assert normalize_pci_address(canonical.upper()) == canonical
    assert normalize_pci_address(f"0000{domain:04X}:{bus:02X}:{device:02X}.{function}") == canonical


# ---------------------------------------------------------------------------- precedence


def _file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(_v1(body))
    return path


def test_no_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(None, {}) == Config()
    assert load_config(None, {"HGX_H200_CONFIG_PATH": ""}) == Config()


def test_the_file_comes_from_the_argument_or_the_environment(tmp_path: Path) -> None:
    path = _file(tmp_path, "state_dir: /from/file\n")
    other = tmp_path / "other.yaml"
    other.write_text(_v1("state_dir: /from/env\n"))
    assert load_config(path, {}).state_dir == "/from/file"
    assert load_config(str(path), {}).state_dir == "/from/file"
    assert load_config(None, {"HGX_H200_CONFIG_PATH": str(other)}).state_dir == "/from/env"
    # The argument (--config) wins over the environment variable.
    assert load_config(path, {"HGX_H200_CONFIG_PATH": str(other)}).state_dir == "/from/file"


def test_defaults_then_file_then_environment_then_command_line(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        "log: {level: error}\nfabric_manager: {endpoint: 10.0.0.1}\n"
        "plugin: {directory: /file/plugins}\n",
    )
    from_file = load_config(path, {})
    assert from_file.log.level == "error"
    assert from_file.fabric_manager.endpoint == "10.0.0.1"
    assert from_file.plugin.directory == "/file/plugins"
    assert from_file.api.listen == "0.0.0.0:9090"  # untouched: the default

    env = {
        "HGX_H200_LOG_LEVEL": "debug",
        "HGX_H200_FMPM_ENDPOINT": "10.0.0.2",
        "HGX_H200_SOCKET_PATH": "/env/plugins",
    }
    from_env = load_config(path, env)
    assert from_env.log.level == "debug"
    assert from_env.fabric_manager.endpoint == "10.0.0.2"
    assert from_env.plugin.directory == "/env/plugins"

    from_flags = with_overrides(
        from_env, {"plugin.directory": "/flag/plugins", "fabric_manager.endpoint": None}
    )
    assert from_flags.plugin.directory == "/flag/plugins"
    assert from_flags.fabric_manager.endpoint == "10.0.0.2"  # None: flag not given


def test_empty_environment_variables_are_unset(tmp_path: Path) -> None:
    path = _file(tmp_path, "log: {level: error}\n")
    assert load_config(path, {"HGX_H200_LOG_LEVEL": "", "HGX_H200_SOCKET_PATH": " "}) == (
        load_config(path, {})
    )


def test_a_socket_path_means_its_directory() -> None:
    env = {"HGX_H200_SOCKET_PATH": "/var/lib/kubelet/device-plugins/nvswitch.sock"}
    assert load_config(None, env).plugin.directory == "/var/lib/kubelet/device-plugins"


def test_a_bad_environment_value_names_the_variable_and_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"HGX_H200_LOG_LEVEL": "chatty"})
    assert caught.value.source == "environment HGX_H200_LOG_LEVEL"
    assert caught.value.key == "log.level"
    with pytest.raises(ConfigError, match=r"HGX_H200_FMPM_ENDPOINT: fabric_manager\.endpoint"):
        load_config(None, {"HGX_H200_FMPM_ENDPOINT": "unix:/run/fm.sock"})


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read the file") as caught:
        load_config(missing, {})
    assert caught.value.source == str(missing)


def test_a_bad_file_names_its_path(tmp_path: Path) -> None:
    path = _file(tmp_path, "log: {colour: red}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: log.colour: unknown key"):
        load_config(path, {})


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^command line: api.listen: must be HOST:PORT"):
        with_overrides(Config(), {"api.listen": "nowhere"})
    with pytest.raises(ConfigError, match=r"^--flags: plugin.nope: unknown key"):
        with_overrides(Config(), {"plugin.nope": 1}, source="--flags")
    with pytest.raises(ConfigError, match="unknown key"):
        with_overrides(Config(), {"log": {"level": "debug"}})
    with pytest.raises(ConfigError, match="unknown key"):
        with_overrides(Config(), {"nope.level": "debug"})


def test_overrides_set_top_level_keys_and_mappings() -> None:
    config = with_overrides(
        Config(),
        {
            "state_dir": "/s",
            "module_map": {1: "0000:5D:00.0"},
            "vfio.gpu_device_ids": {"10de:2335": "H200"},
            "plugin.release_grace_seconds": 1.5,
        },
    )
    assert config.state_dir == "/s"
    assert config.module_map == {1: "0000:5d:00.0"}
    assert dict(config.vfio.gpu_device_ids) == {"10de:2335": "H200"}
    assert config.plugin.release_grace_seconds == 1.5
    assert with_overrides(config, {}) is config


def test_the_allocation_unit_names_the_units_the_plugin_has() -> None:
    assert ALLOCATION_UNITS == UNIT_NAMES
    config = with_overrides(Config(), {"plugin.allocation_unit": "gpu"})
    assert allocation_unit(config.plugin.allocation_unit).name == "gpu"
    with pytest.raises(ConfigError, match=r"^command line: plugin.allocation_unit: must be one"):
        with_overrides(Config(), {"plugin.allocation_unit": "vm"})
