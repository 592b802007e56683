"""The failures of DRA mode, one class per failure; messages say what to do about them.

A per-claim failure never fails a whole kubelet call: the DRAPlugin service puts the
message of one of these into that claim's ``error`` field and the kubelet retries the
claim (Prepare) or reports it on the pod (both).
"""

from __future__ import annotations


class ClaimRefused(Exception):
    """This node will not prepare the claim as allocated (not one FM partition, a blocked
    or unhealthy partition, an FM failure). Nothing is left half done; the message says
    what to ask for, or when to retry."""


class ClaimNotFound(LookupError):
    """The API server does not know the ResourceClaim (HTTP 404): it was deleted."""

    def __init__(self, namespace: str, name: str) -> None:
        super().__init__(f"ResourceClaim {namespace}/{name} does not exist in the API server")
        self.namespace = namespace
        self.name = name


class ClaimUnreadable(Exception):
    """The ResourceClaim could not be read for another reason (API server unreachable,
    unauthorized, a 5xx answer); the message carries the cause. Retrying may succeed."""
