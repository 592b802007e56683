"""The ASGI layer between Hypercorn and the Quart-Trio app: whole bodies in, whole answers out.

Why it exists (Hypercorn 0.18, Quart-Trio 0.12, HTTP/1.1 over h11). Hypercorn runs the
end of every response *inside the app's last* ``send()``: that call writes the final
bytes, closes the stream, queues ``http.disconnect`` for the app, and then either recycles
the keep-alive connection (restarting its keep-alive timer) or, when the client's body has
not all arrived yet, closes the socket. Quart-Trio serves each request in a nursery whose
message reader cancels the nursery on ``http.disconnect``. The reader runs at the first
checkpoint of that same ``send()``, so the rest of Hypercorn's path is cancelled:

* answered before the body arrived (any 401/403/404/405, which never read a body): the
  close is cancelled before ``shutdown``/``close``; the body then arrives, h11 reaches
  DONE/DONE with no stream, the next request sits in the buffer unanswered and the
  connection's reader waits forever (one task and one CLOSE-WAIT socket each time);
* answered normally: the keep-alive timer is not restarted, so an idle keep-alive
  connection is never closed by the server.

The rules this layer enforces, for every ``http`` request:

1. The whole body is read before the app runs (at most ``max_body`` bytes, within
   ``body_timeout`` seconds) and handed to the app as one message. So an answer never
   precedes the end of the body and the connection can always be recycled.
   Too large (declared or counted): ``413 content-too-large``; too slow:
   ``408 request-timeout``. Both are problem+json and close the connection
   (``Connection: close``), since the rest of the body is not read.
2. The app's final ``http.response.body`` (``more_body`` false) is sent shielded from
   cancellation, with a ``final_send_grace`` deadline, so Hypercorn finishes the exchange
   (recycle or close) whatever cancels the app around it.

Other scopes (``lifespan``, ``websocket``) pass through untouched. Ownership: the layer
owns nothing beyond one request's buffered body; it borrows the wrapped app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)

from nvswitch_dp.api.problems import PROBLEM_CONTENT_TYPE, Problem

__all__ = [
    "BODY_TIMEOUT",
    "FINAL_SEND_GRACE",
    "MAX_BODY_BYTES",
    "WholeExchanges",
]

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

# The largest valid body is {"force": false}; 64 KiB is generous and still small enough
# that nobody can make the daemon buffer much.
MAX_BODY_BYTES = 64 * 1024
# A client that declared a body has this long to send all of it. Loopback and cluster
# clients send 64 KiB in far less; without a bound a stalled client holds a task forever.
BODY_TIMEOUT = 10.0
# The final send writes the last bytes and runs Hypercorn's bookkeeping (close, or recycle
# and restart the keep-alive timer): microseconds. Hypercorn shields its socket writes
# itself; this deadline bounds the rest, so the shield can never hold a task for long.
FINAL_SEND_GRACE = 5.0


class WholeExchanges:
    """Wraps an ASGI ``app`` (Quart's ``asgi_app``) with the rules of this module.

    Errors: a refused body is answered here (413/408 problem) and the app is not called;
    a client that disconnects while sending its body ends the request without an answer.
    Everything the app raises propagates unchanged.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int = MAX_BODY_BYTES,
        body_timeout: float = BODY_TIMEOUT,
        final_send_grace: float = FINAL_SEND_GRACE,
    ) -> None:
        if max_body < 0 or body_timeout <= 0 or final_send_grace <= 0:
            raise ValueError(
                f"max_body must be >= 0 and the timeouts > 0, got {max_body}, "
                f"{body_timeout}, {final_send_grace}"
            )
        self.app = app
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.final_send_grace = final_send_grace

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outcome = await self._read_body(scope, receive)
        if outcome is None:
            return  # the client went away; there is nobody to answer
        if isinstance(outcome, Problem):
            await self._refuse(scope, send, outcome)
            return
        replayed = False

        async def replay() -> ASGIReceiveEvent:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": outcome, "more_body": False}
            return await receive()  # after the body: only http.disconnect

        async def send_guarded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(self.final_send_grace, shield=True):
                    await send(message)
            else:
                await send(message)

        await self.app(scope, replay, send_guarded)

    async def _read_body(
        self, scope: HTTPScope, receive: ASGIReceiveCallable
    ) -> bytes | Problem | None:
        """The whole body; a 413/408 :class:`Problem`; None when the client disconnected."""
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            return _too_large(self.max_body, f"Content-Length is {declared}")
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                if message["type"] != "http.request":
                    continue
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    return _too_large(self.max_body, f"more than {self.max_body} bytes were sent")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        return Problem(
            "request-timeout",
            f"the request body did not arrive within {self.body_timeout:g} s "
            f"({size} bytes received)",
        )

    async def _refuse(self, scope: HTTPScope, send: ASGISendCallable, problem: Problem) -> None:
        body = problem.render(scope["path"])
        await send(
            {
                "type": "http.response.start",
                "status": problem.status,
                "headers": [
                    (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
                "trailers": False,
            }
        )
        with trio.move_on_after(self.final_send_grace, shield=True):
            await send({"type": "http.response.body", "body": body, "more_body": False})


def _content_length(scope: HTTPScope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses such a request before it gets here
    return None


def _too_large(limit: int, what: str) -> Problem:
    return Problem(
        "content-too-large",
        f"request bodies are limited to {limit} bytes; {what}",
        {"max_bytes": limit},
    )
