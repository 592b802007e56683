"""KubeVirt consumes a partition: ``plugin.allocation_unit: gpu`` (docs/kubevirt.md).

Unit tests of the device naming, the Allocate checks and the preferred answer of both
units, then the real daemon in ``gpu`` mode with the grpcio kubelet stand-in and its
PodResources service.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from node_helpers import running_controller
from test_lifecycle import Node as LifecycleNode

from nvswitch_dp.controller import AllocationError
from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.partitions.policy import preferred_allocation
from nvswitch_dp.partitions.refusal import Refusal
from nvswitch_dp.partitions.state import PartitionBook
from nvswitch_dp.partitions.table import (
    DeviceRef,
    PartitionTable,
    gpu_device_id,
    parse_device_id,
    partition_id_of,
)
from nvswitch_dp.partitions.units import (
    GPU_UNIT,
    PARTITION_UNIT,
    UNIT_NAMES,
    AllocationUnit,
    UnitError,
    allocation_unit,
)

R = "nvidia.com/gpu-h200"
RESOURCES = [f"{R}-{n}x" for n in (1, 2, 4, 8)]
ENV_4X = "PCI_RESOURCE_NVIDIA_COM_GPU-H200-4X"
H200 = platform("hgx-h200")
MODULE_MAP = H200.module_map()
# HGX H200 table: 0 = all 8; 1 = modules 1-4, 2 = 5-8; 3-6 = pairs (1,3) (2,4) (5,7)
# (6,8); 7-14 = singles 1-8.
TABLE = PartitionTable.from_rows((pid, mods) for pid, mods, _ in H200.rows)


def gpus(pid: int) -> list[str]:
    """The GPU device IDs of partition ``pid`` in module order."""
    return [gpu_device_id(pid, m) for m in TABLE[pid].sorted_modules]


# -- device IDs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "ref"),
    [
        ("partition-0", DeviceRef(0)),
        ("partition-14", DeviceRef(14)),
        ("partition-1-gpu-4", DeviceRef(1, 4)),
        ("partition-63-gpu-16", DeviceRef(63, 16)),
        ("partition-01", None),
        ("partition-1-gpu-04", None),
        ("partition-1-gpu-", None),
        ("partition--gpu-1", None),
        ("partition-1-gpu-1-gpu-2", None),
        ("partition-\u0663", None),
        ("partition-1-gpu-\u0663", None),
        ("partition-1-GPU-1", None),
        ("gpu-1", None),
        ("", None),
    ],
)
def test_one_parser_reads_both_forms_and_only_canonical_spellings(
    device: str, ref: DeviceRef | None
) -> None:
    if ref is None:
        with pytest.raises(ValueError, match="device ID"):
            parse_device_id(device)
        with pytest.raises(ValueError):
            partition_id_of(device)
    else:
        assert parse_device_id(device) == ref
        assert ref.device_id == device  # round trip
        assert partition_id_of(device) == ref.partition_id


def test_gpu_device_ids_fit_the_kubelet_limit() -> None:
    longest = gpu_device_id(2**31 - 1, 16)  # FM partition IDs are uint32; 16 GPUs a node
    assert len(longest) <= 63
    assert gpu_device_id(3, 5) == "partition-3-gpu-5"


def test_each_unit_names_a_partitions_devices() -> None:
    assert PARTITION_UNIT.device_ids(TABLE[1]) == ("partition-1",)
    assert GPU_UNIT.device_ids(TABLE[2]) == tuple(f"partition-2-gpu-{m}" for m in (5, 6, 7, 8))
    assert GPU_UNIT.device_ids(TABLE[7]) == ("partition-7-gpu-1",)
    assert sum(len(GPU_UNIT.device_ids(p)) for p in TABLE.of_size(4)) == 8


def test_units_by_name() -> None:
    assert [allocation_unit(n).name for n in UNIT_NAMES] == ["partition", "gpu"]
    with pytest.raises(ValueError, match="unknown allocation unit 'vm'; known: partition, gpu"):
        allocation_unit("vm")


# -- Allocate: select -----------------------------------------------------------------------


def select(unit: AllocationUnit, size: int, devices: list[str]) -> tuple[list[int], list[int]]:
    selection = unit.select(TABLE, size, f"{R}-{size}x", devices)
    return list(selection.partition_ids), list(selection.module_order)


def test_gpu_unit_accepts_whole_partitions_in_the_requested_order() -> None:
    assert select(GPU_UNIT, 4, gpus(1)) == ([1], [1, 2, 3, 4])
    shuffled = ["partition-2-gpu-7", "partition-2-gpu-5", "partition-2-gpu-8", "partition-2-gpu-6"]
    assert select(GPU_UNIT, 4, shuffled) == ([2], [7, 5, 8, 6])
    both = [gpus(2)[0], *gpus(1), *gpus(2)[1:]]
    assert select(GPU_UNIT, 4, both) == ([2, 1], [5, 1, 2, 3, 4, 6, 7, 8])
    assert select(GPU_UNIT, 1, ["partition-9-gpu-3"]) == ([9], [3])


def test_partition_unit_selects_as_before() -> None:
    assert select(PARTITION_UNIT, 4, ["partition-2", "partition-1"]) == (
        [2, 1],
        [5, 6, 7, 8, 1, 2, 3, 4],
    )


GPU_REFUSALS = [
    # (case, size, devices, kind, words in the message)
    (
        "one-of-four",
        4,
        ["partition-1-gpu-1"],
        "refused",
        [
            "1 GPUs is not a whole number of 4-GPU partitions",
            "partition 1 lacks partition-1-gpu-2, partition-1-gpu-3, partition-1-gpu-4",
            "a VM needs 4 hostDevices entries of nvidia.com/gpu-h200-4x",
        ],
    ),
    (
        "spans-two",
        4,
        ["partition-1-gpu-1", "partition-1-gpu-2", "partition-2-gpu-5", "partition-2-gpu-6"],
        "refused",
        [
            "partition 1 lacks partition-1-gpu-3, partition-1-gpu-4; "
            "partition 2 lacks partition-2-gpu-7, partition-2-gpu-8",
            "List all 4 GPUs of each partition instead",
        ],
    ),
    ("twice", 2, ["partition-3-gpu-1", "partition-3-gpu-1"], "refused", ["requested twice"]),
    ("whole-id", 4, ["partition-1"], "unknown", ["counts GPUs", "partition-1-gpu-1, "]),
    ("wrong-size", 2, gpus(1), "unknown", ["not a GPU of a partition of nvidia.com/gpu-h200-2x"]),
    ("no-such-partition", 4, ["partition-99-gpu-1"], "unknown", ["not a GPU of a partition"]),
    ("foreign-module", 4, ["partition-1-gpu-5"], "unknown", ["GPU 5 is not in partition 1"]),
    ("garbage", 4, ["gpu-1"], "unknown", ["does not start with 'partition-'"]),
]


@pytest.mark.parametrize(
    ("size", "devices", "kind", "words"),
    [g[1:] for g in GPU_REFUSALS],
    ids=[g[0] for g in GPU_REFUSALS],
)
def test_gpu_unit_refuses_anything_but_whole_partitions(
    size: int, devices: list[str], kind: str, words: list[str]
) -> None:
    with pytest.raises(UnitError) as raised:
        GPU_UNIT.select(TABLE, size, f"{R}-{size}x", devices)
    assert raised.value.kind is Refusal(kind)
    for word in words:
        assert word in str(raised.value)


def test_partition_unit_refuses_gpu_ids() -> None:
    with pytest.raises(UnitError, match=r"names one GPU, but .* counts whole partitions") as raised:
        PARTITION_UNIT.select(TABLE, 4, f"{R}-4x", ["partition-1-gpu-1"])
    assert raised.value.kind is Refusal.UNKNOWN


# -- GetPreferredAllocation -----------------------------------------------------------------


def all_gpus(size: int) -> list[str]:
    return [d for p in TABLE.of_size(size) for d in GPU_UNIT.device_ids(p)]


def test_preferred_picks_whole_partitions_with_the_partition_policy() -> None:
    book = PartitionBook(TABLE)
    assert GPU_UNIT.preferred(book, all_gpus(4), [], 4, 4) == gpus(1)
    assert GPU_UNIT.preferred(book, all_gpus(4), [], 8, 4) == gpus(1) + gpus(2)
    # The kubelet's order does not matter: module order within a partition.
    assert GPU_UNIT.preferred(book, list(reversed(all_gpus(4))), [], 4, 4) == gpus(1)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_preferred_agrees_with_the_partition_unit_on_every_busy_board(size: int) -> None:
    # Whatever is already taken, both units pick the same partitions.
    for busy in [(), (7,), (3,), (1,), (7, 12), (5,)]:
        book = PartitionBook(TABLE)
        for pid in busy:
            book.claim(pid)
            book.activated(pid)
        free = [p for p in TABLE.of_size(size) if book.available(p.partition_id)]
        for count in range(1, len(free) + 1):
            whole = preferred_allocation(book, [p.device_id for p in free], [], count)
            expected = [d for dev in whole for d in gpus(partition_id_of(dev))]
            available = [d for p in free for d in GPU_UNIT.device_ids(p)]
            assert GPU_UNIT.preferred(book, available, [], count * size, size) == expected


def test_preferred_takes_must_include_partitions_first() -> None:
    book = PartitionBook(TABLE)
    must = [gpus(2)[2]]
    assert GPU_UNIT.preferred(book, all_gpus(4), must, 4, 4) == gpus(2)
    assert GPU_UNIT.preferred(book, all_gpus(4), must, 8, 4) == gpus(2) + gpus(1)


def test_preferred_skips_a_partition_the_kubelet_offers_only_in_part() -> None:
    book = PartitionBook(TABLE)
    available = gpus(1)[1:] + gpus(2)
    assert GPU_UNIT.preferred(book, available, [], 4, 4) == gpus(2)


@pytest.mark.parametrize(
    ("available", "must", "size", "answer"),
    [
        (["bogus", "partition-1", *gpus(2)], [], 4, gpus(2)),
        ([], [], 4, []),
        (all_gpus(4), [], 0, []),
        (all_gpus(4), [], -3, []),
        (all_gpus(4), ["nonsense"], 4, gpus(1)),
        (all_gpus(4), [], 3, gpus(1)[:3]),  # not a whole partition: best effort
        (all_gpus(4), [], 12, gpus(1) + gpus(2)),  # more than there is
        (gpus(1)[:2] + gpus(2)[:1], [], 4, gpus(1)[:2] + gpus(2)[:1]),  # nothing whole
    ],
)
def test_preferred_never_fails(
    available: list[str], must: list[str], size: int, answer: list[str]
) -> None:
    assert GPU_UNIT.preferred(PartitionBook(TABLE), available, must, size, 4) == answer


# -- the controller in gpu mode --------------------------------------------------------------


async def test_controller_grants_addresses_in_the_requested_order(tmp_path: Path) -> None:
    async with running_controller(tmp_path, unit=GPU_UNIT) as (controller, _):
        request = [
            "partition-2-gpu-8",
            "partition-2-gpu-5",
            "partition-2-gpu-6",
            "partition-2-gpu-7",
        ]
        allocation = await controller.wait_allocation(controller.allocate(f"{R}-4x", [request]))
        (grant,) = controller.grants(allocation)
        assert grant.envs[ENV_4X].split(",") == [MODULE_MAP[m] for m in (8, 5, 6, 7)]
        assert [d.container_path for d in grant.devices] == [
            "/dev/vfio/vfio",
            *(f"/dev/vfio/{10 + m}" for m in (8, 5, 6, 7)),
        ]
        assert grant.envs["NVSWITCH_DP_PARTITION_IDS"] == "2"
        assert grant.envs["NVSWITCH_DP_PARTITION_MODULES"] == "5:6:7:8"
        assert grant.annotations["nvswitch-dp.io/partition-ids"] == "2"
        assert controller.machine.held_partitions() == {2}


async def test_controller_refuses_a_partial_partition_and_claims_nothing(tmp_path: Path) -> None:
    async with running_controller(tmp_path, unit=GPU_UNIT) as (controller, _):
        with pytest.raises(AllocationError, match="partition 1 lacks partition-1-gpu-4") as raised:
            controller.allocate(f"{R}-4x", [gpus(1)[:3]])
        assert raised.value.kind is Refusal.REFUSED
        with pytest.raises(AllocationError) as unknown:
            controller.allocate(f"{R}-4x", [["partition-1"]])
        assert unknown.value.kind is Refusal.UNKNOWN
        assert controller.machine.held_partitions() == frozenset()


# -- the daemon in gpu mode ------------------------------------------------------------------

GRACE = 1.0


class Node(LifecycleNode):
    """The daemon with ``allocation_unit: gpu``, its kubelet and its PodResources."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, extra_config="plugin:\n  allocation_unit: gpu\n")
        self.daemon.wait_api()

    def healthy(self, resource: str) -> set[str]:
        return {d for d, h in self.kubelet.devices(resource).items() if h == "Healthy"}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.close()


def test_every_resource_counts_gpus(node: Node) -> None:
    for size in (1, 2, 4, 8):
        devices = node.kubelet.devices(f"{R}-{size}x")
        assert devices == dict.fromkeys(all_gpus(size), "Healthy")
        assert len(devices) == 8  # H200: every size covers the 8 GPUs once
    status, text = node.daemon.get("/metrics")
    assert status == 200
    for size in (1, 2, 4, 8):  # the metric counts kubelet devices: GPUs in this mode
        assert f'hgx_h200_devices_total{{resource="{R}-{size}x",state="healthy"}} 8.0' in text
    topology = node.kubelet.topology(f"{R}-4x")
    assert {tuple(topology[d]) for d in gpus(1)} == {(0,)}
    assert {tuple(topology[d]) for d in gpus(2)} == {(1,)}


def test_a_vm_of_four_entries_gets_one_whole_partition(node: Node) -> None:
    available = sorted(node.healthy(f"{R}-4x"))
    chosen = node.kubelet.preferred_allocation(f"{R}-4x", available, [], 4)
    assert chosen == gpus(1)
    # The kubelet may pass them in any order: the addresses follow it.
    request = [chosen[2], chosen[0], chosen[3], chosen[1]]
    response = node.kubelet.allocate(f"{R}-4x", request)
    container = response.container_responses[0]
    assert container.envs[ENV_4X].split(",") == [MODULE_MAP[m] for m in (3, 1, 4, 2)]
    paths = [d.container_path for d in container.devices]
    assert paths[0] == "/dev/vfio/vfio" and len(set(paths)) == 5
    assert container.envs["NVSWITCH_DP_PARTITION_IDS"] == "1"
    assert container.annotations["nvswitch-dp.io/partition-ids"] == "1"
    assert node.fm_active() == [1]
    # Partitions stay the unit over REST.
    status, body = node.daemon.get("/v1/partitions")
    assert status == 200
    by_id = {p["id"]: p for p in body["partitions"]}
    assert by_id[1]["state"] == "allocated" and by_id[1]["device_id"] == "partition-1"


def test_four_gpus_spanning_two_partitions_are_refused_clearly(node: Node) -> None:
    request = gpus(1)[:2] + gpus(2)[:2]
    with pytest.raises(grpc.RpcError) as raised:
        node.kubelet.allocate(f"{R}-4x", request)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = raised.value.details() or ""
    assert "partition 1 lacks partition-1-gpu-3, partition-1-gpu-4" in details
    assert "partition 2 lacks partition-2-gpu-7, partition-2-gpu-8" in details
    assert "a VM needs 4 hostDevices entries of nvidia.com/gpu-h200-4x" in details
    with pytest.raises(grpc.RpcError) as whole:
        node.kubelet.allocate(f"{R}-4x", ["partition-1"])
    assert whole.value.code() == grpc.StatusCode.NOT_FOUND
    assert node.fm_active() == []


def test_overlapping_partitions_leave_the_pool_gpu_by_gpu(node: Node) -> None:
    node.kubelet.allocate(f"{R}-4x", gpus(1))  # modules 1-4

    def settled() -> bool:
        return node.healthy(f"{R}-8x") == set() and node.healthy(f"{R}-2x") == set(
            gpus(5) + gpus(6)
        )

    node.kubelet.wait_until(settled, timeout=5)
    assert node.healthy(f"{R}-4x") == set(all_gpus(4))  # in use stays Healthy
    assert node.healthy(f"{R}-1x") == {d for pid in range(11, 15) for d in gpus(pid)}
    # The 2x partitions inside the taken block cannot be had.
    with pytest.raises(grpc.RpcError) as raised:
        node.kubelet.allocate(f"{R}-2x", gpus(3))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "partition 1" in (raised.value.details() or "")


def test_a_partition_is_released_once_no_pod_holds_its_gpus(node: Node) -> None:
    node.kubelet.allocate(f"{R}-4x", gpus(2))
    node.pods.assign("vms", "virt-launcher-a", "compute", f"{R}-4x", gpus(2))
    node.kubelet.wait_until(lambda: node.healthy(f"{R}-8x") == set(), 5)
    # Held through several grace periods: GPU IDs map back to partition 2.
    with pytest.raises(TimeoutError):
        node.kubelet.wait_until(lambda: node.fm_active() != [2], timeout=3 * GRACE)
    node.pods.unassign("vms", "virt-launcher-a")
    node.kubelet.wait_until(lambda: node.fm_active() == [], timeout=10)
    node.kubelet.wait_until(lambda: node.healthy(f"{R}-8x") == set(gpus(0)), timeout=5)
