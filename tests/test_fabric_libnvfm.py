"""The libnvfm backend against a fake ``libnvfm.so`` built here with gcc.

The fake (``tests/fakes/libnvfm_fake.c``) declares the structs as ``nv_fm_types.h`` does
and keeps FM's state in a file, so these tests also check the ctypes layouts against what
a C compiler makes of the header's definitions.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from c_helpers import compile_shared_library

from nvswitch_dp.fabric import libnvfm
from nvswitch_dp.fabric.libnvfm import (
    AddressType,
    LibnvfmError,
    LibnvfmFabricManager,
    connect_address,
)
from nvswitch_dp.fabric.types import (
    FmBadParam,
    FmConnectionNotValid,
    FmInUse,
    FmNotConfigured,
    FmUninitialized,
)
from testkit.harness import simulated_node

FAKE_SOURCE = Path(__file__).parent / "fakes" / "libnvfm_fake.c"
STATE_ENV = "NVSWITCH_DP_FAKE_NVFM_STATE"


@pytest.fixture(scope="session")
def fake_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake libnvfm, compiled once per session with the machine's gcc."""
    out = tmp_path_factory.mktemp("libnvfm") / "libnvfm_fake.so"
    compile_shared_library(FAKE_SOURCE, out)
    return out


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "fm.state"
    monkeypatch.setenv(STATE_ENV, str(path))  # os.environ writes through to C's getenv
    return path


@pytest.fixture
async def fm(fake_library: Path, state: Path) -> AsyncIterator[LibnvfmFabricManager]:
    backend = LibnvfmFabricManager(fake_library, "127.0.0.1", timeout=5)
    yield backend
    await backend.aclose()


def _fake(fake_library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(fake_library))
    lib.fakeNvfmSizeof.restype = ctypes.c_ulong
    lib.fakeNvfmLastAddress.restype = ctypes.c_char_p
    return lib


def _last_connect(fake_library: Path) -> tuple[str, int, int]:
    kind, version = ctypes.c_int(), ctypes.c_uint()
    address = _fake(fake_library).fakeNvfmLastAddress(ctypes.byref(kind), ctypes.byref(version))
    return address.decode(), kind.value, version.value


def test_struct_layouts_match_the_header(fake_library: Path) -> None:
    lib = _fake(fake_library)
    structs = [
        (libnvfm.FmConnectParamsV1, 268),
        (libnvfm.FmConnectParamsV2, 272),
        (libnvfm.FmFabricPartitionGpuInfo, 128),
        (libnvfm.FmFabricPartitionInfo, 2060),
        (libnvfm.FmFabricPartitionList, 131852),
        (libnvfm.FmActivatedFabricPartitionList, 264),
        (libnvfm.FmUnsupportedFabricPartitionList, 4616),
    ]
    for which, (struct, size) in enumerate(structs):
        assert ctypes.sizeof(struct) == size == lib.fakeNvfmSizeof(which), struct.__name__
    assert libnvfm.CONNECT_PARAMS_VERSION == 272 | 2 << 24
    assert libnvfm.PARTITION_LIST_VERSION == 131852 | 1 << 24  # "_v2" carries version 1


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("", ("127.0.0.1", AddressType.INET)),
        ("10.0.0.5", ("10.0.0.5", AddressType.INET)),
        ("10.0.0.5:7777", ("10.0.0.5:7777", AddressType.INET)),
        (
            "unix:/run/nvidia-fabricmanager/socket",
            ("/run/nvidia-fabricmanager/socket", AddressType.UNIX),
        ),
    ],
)
def test_connect_address(endpoint: str, expected: tuple[str, AddressType]) -> None:
    assert connect_address(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["unix:", "x" * 256])
def test_connect_address_rejects(endpoint: str) -> None:
    with pytest.raises(ValueError):
        connect_address(endpoint)


async def test_list_partitions(fm: LibnvfmFabricManager, fake_library: Path) -> None:
    report = await fm.list_partitions()
    assert [p.partition_id for p in report.partitions] == list(range(15))
    assert report.max_partitions == 64
    assert report.partitions[3].module_ids == (1, 3)
    gpu = report.partitions[3].gpus[0]
    assert (gpu.uuid, gpu.pci_bus_id, gpu.max_nvlinks, gpu.nvlink_line_rate_mbps) == (
        "",
        "00000000:00:00.0",
        18,
        26562,
    )
    assert report.partitions[14].gpus[0].max_nvlinks == 0
    assert _last_connect(fake_library) == ("127.0.0.1", AddressType.INET, 272 | 2 << 24)


async def test_activate_deactivate_and_refusals(fm: LibnvfmFabricManager) -> None:
    await fm.activate(3)
    with pytest.raises(FmInUse):
        await fm.activate(3)
    with pytest.raises(FmInUse):
        await fm.activate(0)  # overlaps (1,3)
    await fm.activate(4)
    assert (await fm.list_partitions()).active_ids == {3, 4}
    await fm.deactivate(3)
    with pytest.raises(FmUninitialized):
        await fm.deactivate(3)
    with pytest.raises(FmBadParam):
        await fm.activate(15)
    assert (await fm.list_partitions()).active_ids == {4}


async def test_state_outlives_connections(fake_library: Path, state: Path) -> None:
    first = LibnvfmFabricManager(fake_library, "127.0.0.1", timeout=5)
    await first.activate(5)
    await first.aclose()
    second = LibnvfmFabricManager(fake_library, "127.0.0.1", timeout=5)
    try:
        assert (await second.list_partitions()).active_ids == {5}
    finally:
        await second.aclose()


async def test_restart_and_set_activated(fm: LibnvfmFabricManager, state: Path) -> None:
    await fm.activate(3)
    state.write_text(state.read_text().replace("awaiting 0", "awaiting 1"))  # FM restarted
    with pytest.raises(FmNotConfigured):
        await fm.list_partitions()
    with pytest.raises(FmNotConfigured):
        await fm.activate(4)
    await fm.set_activated([6, 3, 3])
    assert (await fm.list_partitions()).active_ids == {3, 6}
    await fm.set_activated([])
    assert (await fm.list_partitions()).active_ids == frozenset()
    with pytest.raises(FmBadParam):
        await fm.set_activated([64])


async def test_reconnects_after_fm_comes_back(fm: LibnvfmFabricManager, state: Path) -> None:
    await fm.list_partitions()
    state.write_text("active 0\nawaiting 0\ndown 1\n")
    with pytest.raises(FmConnectionNotValid):
        await fm.list_partitions()
    state.write_text("active 0\nawaiting 0\ndown 0\n")
    assert len((await fm.list_partitions()).partitions) == 15


async def test_unix_socket_endpoint(fake_library: Path, state: Path) -> None:
    fm = LibnvfmFabricManager(fake_library, "unix:/run/nvidia-fabricmanager/socket", timeout=5)
    try:
        assert await fm.unsupported_partitions() == []
    finally:
        await fm.aclose()
    assert _last_connect(fake_library)[:2] == ("/run/nvidia-fabricmanager/socket", AddressType.UNIX)


async def test_missing_library(state: Path) -> None:
    fm = LibnvfmFabricManager("/nonexistent/libnvfm.so.1", "127.0.0.1", timeout=5)
    with pytest.raises(LibnvfmError, match="cannot load"):
        await fm.list_partitions()
    assert not LibnvfmError("x").transient


def test_the_daemon_drives_fm_through_libnvfm(fake_library: Path, tmp_path: Path) -> None:
    """``run --simulate hgx-h200 --fm-backend libnvfm`` on the fake library, end to end."""
    state = tmp_path / "fm.state"
    config = tmp_path / "config.yaml"
    config.write_text(f"version: v1\nfabric_manager:\n  libnvfm_path: {fake_library}\n")
    env = {**os.environ, STATE_ENV: str(state)}
    args = ["--config", str(config), "--fm-backend", "libnvfm"]
    with simulated_node(tmp_path, extra_args=args, env=env) as (daemon, kubelet):
        kubelet.allocate("nvidia.com/gpu-h200-2x", ["partition-6"])
        status, body = daemon.get("/v1/partitions/6")
        assert (status, body["state"]) == (200, "allocated")
        with pytest.raises(grpc.RpcError) as raised:
            kubelet.allocate("nvidia.com/gpu-h200-8x", ["partition-0"])
        assert "partition 6" in (raised.value.details() or "")
        status, node = daemon.get("/v1/node")
        assert status == 200 and "libnvfm" in json.dumps(node)
