"""The etcd safety predicates (``cke/server/safety.py``): each allows and refuses."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from cke.cluster import Cluster, Node
from cke.server.clusterstatus import ClusterStatus, EtcdMember, EtcdStatus, NodeStatus
from cke.server.safety import (
    RULE_ALL_CONTROL_PLANES_REACHABLE,
    RULE_CLUSTER_HEALTHY_AND_IN_SYNC,
    RULE_DESTROY_ONLY_NON_MEMBERS,
    RULE_HOST_KEY_VERIFIED,
    RULE_KEEP_ETCD_MAJORITY,
    RULE_KEEP_QUORUM,
    RULE_LEADER_MOVED_FIRST,
    RULE_LEARNER_CAUGHT_UP,
    RULE_ONE_ENTRY_PER_MACHINE,
    RULE_REPLACEMENT_ADDED_FIRST,
    Blocked,
    all_control_planes_reachable,
    check_control_plane_change,
    cluster_healthy_and_in_sync,
    destroy_only_non_members,
    host_key_verified,
    keep_etcd_majority,
    keep_quorum,
    leader_moved_first,
    leader_transfer_target,
    learner_caught_up,
    one_entry_per_machine,
    quorum,
    replacement_added_first,
    same_machine_addresses,
)
from tests.unit.etcd_builders import member

pytestmark = pytest.mark.unit

A, B, C, D, E = (f"10.0.0.{i}" for i in range(1, 6))


def cluster(cps: Sequence[str], workers: Sequence[str] = ()) -> Cluster:
    nodes = [Node(address=a, user="root", control_plane=True) for a in cps]
    nodes += [Node(address=a, user="root") for a in workers]
    return Cluster(name="c", service_subnet="10.68.0.0/16", nodes=nodes)


def status(*members: EtcdMember, nodes: Sequence[NodeStatus] = ()) -> ClusterStatus:
    leader = next((m.id for m in members if m.leader), None)
    return ClusterStatus(
        nodes={n.address: n for n in nodes},
        etcd=EtcdStatus(reachable=bool(members), members=members, leader_id=leader),
    )


def three() -> ClusterStatus:
    return status(member(A, leader=True), member(B), member(C))


def assert_blocked(b: Blocked | None, rule: str, nodes: Sequence[str]) -> None:
    assert b is not None
    assert b.rule == rule
    assert b.nodes == tuple(nodes)
    for n in nodes:
        assert n in b.message
    assert b.to_dict() == {"rule": rule, "message": b.message, "nodes": list(nodes)}


def test_quorum() -> None:
    assert [quorum(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]


# host-key-verified


def test_host_key_verified_allows_matching_and_unknown_nodes() -> None:
    st = status(nodes=[NodeStatus(A, ssh_ok=True), NodeStatus(B, ssh_ok=False)])
    assert host_key_verified(st, [A, B, C]) is None


def test_host_key_verified_refuses_mismatch() -> None:
    st = status(
        nodes=[
            NodeStatus(C, ssh_ok=False, host_key_mismatch=True),
            NodeStatus(A, ssh_ok=True),
            NodeStatus(B, ssh_ok=True, host_key_mismatch=True),
        ]
    )
    b = host_key_verified(st, [C, A, B])
    assert_blocked(b, RULE_HOST_KEY_VERIFIED, [B, C])
    assert b is not None and "host_key" in b.message
    assert host_key_verified(st, [A]) is None


# Rule 1: all-control-planes-reachable


def test_all_control_planes_reachable_allows() -> None:
    # A dead node the configuration dropped (D) is not checked.
    st = status(nodes=[NodeStatus(a, ssh_ok=True) for a in (A, B, C)] + [NodeStatus(D, False)])
    assert all_control_planes_reachable(cluster([A, B, C], [E]), st) is None


def test_all_control_planes_reachable_refuses_down_and_unknown() -> None:
    st = status(nodes=[NodeStatus(A, ssh_ok=True), NodeStatus(C, ssh_ok=False)])
    b = all_control_planes_reachable(cluster([C, B, A]), st)
    assert_blocked(b, RULE_ALL_CONTROL_PLANES_REACHABLE, [B, C])


def test_all_control_planes_reachable_leaves_host_key_to_its_rule() -> None:
    st = status(
        nodes=[NodeStatus(A, ssh_ok=True), NodeStatus(B, ssh_ok=False, host_key_mismatch=True)]
    )
    assert all_control_planes_reachable(cluster([A, B]), st) is None


# Rule 2: cluster-healthy-and-in-sync


def test_in_sync_allows_healthy_cluster() -> None:
    assert cluster_healthy_and_in_sync(three()) is None


def test_in_sync_refuses_without_leader() -> None:
    st = status(member(A), member(B))
    assert_blocked(cluster_healthy_and_in_sync(st), RULE_CLUSTER_HEALTHY_AND_IN_SYNC, [])
    assert_blocked(
        cluster_healthy_and_in_sync(ClusterStatus()), RULE_CLUSTER_HEALTHY_AND_IN_SYNC, []
    )


def test_in_sync_refuses_lagging_and_unhealthy_members() -> None:
    st = status(
        member(A, leader=True, raft_index=10_000),
        member(B, raft_index=1),
        member(C, healthy=False),
    )
    assert_blocked(cluster_healthy_and_in_sync(st), RULE_CLUSTER_HEALTHY_AND_IN_SYNC, [B, C])


def test_in_sync_excludes_the_member_being_removed() -> None:
    st = status(member(A, leader=True), member(B), member(C, healthy=False))
    assert cluster_healthy_and_in_sync(st, excluding={member(C).id}) is None


# Rule 3: keep-quorum


def test_keep_quorum_allows_removing_a_dead_member() -> None:
    st = status(member(A, leader=True), member(B), member(C, healthy=False))
    assert keep_quorum(st, member(C, healthy=False), removing=True) is None


def test_keep_quorum_allows_removing_or_stopping_healthy_in_full_cluster() -> None:
    assert keep_quorum(three(), member(C), removing=True) is None
    assert keep_quorum(three(), member(C), removing=False) is None


def test_keep_quorum_refuses_when_too_few_healthy_remain() -> None:
    st = status(member(A, leader=True), member(B), member(C, healthy=False))
    # Removing B leaves {A, C}: quorum 2, only A healthy.
    b = keep_quorum(st, member(B), removing=True)
    assert_blocked(b, RULE_KEEP_QUORUM, [B])
    assert b is not None and "removing" in b.message
    # Stopping B leaves 1 of 3 healthy.
    assert_blocked(keep_quorum(st, member(B), removing=False), RULE_KEEP_QUORUM, [B])


def test_keep_quorum_ignores_learners() -> None:
    # A learner never counts: 2 voters, one down; stopping the healthy one is refused.
    st = status(member(A, leader=True), member(B, healthy=False), member(C, learner=True))
    assert_blocked(keep_quorum(st, member(A), removing=False), RULE_KEEP_QUORUM, [A])
    # Removing or stopping the learner changes no quorum.
    assert keep_quorum(st, member(C, learner=True), removing=True) is None
    assert keep_quorum(st, member(C, learner=True), removing=False) is None


def test_keep_quorum_refuses_removing_the_last_member() -> None:
    st = status(member(A, leader=True))
    assert_blocked(keep_quorum(st, member(A), removing=True), RULE_KEEP_QUORUM, [A])


# Rule 4: destroy-only-non-members


def test_destroy_only_non_members_allows_non_member() -> None:
    assert destroy_only_non_members(three(), D) is None


def test_destroy_only_non_members_refuses_member_and_unknown_membership() -> None:
    assert_blocked(destroy_only_non_members(three(), B), RULE_DESTROY_ONLY_NON_MEMBERS, [B])
    assert_blocked(destroy_only_non_members(ClusterStatus(), D), RULE_DESTROY_ONLY_NON_MEMBERS, [D])


def test_destroy_only_non_members_refuses_data_started_as_a_current_member() -> None:
    b_member = dataclasses.replace(member(B), peer_urls=(f"https://{B}:2380",))
    st = status(member(A, leader=True), b_member, member(C))
    alias = NodeStatus(D, ssh_ok=True, etcd_has_data=True, etcd_peer_url=f"https://{B}:2380")
    st = dataclasses.replace(st, nodes={D: alias})
    assert_blocked(destroy_only_non_members(st, D), RULE_DESTROY_ONLY_NON_MEMBERS, [B, D])
    former = dataclasses.replace(alias, etcd_peer_url=f"https://{E}:2380")
    assert destroy_only_non_members(dataclasses.replace(st, nodes={D: former}), D) is None


# one-entry-per-machine


def test_one_entry_per_machine_allows_distinct_and_unknown_identities() -> None:
    st = status(
        nodes=[
            NodeStatus(A, ssh_ok=True, identity="SHA256:a"),
            NodeStatus(B, ssh_ok=True, identity="SHA256:b"),
            NodeStatus(C, ssh_ok=True),
            NodeStatus(D, ssh_ok=True),
            NodeStatus(E, ssh_ok=False, identity="SHA256:a"),  # stale: not reached now
        ]
    )
    assert same_machine_addresses(st) == frozenset()
    assert one_entry_per_machine(st, [A, B, C, D, E]) is None


def test_one_entry_per_machine_refuses_two_entries_of_one_machine() -> None:
    st = status(
        nodes=[
            NodeStatus(A, ssh_ok=True, identity="SHA256:a"),
            NodeStatus(B, ssh_ok=True, identity="SHA256:x"),
            NodeStatus(D, ssh_ok=True, identity="SHA256:x"),
        ]
    )
    assert same_machine_addresses(st) == {B, D}
    assert one_entry_per_machine(st, [A]) is None
    assert_blocked(one_entry_per_machine(st, [D]), RULE_ONE_ENTRY_PER_MACHINE, [B, D])
    assert_blocked(one_entry_per_machine(st, [A, B, D]), RULE_ONE_ENTRY_PER_MACHINE, [B, D])


# Rule 5: keep-etcd-majority


def test_control_plane_change_allows_before_bootstrap() -> None:
    assert check_control_plane_change([], cluster([D])) is None


@pytest.mark.parametrize(
    ("current", "new"),
    [
        ([A, B, C], [A, B, C]),
        ([A, B, C], [A, B, D]),  # replace one control plane
        ([A, B, C], [A, B, C, D, E]),  # scale up
        ([A, B, C, D, E], [A, B, C]),  # scale down keeping 3 of 5
        ([A, B, C], [B, C]),
    ],
)
def test_control_plane_change_allows_keeping_a_majority(current: list[str], new: list[str]) -> None:
    assert check_control_plane_change(current, cluster(new)) is None


def test_control_plane_change_refuses_losing_the_majority() -> None:
    b = check_control_plane_change([A, B, C], cluster([A, D, E], [B, C]))
    assert_blocked(b, RULE_KEEP_ETCD_MAJORITY, [B, C])
    assert b is not None
    assert b.message == (
        "the new control planes keep 1 of the 3 current etcd members (dropping 10.0.0.2, "
        "10.0.0.3); a majority (2) must stay, or the cluster loses quorum and its data. "
        "Replace one control plane at a time."
    )


def test_control_plane_change_refuses_dropping_half() -> None:
    b = check_control_plane_change([A, B, C, D], cluster([A, B, E]))
    assert_blocked(b, RULE_KEEP_ETCD_MAJORITY, [C, D])


def test_keep_etcd_majority_uses_voters_only() -> None:
    st = status(member(A, leader=True), member(B), member(C), member(D, learner=True))
    assert keep_etcd_majority(st, cluster([A, B, E])) is None
    assert_blocked(keep_etcd_majority(st, cluster([A, D, E])), RULE_KEEP_ETCD_MAJORITY, [B, C])


# Rule 6: learner-caught-up


def test_learner_caught_up_allows_in_sync_learner() -> None:
    st = status(member(A, leader=True), member(D, learner=True, raft_index=4990))
    assert learner_caught_up(st, st.etcd.members[1]) is None


@pytest.mark.parametrize(
    "newcomer",
    [
        member(D, learner=True, raft_index=1),
        member(D, learner=True, healthy=False),
        member(D),  # already a voter
    ],
)
def test_learner_caught_up_refuses(newcomer: EtcdMember) -> None:
    st = status(member(A, leader=True), newcomer)
    assert_blocked(learner_caught_up(st, newcomer), RULE_LEARNER_CAUGHT_UP, [D])


# Rule 7: leader-moved-first


def test_leader_transfer_target_picks_in_sync_voter() -> None:
    st = status(
        member(C, leader=True),
        member(B, raft_index=1),  # lagging
        member(A, learner=True),  # learners cannot lead
        member(D),
    )
    target = leader_transfer_target(st, member(C))
    assert target is not None and target.address == D
    assert leader_transfer_target(status(member(A, leader=True)), member(A)) is None


def test_leader_moved_first_allows_non_leader_and_movable_leader() -> None:
    assert leader_moved_first(three(), member(B)) is None
    assert leader_moved_first(three(), member(A)) is None


def test_leader_moved_first_refuses_when_no_target() -> None:
    st = status(member(A, leader=True), member(B, healthy=False), member(C, raft_index=1))
    assert_blocked(leader_moved_first(st, member(A)), RULE_LEADER_MOVED_FIRST, [A])


# Rule 8: replacement-added-first


def test_replacement_added_first_allows_when_every_control_plane_votes() -> None:
    st = status(member(A, leader=True), member(B), member(C), member(D))
    assert replacement_added_first(st, cluster([B, C, D], [A]), member(A)) is None


def test_replacement_added_first_refuses_while_a_control_plane_is_missing_or_learning() -> None:
    st = status(member(A, leader=True), member(B), member(C))
    assert_blocked(
        replacement_added_first(st, cluster([B, C, D]), member(A)),
        RULE_REPLACEMENT_ADDED_FIRST,
        [A, D],
    )
    learning = status(member(A, leader=True), member(B), member(C), member(D, learner=True))
    assert_blocked(
        replacement_added_first(learning, cluster([B, C, D]), member(A)),
        RULE_REPLACEMENT_ADDED_FIRST,
        [A, D],
    )
