"""Asking Fabric Manager once, for ``nvswitch-dp doctor``: the edge of the FM checks.

:func:`find_fm_client` looks for the configured backend's client (the ``fmpm`` program or
the libnvfm library) before anything is asked, so that a missing client is reported as
missing, with what was looked up where, rather than as an FM that does not answer.
:func:`ask_fabric_manager` makes the one "list partitions" call and turns its outcome
into an :class:`~nvswitch_dp.doctor.facts.FmAnswer`.

Ownership: nothing here holds a resource past a call; the FM client's own resources are
its backend's (``nvswitch_dp.fabric``).
Errors: FM's errors and ``OSError`` become an ``FmAnswer`` carrying the message; nothing
is raised.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import shutil
from collections.abc import Awaitable, Callable

from nvswitch_dp.config import FabricManagerConfig
from nvswitch_dp.doctor.facts import FmAnswer
from nvswitch_dp.fabric.types import FabricManagerError, FmReport

ListPartitions = Callable[[], FmReport | Awaitable[FmReport]]


def find_fm_client(fm: FabricManagerConfig, path: str | None = None) -> tuple[str, str | None]:
    """``(client, None)`` when the configured backend's client is there (the program's
    resolved path, the library's name, or ``"simulator"``), else ``("", why)`` with what
    was looked up where.

    ``path``: the ``PATH`` an ``fmpm`` without a directory is looked up on (``None``: this
    process's, which is the one the daemon would run it with). libnvfm is looked for by
    loading it, as the backend itself would: the dynamic loader has its own search path.
    """
    if fm.backend == "fmpm":
        found = shutil.which(fm.fmpm_path, path=path)
        if found is not None:
            return found, None
        if os.sep not in fm.fmpm_path:
            searched = path if path is not None else os.environ.get("PATH", os.defpath)
            return "", (
                f"fmpm not found: no {fm.fmpm_path!r} on PATH ({searched}), from "
                "fabric_manager.fmpm_path"
            )
        state = "is not executable" if os.path.exists(fm.fmpm_path) else "does not exist"
        return "", f"fmpm not found: {fm.fmpm_path} {state} (fabric_manager.fmpm_path)"
    if fm.backend == "libnvfm":
        try:
            ctypes.CDLL(fm.libnvfm_path)
        except OSError as exc:
            return "", (
                f"libnvfm not found: cannot load {fm.libnvfm_path!r} "
                f"(fabric_manager.libnvfm_path): {exc}"
            )
        return fm.libnvfm_path, None
    return fm.backend, None


def _answer_from(call: Callable[[], FmReport]) -> FmAnswer:
    try:
        return FmAnswer(report=call())
    except FabricManagerError as exc:
        return FmAnswer(error=str(exc), error_code=exc.code)
    except OSError as exc:
        return FmAnswer(error=f"{type(exc).__name__}: {exc}")


def ask_fabric_manager(list_partitions: ListPartitions, timeout: float = 30.0) -> FmAnswer:
    """Call ``list_partitions`` once; an async callable runs in its own ``trio.run``,
    given up after ``timeout`` seconds (an ``FmAnswer`` carrying a ``TimeoutError``).

    Must not be called from inside a Trio run (use :func:`ask_fabric_manager_async`).
    """

    def call() -> FmReport:
        result = list_partitions()
        if inspect.isawaitable(result):
            import trio

            awaitable = result

            async def wait() -> FmReport:
                with trio.fail_after(timeout):
                    return await awaitable

            try:
                return trio.run(wait)
            except trio.TooSlowError:
                raise TimeoutError(f"no answer within {timeout:g} s") from None
        return result

    return _answer_from(call)


async def ask_fabric_manager_async(list_partitions: ListPartitions) -> FmAnswer:
    """Like :func:`ask_fabric_manager`, from inside a Trio run (no timeout of its own)."""
    try:
        result = list_partitions()
        report = await result if inspect.isawaitable(result) else result
    except FabricManagerError as exc:
        return FmAnswer(error=str(exc), error_code=exc.code)
    except OSError as exc:
        return FmAnswer(error=f"{type(exc).__name__}: {exc}")
    return FmAnswer(report=report)
