"""Echoing client input back into errors and logs, bounded. Pure.

A device ID or claim UID comes from a client and may be any length (a 4 MB gRPC message
holds one string of 4 MB); an error that quotes it whole grows every log line and answer
by as much. :func:`clipped` keeps the head and says how much was left out.
"""

from __future__ import annotations

__all__ = ["MAX_ECHO", "clipped"]

MAX_ECHO = 80


def clipped(text: str, limit: int = MAX_ECHO) -> str:
    """``text`` as is when at most ``limit`` characters, else its first ``limit`` and
    ``... (N more characters)``; always printable (``repr`` of control characters)."""
    head = text if len(text) <= limit else text[:limit]
    if not head.isprintable():
        head = repr(head)[1:-1]
    if len(text) <= limit:
        return head
    return f"{head}... ({len(text) - limit} more characters)"
