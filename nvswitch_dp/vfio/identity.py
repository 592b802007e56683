"""Who each GPU is: its FM module ID, PCI bus ID, UUID and serial, as the driver reports them.

Fabric Manager names GPUs by module ID; only the NVIDIA driver can tell which PCI function
a module is, and only while the GPU is bound to it. Two sources, both read-only:

- NVML (``nvmlDeviceGetModuleId`` and friends, :mod:`nvswitch_dp.vfio.nvml`), NVIDIA's
  own library, the first choice;
- ``nvidia-smi -q`` text (:func:`parse_nvidia_smi_q`), the fallback where NVML cannot
  load or answers an error.

The text format is taken from output captured on a real H200 SXM with driver 580.159.04
(``tests/fixtures/h200-sxm-passthrough/nvidia-smi-q.txt``): each GPU opens with a line
``GPU 00000000:00:06.0`` (8-digit PCI domain) at column 0, and the module ID is printed
indented under ``Platform Info`` as ``Module Id : 8``. Older drivers and other tools
spell it ``Module ID``; both are accepted, at any indentation, and "N/A" means the driver
reports none. Bus IDs are normalised to the sysfs form (``0000:00:06.0``) before
anything is joined with sysfs.

Pure: no I/O here. Errors: :class:`IdentityError` for output that names no GPU or a bus
ID that is not a PCI address; :func:`check_identities` for GPUs without a module ID or
sharing one, each naming the GPUs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from nvswitch_dp.vfio.pci_ids import normalize_pci_address

SOURCE_NVML = "nvml"
SOURCE_NVIDIA_SMI = "nvidia-smi"

# Bounds on what is parsed: a real 8-GPU node prints about 150 KB; far more is not
# nvidia-smi's output and is refused rather than held.
MAX_SMI_OUTPUT_BYTES = 16 << 20
_NOT_AVAILABLE = frozenset({"", "n/a", "not supported", "unknown error", "[n/a]"})

_GPU_LINE = re.compile(r"^GPU\s+([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])\s*$")
_KEY_VALUE = re.compile(r"^(\s*)([^:]+?)\s*:\s?(.*?)\s*$")


class IdentityError(Exception):
    """What the driver reported cannot be used; the message names the GPUs and the cause."""


@dataclass(frozen=True, slots=True)
class GpuIdentity:
    """One GPU as the NVIDIA driver reported it.

    ``address`` is the sysfs form (``"0000:00:06.0"``, lower case); ``module_id`` is
    ``None`` when the driver reported none (N/A, NotSupported); ``uuid`` and ``serial``
    likewise. ``source`` says who reported it: :data:`SOURCE_NVML` or
    :data:`SOURCE_NVIDIA_SMI`.
    """

    address: str
    module_id: int | None
    uuid: str | None
    serial: str | None
    source: str


def _value(text: str) -> str | None:
    return None if text.strip().lower() in _NOT_AVAILABLE else text.strip()


def _module(text: str | None, address: str) -> int | None:
    if text is None:
        return None
    try:
        module = int(text, 0)
    except ValueError:
        raise IdentityError(f"GPU {address}: module ID {text!r} is not a number") from None
    if module < 0:
        raise IdentityError(f"GPU {address}: module ID {module} is negative")
    return module


def parse_nvidia_smi_q(text: str) -> tuple[GpuIdentity, ...]:
    """The GPUs of ``nvidia-smi -q`` output, in the order printed.

    Within a GPU's block the keys are matched case-insensitively after stripping the
    indentation: ``Module Id``/``Module ID`` (the first one; it appears once, under
    ``Platform Info``), ``GPU UUID``, and ``Serial Number`` (exactly: ``Chassis Serial
    Number`` is another key).

    Errors: :class:`IdentityError` when the text is larger than
    :data:`MAX_SMI_OUTPUT_BYTES`, names no GPU, names one by a bus ID that is not a PCI
    address, or has a module ID that is not a number.
    An empty GPU list with ``Attached GPUs : 0`` is not an error: it returns ``()``.
    """
    if len(text) > MAX_SMI_OUTPUT_BYTES:
        raise IdentityError(
            f"nvidia-smi printed {len(text)} characters, more than the "
            f"{MAX_SMI_OUTPUT_BYTES} it ever prints; refusing to parse it"
        )
    blocks: list[tuple[str, dict[str, str]]] = []
    attached: str | None = None
    for line in text.splitlines():
        gpu = _GPU_LINE.match(line)
        if gpu is not None:
            try:
                address = normalize_pci_address(gpu.group(1))
            except ValueError as exc:
                raise IdentityError(f"nvidia-smi -q: {exc}") from None
            blocks.append((address, {}))
            continue
        pair = _KEY_VALUE.match(line)
        if pair is None:
            continue
        key = pair.group(2).strip().lower()
        if not blocks:
            if key == "attached gpus":
                attached = pair.group(3).strip()
            continue
        fields = blocks[-1][1]
        fields.setdefault(key, pair.group(3))  # the first of a key wins within a GPU
    if not blocks:
        if attached == "0":
            return ()
        raise IdentityError(
            "nvidia-smi -q printed no GPU (no line like 'GPU 00000000:00:06.0'); "
            "is the nvidia driver loaded and are the GPUs bound to it?"
        )
    identities = []
    for address, fields in blocks:
        identities.append(
            GpuIdentity(
                address=address,
                module_id=_module(_value(fields.get("module id", "")), address),
                uuid=_value(fields.get("gpu uuid", "")),
                serial=_value(fields.get("serial number", "")),
                source=SOURCE_NVIDIA_SMI,
            )
        )
    return tuple(identities)


def check_identities(identities: Iterable[GpuIdentity]) -> None:
    """Every GPU has a module ID, and no two share one.

    Errors: :class:`IdentityError` naming every GPU without a module ID and every module
    ID two or more GPUs report, with their addresses.
    """
    by_module: dict[int, list[str]] = {}
    missing: list[str] = []
    for identity in identities:
        if identity.module_id is None:
            missing.append(identity.address)
        else:
            by_module.setdefault(identity.module_id, []).append(identity.address)
    problems = []
    if missing:
        problems.append(
            f"no module ID reported for GPU {', '.join(sorted(missing))} "
            "(is this an HGX baseboard GPU? PCIe cards have no module ID)"
        )
    for module, addresses in sorted(by_module.items()):
        if len(addresses) > 1:
            problems.append(f"module ID {module} reported by GPUs {', '.join(sorted(addresses))}")
    if problems:
        raise IdentityError("; ".join(problems))
