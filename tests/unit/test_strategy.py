"""The etcd part of the decision function (``cke/server/strategy.py``).

A table of the scenarios the e2e tests drive, then property tests over random
statuses for the safety invariants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cke.cluster import Cluster, Constraints, Node
from cke.op.base import Operator
from cke.op.etcd import (
    EtcdAddMemberOp,
    EtcdBootstrapOp,
    EtcdDestroyDataOp,
    EtcdPromoteOp,
    EtcdRemoveMemberOp,
    EtcdRestartOp,
    EtcdStartOp,
    desired_etcd_digest,
)
from cke.server.clusterstatus import EtcdMember, EtcdStatus, NodeStatus
from cke.server.phases import Phase
from cke.server.safety import quorum, same_machine_addresses
from cke.server.strategy import (
    ETCD_MAINTAIN_ABORTED,
    MEMBERSHIP_OPS,
    ClusterStatus,
    Decision,
    decide,
)
from tests.unit.etcd_builders import member

pytestmark = pytest.mark.unit

A, B, C, D, E, F = (f"10.0.0.{i}" for i in range(1, 7))
OLD_DIGEST = "outdated"


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def cluster(cps: Sequence[str], workers: Sequence[str] = ()) -> Cluster:
    nodes = [Node(address=a, user="root", control_plane=True) for a in cps]
    nodes += [Node(address=a, user="root") for a in workers]
    return Cluster(name="c", service_subnet="10.68.0.0/16", nodes=nodes)


def node_of(c: Cluster, address: str) -> Node:
    return next(n for n in c.nodes if n.address == address)


def digest(c: Cluster, address: str) -> str:
    return desired_etcd_digest(node_of(c, address), c)


def running(c: Cluster, address: str, **changes: object) -> NodeStatus:
    """A reachable node running an up-to-date etcd with data."""
    ns = NodeStatus(
        address,
        ssh_ok=True,
        etcd_running=True,
        etcd_digest=digest(c, address) if any(n.address == address for n in c.nodes) else None,
        etcd_has_data=True,
    )
    return dataclasses.replace(ns, **changes)  # type: ignore[arg-type]


def clean(address: str, **changes: object) -> NodeStatus:
    """A reachable node with no etcd at all."""
    return dataclasses.replace(NodeStatus(address, ssh_ok=True), **changes)  # type: ignore[arg-type]


def status(members: Sequence[EtcdMember], nodes: Sequence[NodeStatus]) -> ClusterStatus:
    leader = next((m.id for m in members if m.leader), None)
    return ClusterStatus(
        nodes={n.address: n for n in nodes},
        etcd=EtcdStatus(reachable=bool(members), members=tuple(members), leader_id=leader),
    )


def healthy(
    c: Cluster, addresses: Sequence[str], extra_nodes: Sequence[NodeStatus] = ()
) -> ClusterStatus:
    """``addresses`` are healthy in-sync voters (the first leads); other cluster nodes clean."""
    members = [member(a, leader=i == 0) for i, a in enumerate(addresses)]
    nodes = [running(c, a) for a in addresses]
    known = set(addresses) | {n.address for n in extra_nodes}
    nodes += [clean(n.address) for n in c.nodes if n.address not in known]
    return status(members, [*nodes, *extra_nodes])


def with_node(s: ClusterStatus, ns: NodeStatus) -> ClusterStatus:
    return dataclasses.replace(s, nodes={**s.nodes, ns.address: ns})


def with_member(s: ClusterStatus, m: EtcdMember) -> ClusterStatus:
    members = [x for x in s.etcd.members if x.address != m.address] + [m]
    return dataclasses.replace(s, etcd=dataclasses.replace(s.etcd, members=tuple(members)))


def without_member(s: ClusterStatus, address: str) -> ClusterStatus:
    members = tuple(x for x in s.etcd.members if x.address != address)
    return dataclasses.replace(s, etcd=dataclasses.replace(s.etcd, members=members))


def run(c: Cluster | None, s: ClusterStatus) -> Decision:
    return decide(c, Constraints(), s)


def only(d: Decision, cls: type[Operator], targets: Sequence[str]) -> Operator:
    assert len(d.operators) == 1, d
    (op,) = d.operators
    assert isinstance(op, cls), d
    assert op.targets == list(targets)
    return op


def rules(d: Decision) -> dict[str, tuple[str, ...]]:
    return {b.rule: b.nodes for b in d.blocked}


# ---------------------------------------------------------------------------
# No cluster, boot
# ---------------------------------------------------------------------------


def test_no_cluster_waits() -> None:
    d = run(None, ClusterStatus())
    assert d == Decision([], Phase.WAITING_FOR_CLUSTER)


def test_bootstrap_three_control_planes() -> None:
    c = cluster([C, A, B], [D])
    d = run(c, status([], [clean(a) for a in (A, B, C, D)]))
    op = only(d, EtcdBootstrapOp, [A, B, C])
    assert d.phase is Phase.ETCD_BOOT and d.blocked == []
    assert isinstance(op, EtcdBootstrapOp) and op.cluster is c


def test_bootstrap_blocked_by_unreachable_control_plane() -> None:
    c = cluster([A, B, C])
    d = run(c, status([], [clean(A), clean(B, ssh_ok=False)]))  # C unknown
    assert d.operators == [] and d.phase is Phase.ETCD_BOOT_ABORTED
    assert rules(d) == {"all-control-planes-reachable": (B, C)}


def test_empty_status_is_boot_aborted() -> None:
    d = run(cluster([A]), ClusterStatus())
    assert d.operators == [] and d.phase is Phase.ETCD_BOOT_ABORTED
    assert rules(d) == {"all-control-planes-reachable": (A,)}


def test_bootstrap_blocked_by_host_key_mismatch() -> None:
    c = cluster([A, B, C])
    d = run(c, status([], [clean(A), clean(B), clean(C, host_key_mismatch=True)]))
    assert d.operators == [] and d.phase is Phase.ETCD_BOOT_ABORTED
    assert rules(d) == {"host-key-verified": (C,)}


def test_no_bootstrap_when_any_node_has_data() -> None:
    # etcd does not answer, but a worker holds etcd data: a cluster existed; never
    # replace it by a new bootstrap.
    c = cluster([A, B, C], [D])
    s = status([], [clean(A), clean(B), clean(C), clean(D, etcd_has_data=True)])
    d = run(c, s)
    assert d.operators == [] and d.phase is Phase.ETCD_WAIT


# ---------------------------------------------------------------------------
# Start, wait
# ---------------------------------------------------------------------------


def test_killed_etcd_is_started() -> None:
    c = cluster([A, B, C])
    s = with_node(healthy(c, [A, B, C]), running(c, B, etcd_running=False))
    s = with_member(s, member(B, healthy=False))
    d = run(c, s)
    only(d, EtcdStartOp, [B])
    assert d.phase is Phase.ETCD_START and d.blocked == []


def test_all_members_stopped_are_started_even_without_etcd() -> None:
    c = cluster([A, B, C])
    s = status([], [running(c, a, etcd_running=False) for a in (A, B, C)])
    d = run(c, s)
    only(d, EtcdStartOp, [A, B, C])
    assert d.phase is Phase.ETCD_START


def test_start_skips_unreachable_and_host_key_mismatch() -> None:
    c = cluster([A, B, C, D, E])
    s = healthy(c, [A, B, C, D, E])
    s = with_node(s, running(c, B, etcd_running=False))
    s = with_node(s, running(c, C, etcd_running=False, host_key_mismatch=True))
    s = with_node(s, running(c, D, etcd_running=False, ssh_ok=False))
    for a in (B, C, D):
        s = with_member(s, member(a, healthy=False))
    d = run(c, s)
    only(d, EtcdStartOp, [B])
    assert d.phase is Phase.ETCD_START
    assert rules(d) == {"host-key-verified": (C,)}


def test_start_skips_non_member_with_data() -> None:
    # Stale data on a control plane that is not a member: destroyed, never started.
    c = cluster([A, B, C, D])
    s = healthy(c, [A, B, C], [running(c, D, etcd_running=False)])
    d = run(c, s)
    only(d, EtcdDestroyDataOp, [D])
    assert d.phase is Phase.ETCD_MAINTAIN


def test_wait_without_leader() -> None:
    c = cluster([A, B, C])
    s = status(
        [member(A), member(B, healthy=False), member(C, healthy=False)],
        [running(c, A), running(c, B), running(c, C)],
    )
    d = run(c, s)
    assert d.operators == [] and d.phase is Phase.ETCD_WAIT


def test_wait_when_etcd_unreachable_and_nothing_to_start() -> None:
    c = cluster([A, B, C])
    d = run(c, status([], [running(c, a) for a in (A, B, C)]))
    assert d.operators == [] and d.phase is Phase.ETCD_WAIT


def test_steady_state_completed() -> None:
    c = cluster([A, B, C], [D])
    d = run(c, healthy(c, [A, B, C]))
    assert d == Decision([], Phase.COMPLETED)


def test_crashed_control_plane_still_configured_waits() -> None:
    c = cluster([A, B, C])
    s = with_node(healthy(c, [A, B, C]), NodeStatus(C, ssh_ok=False))
    s = with_member(s, member(C, healthy=False))
    d = run(c, s)
    assert d.operators == [] and d.phase is Phase.ETCD_WAIT


# ---------------------------------------------------------------------------
# Scale 3 -> 5 -> 3
# ---------------------------------------------------------------------------


def test_scale_up_adds_one_learner() -> None:
    c = cluster([A, B, C, D, E])
    s = healthy(c, [A, B, C])
    d = run(c, s)
    op = only(d, EtcdAddMemberOp, [D])
    assert d.phase is Phase.ETCD_MAINTAIN and d.blocked == []
    assert isinstance(op, EtcdAddMemberOp) and [m.address for m in op.members] == [A, B, C]


def test_scale_up_promotes_caught_up_learner_before_next_add() -> None:
    c = cluster([A, B, C, D, E])
    s = with_node(healthy(c, [A, B, C]), running(c, D))
    s = with_member(s, member(D, learner=True, raft_index=4999))
    d = run(c, s)
    op = only(d, EtcdPromoteOp, [D])
    assert isinstance(op, EtcdPromoteOp) and op.member.address == D
    assert d.phase is Phase.ETCD_MAINTAIN


def test_scale_up_lagging_learner_blocks_promotion_and_next_add() -> None:
    c = cluster([A, B, C, D, E])
    s = with_node(healthy(c, [A, B, C]), running(c, D))
    s = with_member(s, member(D, learner=True, raft_index=1))
    d = run(c, s)
    assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {"learner-caught-up": (D,)}


def test_scale_up_adds_next_after_promotion() -> None:
    c = cluster([A, B, C, D, E])
    d = run(c, healthy(c, [A, B, C, D]))
    only(d, EtcdAddMemberOp, [E])


def test_scale_down_removes_one_member_at_a_time_then_destroys_data() -> None:
    c = cluster([A, B, C], [D, E])
    s = healthy(c, [A, B, C, D, E])
    d = run(c, s)
    op = only(d, EtcdRemoveMemberOp, [D])
    assert isinstance(op, EtcdRemoveMemberOp)
    assert op.node == node_of(c, D) and op.move_leader_to is None
    assert d.phase is Phase.ETCD_MAINTAIN

    s = without_member(s, D)  # D still has its data and runs etcd
    only(run(c, s), EtcdRemoveMemberOp, [E])

    s = without_member(s, E)
    only(run(c, s), EtcdDestroyDataOp, [D])
    s = with_node(s, clean(D))
    only(run(c, s), EtcdDestroyDataOp, [E])
    s = with_node(s, clean(E))
    assert run(c, s) == Decision([], Phase.COMPLETED)


def test_removing_the_leader_moves_leadership_first() -> None:
    c = cluster([B, C, D], [A])
    s = healthy(c, [A, B, C, D])  # A leads
    op = only(run(c, s), EtcdRemoveMemberOp, [A])
    assert isinstance(op, EtcdRemoveMemberOp)
    assert op.move_leader_to is not None and op.move_leader_to.address == B


def test_removal_waits_for_lagging_members() -> None:
    c = cluster([A, B, C], [D])
    s = with_member(healthy(c, [A, B, C, D]), member(B, raft_index=1))
    d = run(c, s)
    assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {"cluster-healthy-and-in-sync": (B,)}


# ---------------------------------------------------------------------------
# Replace a crashed control plane; sshd stopped
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("keep_as_worker", [False, True])
def test_replace_crashed_control_plane(keep_as_worker: bool) -> None:
    c = cluster([B, C, D], [A] if keep_as_worker else [])
    s = healthy(c, [B, C], [NodeStatus(A, ssh_ok=False), clean(D)])
    s = with_member(s, member(A, healthy=False, raft_index=0))
    d = run(c, s)
    op = only(d, EtcdRemoveMemberOp, [A])
    assert isinstance(op, EtcdRemoveMemberOp)
    assert op.node is None and op.move_leader_to is None  # A is unreachable: API only
    assert d.phase is Phase.ETCD_MAINTAIN and d.blocked == []

    s = without_member(s, A)
    only(run(c, s), EtcdAddMemberOp, [D])


def test_sshd_stopped_blocks_membership_changes_only() -> None:
    c = cluster([A, B, C, D])  # D is to be added
    s = healthy(c, [A, B, C], [clean(D)])
    s = with_node(s, running(c, C, ssh_ok=False))  # its etcd still healthy
    d = run(c, s)
    assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {"all-control-planes-reachable": (C,)}

    # A killed etcd elsewhere is still started: starting is no membership change.
    s2 = with_member(with_node(s, running(c, B, etcd_running=False)), member(B, healthy=False))
    only(run(c, s2), EtcdStartOp, [B])

    # An outdated member elsewhere is still restarted, with the add reported as blocked.
    s3 = with_node(s, running(c, B, etcd_digest=OLD_DIGEST))
    d3 = run(c, s3)
    only(d3, EtcdRestartOp, [B])
    assert d3.phase is Phase.ETCD_MAINTAIN
    assert rules(d3) == {"all-control-planes-reachable": (C,)}


def test_sshd_stopped_without_pending_work_is_completed() -> None:
    c = cluster([A, B, C])
    s = with_node(healthy(c, [A, B, C]), running(c, C, ssh_ok=False))
    assert run(c, s) == Decision([], Phase.COMPLETED)


# ---------------------------------------------------------------------------
# Wiped data dir, stale data
# ---------------------------------------------------------------------------


def test_wiped_data_dir_removes_then_re_adds_member() -> None:
    c = cluster([A, B, C])
    s = with_node(healthy(c, [A, B, C]), clean(C))
    s = with_member(s, member(C, healthy=False, raft_index=0))
    d = run(c, s)
    op = only(d, EtcdRemoveMemberOp, [C])
    assert isinstance(op, EtcdRemoveMemberOp) and op.node == node_of(c, C)
    assert d.phase is Phase.ETCD_MAINTAIN

    s = without_member(s, C)
    only(run(c, s), EtcdAddMemberOp, [C])


def test_unstarted_learner_is_removed_and_re_added() -> None:
    # The add operation died after MemberAdd: a nameless learner, nothing on the node.
    c = cluster([A, B, C, D])
    s = healthy(c, [A, B, C], [clean(D)])
    s = with_member(s, dataclasses.replace(member(D, learner=True, healthy=False), name=""))
    only(run(c, s), EtcdRemoveMemberOp, [D])


def test_desired_control_plane_with_stale_data_is_cleaned_before_add() -> None:
    c = cluster([A, B, C, D])
    s = healthy(c, [A, B, C], [running(c, D, etcd_running=False)])
    only(run(c, s), EtcdDestroyDataOp, [D])
    only(run(c, with_node(s, clean(D))), EtcdAddMemberOp, [D])


def test_destroy_data_skips_host_key_mismatch() -> None:
    c = cluster([A, B, C], [D])
    s = healthy(c, [A, B, C], [clean(D, etcd_has_data=True, host_key_mismatch=True)])
    d = run(c, s)
    assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {"host-key-verified": (D,)}


def peer(address: str) -> str:
    return f"https://{address}:2380"


def test_alias_of_a_member_is_never_wiped_and_blocks_membership() -> None:
    # Issue 10: worker D's address reaches C's sshd (a second NIC, a forwarder). Seen
    # through D, C's etcd data looks like a non-member's; wiping it destroyed C's replica.
    for cps in ([A, B, C], [C]):
        c = cluster(cps, [D])
        alias = running(c, C, identity="SHA256:c", etcd_peer_url=peer(C), etcd_digest=None)
        s = healthy(c, cps)
        s = with_node(s, running(c, C, identity="SHA256:c", etcd_peer_url=peer(C)))
        s = with_node(s, dataclasses.replace(alias, address=D))
        d = run(c, s)
        assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED, d
        assert rules(d) == {"one-entry-per-machine": (C, D)}


def test_alias_blocks_membership_changes_elsewhere() -> None:
    # A fourth control plane waits to be added; D and E are one machine: nothing changes.
    c = cluster([A, B, C, F], [D, E])
    s = healthy(c, [A, B, C])
    s = with_node(s, clean(D, identity="SHA256:x"))
    s = with_node(s, clean(E, identity="SHA256:x"))
    d = run(c, s)
    assert d.operators == []
    assert rules(d) == {"one-entry-per-machine": (D, E)}
    # With distinct identities, F is added.
    only(run(c, with_node(s, clean(E, identity="SHA256:e"))), EtcdAddMemberOp, [F])


def test_data_started_as_a_current_member_is_kept() -> None:
    # Even when the identities differ (say, host keys copied between machines), data whose
    # spec record names a current member's peer URL is that member's: it is kept.
    c = cluster([A, B, C], [D])
    s = healthy(c, [A, B, C], [clean(D, etcd_has_data=True, etcd_peer_url=peer(B))])
    s = with_member(s, dataclasses.replace(member(B), peer_urls=(peer(B),)))
    d = run(c, s)
    assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {"destroy-only-non-members": (B, D)}
    # Data of a former member (not in the list any more) is wiped.
    s = with_node(s, clean(D, etcd_has_data=True, etcd_peer_url=peer(E)))
    only(run(c, s), EtcdDestroyDataOp, [D])


def test_destroy_data_runs_while_membership_is_blocked() -> None:
    c = cluster([A, B, C, E], [D])
    s = healthy(c, [A, B, C], [clean(D, etcd_has_data=True), NodeStatus(E, ssh_ok=False)])
    d = run(c, s)
    only(d, EtcdDestroyDataOp, [D])
    assert d.phase is Phase.ETCD_MAINTAIN
    assert rules(d) == {"all-control-planes-reachable": (E,)}


# ---------------------------------------------------------------------------
# Restart outdated members
# ---------------------------------------------------------------------------


def test_restart_one_outdated_member_leader_last() -> None:
    c = cluster([A, B, C])
    s = healthy(c, [A, B, C])
    for a in (A, C):
        s = with_node(s, running(c, a, etcd_digest=OLD_DIGEST))
    op = only(run(c, s), EtcdRestartOp, [C])
    assert isinstance(op, EtcdRestartOp) and op.move_leader_to is None


def test_restart_leader_moves_leadership() -> None:
    c = cluster([A, B, C])
    s = with_node(healthy(c, [A, B, C]), running(c, A, etcd_digest=None))
    op = only(run(c, s), EtcdRestartOp, [A])
    assert isinstance(op, EtcdRestartOp)
    assert op.move_leader_to is not None and op.move_leader_to.address == B


def test_restart_waits_until_previous_member_caught_up() -> None:
    c = cluster([A, B, C])
    s = with_node(healthy(c, [A, B, C]), running(c, C, etcd_digest=OLD_DIGEST))
    s = with_member(s, member(B, raft_index=1))  # B was just restarted, still catching up
    d = run(c, s)
    assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {"cluster-healthy-and-in-sync": (B,)}


# ---------------------------------------------------------------------------
# Rule 5 inside the decision: add first, then remove
# ---------------------------------------------------------------------------


def test_healthy_member_is_replaced_add_and_promote_first() -> None:
    # Issue 11, point 3: A is retiring (healthy) and replaced by D. CKE removes A first,
    # leaving a 2-voter cluster for the whole replacement; here D joins first.
    c = cluster([B, C, D], [A])
    s = healthy(c, [A, B, C], [clean(D)])
    d = run(c, s)
    only(d, EtcdAddMemberOp, [D])
    assert d.blocked == []
    s = with_member(s, member(D, learner=True))
    s = with_node(s, running(c, D))
    only(run(c, s), EtcdPromoteOp, [D])
    s = with_member(s, member(D))
    only(run(c, s), EtcdRemoveMemberOp, [A])


def test_healthy_member_stays_while_its_replacement_cannot_join() -> None:
    c = cluster([B, C, D], [A])
    s = healthy(c, [A, B, C], [clean(D, ssh_ok=False)])  # D is unreachable
    d = run(c, s)
    assert d.operators == [] and d.phase is ETCD_MAINTAIN_ABORTED
    assert rules(d) == {
        "all-control-planes-reachable": (D,),
        "replacement-added-first": (A, D),
    }


def test_dead_member_is_removed_before_its_replacement_joins() -> None:
    c = cluster([B, C, D], [A])
    s = healthy(c, [B, C], [clean(D), NodeStatus(A, ssh_ok=False)])
    s = with_member(s, member(A, healthy=False, raft_index=0))
    only(run(c, s), EtcdRemoveMemberOp, [A])


def test_losing_majority_config_adds_before_removing() -> None:
    c = cluster([A, D, E], [B, C])
    s = healthy(c, [A, B, C], [clean(D), clean(E)])
    d = run(c, s)
    only(d, EtcdAddMemberOp, [D])
    assert d.phase is Phase.ETCD_MAINTAIN and d.blocked == []

    # With D and E voters, A, D, E keep 3 of 5: removals proceed.
    s = healthy(c, [A, B, C, D, E])
    only(run(c, s), EtcdRemoveMemberOp, [B])


def test_phase_value_for_maintain_aborted() -> None:
    assert ETCD_MAINTAIN_ABORTED.value == "etcd-maintain-aborted"


# ---------------------------------------------------------------------------
# Properties over random statuses
# ---------------------------------------------------------------------------

ADDRESSES = [f"10.0.1.{i}" for i in range(1, 8)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Cluster, ClusterStatus]:
    n = draw(st.integers(1, 7))
    addresses = ADDRESSES[:n]
    cp_flags = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if not any(cp_flags):
        cp_flags[0] = True
    in_config = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    nodes = [
        Node(address=a, user="root", control_plane=cp)
        for a, cp, keep in zip(addresses, cp_flags, in_config, strict=True)
        if keep or cp
    ]
    c = Cluster(name="c", service_subnet="10.68.0.0/16", nodes=nodes)
    configured = {x.address: x for x in nodes}

    # How troubled this cluster is: 0 (all well) .. 3 (a lot fails).
    trouble = draw(st.integers(0, 3))

    def rarely() -> bool:
        return draw(st.integers(0, 7)) == 0

    def fails() -> bool:
        return draw(st.integers(0, 5)) < trouble

    members: list[EtcdMember] = []
    for a in addresses:
        if draw(st.integers(0, 3)) != 0:
            members.append(
                EtcdMember(
                    id=int(a.rsplit(".", 1)[1]),
                    name="" if rarely() else a,
                    address=a,
                    learner=draw(st.integers(0, 3)) == 0,
                    healthy=not fails(),
                    raft_index=0 if fails() else 5000,
                    peer_urls=(f"https://{a}:2380",),
                )
            )
    voter_ids = [m.id for m in members if not m.learner]
    leader_id = None
    if voter_ids and not rarely():
        leader_id = draw(st.sampled_from(voter_ids))
        members = [
            dataclasses.replace(m, healthy=True, raft_index=5000) if m.id == leader_id else m
            for m in members
        ]
    reachable = bool(members) and not rarely()
    etcd = EtcdStatus(
        reachable=reachable,
        members=tuple(members) if reachable else (),
        leader_id=leader_id if reachable else None,
    )

    node_statuses: list[NodeStatus] = []
    member_addresses = {m.address for m in members}
    for a in addresses:
        if rarely():
            continue  # unknown node
        dig = draw(st.sampled_from(["desired", "desired", "old", "none"]))
        d = (
            desired_etcd_digest(configured[a], c)
            if dig == "desired" and a in configured
            else (None if dig == "none" else OLD_DIGEST)
        )
        has_etcd = a in member_addresses
        # Rarely, a node is another one's machine (same identity, its etcd record).
        machine = draw(st.sampled_from(addresses)) if rarely() else a
        node_statuses.append(
            NodeStatus(
                a,
                ssh_ok=not fails(),
                host_key_mismatch=rarely(),
                etcd_running=has_etcd != fails(),
                etcd_digest=d,
                etcd_has_data=has_etcd != fails(),
                identity=f"SHA256:{machine}",
                etcd_peer_url=f"https://{machine}:2380",
            )
        )
    return c, ClusterStatus(nodes={x.address: x for x in node_statuses}, etcd=etcd)


@settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(scenarios())
def test_decision_safety_properties(scenario: tuple[Cluster, ClusterStatus]) -> None:
    c, s = scenario
    d = decide(c, Constraints(), s)
    again = decide(c, Constraints(), s)  # deterministic
    assert (again.phase, again.blocked) == (d.phase, d.blocked)
    assert [(o.name, o.targets) for o in again.operators] == [
        (o.name, o.targets) for o in d.operators
    ]
    etcd = s.etcd
    member_addresses = {m.address for m in etcd.members}
    mismatched = {a for a, ns in s.nodes.items() if ns.host_key_mismatch}
    cps = c.control_planes
    same_machine = same_machine_addresses(s)
    voters = etcd.voters

    # At most one membership change per decision.
    assert sum(isinstance(op, MEMBERSHIP_OPS) for op in d.operators) <= 1
    assert len(d.operators) <= 1

    for op in d.operators:
        # A node with another host key, or reached under two entries, is sent nothing.
        assert not set(op.targets) & mismatched
        if isinstance(op, EtcdRemoveMemberOp):  # the member is removed through the API
            touched = {op.node.address} if op.node is not None else set()
        else:
            touched = set(op.targets)
        assert not touched & same_machine
        if isinstance(op, MEMBERSHIP_OPS):
            assert not same_machine & {n.address for n in c.nodes}

        if isinstance(op, EtcdRemoveMemberOp) and not op.member.learner:
            remaining = [v for v in voters if v.id != op.member.id]
            assert sum(v.healthy for v in remaining) >= quorum(len(remaining))
            if op.member.healthy and op.member.address not in {n.address for n in cps}:
                # A healthy member being replaced leaves only after its replacement.
                assert {n.address for n in cps} <= {v.address for v in voters}
        if isinstance(op, EtcdRestartOp):
            m = etcd.member(op.node.address)
            assert m is not None
            if not m.learner:
                others = [v for v in voters if v.id != m.id]
                assert sum(v.healthy for v in others) >= quorum(len(voters))
        if isinstance(op, EtcdDestroyDataOp):
            # Data of a current member is never destroyed, under any of its addresses.
            assert etcd.reachable and op.node.address not in member_addresses
            owner = s.nodes[op.node.address].etcd_peer_url
            assert not any(owner in m.peer_urls for m in etcd.members)
        if isinstance(op, EtcdPromoteOp):
            assert op.member.learner and etcd.in_sync(op.member)
        if isinstance(op, EtcdAddMemberOp):
            assert not any(m.learner for m in etcd.members)
            assert op.node.address not in member_addresses
        if isinstance(op, EtcdBootstrapOp):
            assert not any(ns.etcd_has_data for ns in s.nodes.values())
        if isinstance(op, (EtcdRemoveMemberOp, EtcdRestartOp)) and op.move_leader_to:
            assert etcd.in_sync(op.move_leader_to) and not op.move_leader_to.learner
        if isinstance(op, (EtcdRemoveMemberOp, EtcdRestartOp)):
            subject = (
                op.member if isinstance(op, EtcdRemoveMemberOp) else etcd.member(op.targets[0])
            )
            leader = etcd.leader
            if subject is not None and leader is not None and leader.id == subject.id:
                assert op.move_leader_to is not None

    # Every refusal names a known rule.
    known = {
        "host-key-verified",
        "all-control-planes-reachable",
        "cluster-healthy-and-in-sync",
        "keep-quorum",
        "destroy-only-non-members",
        "keep-etcd-majority",
        "learner-caught-up",
        "leader-moved-first",
        "one-entry-per-machine",
        "replacement-added-first",
        "etcd-quorum-lost",
        "restore-snapshot-usable",
        "restore-only-after-quorum-loss",
    }
    assert {b.rule for b in d.blocked} <= known
    if not d.operators and d.blocked:
        assert d.phase in (Phase.ETCD_BOOT_ABORTED, ETCD_MAINTAIN_ABORTED, Phase.ETCD_WAIT)
