"""The kubelet's PodResources API: which devices pods still hold, and the release watcher.

``watch_pod_resources`` reads ``List`` every period and feeds each reading (or the fact
that it could not be read) to the node state machine, which decides what to release
(rule N5 in ``partitions/node.py``). It is the only way to learn that a pod ended: the
device-plugin API has no Deallocate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import trio

from nvswitch_dp.partitions.naming import FORMER_DEFAULT_PREFIX, is_former_name, may_be_ours
from nvswitch_dp.partitions.table import partition_id_of
from nvswitch_dp.plugin.grpc_trio import call_on
from nvswitch_dp.ports import KubeletSide, PodDevices, PodResourcesClient
from nvswitch_dp.proto import v1 as podresources

log = logging.getLogger(__name__)

LIST_TIMEOUT_S = 5.0


class GrpcPodResourcesClient:
    """``PodResourcesClient`` over the kubelet's socket (grpclib, one channel per call).

    Errors: ``OSError``, ``grpclib.GRPCError`` or ``TimeoutError`` when the kubelet
    cannot answer.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    async def list_assigned(self) -> list[PodDevices]:
        request = podresources.ListPodResourcesRequest()
        response = await call_on(
            self.socket_path,
            lambda channel: podresources.PodResourcesListerStub(channel).list(
                request, timeout=LIST_TIMEOUT_S
            ),
        )
        return [
            PodDevices(
                pod.namespace, pod.name, container.name, dev.resource_name, tuple(dev.device_ids)
            )
            for pod in response.pod_resources
            for container in pod.containers
            for dev in container.devices
        ]


def assigned_partitions(ours: Callable[[str], bool], holdings: Iterable[PodDevices]) -> set[int]:
    """Partition IDs that some container holds in a resource ``ours`` accepts.

    Either device form counts (``partition-3`` and ``partition-3-gpu-5`` both hold
    partition 3), whatever the configured unit: a pod admitted before the unit changed
    still holds its partition, and one GPU ID held is enough to keep it.
    """
    assigned: set[int] = set()
    for holding in holdings:
        if not ours(holding.resource_name):
            continue
        for device in holding.device_ids:
            try:
                assigned.add(partition_id_of(device))
            except ValueError:
                log.warning(
                    "PodResources lists unknown device %s of %s", device, holding.resource_name
                )
    return assigned


async def partitions_held(pods: PodResourcesClient) -> set[int] | None:
    """Partition IDs pods hold, at start: before the resources are known, every resource
    named like ours (``<prefix>-<n>x``) counts, so nothing a pod may use is left out when
    FM is resumed. None, with the cause logged, when PodResources cannot be read."""
    try:
        holdings = await pods.list_assigned()
    except Exception as exc:  # unreadable for whatever reason: we know nothing
        log.warning("PodResources unreadable at start (%s)", exc)
        return None
    return assigned_partitions(may_be_ours, holdings)


def our_resources(resources: Collection[str]) -> Callable[[str], bool]:
    """The watcher's test of a PodResources resource name: one we serve, or the former
    default name (pods admitted before an upgrade renamed the resources keep theirs)."""
    return lambda name: name in resources or is_former_name(name)


def release_check_interval(grace: float) -> float:
    """How often to read PodResources: a few times per grace period, at most every 5 s."""
    return min(max(grace / 3, 0.1), 5.0)


async def watch_pod_resources(
    node: KubeletSide,
    client: PodResourcesClient,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed a PodResources reading to the node every ``interval`` seconds.

    Error handling: a reading that fails (any error, or no answer within
    ``LIST_TIMEOUT_S``) is fed as "unreadable", and the machine releases nothing on it.
    Pods holding devices under the former default name are counted (and said once).
    """
    ours = our_resources(node.layout.resources)
    former_said = False
    unreachable_logged = False
    task_status.started()
    while True:
        assigned: set[int] | None = None
        try:
            with trio.fail_after(LIST_TIMEOUT_S + 1.0):
                holdings = await client.list_assigned()
        except Exception as exc:  # any failure to read: release nothing
            if not unreachable_logged:
                log.warning("PodResources unreadable (%s); releasing nothing", exc)
                unreachable_logged = True
        else:
            unreachable_logged = False
            assigned = assigned_partitions(ours, holdings)
            former = sorted({h.pod for h in holdings if is_former_name(h.resource_name)})
            if former and not former_said:
                former_said = True
                log.warning(
                    "pods %s hold partitions under the former resource names %s-<n>x; "
                    "they keep them until they end (new pods get %s)",
                    ", ".join(former),
                    FORMER_DEFAULT_PREFIX,
                    ", ".join(node.layout.resources),
                )
        node.pod_resources(assigned)
        await trio.sleep(interval)
