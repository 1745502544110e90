"""The phases of CKE's decision function (``server/strategy.go``)."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    UPGRADE = "upgrade"
    UPGRADE_ABORTED = "upgrade-aborted"
    RIVERS = "rivers"
    ETCD_BOOT = "etcd-boot"
    ETCD_BOOT_ABORTED = "etcd-boot-aborted"
    ETCD_START = "etcd-start"
    ETCD_WAIT = "etcd-wait"
    K8S_START = "k8s-start"
    ETCD_MAINTAIN = "etcd-maintain"
    # Maintenance is needed but every remaining step is held back by a safety rule.
    ETCD_MAINTAIN_ABORTED = "etcd-maintain-aborted"
    K8S_MAINTAIN = "k8s-maintain"
    STOP_CONTROL_PLANE = "stop-control-plane"
    # Named as upstream's phase.go (``cke_operation_phase{phase=...}``).
    REPAIR = "repair-machines"
    UNCORDON = "uncordon-nodes"
    REBOOT = "reboot-nodes"
    COMPLETED = "completed"
    # Not CKE's: the stored cluster or constraints cannot be used (see status.blocked).
    CONFIG_INVALID = "config-invalid"
    # Not CKE's: the decision raised (a bug); nothing is changed (see status.blocked).
    DECISION_FAILED = "decision-failed"
    # Not CKE's: etcd is rebuilt from a snapshot after a quorum loss (ckecli etcd restore).
    ETCD_RESTORE = "etcd-restore"
    # Not CKE's: there is no cluster configuration yet.
    WAITING_FOR_CLUSTER = "waiting-for-cluster"


ALL_PHASES = tuple(p.value for p in Phase)
