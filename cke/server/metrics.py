"""cke's Prometheus metrics, named as CKE names them where they exist."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge

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
        for p in ALL_PHASES:
            self.phase.labels(phase=p).set(0)

    def set_phase(self, phase: str) -> None:
        for p in ALL_PHASES:
            self.phase.labels(phase=p).set(1 if p == phase else 0)
        self.phase_timestamp.set(time.time())
