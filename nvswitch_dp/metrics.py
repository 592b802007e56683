"""Prometheus metrics, with the names the original design promised.

Ownership: one :class:`Metrics` per daemon, each with its own registry (so tests can run
several daemons in one process). Collectors that mirror state (device counts,
partition states) are refreshed from the partition book on each scrape, never on the
hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nvswitch_dp.partitions.state import PartitionView, State

# Allocate is dominated by FM activation: seconds, not milliseconds, on real nodes.
ALLOCATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The daemon's metrics and the registry that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.devices = Gauge(
            "hgx_h200_devices_total",
            "Partitions offered to the kubelet, by resource and kubelet health",
            ["resource", "health"],
            registry=self.registry,
        )
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
            "1 when the last Fabric Manager call reached FM, else 0",
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
        self._refresh: Callable[[], Iterable[tuple[PartitionView, str]]] | None = None

    def observe_partitions(self, source: Callable[[], Iterable[tuple[PartitionView, str]]]) -> None:
        """Read ``(view, resource name)`` pairs from ``source`` at every scrape."""
        self._refresh = source

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
            counts[(resource, "healthy" if view.healthy else "unhealthy")] += 1
            for state in State:
                self.partition_state.labels(
                    partition=str(view.partition.partition_id), resource=resource, state=state.value
                ).set(1 if view.state is state else 0)
        for (resource, health), n in counts.items():
            self.devices.labels(resource=resource, health=health).set(n)
