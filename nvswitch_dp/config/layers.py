"""The layers over the file: environment variables, command-line flags, and the check
that needs them all (:mod:`nvswitch_dp.config`'s docstring gives the precedence).

Everything here but :func:`load_config` is pure: the environment comes in as a mapping,
flags as dotted keys, and each layer's values are validated as a file's are, so a bad
one raises :class:`~nvswitch_dp.config.ConfigError` naming the variable or ``command
line`` and the key. :func:`load_config` is the only reader of a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvswitch_dp.config.parse import build_config, parse_config
from nvswitch_dp.config.schema import (
    ENV_CONFIG_PATH,
    ENV_FMPM_ENDPOINT,
    ENV_LOG_LEVEL,
    ENV_NODE_NAME,
    ENV_SOCKET_PATH,
    SECTIONS,
    Config,
    ConfigError,
    config_to_dict,
)


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
            if head not in SECTIONS:
                raise ConfigError(source, dotted, "unknown key")
            target = data[head]
            if rest not in target:
                raise ConfigError(source, dotted, "unknown key")
            target[rest] = value
        elif head in data and head not in SECTIONS and head != "version":
            data[head] = value
        else:
            raise ConfigError(source, dotted, "unknown key (or a whole section)")
        changed = True
    return build_config(data, source) if changed else config


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
