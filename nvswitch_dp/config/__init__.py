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

General layout (the names below are the package's API; import them from here):

- :mod:`.schema`: the constants, :class:`ConfigError` and the frozen dataclasses, with
  :func:`config_to_dict`; values only.
- :mod:`.validators`: one check per kind of value (a positive number, an endpoint, a
  resource prefix ...), each knowing no key.
- :mod:`.parse`: :func:`parse_config`, the duplicate-refusing YAML loader and the builder
  that walks the schema with the validators and checks the rules joining two values.
- :mod:`.layers`: :func:`load_config` (the one file reader), the environment
  (:func:`env_overrides`, :func:`apply_env`, :func:`apply_dra_env`), the flags
  (:func:`with_overrides`) and :func:`check_complete`.
"""

from __future__ import annotations

from nvswitch_dp.config.layers import (
    apply_dra_env,
    apply_env,
    check_complete,
    env_overrides,
    load_config,
    with_overrides,
)
from nvswitch_dp.config.parse import parse_config
from nvswitch_dp.config.schema import (
    ALLOCATION_UNITS,
    CONFIG_VERSION,
    DEFAULT_DRA_DRIVER,
    DEFAULT_KUBELET_PLUGINS_DIR,
    DEFAULT_STATE_DIR,
    ENV_CONFIG_PATH,
    ENV_FMPM_ENDPOINT,
    ENV_LOG_LEVEL,
    ENV_NODE_NAME,
    ENV_SOCKET_PATH,
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
    config_to_dict,
)
from nvswitch_dp.config.validators import Validator

__all__ = [
    "ALLOCATION_UNITS",
    "CONFIG_VERSION",
    "DEFAULT_DRA_DRIVER",
    "DEFAULT_KUBELET_PLUGINS_DIR",
    "DEFAULT_STATE_DIR",
    "ENV_CONFIG_PATH",
    "ENV_FMPM_ENDPOINT",
    "ENV_LOG_LEVEL",
    "ENV_NODE_NAME",
    "ENV_SOCKET_PATH",
    "FM_BACKENDS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_DRIVER_NAME",
    "PLUGIN_MODES",
    "ApiConfig",
    "Config",
    "ConfigError",
    "DraConfig",
    "FabricManagerConfig",
    "LogConfig",
    "PluginConfig",
    "Validator",
    "VfioConfig",
    "apply_dra_env",
    "apply_env",
    "check_complete",
    "config_to_dict",
    "env_overrides",
    "load_config",
    "parse_config",
    "with_overrides",
]
