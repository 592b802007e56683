"""Resource names: ``nvidia.com/gpu-<model>-<n>x``, the model following the platform.

``plugin.resource_prefix: auto`` (the default) names the resources after the node's GPU
model, read from the marketing name of its PCI device ID (``vfio.gpu_device_ids``): an
HGX H200 serves ``nvidia.com/gpu-h200-*`` (the original contract), a B200 board
``nvidia.com/gpu-b200-*``, an H100 ``nvidia.com/gpu-h100-*``. A configured prefix is used
as is. Pure; the caller passes the model names it found.

Renaming is safe for running pods: a pod admitted under the former default name
(``nvidia.com/gpu-h200-<n>x``, on any board, before names followed the platform) still
holds its partition (the PodResources watcher counts those names as ours), and at start
any ``<prefix>-<n>x`` holding of partition devices counts (:func:`may_be_ours`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

log = logging.getLogger(__name__)

AUTO = "auto"
RESOURCE_DOMAIN = "nvidia.com"
# What a node whose GPU model cannot be told (none found in sysfs) serves: the names the
# project started with, so that such a node is at least named as documented.
FALLBACK_PREFIX = f"{RESOURCE_DOMAIN}/gpu-h200"
# The model in a marketing name: "H200 SXM 141GB" -> h200, "HGX B200" -> b200,
# "H20 HBM3e" -> h20, "A100 SXM4 80GB" -> a100.
_MODEL = re.compile(r"\b([A-Z]{1,2}[0-9]{2,4})\b")


# The name every node served while it was the default, whatever its GPUs: pods admitted
# then still hold devices under it after an upgrade renames the resources.
FORMER_DEFAULT_PREFIX = FALLBACK_PREFIX
_FORMER_NAME = re.compile(re.escape(FORMER_DEFAULT_PREFIX) + r"-[0-9]+x")
# Any "<domain>/<name>-<n>x": at start, before the resources are known, a pod's devices
# under such a name are counted as held if their IDs are partitions (the safe side).
_PARTITION_RESOURCE = re.compile(r"[a-z0-9.-]+/[A-Za-z0-9._-]+-[0-9]+x")


def is_former_name(resource: str) -> bool:
    """Whether ``resource`` is ``nvidia.com/gpu-h200-<n>x``, the former default name."""
    return _FORMER_NAME.fullmatch(resource) is not None


def may_be_ours(resource: str) -> bool:
    """Whether ``resource`` has the shape of one of our names (``<prefix>-<n>x``)."""
    return _PARTITION_RESOURCE.fullmatch(resource) is not None


def model_token(name: str) -> str | None:
    """``"h200"`` from ``"H200 SXM 141GB"``; None when the name holds no model."""
    match = _MODEL.search(name)
    return match.group(1).lower() if match else None


def resource_prefix(configured: str, model_names: Iterable[str]) -> str:
    """The resource prefix to serve with: ``configured`` unless it is ``auto``, else
    ``nvidia.com/gpu-<model>`` of the first name that holds a model (logged when none
    does, naming the fallback and the key that sets it)."""
    if configured != AUTO:
        return configured
    names = list(model_names)
    for name in names:
        token = model_token(name)
        if token is not None:
            return f"{RESOURCE_DOMAIN}/gpu-{token}"
    log.warning(
        "cannot tell the GPU model (%s); serving %s-<n>x; set plugin.resource_prefix to "
        "name the resources yourself",
        ", ".join(sorted(set(names))) or "no GPU found in sysfs",
        FALLBACK_PREFIX,
    )
    return FALLBACK_PREFIX


__all__ = [
    "AUTO",
    "FALLBACK_PREFIX",
    "FORMER_DEFAULT_PREFIX",
    "is_former_name",
    "may_be_ours",
    "model_token",
    "resource_prefix",
]
