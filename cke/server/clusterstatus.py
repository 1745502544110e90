"""The real state of the nodes and of the managed etcd, as cke collected it.

Plain frozen data: the collector (``cke/server/collect.py``) fills it, the pure
decision function reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cke.certinfo import CertInfo
from cke.rebootqueue import QueueStatus
from cke.repairqueue import RepairQueueStatus
from cke.restore import RestoreRequest

# A member whose raft applied index is within this many entries of the leader's
# counts as in sync.
IN_SYNC_LAG = 1000

ALARM_NOSPACE = "NOSPACE"
# Defragment a member whose database is at least this large...
DEFAULT_DEFRAG_MIN_DB_SIZE = 100 * 1024 * 1024
# ... and has less than this fraction of it in use.
DEFAULT_DEFRAG_IN_USE_RATIO = 0.5


@dataclass(frozen=True)
class ServiceStatus:
    """A managed service other than etcd on a node (rivers, etcd-rivers)."""

    running: bool = False
    digest: str | None = None  # of the spec it was started with


@dataclass(frozen=True)
class NodeStatus:
    address: str
    ssh_ok: bool  # an SSH command ran on the node
    host_key_mismatch: bool = False  # the node presented another host key: send nothing
    etcd_running: bool = False
    etcd_digest: str | None = None  # spec digest the running etcd was started with
    etcd_has_data: bool = False  # /var/lib/cke/etcd/member exists
    # The machine's identity: the fingerprint of the SSH host key cke verified.
    identity: str | None = None
    # The peer URL in the node's etcd spec record: which member the data there belongs to.
    etcd_peer_url: str | None = None
    # The leaf certificates found on the node, by name ("server", "peer"); a name is
    # missing when its file is absent or unreadable.
    certs: Mapping[str, CertInfo] = field(default_factory=dict)
    # The key ids of the CAs in each trust bundle on the node ("ca-client", "ca-peer").
    trusted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # rivers and etcd-rivers, by service name (absent: never started by cke).
    services: Mapping[str, ServiceStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class EtcdMember:
    id: int
    name: str  # empty for a member added but not started yet
    address: str  # host of its peer URL: the node address
    learner: bool = False
    healthy: bool = False  # its endpoint answered a status request
    raft_index: int = 0  # raft applied index reported by the member
    leader: bool = False
    peer_urls: tuple[str, ...] = ()
    # The member's backend database (maintenance Status): its size, and the bytes in use
    # (the rest is free pages left by compaction, which only a defragmentation returns).
    db_size: int = 0
    db_size_in_use: int = 0


@dataclass(frozen=True)
class EtcdStatus:
    reachable: bool = False  # some member answered the membership query
    members: tuple[EtcdMember, ...] = ()
    leader_id: int | None = None
    # The alarms raised in the cluster (maintenance alarm list): (member id, alarm name),
    # e.g. (0x1234, "NOSPACE").
    alarms: tuple[tuple[int, str], ...] = ()

    @property
    def nospace(self) -> bool:
        """The NOSPACE alarm is raised: the cluster refuses writes (reads and deletes pass)."""
        return any(alarm == ALARM_NOSPACE for _, alarm in self.alarms)

    def member(self, address: str) -> EtcdMember | None:
        for m in self.members:
            if m.address == address:
                return m
        return None

    @property
    def voters(self) -> list[EtcdMember]:
        return [m for m in self.members if not m.learner]

    @property
    def leader(self) -> EtcdMember | None:
        for m in self.members:
            if m.leader or m.id == self.leader_id:
                return m
        return None

    def in_sync(self, member: EtcdMember) -> bool:
        leader = self.leader
        return (
            member.healthy
            and leader is not None
            and leader.healthy
            and leader.raft_index - member.raft_index <= IN_SYNC_LAG
        )


@dataclass(frozen=True)
class Trust:
    """What the nodes must trust and hold, by CA name (``server``, ``etcd-peer``, ...).

    ``bundles``: the PEM trust bundle of each CA (two CAs while one is rotated);
    ``issuers``: the key id of the issuer every leaf of that CA must come from ("" or
    absent: any). Empty mappings (unit tests, no Vault yet) leave the trust files out of
    the service spec and accept any issuer.
    """

    bundles: Mapping[str, str] = field(default_factory=dict)
    issuers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PKIStatus:
    """The clock and the certificate policy the decision uses (it reads no clock itself)."""

    now: float = 0.0  # Unix time of the collection; 0: unknown, nothing is renewed
    renew_fraction: float = 1 / 3  # renew once this fraction of the lifetime is left
    trust: Trust = field(default_factory=Trust)
    # CA rotations in progress: CA name -> stage (see cke/server/carotation.py).
    rotations: Mapping[str, str] = field(default_factory=dict)
    # When each rotation's current stage began (Unix time), and how long clients outside
    # cke get at the stages that need them (0: no wait).
    rotation_since: Mapping[str, float] = field(default_factory=dict)
    rotation_grace: float = 0.0
    # The key id of the issuer of cke's own etcd client certificate ("" unknown).
    own_client_issuer: str = ""


@dataclass(frozen=True)
class DefragPolicy:
    """When a member's database is fragmented enough to defragment (cke's
    ``--etcd-defrag-min-db-size`` and ``--etcd-defrag-in-use-ratio``): at least
    ``min_db_size`` bytes, of which less than ``in_use_ratio`` is in use. A ratio of 0
    turns routine defragmentation off (NOSPACE recovery still defragments)."""

    min_db_size: int = DEFAULT_DEFRAG_MIN_DB_SIZE
    in_use_ratio: float = DEFAULT_DEFRAG_IN_USE_RATIO

    def fragmented(self, member: EtcdMember) -> bool:
        return (
            member.db_size > 0
            and member.db_size >= self.min_db_size
            and member.db_size_in_use < self.in_use_ratio * member.db_size
        )


@dataclass(frozen=True)
class ClusterStatus:
    nodes: Mapping[str, NodeStatus] = field(default_factory=dict)
    etcd: EtcdStatus = field(default_factory=EtcdStatus)
    pki: PKIStatus = field(default_factory=PKIStatus)
    # The leader's --max-concurrent-updates: how many nodes one rivers operation changes.
    max_concurrent_updates: int = 10
    # The rivers program cke ships to nodes (its zipapp); empty: none, and the decision
    # leaves rivers and etcd-rivers alone.
    rivers_app: bytes = field(default=b"", repr=False)
    # The leader's defragmentation thresholds.
    defrag: DefragPolicy = field(default_factory=DefragPolicy)
    # A restore from a snapshot that ``ckecli etcd restore`` requested, if any, and why
    # the leader cannot use its snapshot ("" when it can).
    restore: RestoreRequest | None = None
    restore_revision: int = 0  # the request's mod revision (it is deleted at that one)
    restore_problem: str = ""
    # The reboot queue (``ckecli reboot-queue``) and the boot checks of its nodes.
    reboots: QueueStatus = field(default_factory=QueueStatus)
    repairs: RepairQueueStatus = field(default_factory=RepairQueueStatus)
