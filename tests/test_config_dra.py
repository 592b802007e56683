"""DRA-mode configuration: plugin.mode, the dra section, NODE_NAME and the flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvswitch_dp.cli import build_run_config, parser
from nvswitch_dp.config import (
    Config,
    ConfigError,
    apply_dra_env,
    check_complete,
    parse_config,
    with_overrides,
)


def _v1(body: str) -> str:
    return "version: v1\n" + body


def test_device_plugin_mode_and_dra_defaults() -> None:
    config = parse_config("version: v1\n")
    assert config.plugin.mode == "device-plugin"
    assert config.dra.driver_name == "gpu.nvswitch-dp.io"
    assert config.dra.kubeconfig is None
    assert config.dra.node_name is None
    assert config.dra.plugin_registry_dir == "/var/lib/kubelet/plugins_registry"
    assert config.dra.plugin_dir is None
    assert config.dra.plugin_directory == "/var/lib/kubelet/plugins/gpu.nvswitch-dp.io"
    assert config.dra.cdi_dir == "/var/run/cdi"
    check_complete(config)  # device-plugin mode needs no node name


def test_the_plugin_dir_follows_the_driver_name_unless_given() -> None:
    config = parse_config(_v1("dra: {driver_name: gpu.example.com}\n"))
    assert config.dra.plugin_directory == "/var/lib/kubelet/plugins/gpu.example.com"
    config = parse_config(_v1("dra: {driver_name: gpu.example.com, plugin_dir: /p}\n"))
    assert config.dra.plugin_directory == "/p"


def test_a_full_dra_section_parses() -> None:
    config = parse_config(
        _v1(
            "plugin: {mode: dra}\n"
            "dra:\n"
            "  driver_name: gpu.example.com\n"
            "  kubeconfig: /etc/kube/config\n"
            "  node_name: hgx-7.example.org\n"
            "  plugin_registry_dir: /r\n"
            "  plugin_dir: /p\n"
            "  cdi_dir: /c\n"
        )
    )
    assert config.plugin.mode == "dra"
    assert config.dra.node_name == "hgx-7.example.org"
    assert config.dra.kubeconfig == "/etc/kube/config"
    assert (config.dra.plugin_registry_dir, config.dra.cdi_dir) == ("/r", "/c")
    check_complete(config)
    assert parse_config(_v1("dra: {kubeconfig: null, plugin_dir: null}\n")) == Config()


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ("plugin: {mode: kubelet}\n", "plugin.mode", "one of device-plugin, dra, got 'kubelet'"),
        ("plugin: {mode: DRA}\n", "plugin.mode", "one of device-plugin, dra"),
        ("dra: {driver: x}\n", "dra.driver", "unknown key; known keys: driver_name"),
        ("dra: {driver_name: GPU.example.com}\n", "dra.driver_name", "DNS subdomain"),
        ("dra: {driver_name: gpu_example}\n", "dra.driver_name", "DNS subdomain"),
        (f"dra: {{driver_name: {'g' * 61}.io}}\n", "dra.driver_name", "at most 63"),
        ("dra: {node_name: Node_1}\n", "dra.node_name", "a Kubernetes node name"),
        ("dra: {node_name: ''}\n", "dra.node_name", "non-empty string"),
        ("dra: {cdi_dir: null}\n", "dra.cdi_dir", "got null"),
        ("dra: {plugin_registry_dir: 7}\n", "dra.plugin_registry_dir", "got 7"),
        ("dra: {kubeconfig: ''}\n", "dra.kubeconfig", "non-empty string"),
        ("dra: [a]\n", "dra", "must be a mapping"),
    ],
)
def test_bad_dra_values_name_the_key(body: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_v1(body), "cfg.yaml")
    assert caught.value.key == key
    assert words in caught.value.message
    assert str(caught.value).startswith(f"cfg.yaml: {key}: ")


def test_dra_mode_without_a_node_name_says_where_to_give_one() -> None:
    config = parse_config(_v1("plugin: {mode: dra}\n"))
    with pytest.raises(ConfigError) as caught:
        check_complete(config)
    assert caught.value.key == "dra.node_name"
    assert "--node-name" in caught.value.message and "NODE_NAME" in caught.value.message


def test_node_name_from_the_environment_only_in_dra_mode() -> None:
    env = {"NODE_NAME": "hgx-3"}
    assert apply_dra_env(Config(), env) == Config()  # device-plugin mode never reads it
    dra = with_overrides(Config(), {"plugin.mode": "dra"})
    assert apply_dra_env(dra, env).dra.node_name == "hgx-3"
    assert apply_dra_env(dra, {"NODE_NAME": "  "}) == dra  # empty counts as unset
    with pytest.raises(ConfigError, match=r"environment NODE_NAME: dra\.node_name: .*node name"):
        apply_dra_env(dra, {"NODE_NAME": "Not A Name"})


def _run_config(argv: list[str], env: dict[str, str]) -> Config:
    return build_run_config(parser().parse_args(["run", *argv]), env)


def test_flags_then_environment_then_file_for_dra(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(_v1("plugin: {mode: dra}\ndra: {node_name: from-file, cdi_dir: /file}\n"))
    env = {"NODE_NAME": "from-env"}
    config = _run_config(["--config", str(path)], env)
    assert config.plugin.mode == "dra"
    assert config.dra.node_name == "from-env"  # the environment beats the file
    assert config.dra.cdi_dir == "/file"
    config = _run_config(
        [
            "--config", str(path),
            "--node-name", "from-flag",
            "--kubeconfig", "/k",
            "--driver-name", "gpu.example.com",
            "--plugin-registry-dir", "/r",
            "--dra-plugin-dir", "/p",
            "--cdi-dir", "/c",
        ],
        env,
    )  # fmt: skip
    assert config.dra.node_name == "from-flag"
    assert (config.dra.kubeconfig, config.dra.driver_name) == ("/k", "gpu.example.com")
    assert (config.dra.plugin_registry_dir, config.dra.plugin_dir, config.dra.cdi_dir) == (
        "/r",
        "/p",
        "/c",
    )


def test_the_mode_flag_turns_dra_on_and_node_name_is_then_required() -> None:
    with pytest.raises(ConfigError) as caught:
        _run_config(["--mode", "dra"], {})
    assert caught.value.key == "dra.node_name"
    config = _run_config(["--mode", "dra"], {"NODE_NAME": "n1"})
    assert (config.plugin.mode, config.dra.node_name) == ("dra", "n1")


def test_device_plugin_runs_ignore_node_name_and_dra_flags_change_nothing_else() -> None:
    plain = _run_config([], {})
    assert plain == _run_config([], {"NODE_NAME": "Whatever Is Here"})
    assert plain.plugin.mode == "device-plugin"


def test_a_simulated_dra_node_keeps_the_kubelet_directories_in_its_state_dir(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    config = _run_config(
        ["--mode", "dra", "--simulate", "hgx-h200", "--state-dir", str(state), "--node-name", "n"],
        {},
    )
    assert config.dra.plugin_registry_dir == str(state / "plugins_registry")
    assert config.dra.plugin_directory == str(state / "plugins" / "gpu.nvswitch-dp.io")
    assert config.dra.cdi_dir == str(state / "cdi")
    given = _run_config(
        [
            "--mode", "dra", "--simulate", "hgx-h200", "--state-dir", str(state),
            "--node-name", "n", "--cdi-dir", "/c",
        ],
        {},
    )  # fmt: skip
    assert given.dra.cdi_dir == "/c"


@pytest.mark.parametrize("mode", ["device-plugin", "dra"])
def test_a_simulated_node_never_points_at_the_hosts_kubelet_paths(
    tmp_path: Path, mode: str
) -> None:
    """``run --simulate`` without path flags, with or without a config file that names
    no paths: every kubelet path is under the state directory, none under /var."""
    state = tmp_path / "state"
    file = tmp_path / "c.yaml"
    file.write_text(_v1(f"state_dir: {state}\nplugin: {{mode: {mode}}}\n"))
    base = ["--simulate", "hgx-h200", "--node-name", "n"]
    for argv in (
        [*base, "--state-dir", str(state), "--mode", mode],
        [*base, "--config", str(file)],
    ):
        config = _run_config(argv, {})
        paths = [
            config.plugin.directory,
            config.plugin.pod_resources_socket,
            config.dra.plugin_registry_dir,
            config.dra.plugin_directory,
            config.dra.cdi_dir,
        ]
        assert [p for p in paths if not p.startswith(f"{state}/")] == [], argv
    assert config.plugin.pod_resources_socket == str(state / "pod-resources" / "kubelet.sock")


def test_a_simulated_node_keeps_the_paths_a_file_the_environment_or_a_flag_gives(
    tmp_path: Path,
) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(_v1("plugin: {pod_resources_socket: /file/pr.sock}\n"))
    argv = ["--simulate", "hgx-h200", "--state-dir", str(tmp_path), "--config", str(file)]
    config = _run_config([*argv, "--plugin-dir", "/var/lib/kubelet/device-plugins"], {})
    assert config.plugin.directory == "/var/lib/kubelet/device-plugins"  # asked for: kept
    assert config.plugin.pod_resources_socket == "/file/pr.sock"
    config = _run_config(argv, {"HGX_H200_SOCKET_PATH": "/env/kubelet.sock"})
    assert config.plugin.directory == "/env"
