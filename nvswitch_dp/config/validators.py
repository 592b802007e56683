"""The checks of single configuration values: each takes plain data, returns it typed.

A validator raises :class:`Invalid` with a message that ends in what it got (``got -1``);
:mod:`nvswitch_dp.config.parse` adds the key path and the source and raises
:class:`~nvswitch_dp.config.ConfigError`. Validators know no keys, no sections and no
other values (cross-field rules live with the builder). Pure: no file or environment
access.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from typing import Any

from nvswitch_dp.fabric.platforms import platform_names
from nvswitch_dp.vfio.identity import is_module_id


class Invalid(Exception):
    """A validator's complaint; turned into ConfigError with the key path and source."""


Validator = Callable[[Any], Any]

# Longest suffix a resource name gets ("-16x"); the name part must stay within 63 chars.
_LONGEST_SIZE_SUFFIX = len("-16x")


def show(value: Any) -> str:
    """``value`` as the YAML reader wrote it, cut to 80 characters, for a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive_number(value: Any) -> float:
    """A finite number above 0 (``true``/``false`` are not numbers), as a float."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise Invalid(f"must be a positive number, got {show(value)}")
    return float(value)


def supervision_period(value: Any) -> float:
    """A positive number of seconds below 30: how often Fabric Manager is listed."""
    # A restarted FM exits 60 s after its restart unless told set-activated, and an idle
    # daemon only learns of the restart at its next supervision.
    period = positive_number(value)
    if period >= 30:
        raise Invalid(
            f"must be below 30 seconds (a restarted Fabric Manager exits after 60 s "
            f"unless resumed), got {show(value)}"
        )
    return period


def non_negative_number(value: Any) -> float:
    """A finite number of at least 0, as a float."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise Invalid(f"must be a number >= 0, got {show(value)}")
    return float(value)


def int_at_least(minimum: int) -> Validator:
    """An integer (``true``/``false`` are not) of at least ``minimum``."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise Invalid(f"must be an integer >= {minimum}, got {show(value)}")
        return value

    return check


def boolean(value: Any) -> bool:
    """``true`` or ``false``; YAML's other spellings are read as these already."""
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {show(value)}")
    return value


def string(value: Any) -> str:
    """A string that is not blank and holds no NUL (a path, a name)."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise Invalid(f"must be a non-empty string, got {show(value)}")
    return value


def optional(validator: Validator) -> Validator:
    """``validator``, with ``null`` (an unset optional key) let through as ``None``."""

    def check(value: Any) -> Any:
        return None if value is None else validator(value)

    return check


optional_string = optional(string)


def choice(*choices: str, fold: bool = False) -> Validator:
    """One of ``choices``; ``fold``: compared (and returned) in lower case."""

    def check(value: Any) -> str:
        text = value.lower() if fold and isinstance(value, str) else value
        if text not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}, got {show(value)}")
        return str(text)

    return check


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_HOST_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(\.{_HOST_LABEL})*$")


def resource_prefix(value: Any) -> str:
    """``auto`` (named after the node's GPU model), or ``<domain>/<name>``: a Kubernetes
    extended resource name once ``-<n>x`` is added."""
    text = string(value)
    if text == "auto":
        return text
    domain, slash, name = text.partition("/")
    hint = "auto, or a Kubernetes extended resource name prefix like 'nvidia.com/gpu-h200'"
    if not slash or not domain or not name:
        raise Invalid(f"must be {hint}, got {show(value)}")
    if len(domain) > 253 or not _DNS_SUBDOMAIN.match(domain):
        raise Invalid(f"domain {domain!r} is not a DNS subdomain (lower case); must be {hint}")
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        raise Invalid(f"extended resources may not use the kubernetes.io domain, got {domain!r}")
    if not _QUALIFIED_NAME.match(name):
        raise Invalid(
            f"name {name!r} must be letters, digits, '-', '_' or '.', starting and ending "
            "with a letter or digit"
        )
    if len(name) + _LONGEST_SIZE_SUFFIX > 63:
        raise Invalid(
            f"name {name!r} is too long: with '-16x' appended it must be at most 63 characters"
        )
    return text


def dns_subdomain(what: str, limit: int) -> Validator:
    """A lower-case DNS subdomain of at most ``limit`` characters; ``what`` names it."""

    def check(value: Any) -> str:
        text = string(value)
        if len(text) > limit or not _DNS_SUBDOMAIN.match(text):
            raise Invalid(
                f"must be {what}: a lower-case DNS subdomain of at most {limit} characters "
                f"(letters, digits, '-' and '.'), got {show(value)}"
            )
        return text

    return check


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOSTNAME.match(text))
    return True


def endpoint(value: Any) -> str:
    """Fabric Manager's address: an IP address or host name, or ``unix:/absolute/path``."""
    text = string(value)
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise Invalid(f"a Unix socket endpoint needs an absolute path, got {show(value)}")
        return text
    if not _is_host(text):
        raise Invalid(
            "must be an IP address or host name (FM's TCP port 6666), or unix:/path/to/socket,"
            f" got {show(value)}"
        )
    return text


def listen(value: Any) -> str:
    """``HOST:PORT`` to listen on; an IPv6 host in brackets."""
    text = string(value)
    hint = "must be HOST:PORT (IPv6 as [::]:9090)"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(f"{hint}, got {show(value)}") from None
        if not sep:
            raise Invalid(f"{hint}, got {show(value)}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host or not _is_host(host):
            raise Invalid(f"{hint}, got {show(value)}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise Invalid(f"port must be 0-65535, got {show(value)}")
    return text


def platform(value: Any) -> str:
    """The name of a platform :mod:`nvswitch_dp.fabric.platforms` knows."""
    text = string(value)
    if text not in platform_names():
        raise Invalid(f"must be one of {', '.join(platform_names())}, got {show(value)}")
    return text


def module_id(key: Any) -> int | None:
    """A ``module_map`` key as a module ID
    (:func:`~nvswitch_dp.vfio.identity.is_module_id`; YAML may give it as a string of
    digits), else ``None``."""
    if isinstance(key, str) and key.strip().isdigit():
        key = int(key)
    return key if is_module_id(key) else None
