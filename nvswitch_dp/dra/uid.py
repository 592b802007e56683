"""Claim UIDs: checked before they name a file, a CDI device or a checkpoint entry.

A ResourceClaim's ``metadata.uid`` comes from the kubelet's request and from files on
the node; both end up in paths under the CDI directory. Only the canonical form the API
server generates (a lower-case RFC 4122 UUID string, which is also a DNS label) is
accepted, so no UID can contain ``/``, ``..`` or anything else a path or a CDI name
would misread.
"""

from __future__ import annotations

import re

from nvswitch_dp.echo import clipped

_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class InvalidClaimUid(ValueError):
    """A claim UID that is not a lower-case UUID string; the message quotes it."""


def validate_claim_uid(uid: str) -> str:
    """Return ``uid`` unchanged if it is a lower-case UUID string.

    Errors: :class:`InvalidClaimUid` for anything else (wrong type, upper case,
    braces, a path, an empty string).
    """
    if not isinstance(uid, str) or _UID.fullmatch(uid) is None:
        raise InvalidClaimUid(
            f"claim UID '{clipped(uid) if isinstance(uid, str) else uid!r}' is not a "
            "lower-case UUID such as "
            "'3f2a9c1e-0b7d-4c55-9e21-6a8f0d4b7c10' (ResourceClaim metadata.uid)"
        )
    return uid


def is_claim_uid(uid: str) -> bool:
    """Whether :func:`validate_claim_uid` accepts ``uid``."""
    return isinstance(uid, str) and _UID.fullmatch(uid) is not None
