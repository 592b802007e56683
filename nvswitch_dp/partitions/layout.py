"""The node's fixed facts and what a container receives for its partitions: pure values.

:class:`NodeLayout` is learned once at start (GPUs found in sysfs, the resources served,
the FM backend, the allocation unit) and never changes; :func:`container_grant` turns a
selection of partitions into the devices, environment and annotations the kubelet (or,
in DRA mode, CDI) hands to a container. Both modes and the REST API read these values;
nothing here does I/O or imports the controller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvswitch_dp.partitions.table import Partition
from nvswitch_dp.partitions.units import AllocationUnit, Selection
from nvswitch_dp.partitions.view import RequestResult

ANNOTATION_PREFIX = "nvswitch-dp.io"


@dataclass(frozen=True, slots=True)
class GpuSlot:
    """What the plugin hands out for one GPU: where it sits on PCI and in VFIO."""

    module_id: int
    pci_address: str
    iommu_group: int
    numa_node: int | None


@dataclass(frozen=True, slots=True)
class NodeLayout:
    """The node's fixed facts, learned at start: GPUs, resources, FM backend, unit."""

    gpus: Mapping[int, GpuSlot]
    resources: Mapping[str, int]  # resource name -> partition size
    resource_prefix: str
    fabric_name: str
    unit: AllocationUnit
    gpu_model: str | None = None  # the marketing name of the node's GPUs, when found

    def resource_name(self, size: int) -> str:
        return f"{self.resource_prefix}-{size}x"

    def resource_of(self, partition: Partition) -> str:
        return self.resource_name(partition.size)

    def topology(self, partition: Partition) -> tuple[int, ...]:
        """NUMA nodes of the partition's GPUs (empty when sysfs does not know)."""
        nodes = {
            self.gpus[m].numa_node
            for m in partition.module_ids
            if m in self.gpus and self.gpus[m].numa_node is not None
        }
        return tuple(sorted(n for n in nodes if n is not None))


@dataclass(frozen=True, slots=True)
class DeviceNode:
    container_path: str
    host_path: str


@dataclass(frozen=True, slots=True)
class ContainerGrant:
    """What a container receives for its partitions (mapped to the gRPC answer at the edge)."""

    devices: tuple[DeviceNode, ...]
    envs: Mapping[str, str]
    annotations: Mapping[str, str]


def pci_resource_env(resource_name: str) -> str:
    """KubeVirt's variable for a resource's PCI addresses (hyphens kept)."""
    return "PCI_RESOURCE_" + resource_name.upper().replace("/", "_").replace(".", "_")


def container_grant(
    layout: NodeLayout,
    dev_root: Path,
    resource: str,
    partitions: Sequence[Partition],
    module_order: Sequence[int] = (),
) -> ContainerGrant:
    """Devices, environment and annotations for one container's partitions (pure).

    ``module_order``: the GPUs in the order their PCI addresses go out (the request's
    order under the ``gpu`` unit); empty: each partition's modules in turn.
    """
    modules = tuple(module_order) or tuple(m for p in partitions for m in p.sorted_modules)
    addresses: list[str] = []
    groups: list[int] = []
    for module in modules:
        slot = layout.gpus[module]
        addresses.append(slot.pci_address)
        if slot.iommu_group not in groups:
            groups.append(slot.iommu_group)
    vfio = dev_root / "vfio"
    devices = [DeviceNode("/dev/vfio/vfio", str(vfio / "vfio"))]
    devices += [DeviceNode(f"/dev/vfio/{g}", str(vfio / str(g))) for g in groups]
    ids = ",".join(str(p.partition_id) for p in partitions)
    module_text = ",".join(":".join(str(m) for m in p.sorted_modules) for p in partitions)
    envs = {
        pci_resource_env(resource): ",".join(addresses),
        "NVSWITCH_DP_PARTITION_IDS": ids,
        "NVSWITCH_DP_PARTITION_MODULES": module_text,
    }
    annotations = {
        f"{ANNOTATION_PREFIX}/partition-ids": ids,
        f"{ANNOTATION_PREFIX}/pci-addresses": ",".join(addresses),
    }
    return ContainerGrant(tuple(devices), envs, annotations)


@dataclass(frozen=True, slots=True)
class Allocation:
    """An Allocate the machine accepted: its request and each container's selection."""

    request_id: int
    resource: str
    containers: tuple[Selection, ...]
    result: RequestResult
