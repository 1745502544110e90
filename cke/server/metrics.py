"""cke's Prometheus metrics, named as CKE names them where they exist."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric

from cke.rebootqueue import count_by_status, dedup
from cke.repairqueue import count_by_status as repair_counts
from cke.server.phases import ALL_PHASES

if TYPE_CHECKING:
    from cke.backup import BackupInfo
    from cke.rebootqueue import RebootEntry
    from cke.repairqueue import RepairEntry


class _AsUpstreamExposes:
    """What ``/metrics`` serves (upstream's rule, ``docs/metrics.md``): every family while
    this replica leads; otherwise ``cke_leader`` and the process and runtime families
    only. A follower's other ``cke_*`` values would be the ones it had when it last led
    (or zeros): an operator scraping every replica would read them as the cluster's.
    A new leader's families come back at once; most are set again by its first
    decision, about a second later (counters and the backup gauges are this process's
    own history, true in any term)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for family in self.metrics.registry.collect():
            if family.name.startswith("cke_sabakan_") and not self.metrics.sabakan_enabled:
                continue  # as upstream: only while the sabakan integration is enabled
            if (
                self.metrics.leading
                or family.name == "cke_leader"
                or not family.name.startswith("cke_")
            ):
                yield family


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            # As upstream's process_* (Go's go_* have Python's python_* as their twin).
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry  # every metric (tests read values here)
        self.leading = False
        self.sabakan_enabled = False  # the leader's last round ran the sabakan integration
        self.exposed = CollectorRegistry(auto_describe=False)  # what /metrics serves
        self.exposed.register(_AsUpstreamExposes(self))
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
        # CKE's reboot queue metrics (docs/metrics.md), set by the leader every round.
        self.reboot_queue_enabled = Gauge(
            "cke_reboot_queue_enabled", "1 if the reboot queue is enabled", registry=self.registry
        )
        self.reboot_queue_entries = Gauge(
            "cke_reboot_queue_entries",
            "The number of reboot queue entries remaining",
            registry=self.registry,
        )
        self.reboot_queue_items = Gauge(
            "cke_reboot_queue_items",
            "The number of reboot queue entries remaining per status",
            ["status"],
            registry=self.registry,
        )
        self.reboot_queue_running = Gauge(
            "cke_reboot_queue_running",
            "1 if the reboot queue is being processed (enabled, with entries)",
            registry=self.registry,
        )
        self.node_reboot_status = Gauge(
            "cke_node_reboot_status",
            "1 for the status of the node's reboot queue entry, 0 for the others",
            ["node", "status"],
            registry=self.registry,
        )
        # CKE's repair queue metrics (docs/metrics.md), set by the leader every round.
        self.repair_queue_enabled = Gauge(
            "cke_repair_queue_enabled", "1 if the repair queue is enabled", registry=self.registry
        )
        self.auto_repair_enabled = Gauge(
            "cke_auto_repair_enabled",
            "1 if sabakan-triggered automatic repair is enabled",
            registry=self.registry,
        )
        self.repair_queue_items = Gauge(
            "cke_repair_queue_items",
            "The number of repair queue entries remaining per status",
            ["status"],
            registry=self.registry,
        )
        self.repair_queue_entries = Gauge(
            "cke_repair_queue_entries",
            "Information about repair queue entries (always 1)",
            ["index", "address", "operation", "status", "step"],
            registry=self.registry,
        )
        self.machine_repair_status = Gauge(
            "cke_machine_repair_status",
            "1 if the machine has a repair queue entry in the status, else 0",
            ["address", "status"],
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
        # The leader's scheduled etcd backups (cke/backup.py; not CKE's).
        self.backup_timestamp = Gauge(
            "cke_etcd_backup_last_success_timestamp_seconds",
            "Unix time when the last good (verified) backup of the managed etcd completed",
            registry=self.registry,
        )
        self.backup_revision = Gauge(
            "cke_etcd_backup_last_revision",
            "etcd revision of the last good backup",
            registry=self.registry,
        )
        self.backup_size = Gauge(
            "cke_etcd_backup_last_size_bytes",
            "Size of the last good backup",
            registry=self.registry,
        )
        self.backup_duration = Gauge(
            "cke_etcd_backup_last_duration_seconds",
            "Time the last good backup took (snapshot and verification)",
            registry=self.registry,
        )
        self.backup_failures = Counter(
            "cke_etcd_backup_failures_total",
            "Scheduled backups (or their copies) that failed",
            registry=self.registry,
        )
        for p in ALL_PHASES:
            self.phase.labels(phase=p).set(0)

    def set_leader(self, leading: bool) -> None:
        self.leading = leading
        self.leader.set(1 if leading else 0)

    def backup_succeeded(self, info: BackupInfo) -> None:
        self.backup_timestamp.set(time.time())
        self.backup_revision.set(info.revision or 0)
        self.backup_size.set(info.size)
        self.backup_duration.set(info.seconds or 0.0)

    def backup_failed(self) -> None:
        self.backup_failures.inc()

    def set_certificate(self, node: str, certificate: str, not_after: float) -> None:
        self.certificate_expiry.labels(node=node, certificate=certificate).set(not_after)

    def set_phase(self, phase: str) -> None:
        for p in ALL_PHASES:
            self.phase.labels(phase=p).set(1 if p == phase else 0)
        self.phase_timestamp.set(time.time())

    def set_reboot_queue(
        self, enabled: bool, entries: Sequence[RebootEntry], node_names: Mapping[str, str]
    ) -> None:
        """The queue's gauges; ``node_names``: every cluster node's name by address."""
        counts = count_by_status(entries)
        self.reboot_queue_enabled.set(1 if enabled else 0)
        self.reboot_queue_entries.set(len(entries))
        self.reboot_queue_running.set(1 if enabled and entries else 0)
        for status, count in counts.items():
            self.reboot_queue_items.labels(status=status).set(count)
        current = {e.node: e.status for e in dedup(entries)}
        self.node_reboot_status.clear()
        for address, name in sorted(node_names.items()):
            for status in counts:
                value = 1 if current.get(address) == status else 0
                self.node_reboot_status.labels(node=name, status=status).set(value)

    def set_repair_queue(
        self, enabled: bool, entries: Sequence[RepairEntry], nodes: Sequence[str]
    ) -> None:
        """The queue's gauges; ``nodes``: every cluster node's address (CKE's
        ``BuildMachineRepairStatus``: those and the entries' machines)."""
        counts = repair_counts(entries)
        self.repair_queue_enabled.set(1 if enabled else 0)
        for status, count in counts.items():
            self.repair_queue_items.labels(status=status).set(count)
        self.repair_queue_entries.clear()
        for e in entries:
            self.repair_queue_entries.labels(
                index=str(e.index),
                address=e.address,
                operation=e.operation,
                status=e.status,
                step=str(e.step),
            ).set(1)
        statuses: dict[str, set[str]] = {a: set() for a in nodes}
        for e in entries:
            statuses.setdefault(e.address, set()).add(e.status)
        self.machine_repair_status.clear()
        for address, present in sorted(statuses.items()):
            for status in counts:
                value = 1 if status in present else 0
                self.machine_repair_status.labels(address=address, status=status).set(value)

    def set_sabakan(self, successful: bool, workers: dict[str, int], unused: int) -> None:
        self.sabakan_enabled = True
        self.sabakan_successful.set(1 if successful else 0)
        self.sabakan_timestamp.set(time.time())
        if successful:
            self.sabakan_workers.clear()
            for role, count in workers.items():
                self.sabakan_workers.labels(role=role).set(count)
            self.sabakan_unused.set(unused)
