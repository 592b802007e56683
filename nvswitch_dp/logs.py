"""Logging set-up on the standard library: human text or one JSON object per line.

JSON lines carry ``ts`` (UTC, RFC 3339 with milliseconds), ``level``, ``logger``, ``msg``,
then every ``extra={...}`` field given to the log call, and ``exc`` with the traceback
when there is one. Values JSON cannot encode are written as ``str(value)``.

Ownership: :func:`configure_logging` owns one handler on the root logger; calling it
again replaces that handler (and leaves handlers others installed, such as pytest's).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2025-01-02T03:04:05.678Z INFO nvswitch_dp.daemon: message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v!r}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class _OwnedHandler(logging.StreamHandler[TextIO]):
    """Marks the handler :func:`configure_logging` installed, so it can replace it."""


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr).

    ``level``: debug, info, warn, warning or error (any case); ``fmt``: text or json.
    Returns the installed handler. Errors: ``ValueError`` for an unknown level or format.
    """
    try:
        threshold = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; known: {', '.join(LEVELS)}") from None
    formatters: dict[str, logging.Formatter] = {"text": TextFormatter(), "json": JsonFormatter()}
    if fmt not in formatters:
        raise ValueError(f"unknown log format {fmt!r}; known: text, json")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OwnedHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _OwnedHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatters[fmt])
    root.addHandler(handler)
    root.setLevel(threshold)
    return handler
