"""The safety rules of etcd maintenance, one small pure predicate per rule.

Each predicate returns ``None`` when the step is fine, or a :class:`Blocked` that
names the rule (a stable string shown by ``ckecli status``), says what was held
back and what to do, and lists the nodes involved.  The decision function
(``cke/server/strategy.py``) asks them before every step; ``ckecli cluster set``
asks :func:`check_control_plane_change` before storing a cluster.

Rule names:

==============================  =====================================================
``host-key-verified``           a node that presented another host key gets nothing
``one-entry-per-machine``       two entries that reach one machine get nothing
``all-control-planes-reachable`` (1) no bootstrap / membership change with a desired
                                control plane unreachable
``cluster-healthy-and-in-sync`` (2) membership changes need a leader and every other
                                member in sync
``keep-quorum``                 (3) never leave fewer healthy voters than a quorum
``destroy-only-non-members``    (4) wipe data only of nodes that left the membership
``keep-etcd-majority``          (5) the new control planes keep a majority of the voters
``learner-caught-up``           (6) promote a learner only once it is in sync
``leader-moved-first``          (7) move leadership away before stopping the leader
``replacement-added-first``     (8) a healthy member leaves only once every desired
                                control plane is a voter
==============================  =====================================================
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from cke.cluster import Cluster
from cke.server.clusterstatus import ClusterStatus, EtcdMember, EtcdStatus

__all__ = [
    "RULE_ALL_CONTROL_PLANES_REACHABLE",
    "RULE_CLUSTER_HEALTHY_AND_IN_SYNC",
    "RULE_DESTROY_ONLY_NON_MEMBERS",
    "RULE_HOST_KEY_VERIFIED",
    "RULE_KEEP_ETCD_MAJORITY",
    "RULE_KEEP_QUORUM",
    "RULE_LEADER_MOVED_FIRST",
    "RULE_LEARNER_CAUGHT_UP",
    "RULE_ONE_ENTRY_PER_MACHINE",
    "RULE_REPLACEMENT_ADDED_FIRST",
    "Blocked",
    "all_control_planes_reachable",
    "check_control_plane_change",
    "cluster_healthy_and_in_sync",
    "destroy_only_non_members",
    "host_key_verified",
    "keep_etcd_majority",
    "keep_quorum",
    "leader_moved_first",
    "leader_transfer_target",
    "learner_caught_up",
    "one_entry_per_machine",
    "quorum",
    "replacement_added_first",
    "same_machine_addresses",
]

RULE_HOST_KEY_VERIFIED = "host-key-verified"
RULE_ONE_ENTRY_PER_MACHINE = "one-entry-per-machine"
RULE_ALL_CONTROL_PLANES_REACHABLE = "all-control-planes-reachable"
RULE_CLUSTER_HEALTHY_AND_IN_SYNC = "cluster-healthy-and-in-sync"
RULE_KEEP_QUORUM = "keep-quorum"
RULE_DESTROY_ONLY_NON_MEMBERS = "destroy-only-non-members"
RULE_KEEP_ETCD_MAJORITY = "keep-etcd-majority"
RULE_LEARNER_CAUGHT_UP = "learner-caught-up"
RULE_LEADER_MOVED_FIRST = "leader-moved-first"
RULE_REPLACEMENT_ADDED_FIRST = "replacement-added-first"
RULE_RIVERS_UPDATED_FIRST = "rivers-updated-first"


@dataclass(frozen=True)
class Blocked:
    """A step the decision held back, and why (shown by ``ckecli status``)."""

    rule: str
    message: str
    nodes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "message": self.message, "nodes": list(self.nodes)}


def quorum(voters: int) -> int:
    """The number of voters etcd needs to commit anything: a strict majority."""
    return voters // 2 + 1


def _names(addresses: Iterable[str]) -> str:
    return ", ".join(addresses)


def _is_leader(etcd: EtcdStatus, member: EtcdMember) -> bool:
    leader = etcd.leader
    return leader is not None and leader.id == member.id


# ---------------------------------------------------------------------------
# host-key-verified: a node whose host key does not match is possibly another
# machine; sending it certificates or commands could hand secrets to an impostor.
# ---------------------------------------------------------------------------


def host_key_verified(status: ClusterStatus, addresses: Iterable[str]) -> Blocked | None:
    """Refuse when any of ``addresses`` presented a host key other than the configured one."""
    bad = sorted(
        {a for a in addresses if (ns := status.nodes.get(a)) is not None and ns.host_key_mismatch}
    )
    if not bad:
        return None
    return Blocked(
        RULE_HOST_KEY_VERIFIED,
        f"node(s) {_names(bad)} presented an unexpected SSH host key; cke sends them nothing. "
        "Verify the machine; then fix host_key in the cluster configuration, or delete "
        "the key pinned at first contact (hostkeys/<address> under cke's prefix).",
        tuple(bad),
    )


# ---------------------------------------------------------------------------
# one-entry-per-machine: two cluster entries whose addresses reach one machine (a
# second NIC, a forwarded port) would be managed as two nodes: etcd data that one
# entry owns looks stale through the other, and gets wiped.  A machine is known by
# the host key cke verified; entries that share it get nothing until the
# configuration is fixed.
# ---------------------------------------------------------------------------


def same_machine_addresses(status: ClusterStatus) -> frozenset[str]:
    """The addresses whose verified host key another address of the status also has."""
    by_identity: dict[str, list[str]] = {}
    for ns in status.nodes.values():
        if ns.identity is not None and ns.ssh_ok:
            by_identity.setdefault(ns.identity, []).append(ns.address)
    return frozenset(a for group in by_identity.values() if len(group) > 1 for a in group)


def one_entry_per_machine(status: ClusterStatus, addresses: Iterable[str]) -> Blocked | None:
    """Refuse when any of ``addresses`` reaches the same machine as another node entry."""
    shared = same_machine_addresses(status)
    involved = {a for a in addresses if a in shared}
    if not involved:
        return None
    groups: dict[str, list[str]] = {}
    for address in sorted(shared):
        identity = status.nodes[address].identity
        assert identity is not None
        groups.setdefault(identity, []).append(address)
    named = [g for g in groups.values() if involved & set(g)]
    nodes = tuple(sorted({a for g in named for a in g}))
    listing = "; ".join(_names(g) for g in named)
    return Blocked(
        RULE_ONE_ENTRY_PER_MACHINE,
        f"node entries {listing} reach one machine (the same SSH host key); cke sends "
        "them nothing and changes no etcd membership. Keep one entry per machine in "
        "the cluster configuration.",
        nodes,
    )


# ---------------------------------------------------------------------------
# Rule 1.  Bootstrapping or changing the membership while a future member cannot
# be reached could leave a cluster whose quorum needs a node we cannot manage.
# Nodes the new configuration drops are not checked: a dead one may be removed.
# ---------------------------------------------------------------------------


def all_control_planes_reachable(cluster: Cluster, status: ClusterStatus) -> Blocked | None:
    """Refuse when a control plane of the desired cluster did not answer over SSH.

    A node missing from the status counts as unreachable.  Nodes with a host-key
    mismatch are left to :func:`host_key_verified`, which says more precisely why.
    """
    down: list[str] = []
    for node in cluster.control_planes:
        ns = status.nodes.get(node.address)
        if ns is None or (not ns.ssh_ok and not ns.host_key_mismatch):
            down.append(node.address)
    down.sort()
    if not down:
        return None
    return Blocked(
        RULE_ALL_CONTROL_PLANES_REACHABLE,
        f"control plane(s) {_names(down)} are unreachable over SSH; etcd bootstrap and "
        "membership changes wait until every control plane answers. Bring the node back, "
        "or replace it in the cluster configuration.",
        tuple(down),
    )


# ---------------------------------------------------------------------------
# Rule 2.  A membership change is a raft configuration change: with a lagging
# member or no leader it could stall the cluster.  The member a step removes or
# promotes is excluded (a dead member must be removable; a learner is checked by
# rule 6).
# ---------------------------------------------------------------------------


def cluster_healthy_and_in_sync(
    status: ClusterStatus, excluding: Collection[int] = ()
) -> Blocked | None:
    """Refuse unless etcd has a healthy leader and every member (but ``excluding`` ids) is
    in sync with it."""
    etcd = status.etcd
    leader = etcd.leader
    if not etcd.reachable or leader is None or not leader.healthy:
        return Blocked(
            RULE_CLUSTER_HEALTHY_AND_IN_SYNC,
            "etcd has no healthy leader; membership changes wait until it recovers.",
            (),
        )
    lagging = sorted(
        m.address for m in etcd.members if m.id not in excluding and not etcd.in_sync(m)
    )
    if not lagging:
        return None
    return Blocked(
        RULE_CLUSTER_HEALTHY_AND_IN_SYNC,
        f"etcd member(s) {_names(lagging)} are unhealthy or not in sync with the leader; "
        "membership changes and restarts wait until every member has caught up.",
        tuple(lagging),
    )


# ---------------------------------------------------------------------------
# Rule 3.  Removing, restarting or stopping a voter must leave enough healthy
# voters for a quorum of the resulting cluster, or etcd stops accepting writes.
# Learners never count.
# ---------------------------------------------------------------------------


def keep_quorum(status: ClusterStatus, member: EtcdMember, *, removing: bool) -> Blocked | None:
    """Refuse when taking ``member`` away (``removing``: out of the membership; otherwise
    stopped for a while) leaves fewer healthy voters than a quorum of the result.

    A learner is never refused: it counts in no quorum, so taking it away changes none.
    """
    if member.learner:
        return None
    voters = status.etcd.voters
    others = [v for v in voters if v.id != member.id]
    resulting = len(others) if removing else len(voters)
    healthy = sum(1 for v in others if v.healthy)
    need = quorum(resulting)
    if healthy >= need:
        return None
    what = "removing" if removing else "stopping"
    return Blocked(
        RULE_KEEP_QUORUM,
        f"{what} etcd member {member.address} would leave {healthy} healthy voter(s) of "
        f"{resulting}, fewer than the quorum of {need}. Bring the unhealthy members back first.",
        (member.address,),
    )


# ---------------------------------------------------------------------------
# Rule 4.  Wiping the data of a member destroys a replica the quorum may count on;
# when etcd does not answer, membership is unknown, so nothing is wiped.
# ---------------------------------------------------------------------------


def destroy_only_non_members(status: ClusterStatus, address: str) -> Blocked | None:
    """Refuse to wipe the etcd data of ``address`` unless it is known not to be a member.

    The data belongs to the member its spec record names (the peer URL etcd was started
    with there): if that is a current member's, the node is that member's machine under
    another address, and the data is a live replica.
    """
    if not status.etcd.reachable:
        return Blocked(
            RULE_DESTROY_ONLY_NON_MEMBERS,
            f"etcd membership is unknown (etcd does not answer); the data on {address} is kept.",
            (address,),
        )
    if status.etcd.member(address) is not None:
        return Blocked(
            RULE_DESTROY_ONLY_NON_MEMBERS,
            f"{address} is still an etcd member; its data is wiped only after it is removed.",
            (address,),
        )
    ns = status.nodes.get(address)
    owner = member_of_peer_url(status.etcd, ns.etcd_peer_url if ns else None)
    if owner is not None:
        return Blocked(
            RULE_DESTROY_ONLY_NON_MEMBERS,
            f"the etcd data on {address} was started as member {owner.address}, which is "
            f"still a member ({owner.id:x}); the data is kept. Is {address} the same machine "
            f"as {owner.address}?",
            tuple(sorted({address, owner.address})),
        )
    return None


def member_of_peer_url(etcd: EtcdStatus, peer_url: str | None) -> EtcdMember | None:
    """The current member whose peer URL is ``peer_url`` (None for none or unknown)."""
    if not peer_url:
        return None
    for m in etcd.members:
        if peer_url in m.peer_urls:
            return m
    return None


# ---------------------------------------------------------------------------
# Rule 5.  A new configuration whose control planes keep less than a majority of
# the current voters can only be reached by passing through a cluster without
# quorum (or by throwing the data away).  Pure, for ``ckecli cluster set``.
# ---------------------------------------------------------------------------


def check_control_plane_change(
    current_member_addresses: Collection[str], new_cluster: Cluster
) -> Blocked | None:
    """Refuse ``new_cluster`` when its control planes keep fewer than a majority
    (``n // 2 + 1``) of the current voting etcd members' addresses.

    ``current_member_addresses``: addresses of the current *voting* members; empty
    when etcd is not bootstrapped yet, and then any cluster is allowed.
    """
    current = sorted(set(current_member_addresses))
    if not current:
        return None
    kept = sorted({n.address for n in new_cluster.control_planes} & set(current))
    need = quorum(len(current))
    if len(kept) >= need:
        return None
    dropped = tuple(a for a in current if a not in kept)
    return Blocked(
        RULE_KEEP_ETCD_MAJORITY,
        f"the new control planes keep {len(kept)} of the {len(current)} current etcd members "
        f"(dropping {_names(dropped)}); a majority ({need}) must stay, or the cluster loses "
        "quorum and its data. Replace one control plane at a time.",
        dropped,
    )


def keep_etcd_majority(status: ClusterStatus, cluster: Cluster) -> Blocked | None:
    """Rule 5 inside the decision: the stored cluster against the current voters."""
    return check_control_plane_change([v.address for v in status.etcd.voters], cluster)


# ---------------------------------------------------------------------------
# Rule 6.  A learner that has not caught up would, as a voter, count in the quorum
# without holding the data: promote only in-sync learners.
# ---------------------------------------------------------------------------


def learner_caught_up(status: ClusterStatus, member: EtcdMember) -> Blocked | None:
    """Refuse to promote ``member`` unless it is a learner in sync with the leader."""
    if member.learner and status.etcd.in_sync(member):
        return None
    if not member.learner:
        return Blocked(
            RULE_LEARNER_CAUGHT_UP,
            f"etcd member {member.address} is not a learner; there is nothing to promote.",
            (member.address,),
        )
    return Blocked(
        RULE_LEARNER_CAUGHT_UP,
        f"etcd learner {member.address} has not caught up with the leader yet; it is promoted "
        "once in sync (check its etcd if this lasts).",
        (member.address,),
    )


# ---------------------------------------------------------------------------
# Rule 7.  Stopping the leader forces an election (writes fail until it ends);
# moving leadership to an in-sync voter first keeps the cluster writable.
# ---------------------------------------------------------------------------


def leader_transfer_target(status: ClusterStatus, member: EtcdMember) -> EtcdMember | None:
    """An in-sync voter other than ``member`` to hand leadership to (lowest address)."""
    etcd = status.etcd
    candidates = sorted(
        (v for v in etcd.voters if v.id != member.id and etcd.in_sync(v)),
        key=lambda v: (v.address, v.id),
    )
    return candidates[0] if candidates else None


def leader_moved_first(status: ClusterStatus, member: EtcdMember) -> Blocked | None:
    """Refuse to stop, restart or remove the leader when no in-sync voter can take over."""
    if not _is_leader(status.etcd, member):
        return None
    if leader_transfer_target(status, member) is not None:
        return None
    return Blocked(
        RULE_LEADER_MOVED_FIRST,
        f"etcd member {member.address} is the leader and no other voter is in sync to take "
        "over leadership; it is left alone until one is.",
        (member.address,),
    )


# ---------------------------------------------------------------------------
# Rule 8.  Replacing a healthy member by removing it first leaves one voter fewer
# for the whole replacement (a 3-member cluster then survives no further failure
# until the newcomer is promoted).  Add and promote the replacement first.
# ---------------------------------------------------------------------------


def replacement_added_first(
    status: ClusterStatus, cluster: Cluster, member: EtcdMember
) -> Blocked | None:
    """Refuse to remove the healthy voter ``member`` while a desired control plane is
    not a voter yet: its replacement joins (as a learner, then promoted) first."""
    voters = {v.address for v in status.etcd.voters}
    waiting = sorted(n.address for n in cluster.control_planes if n.address not in voters)
    if not waiting:
        return None
    return Blocked(
        RULE_REPLACEMENT_ADDED_FIRST,
        f"etcd member {member.address} leaves once control plane(s) {_names(waiting)} "
        "joined as voters, so that the cluster never has fewer voters than it should.",
        (member.address, *waiting),
    )


# ---------------------------------------------------------------------------
# rivers-updated-first: the proxies on the nodes forward to the members in their
# upstream lists; a member removed while a proxy still lists it turns part of that
# node's traffic into errors.  A healthy member leaves only once no running proxy on
# a reachable node has an outdated list (the desired lists no longer name it).
# ---------------------------------------------------------------------------


def rivers_updated_first(member: EtcdMember, outdated: Iterable[str]) -> Blocked | None:
    """Refuse to remove ``member`` while the nodes ``outdated`` run rivers or
    etcd-rivers with an upstream list older than the desired one."""
    stale = sorted(set(outdated))
    if not stale:
        return None
    return Blocked(
        RULE_RIVERS_UPDATED_FIRST,
        f"etcd member {member.address} leaves once the rivers on {_names(stale[:10])}"
        + (f" and {len(stale) - 10} more" if len(stale) > 10 else "")
        + " no longer forward to it.",
        (member.address, *[a for a in stale[:10] if a != member.address]),
    )
