"""The ``nvidia-smi -q`` parser against output captured on a real H200 (driver 580).

``tests/fixtures/h200-sxm-passthrough/nvidia-smi-q.txt`` is the whole output of one real
GPU; the multi-GPU and older-spelling cases are built from it by changing only the lines
a different node or driver would print differently.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvswitch_dp.vfio.identity import (
    MAX_SMI_OUTPUT_BYTES,
    SOURCE_NVIDIA_SMI,
    GpuIdentity,
    IdentityError,
    check_identities,
    parse_nvidia_smi_q,
)

FIXTURES = Path(__file__).parent / "fixtures" / "h200-sxm-passthrough"
REAL = (FIXTURES / "nvidia-smi-q.txt").read_text()
REAL_UUID = "GPU-00000000-1111-2222-3333-444444444444"


def _header_and_gpu(text: str) -> tuple[str, str]:
    start = text.index("GPU 00000000:00:06.0")
    return text[:start], text[start:]


def _gpu_block(address8: str, module: str, *, spelling: str = "Module Id") -> str:
    """The real GPU block, as another GPU at ``address8`` with ``module`` would print it."""
    _, block = _header_and_gpu(REAL)
    block = block.replace("00000000:00:06.0", address8)
    return re.sub(r"Module Id(\s+): 8", lambda m: f"{spelling}{m.group(1)}: {module}", block)


def test_the_real_h200_output_gives_module_8_at_the_sysfs_address() -> None:
    (gpu,) = parse_nvidia_smi_q(REAL)
    assert gpu == GpuIdentity(
        address="0000:00:06.0",
        module_id=8,
        uuid=REAL_UUID,
        serial="1650000000001",
        source=SOURCE_NVIDIA_SMI,
        minor=0,
    )


def test_chassis_serial_number_is_not_the_gpu_serial() -> None:
    # "Chassis Serial Number : N/A" comes after "Serial Number" in the real output; a
    # parser matching by suffix would take N/A.
    assert "Chassis Serial Number" in REAL
    assert parse_nvidia_smi_q(REAL)[0].serial == "1650000000001"


@pytest.mark.parametrize("spelling", ["Module ID", "Module Id", "MODULE ID", "module id"])
@pytest.mark.parametrize("indent", ["", "  ", "\t", "            "])
def test_both_spellings_at_any_indentation(spelling: str, indent: str) -> None:
    header, _ = _header_and_gpu(REAL)
    block = _gpu_block("00000000:5D:00.0", "3", spelling=spelling)
    block = re.sub(rf"^\s*{spelling}", indent + spelling, block, flags=re.MULTILINE)
    (gpu,) = parse_nvidia_smi_q(header + block)
    assert (gpu.address, gpu.module_id) == ("0000:5d:00.0", 3)


def test_eight_gpus_of_an_hgx_board_in_printed_order() -> None:
    header, _ = _header_and_gpu(REAL)
    # module IDs do not follow bus order on HGX boards
    layout = [("18", 4), ("2A", 3), ("3A", 2), ("5D", 1)]
    layout += [("9A", 8), ("AB", 7), ("BA", 6), ("DB", 5)]
    text = header + "".join(_gpu_block(f"00000000:{b}:00.0", str(m)) for b, m in layout)
    gpus = parse_nvidia_smi_q(text)
    assert [(g.address, g.module_id) for g in gpus] == [
        (f"0000:{b.lower()}:00.0", m) for b, m in layout
    ]
    check_identities(gpus)


def test_not_available_module_is_none_and_check_names_the_gpu() -> None:
    header, _ = _header_and_gpu(REAL)
    text = header + _gpu_block("00000000:5D:00.0", "N/A") + _gpu_block("00000000:18:00.0", "1")
    gpus = parse_nvidia_smi_q(text)
    assert gpus[0].module_id is None and gpus[1].module_id == 1
    with pytest.raises(IdentityError, match=r"no module ID reported for GPU 0000:5d:00\.0"):
        check_identities(gpus)


@pytest.mark.parametrize(
    "printed",
    ["[Not Supported]", "Insufficient Permissions", "GPU requires reset", "eight", "17", "-1"],
)
def test_a_module_no_driver_could_mean_leaves_only_that_gpu_without_one(printed: str) -> None:
    header, _ = _header_and_gpu(REAL)
    text = header + _gpu_block("00000000:5D:00.0", printed) + _gpu_block("00000000:18:00.0", "1")
    gpus = parse_nvidia_smi_q(text)
    assert [(g.module_id, g.module_text) for g in gpus] == [(None, printed), (1, None)]
    with pytest.raises(IdentityError, match=re.escape(f"0000:5d:00.0 ({printed!r})")):
        check_identities(gpus)


def test_the_module_under_platform_info_wins_over_one_printed_before_it() -> None:
    header, _ = _header_and_gpu(REAL)
    block = _gpu_block("00000000:5D:00.0", "3")
    # a section before Platform Info with a key of the same name (MIG devices, say)
    block = block.replace(
        "    MIG Mode\n", "    MIG Devices\n        Module Id                 : 9\n    MIG Mode\n"
    )
    (gpu,) = parse_nvidia_smi_q(header + block)
    assert gpu.module_id == 3


def test_wide_pci_domains_keep_their_digits() -> None:
    header, _ = _header_and_gpu(REAL)
    (gpu,) = parse_nvidia_smi_q(header + _gpu_block("00010000:5D:00.0", "3"))
    assert gpu.address == "10000:5d:00.0"  # as sysfs prints a 32-bit domain (%04x)


def test_crlf_output_parses_the_same() -> None:
    assert parse_nvidia_smi_q(REAL.replace("\n", "\r\n")) == parse_nvidia_smi_q(REAL)


def test_two_gpus_reporting_one_module_are_named() -> None:
    header, _ = _header_and_gpu(REAL)
    text = header + _gpu_block("00000000:5D:00.0", "2") + _gpu_block("00000000:18:00.0", "2")
    with pytest.raises(
        IdentityError, match=r"module ID 2 reported by GPUs 0000:18:00\.0, 0000:5d:00\.0"
    ):
        check_identities(parse_nvidia_smi_q(text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "printed no GPU"),
        ("No devices were found\n", "printed no GPU"),
        ("GPU 00000000:00:40.0\n    Module Id : 1\n", "not a PCI address"),
        ("x" * (MAX_SMI_OUTPUT_BYTES + 1), "more than"),
    ],
)
def test_output_that_names_no_usable_gpu_is_refused(text: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        parse_nvidia_smi_q(text)


def test_zero_attached_gpus_is_an_empty_answer() -> None:
    header, _ = _header_and_gpu(REAL)
    assert parse_nvidia_smi_q(header.replace(": 1", ": 0")) == ()


@given(
    st.dictionaries(
        st.tuples(st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7)),
        st.integers(1, 16),
        min_size=1,
        max_size=16,
    )
)
def test_any_board_round_trips(layout: dict[tuple[int, int, int], int]) -> None:
    header, _ = _header_and_gpu(REAL)
    text = header + "".join(
        _gpu_block(f"00000000:{b:02X}:{d:02X}.{f}", str(m)) for (b, d, f), m in layout.items()
    )
    gpus = parse_nvidia_smi_q(text)
    assert {(g.address, g.module_id) for g in gpus} == {
        (f"0000:{b:02x}:{d:02x}.{f}", m) for (b, d, f), m in layout.items()
    }


def test_the_documented_hand_recipe_prints_what_the_docs_show_on_the_real_output() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    command = "nvidia-smi -q | grep -iE '^GPU |module id'"
    block = docs.split(f"$ {command}\n", 1)[1].split("```", 1)[0]
    grep = subprocess.run(
        ["grep", "-iE", "^GPU |module id", str(FIXTURES / "nvidia-smi-q.txt")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert grep.stdout == block
    assert [(g.address, g.module_id) for g in parse_nvidia_smi_q(grep.stdout)] == [
        ("0000:00:06.0", 8)
    ]
