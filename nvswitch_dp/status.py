"""``nvswitch-dp status``: the node's fabric map for operators, read from the REST API.

    nvswitch-dp status [--api URL] [--token-file FILE]

GPUs are the columns (module ID, with PCI address, NUMA node, driver and health listed
above the map), partitions the rows, grouped by size, largest first. ``█`` marks the GPUs
a partition joins, ``·`` the others; each row ends with the partition's state, its
resource and, when blocked, the partition that blocks it.

Ownership: reads only (``/v1/node``, ``/v1/gpus``, ``/v1/partitions``); never changes the
node. Errors: an unreachable API or an error answer prints one line on stderr and exits
1; the token is sent only when ``--token-file`` is given (needed with
``api.open_reads: false``).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_API = "http://127.0.0.1:9090"
FULL, EMPTY = "█", "·"
COLUMN = 3  # characters per GPU column in the map


class StatusError(Exception):
    """The API could not be read; the message says where and why."""


def fetch(api: str, path: str, token: str | None) -> Any:
    """GET ``api + path`` and decode its JSON. Raises :class:`StatusError`."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(api.rstrip("/") + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        raise StatusError(f"{api}{path}: {exc.code} {detail}") from None
    except (OSError, ValueError) as exc:
        raise StatusError(f"{api}{path}: {exc}") from None


def _gpu_health(gpu: dict[str, Any]) -> str:
    if not gpu["healthy"]:
        return "✗"
    return "D" if gpu["drained"] else "✓"


def render(
    node: dict[str, Any], gpus: list[dict[str, Any]], partitions: list[dict[str, Any]]
) -> str:
    """The fabric map as text (pure)."""
    lines: list[str] = []
    platform, fm = node["platform"], node["fabric_manager"]
    model = platform["gpu_model"] or "GPUs"
    simulated = f" (simulated {platform['simulated']})" if platform["simulated"] else ""
    fm_state = "reachable" if fm["reachable"] else f"UNREACHABLE: {fm['problem']}"
    registered = sum(1 for r in node["resources"] if r["registered"])
    pod = node["pod_resources"]["reachable"]
    pod_state = {True: "reachable", False: "unreachable", None: "not consulted yet"}[pod]
    lines.append(f"Node: {platform['gpu_count']} x {model}{simulated}")
    lines.append(
        f"Fabric Manager ({fm['backend']}): {fm_state}   kubelet: {registered}/"
        f"{len(node['resources'])} resources registered   PodResources: {pod_state}"
    )
    lines.append("ready" if node["ready"] else "NOT READY: " + "; ".join(node["problems"]))
    lines.append("")
    lines.append("GPU  PCI address   NUMA  IOMMU  driver    health")
    for gpu in gpus:
        health = "ok" if gpu["healthy"] else f"FAULT: {gpu['fault']}"
        if gpu["drained"]:
            health += " (drained)"
        lines.append(
            f"{gpu['module']:<4} {gpu['pci_address'] or '?':<13} "
            f"{'-' if gpu['numa_node'] is None else gpu['numa_node']:<5} "
            f"{'-' if gpu['iommu_group'] is None else gpu['iommu_group']:<6} "
            f"{gpu['driver'] or '-':<9} {health}"
        )
    lines.append("")
    modules = [g["module"] for g in gpus]
    label = 16
    lines.append(f"{'GPU':<{label}}" + "".join(f"{m:>{COLUMN}}" for m in modules))
    lines.append(f"{'health':<{label}}" + "".join(f"{_gpu_health(g):>{COLUMN}}" for g in gpus))
    for size in sorted({p["size"] for p in partitions}, reverse=True):
        lines.append(f"-- {size}x " + "-" * (label - 6 + COLUMN * len(modules)))
        for p in sorted((p for p in partitions if p["size"] == size), key=lambda p: p["id"]):
            cells = "".join(f"{FULL if m in p['modules'] else EMPTY:>{COLUMN}}" for m in modules)
            tail = f"  {p['state'].upper() if p['state'] == 'unhealthy' else p['state']:<12}"
            tail += f" {p['resource']}"
            if p["blocked_by"] is not None:
                tail += f"  blocked by partition-{p['blocked_by']}"
            if p["fault"]:
                tail += f"  fault: {p['fault']}"
            lines.append(f"{p['device_id']:<{label}}{cells}{tail}")
    lines.append("")
    lines.append(f"{FULL} GPU in the partition   ✓ healthy   ✗ faulty   D drained")
    return "\n".join(lines)


def status_main(argv: Sequence[str]) -> int:
    """Entry point of ``nvswitch-dp status``: print the map; 0, or 1 when unreadable."""
    parser = argparse.ArgumentParser(
        prog="nvswitch-dp status",
        # Plain text: the module docstring's reStructuredText would be printed as is.
        description="The node's fabric map for operators, read from the REST API: GPUs "
        "against partitions, each partition's state and what blocks it.",
    )
    parser.add_argument("--api", default=DEFAULT_API, metavar="URL", help=f"default {DEFAULT_API}")
    parser.add_argument("--token-file", metavar="FILE", help="bearer token (api.open_reads: false)")
    args = parser.parse_args(list(argv))
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
    except OSError as exc:
        print(f"nvswitch-dp status: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        node = fetch(args.api, "/v1/node", token)
        gpus = fetch(args.api, "/v1/gpus", token)["gpus"]
        partitions = fetch(args.api, "/v1/partitions", token)["partitions"]
    except StatusError as exc:
        print(f"nvswitch-dp status: {exc}", file=sys.stderr)
        return 1
    print(render(node, gpus, partitions))
    return 0
