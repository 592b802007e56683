"""A bare grpclib DevicePlugin server on plain asyncio: the baseline for Allocate latency.

It serves the betterproto2 ``DevicePluginBase`` with no Trio, no trio-asyncio and no
partition logic, and answers Allocate with a response of the same shape as our plugin:
``/dev/vfio/vfio`` plus one ``/dev/vfio/<iommu group>`` per GPU, the KubeVirt variable
``PCI_RESOURCE_<RESOURCE>`` with the comma-separated PCI addresses, the partition
variables and annotations. Comparing a kubelet client's latency against this server and
against the daemon shows what our stack adds.

Usage::

    python benchmarks/bare_server.py --socket PATH [--resource NAME]

It prints ``serving`` once the socket accepts connections and stops on SIGTERM or SIGINT:
every ListAndWatch stream ends, the server closes and the socket is removed.

Errors: Allocate of an unknown device ID fails with NOT_FOUND, like the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from grpclib import GRPCError
from grpclib.const import Status
from grpclib.server import Server

# Runnable as a script from a checkout: make the repository's package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nvswitch_dp.proto import v1beta1 as dp

DEFAULT_RESOURCE = "nvidia.com/gpu-h200-4x"
ANNOTATION_PREFIX = "nvswitch-dp.io"
CLOSE_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class FakePartition:
    """A partition of four GPUs: its device ID, module IDs, PCI addresses, IOMMU groups."""

    partition_id: int
    modules: tuple[int, ...]
    pci_addresses: tuple[str, ...]
    iommu_groups: tuple[int, ...]

    @property
    def device_id(self) -> str:
        return f"partition-{self.partition_id}"


def fake_partitions() -> list[FakePartition]:
    """Two 4-GPU partitions of an 8-GPU HGX board (modules 1-4 and 5-8)."""
    buses = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
    partitions = []
    for index, partition_id in enumerate((1, 2)):
        modules = tuple(range(4 * index + 1, 4 * index + 5))
        partitions.append(
            FakePartition(
                partition_id=partition_id,
                modules=modules,
                pci_addresses=tuple(f"0000:{buses[m - 1]:02x}:00.0" for m in modules),
                iommu_groups=tuple(40 + m for m in modules),
            )
        )
    return partitions


def pci_resource_env(resource_name: str) -> str:
    """KubeVirt's variable name: upper-cased, ``/`` and ``.`` become ``_``, hyphens kept."""
    return "PCI_RESOURCE_" + resource_name.upper().replace("/", "_").replace(".", "_")


class BareDevicePlugin(dp.DevicePluginBase):
    """Answers from a fixed partition list; owns nothing but ``stopping``.

    ``stopping`` ends every ListAndWatch stream when set (grpclib's ``Server.close`` does
    not end open streams by itself).
    """

    def __init__(self, resource: str, partitions: Sequence[FakePartition]) -> None:
        self.resource = resource
        self.partitions = {p.device_id: p for p in partitions}
        self.stopping = asyncio.Event()

    async def get_device_plugin_options(self, message: dp.Empty) -> dp.DevicePluginOptions:
        return dp.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=True
        )

    async def list_and_watch(self, message: dp.Empty) -> AsyncIterator[dp.ListAndWatchResponse]:
        yield dp.ListAndWatchResponse(
            devices=[
                dp.Device(
                    id=device_id,
                    health="Healthy",
                    topology=dp.TopologyInfo(nodes=[dp.NumaNode(id=0)]),
                )
                for device_id in self.partitions
            ]
        )
        await self.stopping.wait()

    async def get_preferred_allocation(
        self, message: dp.PreferredAllocationRequest
    ) -> dp.PreferredAllocationResponse:
        responses = []
        for request in message.container_requests:
            chosen = list(request.must_include_deviceIDs)
            chosen += [d for d in request.available_deviceIDs if d not in chosen]
            responses.append(
                dp.ContainerPreferredAllocationResponse(
                    device_i_ds=chosen[: request.allocation_size]
                )
            )
        return dp.PreferredAllocationResponse(container_responses=responses)

    async def allocate(self, message: dp.AllocateRequest) -> dp.AllocateResponse:
        return dp.AllocateResponse(
            container_responses=[
                self._container_response(request.devices_ids)
                for request in message.container_requests
            ]
        )

    def _container_response(self, device_ids: Sequence[str]) -> dp.ContainerAllocateResponse:
        unknown = [d for d in device_ids if d not in self.partitions]
        if unknown:
            raise GRPCError(Status.NOT_FOUND, f"unknown {self.resource} devices {unknown}")
        chosen = [self.partitions[d] for d in device_ids]
        addresses = [a for p in chosen for a in p.pci_addresses]
        groups = [g for p in chosen for g in p.iommu_groups]
        ids = ",".join(str(p.partition_id) for p in chosen)
        paths = ["/dev/vfio/vfio", *(f"/dev/vfio/{g}" for g in groups)]
        devices = [dp.DeviceSpec(container_path=p, host_path=p, permissions="rwm") for p in paths]
        return dp.ContainerAllocateResponse(
            envs={
                pci_resource_env(self.resource): ",".join(addresses),
                "NVSWITCH_DP_PARTITION_IDS": ids,
                "NVSWITCH_DP_PARTITION_MODULES": ",".join(
                    ":".join(str(m) for m in p.modules) for p in chosen
                ),
            },
            annotations={
                f"{ANNOTATION_PREFIX}/partition-ids": ids,
                f"{ANNOTATION_PREFIX}/pci-addresses": ",".join(addresses),
            },
            devices=devices,
        )

    async def pre_start_container(
        self, message: dp.PreStartContainerRequest
    ) -> dp.PreStartContainerResponse:
        return dp.PreStartContainerResponse()


async def serve(socket_path: Path, resource: str) -> None:
    """Serve until SIGTERM/SIGINT, then end the streams, close, and remove the socket."""
    plugin = BareDevicePlugin(resource, fake_partitions())
    server = Server([plugin])
    socket_path.unlink(missing_ok=True)
    await server.start(path=str(socket_path))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("serving", flush=True)
    try:
        await stop.wait()
    finally:
        plugin.stopping.set()
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT_SECONDS)
        socket_path.unlink(missing_ok=True)  # asyncio on 3.11 leaves it behind


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description="bare grpclib DevicePlugin (benchmark baseline)")
    parser.add_argument("--socket", type=Path, required=True, help="unix socket to serve on")
    parser.add_argument("--resource", default=DEFAULT_RESOURCE, help="extended resource name")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.socket, args.resource))
    return 0


if __name__ == "__main__":
    sys.exit(main())
