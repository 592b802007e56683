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
from typing import TypeGuard

from nvswitch_dp.vfio.pci_ids import normalize_pci_address

# FM's limit: 16 GPUs per node, numbered from 1 (module_map and the inventory check it too).
MAX_MODULE_ID = 16


def is_module_id(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a module ID FM can know: an integer (not a bool) from 1 to
    :data:`MAX_MODULE_ID`."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_MODULE_ID


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
    ``None`` when the driver reported none (N/A, NotSupported, an error text, kept in
    ``module_text`` for the message); ``uuid`` and ``serial`` likewise. ``source`` says
    who reported it: :data:`SOURCE_NVML` or :data:`SOURCE_NVIDIA_SMI`.
    """

    address: str
    module_id: int | None
    uuid: str | None
    serial: str | None
    source: str
    minor: int | None = None  # of /dev/nvidia<minor>; None when not reported
    module_text: str | None = None  # what was printed where no module ID could be read


# A UUID is 40 characters and a serial 13; anything longer is not one, and is not kept.
MAX_FIELD_CHARS = 256


def _value(text: str) -> str | None:
    text = text.strip()
    if text.lower() in _NOT_AVAILABLE or len(text) > MAX_FIELD_CHARS:
        return None
    return text


def _number(text: str | None, limit: int) -> int | None:
    """A decimal number up to ``limit``; ``None`` for anything else ("N/A", "[Not
    Supported]", "Insufficient Permissions", "GPU requires reset", out of range)."""
    if text is None or not text.isdecimal():
        return None
    value = int(text, 10)
    return value if value <= limit else None


def parse_nvidia_smi_q(text: str) -> tuple[GpuIdentity, ...]:
    """The GPUs of ``nvidia-smi -q`` output, in the order printed.

    Within a GPU's block the keys are matched case-insensitively after stripping the
    indentation: ``Module Id``/``Module ID`` (the one under ``Platform Info`` where there
    is such a section, else the first), ``GPU UUID``, ``Minor Number``, and ``Serial
    Number`` (exactly: ``Chassis Serial Number`` is another key). A module value that is
    not a decimal number up to :data:`MAX_MODULE_ID` (``N/A``, ``[Not Supported]``, an
    error text) leaves that GPU without a module ID, the text kept for the message: one
    GPU the driver cannot describe does not hide the others.

    Errors: :class:`IdentityError` when the text is larger than
    :data:`MAX_SMI_OUTPUT_BYTES`, names no GPU, or names one by a bus ID that is not a
    PCI address.
    An empty GPU list with ``Attached GPUs : 0`` is not an error: it returns ``()``.
    """
    if len(text) > MAX_SMI_OUTPUT_BYTES:
        raise IdentityError(
            f"nvidia-smi printed {len(text)} characters, more than the "
            f"{MAX_SMI_OUTPUT_BYTES} it ever prints; refusing to parse it"
        )
    blocks: list[tuple[str, dict[str, str]]] = []
    attached: str | None = None
    platform_indent: int | None = None  # inside a GPU's "Platform Info" section
    for line in text.splitlines():
        gpu = _GPU_LINE.match(line)
        if gpu is not None:
            platform_indent = None
            try:
                address = normalize_pci_address(gpu.group(1))
            except ValueError as exc:
                raise IdentityError(f"nvidia-smi -q: {exc}") from None
            blocks.append((address, {}))
            continue
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if platform_indent is not None and indent <= platform_indent:
            platform_indent = None  # the Platform Info section has ended
        pair = _KEY_VALUE.match(line)
        if pair is None:  # a section title ("    Platform Info")
            if blocks and line.strip().lower() == "platform info":
                platform_indent = indent
            continue
        key = pair.group(2).strip().lower()
        if not blocks:
            if key == "attached gpus":
                attached = pair.group(3).strip()
            continue
        if key == "module id" and platform_indent is not None:
            key = "platform module id"  # where drivers print it; preferred over any other
        blocks[-1][1].setdefault(key, pair.group(3))  # the first of a key wins within a GPU
    if not blocks:
        if attached == "0":
            return ()
        raise IdentityError(
            "nvidia-smi -q printed no GPU (no line like 'GPU 00000000:00:06.0'); "
            "is the nvidia driver loaded and are the GPUs bound to it?"
        )
    identities = []
    for address, fields in blocks:
        printed = fields.get("platform module id", fields.get("module id", "")).strip()
        module = _number(printed, MAX_MODULE_ID)
        identities.append(
            GpuIdentity(
                address=address,
                module_id=module,
                uuid=_value(fields.get("gpu uuid", "")),
                serial=_value(fields.get("serial number", "")),
                source=SOURCE_NVIDIA_SMI,
                minor=_number(fields.get("minor number", "").strip(), 1 << 20),
                module_text=None if module is not None else (printed or "not printed"),
            )
        )
    return tuple(identities)


def check_identities(identities: Iterable[GpuIdentity]) -> None:
    """Every GPU has a module ID (1 to :data:`MAX_MODULE_ID`), and no two share one.

    Errors: :class:`IdentityError` naming every GPU without a module ID and every module
    ID two or more GPUs report, with their addresses.
    """
    by_module: dict[int, list[str]] = {}
    missing: list[str] = []
    for identity in identities:
        if not is_module_id(identity.module_id):
            text = identity.module_text or (
                None if identity.module_id is None else str(identity.module_id)
            )
            printed = f" ({text!r})" if text else ""
            missing.append(f"{identity.address}{printed}")
        else:
            by_module.setdefault(identity.module_id, []).append(identity.address)
    problems = []
    if missing:
        problems.append(
            f"no module ID reported for GPU {', '.join(sorted(missing))} "
            "(is this an HGX baseboard GPU? PCIe cards have no module ID; "
            "check `nvidia-smi -q` on the node)"
        )
    for module, addresses in sorted(by_module.items()):
        if len(addresses) > 1:
            problems.append(f"module ID {module} reported by GPUs {', '.join(sorted(addresses))}")
    if problems:
        raise IdentityError("; ".join(problems))
