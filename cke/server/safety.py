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
``defrag-when-in-sync``         (9) defragment a member only with a healthy leader and
                                every member in sync
``etcd-nospace``                not a refusal but a report: the NOSPACE alarm is
                                raised and cke is recovering from it
``etcd-quorum-lost``            (10) too few control planes keep etcd data for a quorum:
                                nothing is done until ``ckecli etcd restore``
``restore-snapshot-usable``     (11) restore only from the snapshot ckecli checked, with
                                every control plane reachable
``restore-only-after-quorum-loss`` (12) a restore request is ignored while etcd can
                                still form a quorum
``reboot-commands-configured``  (13) reboot only with reboot_command and
                                boot_check_command set
``reboot-unreachable-within-limit`` (13) no reboot starts with more nodes unreachable
                                than ``maximum-unreachable-nodes-for-reboot``
``reboot-control-plane-in-sync`` (13) a control plane reboots only with a healthy
                                leader and every member in sync
``reboot-one-control-plane-at-a-time`` (13) a control plane reboots alone
``etcd-good-for-repair``        (14) the repair queue is worked only with a healthy etcd
                                whose out-of-sync members are all on unreachable
                                control planes, and at most one control plane short
``repair-entry-usable``         (14) a repair entry whose machine is not a node of the
                                cluster, or that no repair procedure matches, waits
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
    "RULE_DEFRAG_WHEN_IN_SYNC",
    "RULE_DESTROY_ONLY_NON_MEMBERS",
    "RULE_ETCD_GOOD_FOR_REPAIR",
    "RULE_ETCD_NOSPACE",
    "RULE_ETCD_QUORUM_LOST",
    "RULE_HOST_KEY_VERIFIED",
    "RULE_KEEP_ETCD_MAJORITY",
    "RULE_KEEP_QUORUM",
    "RULE_LEADER_MOVED_FIRST",
    "RULE_LEARNER_CAUGHT_UP",
    "RULE_ONE_ENTRY_PER_MACHINE",
    "RULE_REBOOT_COMMANDS_CONFIGURED",
    "RULE_REBOOT_CONTROL_PLANE_IN_SYNC",
    "RULE_REBOOT_ONE_CONTROL_PLANE_AT_A_TIME",
    "RULE_REBOOT_UNREACHABLE_WITHIN_LIMIT",
    "RULE_REPAIR_ENTRY_USABLE",
    "RULE_REPLACEMENT_ADDED_FIRST",
    "RULE_RESTORE_ONLY_AFTER_QUORUM_LOSS",
    "RULE_RESTORE_SNAPSHOT_USABLE",
    "Blocked",
    "all_control_planes_reachable",
    "check_control_plane_change",
    "cluster_healthy_and_in_sync",
    "defrag_when_in_sync",
    "destroy_only_non_members",
    "etcd_good_for_repair",
    "etcd_nospace",
    "etcd_quorum_lost",
    "host_key_verified",
    "keep_etcd_majority",
    "keep_quorum",
    "leader_moved_first",
    "leader_transfer_target",
    "learner_caught_up",
    "one_entry_per_machine",
    "quorum",
    "reboot_commands_configured",
    "reboot_control_plane_in_sync",
    "reboot_one_control_plane_at_a_time",
    "reboot_unreachable_within_limit",
    "repair_entry_usable",
    "replacement_added_first",
    "restore_only_after_quorum_loss",
    "restore_snapshot_usable",
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
RULE_DEFRAG_WHEN_IN_SYNC = "defrag-when-in-sync"
RULE_ETCD_NOSPACE = "etcd-nospace"
RULE_ETCD_QUORUM_LOST = "etcd-quorum-lost"
RULE_RESTORE_SNAPSHOT_USABLE = "restore-snapshot-usable"
RULE_RESTORE_ONLY_AFTER_QUORUM_LOSS = "restore-only-after-quorum-loss"
RULE_REBOOT_COMMANDS_CONFIGURED = "reboot-commands-configured"
RULE_REBOOT_UNREACHABLE_WITHIN_LIMIT = "reboot-unreachable-within-limit"
RULE_REBOOT_CONTROL_PLANE_IN_SYNC = "reboot-control-plane-in-sync"
RULE_REBOOT_ONE_CONTROL_PLANE_AT_A_TIME = "reboot-one-control-plane-at-a-time"
RULE_ETCD_GOOD_FOR_REPAIR = "etcd-good-for-repair"
RULE_REPAIR_ENTRY_USABLE = "repair-entry-usable"
# Where the operator finds the way back, named in the quorum-loss message.
RESTORE_RUNBOOK = "README, 'Restore after quorum loss'"


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


def _lagging(etcd: EtcdStatus, excluding: Collection[int] = ()) -> list[str] | None:
    """The members (but ``excluding`` ids) unhealthy or not in sync with the leader, by
    address; None when etcd has no healthy leader."""
    leader = etcd.leader
    if not etcd.reachable or leader is None or not leader.healthy:
        return None
    return sorted(m.address for m in etcd.members if m.id not in excluding and not etcd.in_sync(m))


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
    lagging = _lagging(status.etcd, excluding)
    if lagging is None:
        return Blocked(
            RULE_CLUSTER_HEALTHY_AND_IN_SYNC,
            "etcd has no healthy leader; membership changes wait until it recovers.",
            (),
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


# ---------------------------------------------------------------------------
# Rule 9.  A member being defragmented serves no request until its database file is
# rewritten (its raft log still advances, so the quorum holds).  Taking a member away
# while another lags or is down, or while there is no leader, leaves fewer members to
# serve; routine defragmentation can wait for a calm cluster.
# ---------------------------------------------------------------------------


def defrag_when_in_sync(status: ClusterStatus) -> Blocked | None:
    """Refuse a routine defragmentation unless etcd has a healthy leader and every member
    (learners included) is healthy and in sync with it."""
    lagging = _lagging(status.etcd)
    if lagging is None:
        return Blocked(
            RULE_DEFRAG_WHEN_IN_SYNC,
            "etcd has no healthy leader; defragmentation waits until it recovers.",
            (),
        )
    if not lagging:
        return None
    return Blocked(
        RULE_DEFRAG_WHEN_IN_SYNC,
        f"etcd member(s) {_names(lagging)} are unhealthy or not in sync with the leader; "
        "fragmented members are defragmented once every member has caught up.",
        tuple(lagging),
    )


# ---------------------------------------------------------------------------
# etcd-nospace: a database that reached its quota (--quota-backend-bytes) raises the
# NOSPACE alarm, and etcd refuses every write (reads and deletes pass) until the alarm
# is disarmed.  Not a refusal: it says what happens (compact, defragment every member
# one at a time, disarm) so that ``ckecli status`` shows why writes fail.
# ---------------------------------------------------------------------------


def etcd_nospace(status: ClusterStatus) -> Blocked | None:
    """Report the NOSPACE alarm (None when it is not raised)."""
    etcd = status.etcd
    if not etcd.nospace:
        return None
    ids = {mid for mid, _ in etcd.alarms}
    alarmed = sorted(m.address for m in etcd.members if m.id in ids)
    down = sorted(m.address for m in etcd.members if not m.healthy)
    message = (
        f"etcd raised the NOSPACE alarm{' on ' + _names(alarmed) if alarmed else ''}: a "
        "database reached its quota (--quota-backend-bytes) and etcd refuses writes. cke "
        "compacts the history to the current revision, defragments every member one at a "
        "time (followers first) and disarms the alarm."
    )
    if down:
        message += f" Member(s) {_names(down)} do not answer and are not defragmented."
    return Blocked(RULE_ETCD_NOSPACE, message, tuple(alarmed))


# ---------------------------------------------------------------------------
# Rule 10.  With too few control planes keeping etcd data for a quorum, no member
# can be started, added or removed: each needs a quorum.  Acting anyway (a new
# bootstrap, say) would throw away whatever data is left.  Only a restore from a
# snapshot, which the operator asks for, brings the cluster back.
# ---------------------------------------------------------------------------


def etcd_quorum_lost(cluster: Cluster, status: ClusterStatus) -> Blocked | None:
    """Refuse everything when etcd has no leader and fewer control planes than a quorum
    of them could still hold etcd data (those that answer with data, and those that do
    not answer and may come back with theirs)."""
    if status.etcd.leader is not None:
        return None
    addresses = sorted(n.address for n in cluster.control_planes)
    if not addresses:
        return None
    with_data, unknown, lost = [], [], []
    for address in addresses:
        ns = status.nodes.get(address)
        if ns is None or not ns.ssh_ok or ns.host_key_mismatch:
            unknown.append(address)  # it may well hold its data: we cannot tell
        elif ns.etcd_has_data:
            with_data.append(address)
        else:
            lost.append(address)
    need = quorum(len(addresses))
    if len(with_data) + len(unknown) >= need:
        return None
    kept = f"only {_names(with_data)} keep(s)" if with_data else "none keeps"
    return Blocked(
        RULE_ETCD_QUORUM_LOST,
        f"etcd lost its quorum for good: of {len(addresses)} control planes {kept} etcd "
        f"data, a quorum needs {need}; {_names(lost)} lost theirs. cke changes nothing by "
        "itself. Restore from a backup with 'ckecli etcd restore SNAPSHOT --yes' "
        f"(runbook: {RESTORE_RUNBOOK}).",
        tuple(lost),
    )


# ---------------------------------------------------------------------------
# Rule 11.  A restore replaces every member's data with the snapshot: only the file
# ckecli verified (same SHA-256, read by the leader on its admin host), and only
# with every control plane reachable, since all of them start from it at once.
# ---------------------------------------------------------------------------


def restore_snapshot_usable(cluster: Cluster, status: ClusterStatus) -> Blocked | None:
    """Refuse a requested restore whose snapshot the leader cannot use."""
    request = status.restore
    if request is None:
        return None
    if status.restore_problem:
        return Blocked(
            RULE_RESTORE_SNAPSHOT_USABLE,
            f"restore requested but not possible: {status.restore_problem}. The snapshot "
            "must be at the same path on the leader's admin host.",
        )
    return None


# ---------------------------------------------------------------------------
# Rule 12.  A restore while etcd can still form a quorum would throw away every
# write since the snapshot: the request waits, and says so.
# ---------------------------------------------------------------------------


def restore_only_after_quorum_loss(cluster: Cluster, status: ClusterStatus) -> Blocked | None:
    """Report a restore request that is not carried out because etcd can form a quorum."""
    request = status.restore
    if request is None or etcd_quorum_lost(cluster, status) is not None:
        return None
    return Blocked(
        RULE_RESTORE_ONLY_AFTER_QUORUM_LOSS,
        f"a restore from {request.snapshot} is requested, but etcd can still form a quorum: "
        "restoring would lose every write since the snapshot. Nothing is restored; "
        "'ckecli etcd restore --cancel' removes the request.",
    )


# ---------------------------------------------------------------------------
# Rule 13.  The reboot queue (``ckecli reboot-queue``).  A reboot takes a node away
# for a while: never with more unreachable nodes than the constraint allows, never
# a control plane unless etcd could lose it and stay healthy, never two control
# planes (or a control plane and anything else) at once, and only with the commands
# configured.
# ---------------------------------------------------------------------------


def reboot_commands_configured(cluster: Cluster) -> Blocked | None:
    """Refuse to reboot when ``reboot.reboot_command`` or ``boot_check_command`` is empty
    (cke could reboot a node but never tell it is back)."""
    missing = [
        name
        for name, command in (
            ("reboot_command", cluster.reboot.reboot_command),
            ("boot_check_command", cluster.reboot.boot_check_command),
        )
        if not command
    ]
    if not missing:
        return None
    return Blocked(
        RULE_REBOOT_COMMANDS_CONFIGURED,
        f"the reboot queue has entries but the cluster sets no reboot.{missing[0]}; "
        "nothing is rebooted until the cluster configuration sets both commands.",
    )


def reboot_unreachable_within_limit(
    cluster: Cluster, status: ClusterStatus, rebooting: Collection[str], limit: int
) -> Blocked | None:
    """Refuse to start a reboot when more nodes than ``limit``
    (``maximum-unreachable-nodes-for-reboot``) are unreachable, not counting the nodes
    whose reboot is under way (they are expected to be away)."""
    down = sorted(
        n.address
        for n in cluster.nodes
        if n.address not in rebooting
        and ((ns := status.nodes.get(n.address)) is None or not ns.ssh_ok)
    )
    if len(down) <= limit:
        return None
    return Blocked(
        RULE_REBOOT_UNREACHABLE_WITHIN_LIMIT,
        f"{len(down)} node(s) are unreachable ({_names(down)}), more than "
        f"maximum-unreachable-nodes-for-reboot ({limit}); queued reboots wait.",
        tuple(down),
    )


def reboot_control_plane_in_sync(status: ClusterStatus, address: str) -> Blocked | None:
    """Refuse to reboot control plane ``address`` unless etcd has a healthy leader and
    every member (its own included) is in sync: the reboot then costs one member that
    comes back with everything, and the others keep the quorum."""
    lagging = _lagging(status.etcd)
    if lagging is None:
        reason = "etcd has no healthy leader"
    elif lagging:
        reason = f"etcd member(s) {_names(lagging)} are unhealthy or not in sync"
    else:
        return None
    return Blocked(
        RULE_REBOOT_CONTROL_PLANE_IN_SYNC,
        f"{reason}; the reboot of control plane {address} waits until every member is "
        "healthy and in sync.",
        (address,),
    )


def reboot_one_control_plane_at_a_time(
    address: str, control_planes: Collection[str], in_progress: Collection[str]
) -> Blocked | None:
    """Refuse to reboot control plane ``address`` while any other reboot is under way,
    and any node while a control plane's is (CKE: API servers one by one, never
    together with other nodes)."""
    others = sorted(a for a in in_progress if a != address)
    if not others:
        return None
    if address not in control_planes and not any(a in control_planes for a in others):
        return None
    return Blocked(
        RULE_REBOOT_ONE_CONTROL_PLANE_AT_A_TIME,
        f"the reboot of {address} waits: {_names(others)} are still rebooting, and a "
        "control plane reboots alone.",
        (address, *others),
    )


# ---------------------------------------------------------------------------
# Rule 14.  The repair queue (CKE's ``EtcdIsGoodForRepair``, cke#896): repairing a
# machine may cost its member for a while, so etcd must afford it; a member out of sync
# is tolerated only on a control plane SSH cannot reach (the failure being repaired).
# ---------------------------------------------------------------------------


def etcd_good_for_repair(
    cluster: Cluster, status: ClusterStatus, control_plane_count: int
) -> Blocked | None:
    """Refuse to work the repair queue unless etcd has a healthy leader, every member not
    in sync runs on a control plane that SSH cannot reach, and at least
    ``control_plane_count - 1`` members are in sync."""
    etcd = status.etcd
    leader = etcd.leader
    if not etcd.reachable or leader is None or not leader.healthy:
        return Blocked(
            RULE_ETCD_GOOD_FOR_REPAIR,
            "etcd has no healthy leader; repairs wait until it recovers.",
        )
    control_planes = {n.address for n in cluster.control_planes}
    in_sync = 0
    lagging: list[str] = []
    for m in etcd.members:
        if etcd.in_sync(m):
            in_sync += 1
            continue
        ns = status.nodes.get(m.address)
        if m.address not in control_planes or (ns is not None and ns.ssh_ok):
            lagging.append(m.address)
    if lagging:
        return Blocked(
            RULE_ETCD_GOOD_FOR_REPAIR,
            f"etcd member(s) {_names(sorted(lagging))} are out of sync but not on an "
            "unreachable control plane; repairs wait until they catch up.",
            tuple(sorted(lagging)),
        )
    if in_sync < control_plane_count - 1:
        return Blocked(
            RULE_ETCD_GOOD_FOR_REPAIR,
            f"only {in_sync} etcd member(s) are in sync, fewer than control-plane-count - 1 "
            f"({control_plane_count - 1}); repairs wait.",
        )
    return None


def repair_entry_usable(problems: Iterable[tuple[str, str]]) -> Blocked | None:
    """Report repair entries the leader leaves alone: ``problems`` are (address, why)."""
    found = sorted(problems)
    if not found:
        return None
    return Blocked(
        RULE_REPAIR_ENTRY_USABLE,
        "repair queue entries wait: "
        + "; ".join(f"{address}: {why}" for address, why in found)
        + ". Fix the cluster's repair section or delete the entries.",
        tuple(sorted({a for a, _ in found})),
    )
