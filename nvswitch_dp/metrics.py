"""Prometheus metrics, with the names the original design promised.

Ownership: one :class:`Metrics` per daemon, each with its own registry (so tests can run
several daemons in one process). Collectors that mirror state (device counts,
partition states, FM reachability) are refreshed from their sources on each scrape, never
on the hot path.

``hgx_h200_devices_total`` keeps the name the original design promised ("Total number of
H200 devices by state"), labelled ``{resource, state}`` with ``state`` the kubelet's
device health (``healthy``/``unhealthy``; the finer partition states are
``hgx_h200_partition_state``). It is a count of devices now, not a counter, and
``promtool check metrics`` rejects ``_total`` on gauges ("non-counter metrics should not
have _total suffix"); its lint exempts *untyped* families, so the family is exposed as
``untyped`` (Prometheus stores untyped samples exactly like gauges). Every other family
follows the naming rules as is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric, UnknownMetricFamily
from prometheus_client.registry import Collector

from nvswitch_dp.partitions.state import PartitionView, State
from nvswitch_dp.partitions.table import Partition

# Allocate is dominated by FM activation: seconds, not milliseconds, on real nodes.
ALLOCATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The daemon's metrics and the registry that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._device_counts: dict[tuple[str, str], int] = {}
        self.registry.register(_DeviceCounts(self))
        self.partition_operations = Counter(
            "hgx_h200_partition_operations",
            "Fabric Manager partition operations, by operation and result (FM return name)",
            ["operation", "result"],
            registry=self.registry,
        )
        self.allocation_duration = Histogram(
            "hgx_h200_allocation_duration_seconds",
            "Time to answer a kubelet Allocate, activation included",
            ["resource"],
            buckets=ALLOCATION_BUCKETS,
            registry=self.registry,
        )
        self.fabric_manager_up = Gauge(
            "hgx_h200_fabric_manager_up",
            "1 when Fabric Manager was reachable at its last call, else 0",
            registry=self.registry,
        )
        self.resource_registered = Gauge(
            "hgx_h200_resource_registered",
            "1 when the resource is registered with the kubelet, else 0",
            ["resource"],
            registry=self.registry,
        )
        self.partition_state = Gauge(
            "hgx_h200_partition_state",
            "1 for the state each partition is in (one series per partition and state)",
            ["partition", "resource", "state"],
            registry=self.registry,
        )
        self.api_connections = Gauge(
            "hgx_h200_api_connections",
            "REST connections open now",
            registry=self.registry,
        )
        self.api_connections_refused = Counter(
            "hgx_h200_api_connections_refused",
            "REST connections refused: reason=limit (api.max_connections, or what the "
            "descriptor limit leaves) or descriptors (accept failed with EMFILE/ENFILE)",
            ["reason"],
            registry=self.registry,
        )
        self.fabric_overlap_reports = Counter(
            "hgx_h200_fabric_overlap_reports",
            "Changes to the set of overlapping partitions Fabric Manager reports active "
            "(FM itself forbids this; each new set is logged once)",
            registry=self.registry,
        )
        self.fabric_list_failures = Counter(
            "hgx_h200_fabric_list_failures",
            "Fabric Manager partition lists that failed (any cause)",
            registry=self.registry,
        )
        self._refresh: Callable[[], Iterable[tuple[PartitionView, str]]] | None = None
        self.devices_per: Callable[[Partition], int] = lambda partition: 1

    def count_devices_with(self, devices_per: Callable[[Partition], int]) -> None:
        """How many kubelet devices one partition is (default one)."""
        self.devices_per = devices_per

    def observe_partitions(self, source: Callable[[], Iterable[tuple[PartitionView, str]]]) -> None:
        """Read ``(view, resource name)`` pairs from ``source`` at every scrape."""
        self._refresh = source

    def observe_fabric(self, source: Callable[[], bool]) -> None:
        """Read FM reachability from ``source`` whenever the gauge is collected."""
        self.fabric_manager_up.set_function(lambda: 1.0 if source() else 0.0)

    def count_operation(self, operation: str, result: str) -> None:
        self.partition_operations.labels(operation=operation, result=result).inc()

    def exposition(self) -> bytes:
        """The text exposition, refreshed from the partition book first."""
        if self._refresh is not None:
            self._refresh_partitions(list(self._refresh()))
        return generate_latest(self.registry)

    def _refresh_partitions(self, views: list[tuple[PartitionView, str]]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for view, resource in views:
            for health in ("healthy", "unhealthy"):
                counts.setdefault((resource, health), 0)
            # One partition is one kubelet device, or one per GPU (allocation_unit: gpu).
            counts[(resource, "healthy" if view.healthy else "unhealthy")] += self.devices_per(
                view.partition
            )
            for state in State:
                self.partition_state.labels(
                    partition=str(view.partition.partition_id), resource=resource, state=state.value
                ).set(1 if view.state is state else 0)
        self._device_counts = counts

    def device_counts(self) -> dict[tuple[str, str], int]:
        """``(resource, state) -> devices`` as of the last scrape."""
        return dict(self._device_counts)


class _DeviceCounts(Collector):
    """``hgx_h200_devices_total{resource,state}``, untyped (see the module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for (resource, state), n in sorted(self.metrics.device_counts().items()):
            family.add_metric([resource, state], n)
        yield family

    def _family(self) -> UnknownMetricFamily:
        return UnknownMetricFamily(
            "hgx_h200_devices_total",
            "Total number of H200 devices (kubelet devices: partitions) by resource and state "
            "(healthy or unhealthy, as ListAndWatch reports them)",
            labels=["resource", "state"],
        )
