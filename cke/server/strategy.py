"""The decision function: ``decide(cluster, constraints, status) -> Decision``.

Pure: it reads nothing and changes nothing (no I/O, clock or randomness); everything
it needs is in its arguments, and every choice is made in address order.  Each
safety rule is a named predicate in :mod:`cke.server.safety`, so that a refusal
can say which rule held a step back (``Decision.blocked``, shown by ``ckecli status``);
the next decision re-checks everything, so a blocked step is retried as soon as
the situation changes.

The etcd part follows CKE's ``server/strategy.go``:

1. **boot** - nothing anywhere has etcd data and etcd does not answer: bootstrap
   every control plane at once (``etcd-boot``; ``etcd-boot-aborted`` when rule 1 or
   the host-key rule holds it back).
2. **start** - control planes with data whose etcd is stopped and that are members
   (or membership is unknown because etcd does not answer): ``etcd-start``.
   **renew** - running members whose leaf certificates are due (missing, inside the
   renewal window, or from an issuer a CA rotation replaced) get new ones in place
   (``etcd-renew-certificates``, :mod:`cke.server.certrenewal`); not a membership
   change and no restart, so before the wait: expired peer certificates are a reason
   etcd has no leader.
3. **wait** - etcd does not answer or has no healthy leader: only time (or the
   starts above) can fix that, so ``etcd-wait`` with no operator.
4. **maintain** - at most ONE operator, the first of these whose rules pass:
   a. remove an unhealthy member that is not a desired control plane;
   b. promote a desired learner that is in sync;
   c. add a missing desired control plane as a learner - only with no learner
      pending, and only once the node is clean (no data, etcd not running);
   a'. remove a healthy member that is not a desired control plane (the leader last),
      only once every desired control plane is a voter: a healthy member being
      replaced leaves after its replacement was added and promoted (CKE removes
      first, which leaves one voter fewer for the whole replacement);
   d. repair a desired member whose node lost its data (reachable, no data, not
      running): remove it; it is re-added by (c) next round;
   e. destroy the etcd data of a reachable node that is not a member but has data
      or runs etcd (nodes dropped from the control planes, and desired control
      planes with stale data, which (c) waits for - the decision, not
      ``EtcdAddMemberOp``, cleans a node before it joins);
   f. restart one outdated member (its spec digest differs, trust bundles included),
      the leader last;
   g. take one CA rotation to its next stage once its stage reached every member
      (:mod:`cke.server.carotation`);
   h. defragment one member whose database is fragmented (``ClusterStatus.defrag``:
      at least ``min_db_size`` bytes, less than ``in_use_ratio`` in use), followers
      first, the leader last, only with every member in sync (rule 9);
   i. start stopped and restart outdated rivers and etcd-rivers (phase ``rivers``,
      :mod:`cke.op.rivers`), ``max_concurrent_updates`` nodes at a time.
   (a)-(d) are membership changes; (e) and (f) keep going when those are blocked.
4'. **repair** - CKE's step 10, once nothing in (4) is to be done, before the waits for
   held-back steps and out-of-sync members (a repair is what ends them): remove deleted
   entries, finish healthy ones, run the next repair command (:mod:`cke.op.repair`,
   :func:`cke.repairqueue.plan_repairs`), only while etcd is good for repair (rule 14,
   ``etcd-good-for-repair``).
5. **reboot** - only when nothing above is to be done or held back and every member is
   in sync (CKE's step 11): remove cancelled entries and entries whose node booted,
   else reboot one queued node (``reboot``, :mod:`cke.op.reboot`): workers first, at
   most ``reboot.max_concurrent_reboots`` at once, a control plane alone, with etcd in
   sync, leadership moved away first; never with more unreachable nodes than
   ``maximum-unreachable-nodes-for-reboot`` (rules ``reboot-*``).
   Before all of them, when etcd raised the NOSPACE alarm (it refuses writes):
   ``etcd-nospace-recovery`` compacts the history, defragments every healthy member one
   at a time (followers first) and disarms the alarm; ``etcd-nospace`` in ``blocked``
   says so in every phase while the alarm is raised.
   Phase ``etcd-maintain`` when an operator runs (``blocked`` lists what else was
   held back), :data:`ETCD_MAINTAIN_ABORTED` when only blocked steps remain,
   ``etcd-wait`` when nothing can be done but a member is still unhealthy (say a
   crashed control plane not yet replaced), else ``completed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

from cke.cluster import Cluster, Constraints, Node
from cke.op.base import Operator
from cke.op.etcd import (
    EtcdAddMemberOp,
    EtcdBootstrapOp,
    EtcdDefragOp,
    EtcdDestroyDataOp,
    EtcdNospaceRecoveryOp,
    EtcdPromoteOp,
    EtcdRemoveMemberOp,
    EtcdRenewCertsOp,
    EtcdRestartOp,
    EtcdStartOp,
    desired_etcd_digest,
)
from cke.op.reboot import RebootDequeueOp, RebootOp
from cke.op.repair import RepairDequeueOp, RepairExecuteOp, RepairFinishOp
from cke.op.restore import EtcdRestoreOp
from cke.op.rivers import KINDS, RiversKind, RiversOp, RiversStopOp, rivers_spec
from cke.rebootqueue import (
    DEFAULT_MAX_CONCURRENT_REBOOTS,
    IN_PROGRESS,
    STATUS_CANCELLED,
    STATUS_REBOOTING,
    EntryError,
    choose_candidates,
    dedup,
)
from cke.repairqueue import (
    ACTION_DEQUEUE,
    ACTION_FAIL,
    ACTION_SUCCEED,
    RepairEntry,
    find_operation,
    plan_repairs,
)
from cke.server.carotation import CARotationOp, Progress, rotation_progress
from cke.server.certrenewal import RULE_CERTIFICATES_RENEWED, Due, node_renewals
from cke.server.clusterstatus import ClusterStatus, EtcdMember, NodeStatus
from cke.server.phases import Phase
from cke.server.safety import (
    Blocked,
    all_control_planes_reachable,
    cluster_healthy_and_in_sync,
    defrag_when_in_sync,
    destroy_only_non_members,
    etcd_good_for_repair,
    etcd_nospace,
    etcd_quorum_lost,
    host_key_verified,
    keep_etcd_majority,
    keep_quorum,
    leader_moved_first,
    leader_transfer_target,
    learner_caught_up,
    one_entry_per_machine,
    reboot_commands_configured,
    reboot_control_plane_in_sync,
    reboot_one_control_plane_at_a_time,
    reboot_unreachable_within_limit,
    repair_entry_usable,
    replacement_added_first,
    restore_only_after_quorum_loss,
    restore_snapshot_usable,
    rivers_updated_first,
    same_machine_addresses,
)

__all__ = [
    "ETCD_MAINTAIN_ABORTED",
    "MEMBERSHIP_OPS",
    "Blocked",
    "ClusterStatus",
    "Decision",
    "decide",
]

# Phase for "etcd maintenance is needed but every remaining step is held back by a
# rule".  The value is "etcd-maintain-aborted"; until Phase has that member the
# decision falls back to "etcd-maintain" (the blocked list still says why).
ETCD_MAINTAIN_ABORTED = Phase.ETCD_MAINTAIN_ABORTED

# Operators that change the etcd membership (rule 2: at most one per decision).
MEMBERSHIP_OPS: tuple[type[Operator], ...] = (
    EtcdBootstrapOp,
    EtcdAddMemberOp,
    EtcdPromoteOp,
    EtcdRemoveMemberOp,
)


@dataclass(frozen=True)
class Decision:
    operators: list[Operator]
    phase: Phase
    blocked: list[Blocked] = field(default_factory=list)
    # CA rotations in progress and what each waits for (``ckecli status``).
    rotations: list[Progress] = field(default_factory=list)
    # Per node, the state of rivers and etcd-rivers (``ckecli status``).
    rivers: dict[str, dict[str, str]] = field(default_factory=dict)


def decide(cluster: Cluster | None, constraints: Constraints, status: ClusterStatus) -> Decision:
    if cluster is None:
        return Decision([], Phase.WAITING_FOR_CLUSTER)
    return _Etcd(cluster, status, constraints).decide()


# A check returns None (fine) or the Blocked that refuses the step.
Check = Callable[[], Blocked | None]


class _Blocks:
    """The rules that held something back, each (rule, message, nodes) once, in order."""

    def __init__(self) -> None:
        self.items: list[Blocked] = []

    def add(self, blocked: Blocked | None) -> None:
        if blocked is not None and blocked not in self.items:
            self.items.append(blocked)

    def first_failure(self, checks: Sequence[Check]) -> Blocked | None:
        """Run ``checks`` in order; record and return the first refusal (None: all pass)."""
        for check in checks:
            blocked = check()
            if blocked is not None:
                self.add(blocked)
                return blocked
        return None


class _Etcd:
    """One decision over the etcd part; the helpers read ``cluster`` and ``status``."""

    def __init__(
        self, cluster: Cluster, status: ClusterStatus, constraints: Constraints | None = None
    ) -> None:
        self.cluster = cluster
        self.status = status
        self.constraints = constraints or Constraints()
        self.etcd = status.etcd
        self.nodes = {n.address: n for n in cluster.nodes}
        self.control_planes = sorted(cluster.control_planes, key=lambda n: n.address)
        self.cp_addresses = frozenset(n.address for n in self.control_planes)
        self.all_addresses = sorted(self.nodes)
        # Entries that reach one machine are left alone (one-entry-per-machine).
        self.same_machine = same_machine_addresses(status)
        self.trust = status.pki.trust
        self._rivers_digests: dict[tuple[str, str, tuple[str, ...]], str] = {}
        self.blocks = _Blocks()
        # Reports that hold nothing back (they never change the phase).
        self.reports: list[Blocked] = []

    # -- node state --------------------------------------------------------

    def ns(self, address: str) -> NodeStatus | None:
        return self.status.nodes.get(address)

    def reachable(self, address: str) -> bool:
        """Commands can be sent: SSH answered with the expected host key.

        Unknown nodes (missing from the status) count as unreachable.
        """
        ns = self.ns(address)
        return (
            ns is not None
            and ns.ssh_ok
            and not ns.host_key_mismatch
            and address not in self.same_machine
        )

    def mismatched(self, address: str) -> bool:
        ns = self.ns(address)
        return ns is not None and ns.host_key_mismatch

    def sendable(self, nodes: Iterable[Node]) -> list[Node]:
        """The nodes that may be sent commands; the host-key mismatches are recorded."""
        nodes = list(nodes)
        self.blocks.add(host_key_verified(self.status, (n.address for n in nodes)))
        self.blocks.add(one_entry_per_machine(self.status, (n.address for n in nodes)))
        return [n for n in nodes if self.reachable(n.address)]

    def is_leader(self, member: EtcdMember) -> bool:
        leader = self.etcd.leader
        return leader is not None and leader.id == member.id

    def move_leader_to(self, member: EtcdMember) -> EtcdMember | None:
        return leader_transfer_target(self.status, member) if self.is_leader(member) else None

    def membership_gate(self, excluding: Iterable[int] = ()) -> list[Check]:
        """Rules every membership change passes (1, host keys of the control planes, one
        entry per machine anywhere in the cluster, 2)."""
        return [
            partial(all_control_planes_reachable, self.cluster, self.status),
            partial(host_key_verified, self.status, sorted(self.cp_addresses)),
            partial(one_entry_per_machine, self.status, self.all_addresses),
            partial(cluster_healthy_and_in_sync, self.status, frozenset(excluding)),
        ]

    # -- phases ------------------------------------------------------------

    def decide(self) -> Decision:
        decision = self._decide()
        rotations = self.rotations() if self.status.pki.rotations else []
        rivers = self.rivers_summary() if self.etcd.reachable and self.status.rivers_app else {}
        blocked = [*decision.blocked, *(b for b in self.reports if b not in decision.blocked)]
        return Decision(decision.operators, decision.phase, blocked, rotations, rivers)

    def _decide(self) -> Decision:
        if not self.bootstrapped():
            return self.boot()
        lost = etcd_quorum_lost(self.cluster, self.status)
        if lost is not None:
            return self.restore(lost)
        self.blocks.add(restore_only_after_quorum_loss(self.cluster, self.status))
        self.blocks.add(etcd_nospace(self.status))
        start = self.start()
        if start is not None:
            return Decision([start], Phase.ETCD_START, self.blocks.items)
        # Before waiting for a healthy etcd: members whose peer certificates expired
        # cannot reach each other until new ones are written.
        renew = self.renew_certificates()
        if renew is not None:
            return Decision([renew], Phase.ETCD_MAINTAIN, self.blocks.items)
        leader = self.etcd.leader
        if not self.etcd.reachable or leader is None or not leader.healthy:
            return Decision([], Phase.ETCD_WAIT, self.blocks.items)
        if self.etcd.nospace:
            return Decision([self.recover_nospace()], Phase.ETCD_MAINTAIN, self.blocks.items)
        op = self.maintain()
        if op is not None:
            phase = Phase.RIVERS if isinstance(op, RiversOp | RiversStopOp) else Phase.ETCD_MAINTAIN
            return Decision([op], phase, self.blocks.items)
        # CKE's step 10: the repair queue, before the waits below (repairing a crashed
        # control plane is what ends them), when etcd can afford it.
        repair = self.repair()
        if repair is not None:
            return repair
        if self.blocks.items:
            return Decision([], ETCD_MAINTAIN_ABORTED, self.blocks.items)
        if not all(self.etcd.in_sync(m) for m in self.etcd.members):
            # Nothing can be done (e.g. a crashed control plane still in the config):
            # wait for the member to come back or for a new configuration.
            return Decision([], Phase.ETCD_WAIT)
        # Last, as CKE's step 11: only an etcd with nothing to repair or maintain, every
        # member in sync, reboots a node (a rebooted control plane comes back through
        # etcd-start / etcd-wait above before its entry leaves the queue).
        reboot = self.reboot()
        if reboot is not None:
            return reboot
        return Decision([], Phase.COMPLETED)

    def bootstrapped(self) -> bool:
        """Some etcd exists: it answers, or any node holds data or runs etcd.

        Stricter than CKE (which looks at control planes only): data anywhere means
        a cluster existed, and a new bootstrap would silently replace it.
        """
        if self.etcd.reachable or self.etcd.members:
            return True
        return any(ns.etcd_has_data or ns.etcd_running for ns in self.status.nodes.values())

    def boot(self) -> Decision:
        refused = self.blocks.first_failure(
            [
                partial(all_control_planes_reachable, self.cluster, self.status),
                partial(host_key_verified, self.status, sorted(self.cp_addresses)),
                partial(one_entry_per_machine, self.status, self.all_addresses),
            ]
        )
        if refused is not None or not self.control_planes:
            return Decision([], Phase.ETCD_BOOT_ABORTED, self.blocks.items)
        return Decision(
            [EtcdBootstrapOp(self.control_planes, self.cluster, self.trust)], Phase.ETCD_BOOT
        )

    def restore(self, lost: Blocked) -> Decision:
        """The quorum is lost for good: nothing is done until the operator asks for a
        restore, and then only from the snapshot ckecli checked, on every control plane."""
        self.blocks.add(lost)
        request = self.status.restore
        if request is None:
            return Decision([], Phase.ETCD_WAIT, self.blocks.items)
        refused = self.blocks.first_failure(
            [
                partial(restore_snapshot_usable, self.cluster, self.status),
                partial(all_control_planes_reachable, self.cluster, self.status),
                partial(host_key_verified, self.status, sorted(self.cp_addresses)),
                partial(one_entry_per_machine, self.status, self.all_addresses),
            ]
        )
        if refused is not None:
            return Decision([], Phase.ETCD_WAIT, self.blocks.items)
        op = EtcdRestoreOp(
            self.control_planes, self.cluster, request, self.status.restore_revision, self.trust
        )
        return Decision([op], Phase.ETCD_RESTORE, self.blocks.items)

    def start(self) -> EtcdStartOp | None:
        """Start stopped members on control planes; no membership rule is involved."""
        stopped = []
        for node in self.control_planes:
            ns = self.ns(node.address)
            if ns is None or not ns.etcd_has_data or ns.etcd_running:
                continue
            # When etcd answers, only members are started: data of a non-member is
            # stale and is destroyed by maintenance instead.
            if self.etcd.reachable and self.etcd.member(node.address) is None:
                continue
            stopped.append(node)
        nodes = self.sendable(stopped)
        return EtcdStartOp(nodes, self.cluster, self.trust) if nodes else None

    def renew_certificates(self) -> EtcdRenewCertsOp | None:
        """Renew, in place, the leaves of running members that are due (missing, inside
        the renewal window, or from an issuer a CA rotation replaced). Not a membership
        change and no restart: it runs whatever else is blocked. A due member that
        cannot be reached is reported under ``certificates-renewed``."""
        due: dict[str, list[Due]] = {}
        for node in self.control_planes:
            ns = self.ns(node.address)
            if ns is None:
                continue
            # When etcd does not answer, membership is unknown, and expired certificates
            # may be the very reason: every control plane running etcd counts.
            if self.etcd.reachable and self.etcd.member(node.address) is None:
                continue
            # An unreachable node keeps the certificates last seen on it (the leader
            # remembers them), so that their expiry is still reported.
            if not (ns.etcd_running or (not ns.ssh_ok and ns.certs)):
                continue
            found = node_renewals(ns, self.status.pki)
            if found:
                due[node.address] = found
        if not due:
            return None
        nodes = self.sendable(n for n in self.control_planes if n.address in due)
        unreachable = sorted(set(due) - {n.address for n in nodes})
        if unreachable:
            self.blocks.add(
                Blocked(
                    RULE_CERTIFICATES_RENEWED,
                    "certificates inside their renewal window on nodes cke cannot reach: "
                    + "; ".join(d.describe() for a in unreachable for d in due[a]),
                    tuple(unreachable),
                )
            )
        if not nodes:
            return None
        reasons = {n.address: [f"{d.name} {d.reason}" for d in due[n.address]] for n in nodes}
        return EtcdRenewCertsOp(nodes, reasons)

    def maintain(self) -> Operator | None:
        for step in (
            self.remove_dead_dropped,
            self.promote_learner,
            self.add_member,
            self.remove_healthy_dropped,
            self.repair_lost_data,
            self.destroy_data,
            self.restart_outdated,
            self.advance_ca_rotation,
            self.defragment,
            self.rivers,
        ):
            op = step()
            if op is not None:
                return op
        return None

    # -- maintenance steps (each returns its operator, or records why not) --

    def remove_dead_dropped(self) -> Operator | None:
        """(a) Remove an unhealthy member that is not a desired control plane: it counts
        in the quorum without voting, and blocks every other membership change (rule 2)."""
        return self.remove_dropped(healthy=False)

    def remove_healthy_dropped(self) -> Operator | None:
        """(a') Remove a healthy member that is not a desired control plane, once every
        desired control plane is a voter: a replacement is added and promoted before
        the member it replaces leaves, so the voters never drop below the desired count."""
        return self.remove_dropped(healthy=True)

    def remove_dropped(self, healthy: bool) -> Operator | None:
        dropped = [
            m
            for m in self.etcd.members
            if m.address not in self.cp_addresses and m.healthy == healthy
        ]
        # The leader last.
        dropped.sort(key=lambda m: (self.is_leader(m), m.address, m.id))
        for m in dropped:
            checks: list[Check] = [
                *self.membership_gate(excluding=[m.id]),
                partial(host_key_verified, self.status, [m.address]),
                partial(keep_quorum, self.status, m, removing=True),
                partial(leader_moved_first, self.status, m),
            ]
            if healthy and not m.learner:
                checks.insert(0, partial(replacement_added_first, self.status, self.cluster, m))
            if healthy:
                checks.insert(0, partial(rivers_updated_first, m, self.rivers_outdated_nodes()))
            if not m.learner:
                # Removing a voter may lose the data unless the new control planes keep
                # a majority of the voters; adding first (step c) gets there safely.
                checks.insert(-2, partial(keep_etcd_majority, self.status, self.cluster))
            if self.blocks.first_failure(checks) is None:
                node = self.nodes.get(m.address)
                node = node if node is not None and self.reachable(m.address) else None
                return EtcdRemoveMemberOp(
                    m, node, self.move_leader_to(m), via=self.voters_except(m)
                )
        return None

    def voters_except(self, member: EtcdMember) -> list[str]:
        """Healthy voters other than ``member``: where membership requests go."""
        return sorted(v.address for v in self.etcd.voters if v.healthy and v.id != member.id)

    def promote_learner(self) -> Operator | None:
        """(b) Promote a desired learner once it has caught up (rule 6)."""
        learners = sorted(
            (m for m in self.etcd.members if m.learner and m.address in self.cp_addresses),
            key=lambda m: (m.address, m.id),
        )
        for m in learners:
            checks: list[Check] = [
                *self.membership_gate(excluding=[m.id]),
                partial(learner_caught_up, self.status, m),
            ]
            if self.blocks.first_failure(checks) is None:
                return EtcdPromoteOp(m, via=self.voters_except(m))
        return None

    def add_member(self) -> Operator | None:
        """(c) Add one missing control plane as a learner, when no learner is pending."""
        if any(m.learner for m in self.etcd.members):
            return None  # one newcomer at a time: (b) promotes it first
        # A node with stale data waits for (e) to wipe it.  An unreachable node looks
        # clean (nothing is known): the gate below refuses it by rule 1 and says so.
        clean = [
            n
            for n in self.control_planes
            if self.etcd.member(n.address) is None and not self._has_etcd(n.address)
        ]
        if not clean or self.blocks.first_failure(self.membership_gate()) is not None:
            return None
        # The gate passed, so every control plane is reachable with a verified host key.
        return EtcdAddMemberOp(clean[0], self.cluster, list(self.etcd.members), self.trust)

    def repair_lost_data(self) -> Operator | None:
        """(d) Remove a desired member whose node lost its data; (c) re-adds it."""
        for node in self.control_planes:
            m = self.etcd.member(node.address)
            ns = self.ns(node.address)
            if m is None or ns is None or m.healthy:
                continue
            if not self.reachable(node.address) or ns.etcd_has_data or ns.etcd_running:
                continue
            checks: list[Check] = [
                *self.membership_gate(excluding=[m.id]),
                partial(keep_quorum, self.status, m, removing=True),
                partial(leader_moved_first, self.status, m),
            ]
            if self.blocks.first_failure(checks) is None:
                return EtcdRemoveMemberOp(
                    m, node, self.move_leader_to(m), via=self.voters_except(m)
                )
        return None

    def destroy_data(self) -> Operator | None:
        """(e) Wipe etcd data on a node that is not a member (rule 4); not a membership
        change, so it runs even while membership changes are blocked."""
        stale = sorted(
            (n for n in self.cluster.nodes if self._has_etcd(n.address)),
            key=lambda n: n.address,
        )
        stale = [n for n in stale if self.etcd.member(n.address) is None]
        for node in self.sendable(stale):
            check = partial(destroy_only_non_members, self.status, node.address)
            if self.blocks.first_failure([check]) is None:
                healthy_voters = sorted(v.address for v in self.etcd.voters if v.healthy)
                return EtcdDestroyDataOp(node, ask=healthy_voters)
        return None

    def restart_outdated(self) -> Operator | None:
        """(f) Restart one outdated member; rule 2 makes the next one wait until it is
        back in sync."""
        outdated: list[tuple[Node, EtcdMember]] = []
        for node in self.control_planes:
            m = self.etcd.member(node.address)
            ns = self.ns(node.address)
            if m is None or ns is None or not ns.etcd_running:
                continue
            # An unknown digest (None) counts as outdated: the spec is not cke's.
            if ns.etcd_digest != desired_etcd_digest(node, self.cluster, self.trust):
                outdated.append((node, m))
        outdated.sort(key=lambda nm: (self.is_leader(nm[1]), nm[0].address))
        sendable = {n.address for n in self.sendable(n for n, _ in outdated)}
        for node, m in outdated:
            if node.address not in sendable:
                continue
            checks: list[Check] = [
                partial(cluster_healthy_and_in_sync, self.status),
                partial(keep_quorum, self.status, m, removing=False),
                partial(leader_moved_first, self.status, m),
            ]
            if self.blocks.first_failure(checks) is None:
                target = self.move_leader_to(m)
                return EtcdRestartOp(
                    node,
                    self.cluster,
                    target,
                    leader=m if target is not None else None,
                    trust=self.trust,
                )
        return None

    # -- hygiene: defragmentation and NOSPACE ----------------------------------------

    def followers_first(self, members: Iterable[EtcdMember]) -> list[EtcdMember]:
        return sorted(members, key=lambda m: (self.is_leader(m), m.address, m.id))

    def defragment(self) -> Operator | None:
        """(h) Defragment one fragmented member, followers first, the leader last; the
        next one waits for the next round (rule 9 then sees it back in sync). Voters
        only: etcd serves a learner nothing but Status and serializable reads (and a
        learner is promoted soon)."""
        fragmented = self.followers_first(
            m for m in self.etcd.voters if self.status.defrag.fragmented(m)
        )
        if not fragmented:
            return None
        if self.blocks.first_failure([partial(defrag_when_in_sync, self.status)]) is not None:
            return None
        m = fragmented[0]
        return EtcdDefragOp(m, ask=self.voters_except(m))

    def recover_nospace(self) -> Operator:
        """The NOSPACE alarm with a healthy leader: compact, defragment every member that
        answers (voters: see ``defragment``; followers first, the leader last), disarm.
        Members that do not answer are
        left out (``etcd-nospace`` names them); one whose database still fills the quota
        raises the alarm again at the next write, and is recovered then."""
        members = self.followers_first(m for m in self.etcd.voters if m.healthy)
        via = sorted(v.address for v in self.etcd.voters if v.healthy)
        return EtcdNospaceRecoveryOp(members, via)

    # -- rivers and etcd-rivers (CKE's riversOps) -------------------------------------

    def rivers_upstreams(self) -> list[str]:
        """The desired control planes whose members are voters: what every proxy
        forwards to (a new control plane once promoted; a dropped one at once)."""
        return sorted(m.address for m in self.etcd.voters if m.address in self.cp_addresses)

    def rivers_targets(self, kind: RiversKind) -> list[Node]:
        return self.control_planes if kind.control_planes_only else self.cluster.nodes

    def rivers_state(self, kind: RiversKind, node: Node, upstreams: list[str]) -> str:
        """``current``, ``outdated``, ``stopped`` or ``unknown`` (node not reachable)."""
        ns = self.ns(node.address)
        if ns is None or not ns.ssh_ok:
            return "unknown"
        st = ns.services.get(kind.service)
        if st is None or not st.running:
            return "stopped"
        return "current" if st.digest == self.rivers_digest(kind, node, upstreams) else "outdated"

    def rivers_digest(self, kind: RiversKind, node: Node, upstreams: list[str]) -> str:
        """The digest a node's proxy must run with; computed once per decision (it hashes
        the rivers app, and the status, the rule and the step all ask for it)."""
        key = (kind.service, node.address, tuple(upstreams))
        digest = self._rivers_digests.get(key)
        if digest is None:
            spec = rivers_spec(kind, node, upstreams, self.cluster, self.status.rivers_app)
            digest = self._rivers_digests[key] = spec.digest()
        return digest

    def rivers_outdated_nodes(self) -> list[str]:
        """Reachable nodes whose running rivers or etcd-rivers forward to an old list."""
        upstreams = self.rivers_upstreams()
        if not upstreams or not self.status.rivers_app:
            return []
        return sorted(
            {
                n.address
                for kind in KINDS
                for n in self.rivers_targets(kind)
                if self.rivers_state(kind, n, upstreams) == "outdated"
            }
        )

    def rivers(self) -> Operator | None:
        """(h) Start stopped and restart outdated rivers and etcd-rivers, at most
        ``max_concurrent_updates`` nodes per operation (phase ``rivers``). Never with an
        empty upstream list: a proxy keeps its old list rather than none. Last (CKE runs
        it first): a rivers that cannot start must not hold back the repair of etcd; a
        healthy member that a proxy still lists waits for it (rivers-updated-first)."""
        upstreams = self.rivers_upstreams()
        if not upstreams or not self.status.rivers_app:
            return None
        limit = max(1, self.status.max_concurrent_updates)
        for kind in KINDS:
            nodes = sorted(self.rivers_targets(kind), key=lambda n: n.address)
            states = {n.address: self.rivers_state(kind, n, upstreams) for n in nodes}
            for wanted in ("stopped", "outdated"):
                candidates = [n for n in nodes if states[n.address] == wanted]
                sendable = self.sendable(candidates)[:limit]
                if sendable:
                    return RiversOp(
                        kind,
                        sendable,
                        upstreams,
                        self.cluster,
                        self.status.rivers_app,
                        bootstrap=wanted == "stopped",
                    )
            if kind.control_planes_only:
                # Nodes that were control planes keep no proxy for their old role.
                former = [
                    n
                    for n in self.cluster.nodes
                    if n.address not in self.cp_addresses
                    and (ns := self.ns(n.address)) is not None
                    and (st := ns.services.get(kind.service)) is not None
                    and st.running
                ]
                sendable = self.sendable(sorted(former, key=lambda n: n.address))[:limit]
                if sendable:
                    return RiversStopOp(kind, sendable)
        return None

    def rivers_summary(self) -> dict[str, dict[str, str]]:
        """Per node, the state of each proxy it should run (``ckecli status``)."""
        upstreams = self.rivers_upstreams()
        summary: dict[str, dict[str, str]] = {}
        for kind in KINDS:
            for n in self.rivers_targets(kind):
                state = self.rivers_state(kind, n, upstreams) if upstreams else "waiting"
                summary.setdefault(n.address, {})[kind.service] = state
        return summary

    def member_statuses(self) -> list[NodeStatus]:
        """The status of every control plane that is an etcd member."""
        return [
            ns
            for n in self.control_planes
            if self.etcd.member(n.address) is not None and (ns := self.ns(n.address)) is not None
        ]

    def spec_current(self, ns: NodeStatus) -> bool:
        node = self.nodes[ns.address]
        return ns.etcd_running and ns.etcd_digest == desired_etcd_digest(
            node, self.cluster, self.trust
        )

    def rotations(self) -> list[Progress]:
        members = self.member_statuses()
        return [
            rotation_progress(name, stage, self.status.pki, members, self.spec_current)
            for name, stage in sorted(self.status.pki.rotations.items())
        ]

    def advance_ca_rotation(self) -> Operator | None:
        """(g) Take one CA rotation to its next stage once its stage reached every member
        (see :mod:`cke.server.carotation`); only with every control plane reachable and
        the cluster healthy and in sync, so that "every member" means all of them."""
        for progress in self.rotations():
            if not progress.ready:
                continue
            checks: list[Check] = [
                partial(all_control_planes_reachable, self.cluster, self.status),
                partial(cluster_healthy_and_in_sync, self.status),
            ]
            if self.blocks.first_failure(checks) is None:
                return CARotationOp(progress.name, progress.stage)
        return None

    # -- the reboot queue (CKE's rebootOps) --------------------------------------------

    def reboot(self) -> Decision | None:
        """Remove finished and cancelled entries, else start one queued reboot (workers
        first, up to ``reboot.max_concurrent_reboots``; a control plane alone, with etcd
        in sync, its leadership moved away first). CKE cordons and drains the node
        (evicting its Pods) before the reboot command: there is no Kubernetes here, so
        nothing is evicted. None: nothing to do or wait for."""
        q = self.status.reboots
        if not q.entries:
            return None
        cancelled = [e for e in q.entries if e.status == STATUS_CANCELLED]
        if cancelled:
            return Decision([RebootDequeueOp(cancelled, cancel=True)], Phase.REBOOT)
        booted = [e for e in q.entries if e.status == STATUS_REBOOTING and e.node in q.booted]
        if booted:
            return Decision([RebootDequeueOp(booted)], Phase.REBOOT)
        if not q.enabled:
            return None
        members = [e for e in dedup(q.entries) if e.node in self.nodes]
        in_progress = [e.node for e in members if e.status in IN_PROGRESS]
        limit = self.cluster.reboot.max_concurrent_reboots or DEFAULT_MAX_CONCURRENT_REBOOTS
        chosen = choose_candidates(members, self.nodes, self.cp_addresses, limit, q.now)
        if not chosen:
            return Decision([], Phase.REBOOT) if in_progress else None
        entry = chosen[0]
        node = self.nodes[entry.node]
        m = self.etcd.member(node.address)
        checks: list[Check] = [
            partial(reboot_commands_configured, self.cluster),
            partial(
                reboot_unreachable_within_limit,
                self.cluster,
                self.status,
                in_progress,
                self.constraints.maximum_unreachable_nodes_for_reboot,
            ),
            partial(host_key_verified, self.status, [node.address]),
            partial(one_entry_per_machine, self.status, [node.address]),
            partial(
                reboot_one_control_plane_at_a_time, node.address, self.cp_addresses, in_progress
            ),
        ]
        if node.address in self.cp_addresses:
            checks.append(partial(reboot_control_plane_in_sync, self.status, node.address))
        if m is not None:
            checks += [
                partial(keep_quorum, self.status, m, removing=False),
                partial(leader_moved_first, self.status, m),
            ]
        if self.blocks.first_failure(checks) is not None:
            return Decision([], Phase.REBOOT, self.blocks.items)
        # CKE cordons the node and evicts its Pods here, before the reboot command. No
        # Kubernetes runs here, so there is nothing to cordon or evict.
        target = self.move_leader_to(m) if m is not None else None
        op = RebootOp(
            node,
            entry,
            q.revisions.get(entry.index, 0),
            self.cluster,
            leader=m if target is not None else None,
            move_leader_to=target,
        )
        return Decision([op], Phase.REBOOT, self.blocks.items)

    # -- the repair queue (CKE's repairOps) ---------------------------------------------

    def repair(self) -> Decision | None:
        """One step of the repair queue (:func:`cke.repairqueue.plan_repairs`): remove
        deleted entries, finish healthy ones, run the next repair command; only while
        etcd is good for repair (rule 14). None: nothing to do or wait for. CKE drains
        the node before a ``need_drain`` step; there is no Kubernetes here, so nothing
        is cordoned or evicted."""
        q = self.status.repairs
        if not q.entries:
            return None
        rebooting_cps = [
            e.node
            for e in self.status.reboots.entries
            if e.status in IN_PROGRESS and e.node in self.cp_addresses
        ]
        plan = plan_repairs(self.cluster, q, self.cp_addresses, rebooting_cps)
        unusable = repair_entry_usable(
            (e.address, self.repair_problem(e)) for e in plan.unknown if not e.deleted
        )
        if not plan.active:
            # Reported only: such entries hold neither the phase nor the reboot queue.
            if unusable is not None:
                self.reports.append(unusable)
            return None
        self.blocks.add(unusable)
        refused = etcd_good_for_repair(
            self.cluster, self.status, self.constraints.control_plane_count
        )
        if refused is not None:
            self.blocks.add(refused)
            return Decision([], Phase.REPAIR, self.blocks.items)
        for action in plan.actions:
            revision = q.revisions.get(action.entry.index, 0)
            node = self.nodes.get(action.entry.address)
            op: Operator
            if action.kind == ACTION_DEQUEUE:
                op = RepairDequeueOp(action.entry)
            elif action.kind in (ACTION_SUCCEED, ACTION_FAIL):
                ok = action.kind == ACTION_SUCCEED
                op = RepairFinishOp(node, action.entry, revision, self.cluster, ok)
            elif node is not None and self.sendable([node]):
                op = RepairExecuteOp(node, action.entry, revision, self.cluster, action.step)
            else:
                continue
            return Decision([op], Phase.REPAIR, self.blocks.items)
        return Decision([], Phase.REPAIR, self.blocks.items)

    def repair_problem(self, entry: RepairEntry) -> str:
        if entry.address not in self.nodes:
            return "not a node of the cluster (cke runs repair commands on it over SSH)"
        try:
            find_operation(self.cluster, entry.machine_type, entry.operation)
        except EntryError as exc:
            return str(exc)
        return "unusable"

    def _has_etcd(self, address: str) -> bool:
        ns = self.ns(address)
        return ns is not None and (ns.etcd_has_data or ns.etcd_running)
