"""Bearer-token authorisation of the REST API.

Rules (``openapi.yaml`` documents the same):

1. Mutating routes always need ``Authorization: Bearer <token>``. The token is the content
   of ``api.token_file`` (a mounted Secret), whitespace stripped, compared with
   :func:`hmac.compare_digest`.
2. Without a usable token the API never opens up: no ``api.token_file`` configured means
   ``403 mutations-disabled``; a configured file that is missing, unreadable or empty
   means ``503 token-unavailable`` (the Secret is not mounted yet, or is broken). Both
   say how to fix it. The server-side problem is reported before the client's header
   is looked at, since no header could help.
3. A missing or malformed header is ``401`` with ``WWW-Authenticate: Bearer``; a wrong
   token is ``403 forbidden``.
4. Reads (``/v1/...`` GETs) are open unless ``api.open_reads`` is false, then they follow
   rules 1-3. ``/healthz``, ``/readyz`` and ``/metrics`` are always open: probes and
   Prometheus scrape them without credentials.

Ownership: a :class:`TokenSource` owns nothing but its cached copy of the file; it
re-reads the file when its ``stat`` changes (mtime, inode or size: a Kubernetes Secret
update swaps a symlink, which changes the inode), so a rotated Secret takes effect on the
next request without a restart.
"""

from __future__ import annotations

import hmac
import logging
import os

from nvswitch_dp.api.problems import Problem

log = logging.getLogger(__name__)

CONFIGURE_HINT = (
    "set api.token_file in the daemon's configuration to a file holding the token "
    "(for example a mounted Kubernetes Secret) and send 'Authorization: Bearer <token>'"
)


class TokenSource:
    """The current API token, read from ``path`` (``None``: no token configured).

    :meth:`token` raises :class:`Problem` (403 or 503) when there is no usable token.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token: str | None = None
        self._error: str | None = None
        if path is not None:
            self._refresh()

    def _refresh(self) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._stamp, self._token = None, None
            self._error = f"api.token_file {self.path} cannot be read: {exc.strerror}"
            return
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp == self._stamp:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            self._stamp, self._token = None, None
            self._error = f"api.token_file {self.path} cannot be read: {exc}"
            return
        self._stamp = stamp
        self._token = token or None
        self._error = None if token else f"api.token_file {self.path} is empty"
        log.info("API token %s from %s", "loaded" if token else "is empty", self.path)

    def token(self) -> str:
        if self.path is None:
            raise Problem("mutations-disabled", f"no API token is configured: {CONFIGURE_HINT}")
        self._refresh()
        if self._token is None:
            raise Problem(
                "token-unavailable",
                f"{self._error}; changes are refused until it holds a token ({CONFIGURE_HINT})",
                headers={"Retry-After": "10"},
            )
        return self._token


class Authorizer:
    """Decides whether a request may proceed; raises :class:`Problem` when not."""

    def __init__(self, tokens: TokenSource, *, open_reads: bool) -> None:
        self.tokens = tokens
        self.open_reads = open_reads

    def check(self, authorization: str | None, *, mutating: bool) -> None:
        """Raise :class:`Problem` unless a request with this ``Authorization`` value may
        proceed (``mutating``: it changes state)."""
        if not mutating and self.open_reads:
            return
        expected = self.tokens.token()
        header = authorization
        if header is None:
            raise Problem(
                "unauthorized",
                "this request needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="nvswitch-dp"'},
            )
        scheme, _, presented = header.strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise Problem(
                "unauthorized",
                "the Authorization header must be 'Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="nvswitch-dp", error="invalid_request"'},
            )
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise Problem("forbidden", "the bearer token does not match api.token_file")
