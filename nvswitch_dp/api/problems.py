"""Problem details (RFC 9457) for every error the REST API answers with.

Rule: an error leaves the API only as ``application/problem+json`` with ``type``, ``title``,
``status``, ``detail`` and ``instance``, plus extension members where they help a client
act (``partition_id``, ``blocked_by``, ``fm_code`` ...). The problem types are the table
:data:`PROBLEM_TYPES`; ``openapi.yaml`` documents the same table, and a test keeps the two
equal. Type URIs are ``https://nvswitch-dp.io/problems/<name>``; they identify the kind of
problem (they are names, not pages a client must fetch).

This module maps the core's exceptions (:class:`~nvswitch_dp.partitions.state.StateError`
subclasses, :class:`~nvswitch_dp.fabric.types.FabricManagerError`) to problems, so the
mapping is one table and not scattered through the routes. Pure: no Quart in here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nvswitch_dp.fabric.types import FabricManagerError
from nvswitch_dp.partitions.state import (
    IllegalTransition,
    PartitionBlocked,
    PartitionInUse,
    PartitionUnhealthy,
    StateError,
    UnknownPartition,
)

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "https://nvswitch-dp.io/problems/"

# name -> (HTTP status, title). The title is the same for every occurrence of a type.
PROBLEM_TYPES: dict[str, tuple[int, str]] = {
    "invalid-request": (400, "The request is malformed"),
    "unauthorized": (401, "A bearer token is required"),
    "forbidden": (403, "The bearer token is not accepted"),
    "mutations-disabled": (403, "No API token is configured, so changes are refused"),
    "not-found": (404, "No such resource"),
    "unknown-partition": (404, "No such partition"),
    "unknown-gpu": (404, "No such GPU"),
    "method-not-allowed": (405, "Method not allowed on this resource"),
    "request-timeout": (408, "The request body did not arrive in time"),
    "partition-blocked": (409, "The partition shares a GPU with an occupied partition"),
    "partition-in-use": (409, "The partition is held by a pod"),
    "partition-unhealthy": (409, "The partition is unhealthy"),
    "illegal-transition": (409, "The partition cannot make this transition now"),
    "state-conflict": (409, "The request conflicts with the node's state"),
    "content-too-large": (413, "The request body is too large"),
    "internal-error": (500, "Internal error"),
    "fabric-manager-error": (502, "Fabric Manager refused or failed the operation"),
    "token-unavailable": (503, "The configured API token cannot be read"),
    "fabric-manager-unavailable": (503, "Fabric Manager is unavailable"),
}


def type_uri(name: str) -> str:
    return TYPE_BASE + name


@dataclass
class Problem(Exception):
    """An error answer. Raise it from a route; the app's handler renders it.

    ``name`` must be a key of :data:`PROBLEM_TYPES` (``KeyError`` otherwise, at
    construction, so a typo fails in tests and never reaches a client).
    """

    name: str
    detail: str
    extensions: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status, self.title = PROBLEM_TYPES[self.name]
        super().__init__(self.detail)

    def body(self, instance: str) -> dict[str, Any]:
        """The JSON object; ``instance`` is the request's path (the occurrence)."""
        return {
            "type": type_uri(self.name),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            **self.extensions,
        }

    def render(self, instance: str) -> bytes:
        return json.dumps(self.body(instance)).encode()


def problem_from_state_error(exc: StateError) -> Problem:
    """The 404/409 problem for a refusal of the partition state machine."""
    if isinstance(exc, UnknownPartition):
        return Problem("unknown-partition", str(exc), {"partition_id": exc.partition_id})
    if isinstance(exc, PartitionBlocked):
        return Problem(
            "partition-blocked",
            str(exc),
            {
                "partition_id": exc.partition_id,
                "blocked_by": exc.blocker,
                "blocker_state": exc.blocker_state.value,
            },
        )
    if isinstance(exc, PartitionInUse):
        return Problem(
            "partition-in-use",
            f'{exc}; deactivate with {{"force": true}} to take it from the pod',
            {"partition_id": exc.partition_id},
        )
    if isinstance(exc, PartitionUnhealthy):
        return Problem(
            "partition-unhealthy", str(exc), {"partition_id": exc.partition_id, "fault": exc.reason}
        )
    if isinstance(exc, IllegalTransition):
        return Problem(
            "illegal-transition",
            str(exc),
            {"partition_id": exc.partition_id, "phase": exc.phase.value},
        )
    return Problem("state-conflict", str(exc))


def problem_from_fabric_error(exc: FabricManagerError) -> Problem:
    """503 when FM is unreachable or not ready (worth retrying), else 502, with FM's code."""
    name = "fabric-manager-unavailable" if exc.transient else "fabric-manager-error"
    headers = {"Retry-After": "5"} if exc.transient else {}
    return Problem(
        name,
        str(exc),
        {"fm_code": exc.code_name, "fm_return": int(exc.code), "operation": exc.operation},
        headers,
    )
