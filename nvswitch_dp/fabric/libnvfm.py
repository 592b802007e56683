"""The ``libnvfm`` backend: Fabric Manager's C API through ctypes.

Layouts and constants are those of ``nv_fm_types.h`` / ``nv_fm_agent.h`` (FM SDK, 535+):
``FM_MAX_STR_LENGTH`` 256, ``FM_UUID_BUFFER_SIZE`` 80, ``FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE``
32, 64 partitions, 16 GPUs; struct versions are ``sizeof(struct) | (ver << 24)``, where the
connect parameters are v2 (``addressType`` added, ``addressIsUnixSocket`` deprecated) and
the partition list, although named ``_v2``, carries version number 1. Older libraries
that only know ``fmConnectParams_v1`` answer VERSION_MISMATCH; we then connect with v1.

Every C call blocks, so it runs in a worker thread (``trio.to_thread.run_sync``). One
connection is kept, guarded by a :class:`trio.Lock`; CONNECTION_NOT_VALID drops it and
the call is tried once more on a new one. Endpoint: ``unix:/path`` is FM's Unix socket
(``FM_CMD_UNIX_SOCKET_PATH``); anything else is a TCP address, ``host`` or ``host:port``
(FM's default port 6666 when none is given), empty meaning ``127.0.0.1``.
"""

from __future__ import annotations

import ctypes
import enum
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from nvswitch_dp.fabric.types import (
    FabricManagerError,
    FmGpu,
    FmPartition,
    FmReport,
    FmReturn,
    FmTimeout,
    activated_list_argument,
    error_for,
)

FM_MAX_STR_LENGTH = 256
FM_UUID_BUFFER_SIZE = 80
FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE = 32
FM_MAX_NUM_GPUS = 16
FM_MAX_FABRIC_PARTITIONS = 64
DEFAULT_LIBRARY = "libnvfm.so.1"

T = TypeVar("T")


class AddressType(enum.IntEnum):
    """``enum nvFmApiAddrTypes``."""

    UNKNOWN = 0
    INET = 1
    UNIX = 2
    VSOCK = 3


class FmConnectParamsV1(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("addressInfo", ctypes.c_char * FM_MAX_STR_LENGTH),
        ("timeoutMs", ctypes.c_uint),
        ("addressIsUnixSocket", ctypes.c_uint),
    ]


class FmConnectParamsV2(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("addressInfo", ctypes.c_char * FM_MAX_STR_LENGTH),
        ("timeoutMs", ctypes.c_uint),
        ("addressIsUnixSocket", ctypes.c_uint),  # deprecated, still filled for old libraries
        ("addressType", ctypes.c_int),  # enum nvFmApiAddrTypes: int-sized on the x86-64 ABI
    ]


class FmFabricPartitionGpuInfo(ctypes.Structure):
    _fields_ = [
        ("physicalId", ctypes.c_uint),
        ("uuid", ctypes.c_char * FM_UUID_BUFFER_SIZE),
        ("pciBusId", ctypes.c_char * FM_DEVICE_PCI_BUS_ID_BUFFER_SIZE),
        ("numNvLinksAvailable", ctypes.c_uint),
        ("maxNumNvLinks", ctypes.c_uint),
        ("nvlinkLineRateMBps", ctypes.c_uint),
    ]


class FmFabricPartitionInfo(ctypes.Structure):
    _fields_ = [
        ("partitionId", ctypes.c_uint),
        ("isActive", ctypes.c_uint),
        ("numGpus", ctypes.c_uint),
        ("gpuInfo", FmFabricPartitionGpuInfo * FM_MAX_NUM_GPUS),
    ]


class FmFabricPartitionList(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("numPartitions", ctypes.c_uint),
        ("maxNumPartitions", ctypes.c_uint),
        ("partitionInfo", FmFabricPartitionInfo * FM_MAX_FABRIC_PARTITIONS),
    ]


class FmActivatedFabricPartitionList(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("numPartitions", ctypes.c_uint),
        ("partitionIds", ctypes.c_uint * FM_MAX_FABRIC_PARTITIONS),
    ]


class FmUnsupportedFabricPartitionInfo(ctypes.Structure):
    _fields_ = [
        ("partitionId", ctypes.c_uint),
        ("numGpus", ctypes.c_uint),
        ("gpuPhysicalIds", ctypes.c_uint * FM_MAX_NUM_GPUS),
    ]


class FmUnsupportedFabricPartitionList(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("numPartitions", ctypes.c_uint),
        ("partitionInfo", FmUnsupportedFabricPartitionInfo * FM_MAX_FABRIC_PARTITIONS),
    ]


def struct_version(struct: type[ctypes.Structure], ver: int) -> int:
    """``MAKE_FM_PARAM_VERSION(typeName, ver)``."""
    return ctypes.sizeof(struct) | (ver << 24)


CONNECT_PARAMS_V1_VERSION = struct_version(FmConnectParamsV1, 1)
CONNECT_PARAMS_VERSION = struct_version(FmConnectParamsV2, 2)
PARTITION_LIST_VERSION = struct_version(FmFabricPartitionList, 1)
ACTIVATED_LIST_VERSION = struct_version(FmActivatedFabricPartitionList, 1)
UNSUPPORTED_LIST_VERSION = struct_version(FmUnsupportedFabricPartitionList, 1)


class LibnvfmError(FabricManagerError):
    """``libnvfm`` could not be loaded or lacks a function. GENERIC_ERROR, not transient."""

    code = FmReturn.GENERIC_ERROR


def connect_address(endpoint: str) -> tuple[str, AddressType]:
    """FM's ``addressInfo`` and ``addressType`` for a configured endpoint. Pure.

    Errors: ``ValueError`` if the address does not fit ``FM_MAX_STR_LENGTH``.
    """
    if endpoint.startswith("unix:"):
        address, kind = endpoint.removeprefix("unix:"), AddressType.UNIX
        if not address:
            raise ValueError("FM endpoint 'unix:' names no socket path")
    else:
        address, kind = endpoint or "127.0.0.1", AddressType.INET
    if len(address.encode()) >= FM_MAX_STR_LENGTH:
        raise ValueError(f"FM endpoint {endpoint!r} is longer than {FM_MAX_STR_LENGTH - 1} bytes")
    return address, kind


def report_from_struct(plist: FmFabricPartitionList) -> FmReport:
    """The :class:`FmReport` in a filled ``fmFabricPartitionList_t``. Pure.

    Errors: :class:`LibnvfmError` if a count exceeds its array (a library that does not
    match this layout).
    """
    if plist.numPartitions > FM_MAX_FABRIC_PARTITIONS:
        raise LibnvfmError("list partitions", f"numPartitions {plist.numPartitions} > 64")
    partitions = []
    for i in range(plist.numPartitions):
        info = plist.partitionInfo[i]
        if info.numGpus > FM_MAX_NUM_GPUS:
            raise LibnvfmError(
                "list partitions", f"partition {info.partitionId}: numGpus {info.numGpus} > 16"
            )
        gpus = tuple(
            FmGpu(
                physical_id=g.physicalId,
                max_nvlinks=g.maxNumNvLinks,
                nvlinks_available=g.numNvLinksAvailable,
                nvlink_line_rate_mbps=g.nvlinkLineRateMBps,
                pci_bus_id=g.pciBusId.decode(errors="replace"),
                uuid=g.uuid.decode(errors="replace"),
            )
            for g in info.gpuInfo[: info.numGpus]
        )
        partitions.append(FmPartition(info.partitionId, bool(info.isActive), gpus))
    return FmReport(tuple(partitions), max_partitions=plist.maxNumPartitions)


def load_library(path: str | os.PathLike[str]) -> ctypes.CDLL:
    """Load ``libnvfm`` and declare the functions the plugin uses.

    Errors: :class:`LibnvfmError` naming the path or the missing symbol.
    """
    try:
        lib = ctypes.CDLL(os.fspath(path))
    except OSError as exc:
        raise LibnvfmError("load libnvfm", f"cannot load {os.fspath(path)!r}: {exc}") from None
    handle = ctypes.c_void_p
    signatures: dict[str, list[type]] = {
        "fmLibInit": [],
        "fmLibShutdown": [],
        "fmConnect": [ctypes.c_void_p, ctypes.POINTER(handle)],
        "fmDisconnect": [handle],
        "fmGetSupportedFabricPartitions": [handle, ctypes.POINTER(FmFabricPartitionList)],
        "fmActivateFabricPartition": [handle, ctypes.c_uint],
        "fmDeactivateFabricPartition": [handle, ctypes.c_uint],
        "fmSetActivatedFabricPartitions": [
            handle,
            ctypes.POINTER(FmActivatedFabricPartitionList),
        ],
        "fmGetUnsupportedFabricPartitions": [
            handle,
            ctypes.POINTER(FmUnsupportedFabricPartitionList),
        ],
    }
    for name, argtypes in signatures.items():
        try:
            func = getattr(lib, name)
        except AttributeError:
            raise LibnvfmError("load libnvfm", f"{os.fspath(path)!r} has no {name}") from None
        func.argtypes = argtypes
        func.restype = ctypes.c_int  # fmReturn_t
    return lib


class LibnvfmFabricManager:
    """The ``libnvfm`` FM backend (implements ``FabricManagerClient``).

    ``library`` is the path or soname of ``libnvfm``; ``endpoint`` as in
    :func:`connect_address`; ``timeout`` seconds, used as ``fmConnect``'s ``timeoutMs``
    and as the limit on each call.

    Ownership: owns the library's initialisation and one FM connection, opened lazily on
    the first call; :meth:`aclose` disconnects and shuts the library down. The library
    is process-wide state: use one instance per process.
    Errors: FM's typed errors (``error_for``); :class:`FmTimeout` when a call outlasts
    ``timeout`` (the C call cannot be interrupted: its thread is abandoned and finishes in
    the background, holding the connection until then); :class:`LibnvfmError` when the
    library cannot be loaded.
    """

    name = "libnvfm"

    def __init__(
        self,
        library: str | os.PathLike[str] = DEFAULT_LIBRARY,
        endpoint: str = "127.0.0.1",
        timeout: float = 10.0,
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"libnvfm timeout must be a positive number of seconds, not {timeout}")
        self.library = library
        self.address, self.address_type = connect_address(endpoint)
        self.timeout = timeout
        self._lock = trio.Lock()
        # Held by the worker thread for the whole C call: a thread abandoned after a
        # timeout keeps the handle until its call returns.
        self._thread_lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._handle: ctypes.c_void_p | None = None

    # -- worker-thread side (blocking) --

    def _check(self, code: int, operation: str) -> None:
        if code != FmReturn.SUCCESS:
            raise error_for(code, operation, f"libnvfm returned {code}")

    def _ensure_connected(self) -> tuple[ctypes.CDLL, ctypes.c_void_p]:
        if self._lib is None:
            lib = load_library(self.library)
            code = lib.fmLibInit()
            # IN_USE: already initialised in this process; that is fine.
            if code not in (FmReturn.SUCCESS, FmReturn.IN_USE):
                self._check(code, "initialise libnvfm")
            self._lib = lib
        if self._handle is None:
            self._handle = self._connect(self._lib)
        return self._lib, self._handle

    def _connect(self, lib: ctypes.CDLL) -> ctypes.c_void_p:
        handle = ctypes.c_void_p()
        unix = int(self.address_type == AddressType.UNIX)
        timeout_ms = max(1, round(self.timeout * 1000))
        params2 = FmConnectParamsV2(
            version=CONNECT_PARAMS_VERSION,
            addressInfo=self.address.encode(),
            timeoutMs=timeout_ms,
            addressIsUnixSocket=unix,
            addressType=int(self.address_type),
        )
        code = lib.fmConnect(ctypes.byref(params2), ctypes.byref(handle))
        if code == FmReturn.VERSION_MISMATCH:
            # A library older than the v2 header: it only knows addressIsUnixSocket.
            params1 = FmConnectParamsV1(
                version=CONNECT_PARAMS_V1_VERSION,
                addressInfo=self.address.encode(),
                timeoutMs=timeout_ms,
                addressIsUnixSocket=unix,
            )
            code = lib.fmConnect(ctypes.byref(params1), ctypes.byref(handle))
        self._check(code, f"connect to {self.address}")
        return handle

    def _drop_connection(self) -> None:
        if self._lib is not None and self._handle is not None:
            self._lib.fmDisconnect(self._handle)  # whatever it says, the handle is gone
        self._handle = None

    def _with_connection(
        self, operation: str, call: Callable[[ctypes.CDLL, ctypes.c_void_p], int]
    ) -> None:
        """Run ``call`` on the connection; reconnect once if FM dropped it."""
        with self._thread_lock:
            for attempt in range(2):
                lib, handle = self._ensure_connected()
                code = call(lib, handle)
                if code == FmReturn.CONNECTION_NOT_VALID and attempt == 0:
                    self._drop_connection()
                    continue
                if code == FmReturn.CONNECTION_NOT_VALID:
                    self._drop_connection()
                self._check(code, operation)
                return

    def _shutdown(self) -> None:
        with self._thread_lock:
            self._drop_connection()
            if self._lib is not None:
                self._lib.fmLibShutdown()
                self._lib = None

    # -- Trio side --

    async def _in_thread(self, operation: str, fn: Callable[[], T]) -> T:
        async with self._lock:
            with trio.move_on_after(self.timeout):
                return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
            raise FmTimeout(operation, f"libnvfm did not answer within {self.timeout:g}s")

    async def list_partitions(self) -> FmReport:
        op = "list partitions"
        plist = FmFabricPartitionList()

        def call(lib: ctypes.CDLL, handle: ctypes.c_void_p) -> int:
            ctypes.memset(ctypes.byref(plist), 0, ctypes.sizeof(plist))
            plist.version = PARTITION_LIST_VERSION
            return int(lib.fmGetSupportedFabricPartitions(handle, ctypes.byref(plist)))

        await self._in_thread(op, lambda: self._with_connection(op, call))
        return report_from_struct(plist)

    async def activate(self, partition_id: int) -> None:
        op = f"activate partition {partition_id}"
        await self._in_thread(
            op,
            lambda: self._with_connection(
                op, lambda lib, h: int(lib.fmActivateFabricPartition(h, partition_id))
            ),
        )

    async def deactivate(self, partition_id: int) -> None:
        op = f"deactivate partition {partition_id}"
        await self._in_thread(
            op,
            lambda: self._with_connection(
                op, lambda lib, h: int(lib.fmDeactivateFabricPartition(h, partition_id))
            ),
        )

    async def set_activated(self, partition_ids: Sequence[int]) -> None:
        op = "set activated partitions"
        ids = activated_list_argument(partition_ids)
        if len(ids) > FM_MAX_FABRIC_PARTITIONS or any(
            not 0 <= p < FM_MAX_FABRIC_PARTITIONS for p in ids
        ):
            raise error_for(FmReturn.BADPARAM, op, f"partition IDs {ids} outside 0..63")
        alist = FmActivatedFabricPartitionList(version=ACTIVATED_LIST_VERSION)
        alist.numPartitions = len(ids)
        for i, pid in enumerate(ids):
            alist.partitionIds[i] = pid
        await self._in_thread(
            op,
            lambda: self._with_connection(
                op, lambda lib, h: int(lib.fmSetActivatedFabricPartitions(h, ctypes.byref(alist)))
            ),
        )

    async def unsupported_partitions(self) -> list[tuple[int, tuple[int, ...]]]:
        """``fmGetUnsupportedFabricPartitions``: ``(partition ID, module IDs)`` rows."""
        op = "list unsupported partitions"
        ulist = FmUnsupportedFabricPartitionList()

        def call(lib: ctypes.CDLL, handle: ctypes.c_void_p) -> int:
            ctypes.memset(ctypes.byref(ulist), 0, ctypes.sizeof(ulist))
            ulist.version = UNSUPPORTED_LIST_VERSION
            return int(lib.fmGetUnsupportedFabricPartitions(handle, ctypes.byref(ulist)))

        await self._in_thread(op, lambda: self._with_connection(op, call))
        count = min(ulist.numPartitions, FM_MAX_FABRIC_PARTITIONS)
        return [
            (
                info.partitionId,
                tuple(info.gpuPhysicalIds[: min(info.numGpus, FM_MAX_NUM_GPUS)]),
            )
            for info in ulist.partitionInfo[:count]
        ]

    async def aclose(self) -> None:
        """Disconnect from FM and shut the library down (shielded: cleanup must finish)."""
        with trio.CancelScope(shield=True):
            async with self._lock:
                await trio.to_thread.run_sync(self._shutdown)
