"""The real state of the nodes and of the managed etcd, as cke collected it.

Plain frozen data: the collector (``cke/server/collect.py``) fills it, the pure
decision function reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# A member whose raft applied index is within this many entries of the leader's
# counts as in sync.
IN_SYNC_LAG = 1000


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


@dataclass(frozen=True)
class EtcdStatus:
    reachable: bool = False  # some member answered the membership query
    members: tuple[EtcdMember, ...] = ()
    leader_id: int | None = None

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
class ClusterStatus:
    nodes: Mapping[str, NodeStatus] = field(default_factory=dict)
    etcd: EtcdStatus = field(default_factory=EtcdStatus)
