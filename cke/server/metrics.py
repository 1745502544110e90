"""cke's Prometheus metrics, named as CKE names them where they exist."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cke.server.phases import ALL_PHASES


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.leader = Gauge(
            "cke_leader", "1 if this server is the leader of CKE", registry=self.registry
        )
        self.phase = Gauge(
            "cke_operation_phase",
            "1 for the phase the leader is in, 0 for the others",
            ["phase"],
            registry=self.registry,
        )
        self.phase_timestamp = Gauge(
            "cke_operation_phase_timestamp_seconds",
            "Unix time of the last phase update",
            registry=self.registry,
        )
        self.progressing = Gauge(
            "cke_progressing", "1 while an operation runs", registry=self.registry
        )
        self.operations = Counter(
            "cke_operations_total",
            "Operations run by this server, by name and outcome",
            ["operation", "outcome"],
            registry=self.registry,
        )
        # CKE's sabakan integration metrics (docs/metrics.md).
        self.sabakan_successful = Gauge(
            "cke_sabakan_integration_successful",
            "1 if the last sabakan integration satisfied the constraints",
            registry=self.registry,
        )
        self.sabakan_timestamp = Gauge(
            "cke_sabakan_integration_timestamp_seconds",
            "Unix time when cke_sabakan_integration_successful was last updated",
            registry=self.registry,
        )
        self.sabakan_workers = Gauge(
            "cke_sabakan_workers",
            "The number of worker nodes for each role",
            ["role"],
            registry=self.registry,
        )
        self.sabakan_unused = Gauge(
            "cke_sabakan_unused_machines",
            "The number of machines sabakan lists that the cluster does not use",
            registry=self.registry,
        )
        self.certificate_expiry = Gauge(
            "cke_certificate_expiry_timestamp_seconds",
            'Unix time when each certificate cke manages expires (node "": cke\'s own)',
            ["node", "certificate"],
            registry=self.registry,
        )
        self.status_collection = Histogram(
            "cke_status_collection_seconds",
            "Time the leader took to collect the status of every node (SSH) and of etcd",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 15, 30, 60),
            registry=self.registry,
        )
        for p in ALL_PHASES:
            self.phase.labels(phase=p).set(0)

    def set_certificate(self, node: str, certificate: str, not_after: float) -> None:
        self.certificate_expiry.labels(node=node, certificate=certificate).set(not_after)

    def set_phase(self, phase: str) -> None:
        for p in ALL_PHASES:
            self.phase.labels(phase=p).set(1 if p == phase else 0)
        self.phase_timestamp.set(time.time())

    def set_sabakan(self, successful: bool, workers: dict[str, int], unused: int) -> None:
        self.sabakan_successful.set(1 if successful else 0)
        self.sabakan_timestamp.set(time.time())
        if successful:
            self.sabakan_workers.clear()
            for role, count in workers.items():
                self.sabakan_workers.labels(role=role).set(count)
            self.sabakan_unused.set(unused)
