"""The DevicePlugin service for one resource (one partition size).

Handlers run on the asyncio side (grpclib). They read the partition book synchronously
(one thread, so a read is never torn) and hop to Trio only when Fabric Manager must be
called, which keeps the hop off Allocate's path when a partition is already active.

Devices: what one device stands for (a whole partition, or one GPU of it for KubeVirt)
is the layout's :class:`~nvswitch_dp.partitions.units.AllocationUnit`; this module
asks it and never branches on the unit itself.

Errors: Allocate maps :class:`AllocationError` to gRPC status codes (NOT_FOUND for an
unknown device, INVALID_ARGUMENT for a device named twice, FAILED_PRECONDITION when
another partition blocks it, UNAVAILABLE when FM fails) with a message that names the
blocking partition, or under the ``gpu`` unit the GPUs missing from a partial request.
GetPreferredAllocation
never fails: an error there fails the pod's admission, so it answers with its best
effort instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from grpclib import GRPCError
from grpclib.const import Status
from trio_asyncio import trio_as_aio

from nvswitch_dp.metrics import Metrics
from nvswitch_dp.partitions.layout import ContainerGrant
from nvswitch_dp.partitions.offering import kubelet_offer
from nvswitch_dp.partitions.refusal import AllocationError, Refusal
from nvswitch_dp.partitions.view import RequestStatus
from nvswitch_dp.ports import KubeletSide
from nvswitch_dp.proto import v1beta1 as dp

log = logging.getLogger(__name__)

# ListAndWatch streams served at once per resource (see list_and_watch).
MAX_STREAMS = 8
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

_STATUS_BY_KIND = {
    Refusal.UNKNOWN: Status.NOT_FOUND,
    Refusal.INVALID: Status.INVALID_ARGUMENT,
    Refusal.REFUSED: Status.FAILED_PRECONDITION,
    Refusal.FABRIC: Status.UNAVAILABLE,
}


class DevicePluginService(dp.DevicePluginBase):
    """Answers the kubelet for ``resource``; owns nothing, borrows the node's kubelet side."""

    def __init__(self, node: KubeletSide, resource: str, metrics: Metrics) -> None:
        self.node = node
        self.resource = resource
        self.metrics = metrics
        self.size = node.layout.resources[resource]
        self._streams = 0  # ListAndWatch streams open now

    def device_list(self) -> list[dp.Device]:
        layout = self.node.layout
        devices = []
        for partition, offered in kubelet_offer(self.node.view(), self.size):
            numa = layout.topology(partition)
            health = HEALTHY if offered else UNHEALTHY
            # Every device of a partition (one, or one per GPU) shares its health and NUMA.
            for device in layout.unit.device_ids(partition):
                devices.append(
                    dp.Device(
                        id=device,
                        health=health,
                        topology=dp.TopologyInfo(nodes=[dp.NumaNode(id=n) for n in numa])
                        if numa
                        else None,
                    )
                )
        return devices

    async def get_device_plugin_options(self, message: dp.Empty) -> dp.DevicePluginOptions:
        return dp.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=True
        )

    async def list_and_watch(self, message: dp.Empty) -> AsyncIterator[dp.ListAndWatchResponse]:
        """The full list now, then again after every change that alters it.

        At most :data:`MAX_STREAMS` streams per resource at once (the kubelet keeps one;
        a restarted kubelet's new one may overlap the old for a moment): more is
        ``RESOURCE_EXHAUSTED``. A client that does not read holds at most one HTTP/2
        window of unsent updates (grpclib's send waits on flow control), so the streams'
        memory is bounded too.
        """
        if self._streams >= MAX_STREAMS:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"{self._streams} ListAndWatch streams of {self.resource} are open; at most "
                f"{MAX_STREAMS} are served (the kubelet needs one)",
            )
        self._streams += 1
        try:
            feed = self.node.feed
            last: list[tuple[str, str]] | None = None
            while not feed.closed:
                seen = feed.generation
                devices = self.device_list()
                summary = [(d.id, d.health) for d in devices]
                if summary != last:
                    last = summary
                    yield dp.ListAndWatchResponse(devices=devices)
                await feed.wait_beyond(seen)
        finally:
            self._streams -= 1

    async def get_preferred_allocation(
        self, message: dp.PreferredAllocationRequest
    ) -> dp.PreferredAllocationResponse:
        responses = []
        view = self.node.view()
        for request in message.container_requests:
            try:
                chosen = self.node.layout.unit.preferred(
                    view,
                    request.available_deviceIDs,
                    request.must_include_deviceIDs,
                    request.allocation_size,
                    self.size,
                )
            except Exception:  # never fail admission; see module docstring
                log.exception("preferred allocation failed; answering first-fit")
                chosen = list(request.must_include_deviceIDs)
                chosen += [d for d in request.available_deviceIDs if d not in chosen]
                chosen = chosen[: request.allocation_size]
            responses.append(dp.ContainerPreferredAllocationResponse(device_i_ds=chosen))
        return dp.PreferredAllocationResponse(container_responses=responses)

    async def allocate(self, message: dp.AllocateRequest) -> dp.AllocateResponse:
        """All containers' devices at once (the machine undoes a failure itself).

        Cancellation (a client deadline, a closed channel, our shutdown) only stops the
        wait: the FM calls belong to the node's effect runner and finish on their own,
        and what the request took is released by the usual rule once no pod holds it.
        """
        started = time.perf_counter()
        node = self.node
        try:
            allocation = node.allocate(
                self.resource, [list(r.devices_ids) for r in message.container_requests]
            )
            try:
                if allocation.result.status is not RequestStatus.GRANTED:
                    allocation = await trio_as_aio(node.wait_allocation)(allocation)
            finally:
                node.forget(allocation.request_id)
        except AllocationError as exc:
            log.warning("Allocate %s refused: %s", self.resource, exc)
            raise GRPCError(_STATUS_BY_KIND[exc.kind], str(exc)) from None
        responses = [self._container_response(g) for g in node.grants(allocation)]
        self.metrics.allocation_duration.labels(resource=self.resource).observe(
            time.perf_counter() - started
        )
        table = node.view().table
        log.info(
            "allocated %s to a container",
            ", ".join(
                table[pid].device_id for s in allocation.containers for pid in s.partition_ids
            ),
        )
        return dp.AllocateResponse(container_responses=responses)

    @staticmethod
    def _container_response(grant: ContainerGrant) -> dp.ContainerAllocateResponse:
        return dp.ContainerAllocateResponse(
            envs=dict(grant.envs),
            annotations=dict(grant.annotations),
            devices=[
                dp.DeviceSpec(
                    container_path=d.container_path, host_path=d.host_path, permissions="rwm"
                )
                for d in grant.devices
            ],
        )

    async def pre_start_container(
        self, message: dp.PreStartContainerRequest
    ) -> dp.PreStartContainerResponse:
        return dp.PreStartContainerResponse()
