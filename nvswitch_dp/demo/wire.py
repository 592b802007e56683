"""The demo kubelets' gRPC plumbing: serve handlers as a Trio task; one call on one channel.

Both kubelets of the demo are grpclib programs under Trio, in the daemon's shape
(shared/reference/stack.md, "grpclib inside Trio"): one asyncio loop from
``trio_asyncio.open_loop()`` above the demo's nursery, servers started and closed by
:func:`nvswitch_dp.plugin.grpc_trio.serving`, client calls made through
:func:`nvswitch_dp.plugin.grpc_trio.call_on` (a channel per call). A handler that must
reach Trio hops with ``trio_as_aio``, as the daemon's DRA handlers do
(``nvswitch_dp/dra/kubelet.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from nvswitch_dp.plugin.grpc_trio import serving


async def serve(
    handlers: Sequence[Any],
    socket_path: Path,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handlers`` on the Unix socket ``socket_path`` until cancelled.

    Resource handling: owns the socket file (a stale one is replaced; it is removed on
    exit, after open connections are closed). Error handling: ``OSError`` when the socket
    cannot be bound, before ``task_status.started()``.
    """
    async with serving(handlers, socket_path):
        task_status.started()
        await trio.sleep_forever()
