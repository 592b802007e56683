"""Platforms the simulator can stand for: FM's default partition tables and the PCI facts.

Source: the Fabric Manager user guide's "GPU Partitions" tables (HGX H100/H200/H20 8-GPU,
H800, B200, A100 16-GPU). The daemon never reads this module to decide what to serve: it
serves what FM reports. Only the simulator and the simulated sysfs tree use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Row = tuple[int, tuple[int, ...], int]  # (partition ID, module IDs, NVLinks per GPU)


@dataclass(frozen=True, slots=True)
class Platform:
    """One kind of HGX board as the simulator presents it."""

    name: str
    description: str
    gpu_device_id: str  # PCI device ID, vendor 10de
    nvswitch_device_id: str  # "" where the switches are not PCI functions of the host
    nvswitch_count: int
    rows: tuple[Row, ...]
    line_rate_mbps: int
    # PCI bus of each module, listed by module ID: deliberately not lspci order, as on
    # real boards, so that nothing can get away with assuming it.
    module_buses: tuple[int, ...]

    @property
    def gpu_count(self) -> int:
        return len(self.module_buses)

    def module_map(self) -> dict[int, str]:
        """Module ID -> PCI address on the simulated node."""
        return {m: f"0000:{bus:02x}:00.0" for m, bus in enumerate(self.module_buses, start=1)}

    def numa_node(self, module_id: int) -> int:
        """Modules 1-4 (and 9-12) on socket 0, the rest on socket 1, as HGX boards are wired."""
        return 0 if ((module_id - 1) // 4) % 2 == 0 else 1


def _singles(first_id: int, modules: int) -> list[Row]:
    return [(first_id + m - 1, (m,), 0) for m in range(1, modules + 1)]


def _hopper_rows(links: int) -> tuple[Row, ...]:
    return (
        (0, tuple(range(1, 9)), links),
        (1, (1, 2, 3, 4), links),
        (2, (5, 6, 7, 8), links),
        (3, (1, 3), links),
        (4, (2, 4), links),
        (5, (5, 7), links),
        (6, (6, 8), links),
        *_singles(7, 8),
    )


def _b200_rows() -> tuple[Row, ...]:
    return (
        (1, tuple(range(1, 9)), 18),
        (2, (1, 2, 3, 4), 18),
        (3, (5, 6, 7, 8), 18),
        (4, (1, 2), 18),
        (5, (3, 4), 18),
        (6, (5, 6), 18),
        (7, (7, 8), 18),
        *_singles(8, 8),
    )


def _a100_16_rows() -> tuple[Row, ...]:
    quads = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16)]
    rows: list[Row] = [
        (0, tuple(range(1, 17)), 12),
        (1, tuple(range(1, 9)), 12),
        (2, tuple(range(9, 17)), 12),
        (3, quads[0] + quads[2], 12),
        (4, quads[1] + quads[3], 12),
        (5, quads[0] + quads[3], 12),
        (6, quads[1] + quads[2], 12),
    ]
    rows += [(7 + i, q, 12) for i, q in enumerate(quads)]
    rows += [(11 + i, (2 * i + 1, 2 * i + 2), 12) for i in range(8)]
    rows += _singles(19, 16)
    return tuple(rows)


# Bus numbers seen on 8-GPU HGX boards; module order differs from bus order.
_HGX8_BUSES = (0x5D, 0x3A, 0x2A, 0x18, 0xDB, 0xBA, 0xAB, 0x9A)
_HGX16_BUSES = (7, 15, 71, 78, 135, 144, 183, 189, 11, 21, 74, 84, 138, 149, 186, 193)

PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        Platform(
            "hgx-h200",
            "HGX H200 8-GPU (H200 SXM 141GB)",
            "2335",
            "22a3",
            4,
            _hopper_rows(18),
            26562,
            _HGX8_BUSES,
        ),
        Platform(
            "hgx-h100",
            "HGX H100 8-GPU (H100 SXM5 80GB)",
            "2330",
            "22a3",
            4,
            _hopper_rows(18),
            26562,
            _HGX8_BUSES,
        ),
        Platform(
            "hgx-h800", "HGX H800 8-GPU", "2324", "22a3", 4, _hopper_rows(8), 26562, _HGX8_BUSES
        ),
        Platform(
            "hgx-h20", "HGX H20 8-GPU", "2329", "22a3", 4, _hopper_rows(18), 26562, _HGX8_BUSES
        ),
        Platform("hgx-b200", "HGX B200 8-GPU", "2901", "", 2, _b200_rows(), 53125, _HGX8_BUSES),
        Platform(
            "hgx-a100-16",
            "HGX A100 16-GPU (two baseboards)",
            "20b0",
            "1af1",
            12,
            _a100_16_rows(),
            25781,
            _HGX16_BUSES,
        ),
    )
}


def platform(name: str) -> Platform:
    """The platform called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return PLATFORMS[name]
    except KeyError:
        raise KeyError(
            f"unknown platform {name!r}; known: {', '.join(sorted(PLATFORMS))}"
        ) from None


def platform_names() -> Sequence[str]:
    return sorted(PLATFORMS)
