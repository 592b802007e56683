"""Who each GPU is, read through NVML: module ID, PCI bus ID, UUID and serial.

What it reads: for every device NVML counts, ``nvmlDeviceGetPciInfo`` (the bus ID, turned
into the sysfs form ``0000:00:06.0``), ``nvmlDeviceGetModuleId`` (the HGX baseboard
position Fabric Manager names GPUs by), ``nvmlDeviceGetUUID`` and ``nvmlDeviceGetSerial``,
through nvidia-ml-py (module ``pynvml``), NVIDIA's own binding. The binding is an optional
extra (``pip install 'nvswitch-dp[nvml]'``) and is imported inside the call, so the package
imports and runs without it; :mod:`nvswitch_dp.vfio.identity` parses ``nvidia-smi -q`` where
NVML cannot be used.

What it cannot see: NVML only knows GPUs bound to the nvidia driver. A GPU on vfio-pci
(every GPU this plugin hands to a VM) is invisible to it, so NVML can only be read before
the GPUs are moved to vfio-pci; that is why the node inventory records the identities once
read, and why nothing here is asked about a GPU's state afterwards.

Ownership: each call initialises NVML (``nvmlInit``) and shuts it down (``nvmlShutdown``,
in a ``finally``) before returning; no handle outlives the call. pynvml keeps the library
it loaded for the life of the process. NVML's initialisation is not safe to run from two
threads at once: call this from one thread (the daemon reads identities once, at start).

Errors: :class:`NvmlUnavailable` when the binding is not installed, the library cannot be
found or loaded, ``nvmlInit`` or ``nvmlDeviceGetCount`` fails, or a device's handle or PCI
info cannot be read (the message names the device index and NVML's error string). A module
ID, UUID or serial NVML will not give (NotSupported on a PCIe card, or any other NVML
error) is ``None`` in the result, not an error: :func:`~nvswitch_dp.vfio.identity.check_identities`
decides whether a missing module ID matters.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path
from typing import Any

from nvswitch_dp.vfio.identity import MAX_FIELD_CHARS, SOURCE_NVML, GpuIdentity
from nvswitch_dp.vfio.pci_ids import normalize_pci_address

# The name pynvml passes to dlopen on Linux, and the DT_SONAME of NVIDIA's library.
NVML_SONAME = "libnvidia-ml.so.1"


class NvmlUnavailable(Exception):
    """NVML cannot be used on this node; the message says why (and what to do)."""


def _text(value: object) -> str:
    """Text from pynvml, which answers ``str`` on Python 3 but ``bytes`` in older releases."""
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return str(value)


def _optional_text(pynvml: Any, call: Any, handle: object) -> str | None:
    try:
        value = _text(call(handle)).strip()
    except pynvml.NVMLError:
        return None
    return value if value and len(value) <= MAX_FIELD_CHARS else None


def read_identities_nvml(library: Path | None = None) -> tuple[GpuIdentity, ...]:
    """Every GPU NVML sees, in NVML's index order, with ``source`` :data:`SOURCE_NVML`.

    ``library``: an NVML library to use instead of the one the dynamic loader finds; this
    is how ``--nvml-library`` and ``--driver-root`` point the daemon at a host library from
    inside a container. It is loaded with ``RTLD_GLOBAL`` before pynvml loads anything: NVIDIA's
    library carries the DT_SONAME ``libnvidia-ml.so.1``, so pynvml's own
    ``CDLL("libnvidia-ml.so.1")`` is then answered by the dynamic loader with the object
    already loaded. This only works if pynvml has not loaded another NVML earlier in the
    same process (it keeps the first for the life of the process).

    Ownership and threads: NVML is initialised and shut down within the call; call it from
    one thread at a time.

    Errors: :class:`NvmlUnavailable` (see the module docstring), chained from nothing; the
    message carries NVML's error string. Per-device module ID, UUID and serial errors give
    ``None`` for that field.
    """
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable(
            "the NVML binding (nvidia-ml-py, module pynvml) is not installed; "
            "install it with: pip install 'nvswitch-dp[nvml]'"
        ) from None
    if library is not None:
        try:
            # ctypes never dlcloses, so the object stays loaded after this handle is dropped.
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise NvmlUnavailable(
                f"NVML library {library} not found or not loadable: {exc}"
            ) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        raise NvmlUnavailable(
            f"NVML library {NVML_SONAME} not found by the dynamic loader "
            "(is the NVIDIA driver installed? from a container, pass --nvml-library "
            "or --driver-root)"
        ) from None
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"nvmlInit failed: {exc}") from None
    try:
        return _read_devices(pynvml)
    finally:
        # The answer is already read (or the error raised); a failed shutdown changes neither.
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _read_devices(pynvml: Any) -> tuple[GpuIdentity, ...]:
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"nvmlDeviceGetCount failed: {exc}") from None
    identities = []
    for index in range(count):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(
                f"NVML device {index}: nvmlDeviceGetHandleByIndex failed: {exc}"
            ) from None
        try:
            bus_id = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(
                f"NVML device {index}: nvmlDeviceGetPciInfo failed: {exc}"
            ) from None
        try:
            address = normalize_pci_address(bus_id)
        except ValueError as exc:
            raise NvmlUnavailable(f"NVML device {index}: {exc}") from None
        try:
            module_id: int | None = int(pynvml.nvmlDeviceGetModuleId(handle))
        except pynvml.NVMLError:
            module_id = None  # NotSupported: a GPU that is not on an HGX baseboard
        try:
            minor: int | None = int(pynvml.nvmlDeviceGetMinorNumber(handle))
        except pynvml.NVMLError:
            minor = None
        identities.append(
            GpuIdentity(
                address=address,
                module_id=module_id,
                uuid=_optional_text(pynvml, pynvml.nvmlDeviceGetUUID, handle),
                serial=_optional_text(pynvml, pynvml.nvmlDeviceGetSerial, handle),
                source=SOURCE_NVML,
                minor=minor,
            )
        )
    return tuple(identities)
