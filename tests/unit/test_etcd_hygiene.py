"""etcd hygiene: defragmentation of fragmented members and recovery from NOSPACE.

The trigger (``DefragPolicy``), the rules (``defrag-when-in-sync``, ``etcd-nospace``),
the decision's choices and the operators' commands; pure, no etcd.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from cke.cli.cke_main import FlagError, build_parser, defrag_policy, parse_size
from cke.cluster import Cluster, Constraints, Node
from cke.etcdadmin import _is_nospace_error
from cke.op.base import Commander, Operator
from cke.op.etcd import EtcdDefragOp, EtcdNospaceRecoveryOp, desired_etcd_digest
from cke.op.rivers import RiversOp
from cke.server.clusterstatus import (
    ALARM_NOSPACE,
    ClusterStatus,
    DefragPolicy,
    EtcdMember,
    EtcdStatus,
    NodeStatus,
)
from cke.server.control import RULE_VAULT_AVAILABLE, held_for_vault
from cke.server.phases import Phase
from cke.server.safety import (
    RULE_DEFRAG_WHEN_IN_SYNC,
    RULE_ETCD_NOSPACE,
    defrag_when_in_sync,
    etcd_nospace,
)
from cke.server.strategy import ETCD_MAINTAIN_ABORTED, Decision, decide
from tests.unit.etcd_builders import member

pytestmark = pytest.mark.unit

A, B, C = (f"10.0.0.{i}" for i in range(1, 4))
MiB = 1024 * 1024
# Small thresholds, as the e2e test uses: 1 MiB, less than half in use.
POLICY = DefragPolicy(min_db_size=1 * MiB, in_use_ratio=0.5)


def sized(m: EtcdMember, size: int, in_use: int) -> EtcdMember:
    return dataclasses.replace(m, db_size=size, db_size_in_use=in_use)


FRAGMENTED = (8 * MiB, 2 * MiB)
COMPACT = (8 * MiB, 7 * MiB)


def cluster() -> Cluster:
    nodes = [Node(address=a, user="root", control_plane=True) for a in (A, B, C)]
    return Cluster(name="c", service_subnet="10.68.0.0/16", nodes=nodes)


def status(
    members: Sequence[EtcdMember],
    alarms: tuple[tuple[int, str], ...] = (),
    policy: DefragPolicy = POLICY,
) -> ClusterStatus:
    c = cluster()
    nodes = {
        n.address: NodeStatus(
            n.address,
            ssh_ok=True,
            etcd_running=True,
            etcd_digest=desired_etcd_digest(n, c),
            etcd_has_data=True,
        )
        for n in c.nodes
    }
    leader = next((m.id for m in members if m.leader), None)
    etcd = EtcdStatus(reachable=True, members=tuple(members), leader_id=leader, alarms=alarms)
    return ClusterStatus(nodes=nodes, etcd=etcd, defrag=policy)


def three(
    a: tuple[int, int] = COMPACT, b: tuple[int, int] = COMPACT, c: tuple[int, int] = COMPACT
) -> list[EtcdMember]:
    """A leads; B and C follow."""
    return [
        sized(member(A, leader=True), *a),
        sized(member(B), *b),
        sized(member(C), *c),
    ]


def run(s: ClusterStatus) -> Decision:
    return decide(cluster(), Constraints(), s)


def rules(d: Decision) -> dict[str, tuple[str, ...]]:
    return {b.rule: b.nodes for b in d.blocked}


# ---------------------------------------------------------------------------
# The trigger
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "in_use", "fragmented"),
    [
        (8 * MiB, 2 * MiB, True),  # a quarter in use
        (8 * MiB, 4 * MiB, False),  # exactly half: not less than half
        (8 * MiB, 7 * MiB, False),
        (512 * 1024, 1024, False),  # below the floor
        (0, 0, False),  # unknown (the member did not answer)
    ],
)
def test_fragmented_needs_the_floor_and_the_ratio(size: int, in_use: int, fragmented: bool) -> None:
    assert POLICY.fragmented(sized(member(A), size, in_use)) is fragmented


def test_ratio_zero_never_defragments() -> None:
    assert not DefragPolicy(0, 0.0).fragmented(sized(member(A), 8 * MiB, 0))


def test_default_floor_is_100_mib() -> None:
    policy = DefragPolicy()
    assert not policy.fragmented(sized(member(A), 99 * MiB, 1 * MiB))
    assert policy.fragmented(sized(member(A), 100 * MiB, 1 * MiB))


# ---------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------


def test_defrag_when_in_sync_allows_a_calm_cluster() -> None:
    assert defrag_when_in_sync(status(three())) is None


def test_defrag_when_in_sync_refuses_a_lagging_member() -> None:
    members = three()
    members[2] = dataclasses.replace(members[2], raft_index=1)
    blocked = defrag_when_in_sync(status(members))
    assert blocked is not None
    assert blocked.rule == RULE_DEFRAG_WHEN_IN_SYNC and blocked.nodes == (C,)


def test_defrag_when_in_sync_refuses_a_down_learner() -> None:
    members = [*three()[:2], member(C, learner=True, healthy=False)]
    blocked = defrag_when_in_sync(status(members))
    assert blocked is not None and blocked.nodes == (C,)


def test_defrag_when_in_sync_refuses_without_a_leader() -> None:
    members = [dataclasses.replace(m, leader=False) for m in three()]
    blocked = defrag_when_in_sync(status(members))
    assert blocked is not None and blocked.rule == RULE_DEFRAG_WHEN_IN_SYNC
    assert "no healthy leader" in blocked.message


def test_etcd_nospace_is_silent_without_the_alarm() -> None:
    assert etcd_nospace(status(three(), alarms=((2, "CORRUPT"),))) is None


def test_etcd_nospace_names_the_alarmed_and_the_silent_members() -> None:
    members = three()
    members[2] = dataclasses.replace(members[2], healthy=False)
    blocked = etcd_nospace(status(members, alarms=((1, ALARM_NOSPACE), (2, ALARM_NOSPACE))))
    assert blocked is not None
    assert blocked.rule == RULE_ETCD_NOSPACE and blocked.nodes == (A, B)
    assert "refuses writes" in blocked.message and "defragments every member" in blocked.message
    assert f"{C} do not answer" in blocked.message


def test_nospace_alarm_strings_are_not_ill_health() -> None:
    assert _is_nospace_error("memberID:10276657743932975437 alarm:NOSPACE ")
    assert not _is_nospace_error("memberID:1 alarm:CORRUPT ")
    assert not _is_nospace_error("etcdserver: no leader")


# ---------------------------------------------------------------------------
# The decision: routine defragmentation
# ---------------------------------------------------------------------------


def test_nothing_fragmented_is_completed() -> None:
    d = run(status(three()))
    assert d.phase == Phase.COMPLETED and d.operators == []


def test_followers_first_one_at_a_time() -> None:
    d = run(status(three(a=FRAGMENTED, b=FRAGMENTED, c=FRAGMENTED)))
    assert d.phase == Phase.ETCD_MAINTAIN
    (op,) = d.operators
    assert isinstance(op, EtcdDefragOp) and op.targets == [B]
    # B done: C next; the leader last.
    d = run(status(three(a=FRAGMENTED, c=FRAGMENTED)))
    assert d.operators[0].targets == [C]
    d = run(status(three(a=FRAGMENTED)))
    (op,) = d.operators
    assert isinstance(op, EtcdDefragOp) and op.targets == [A]
    assert [c.info.name for c in _commands(op)] == ["etcd-defragment", "wait-etcd-healthy"]


def test_learners_are_not_defragmented() -> None:
    """etcd serves a learner only Status and serializable reads."""
    learner = sized(member(C, learner=True), *FRAGMENTED)
    d = run(status([*three()[:2], learner]))
    assert not any(isinstance(op, EtcdDefragOp) for op in d.operators), d  # it is promoted
    d = run(status([*three()[:2], learner], alarms=((1, ALARM_NOSPACE),)))
    assert d.operators[0].targets == [B, A]


def test_no_defrag_while_a_member_lags() -> None:
    members = three(b=FRAGMENTED)
    members[2] = dataclasses.replace(members[2], raft_index=1)
    d = run(status(members))
    assert d.operators == []
    assert d.phase == ETCD_MAINTAIN_ABORTED
    assert rules(d) == {RULE_DEFRAG_WHEN_IN_SYNC: (C,)}


def test_thresholds_come_from_the_status() -> None:
    off = DefragPolicy(min_db_size=100 * MiB, in_use_ratio=0.5)
    assert run(status(three(b=FRAGMENTED), policy=off)).phase == Phase.COMPLETED


def test_defrag_comes_before_rivers() -> None:
    s = dataclasses.replace(status(three(b=FRAGMENTED)), rivers_app=b"app")
    assert isinstance(run(s).operators[0], EtcdDefragOp)
    s = dataclasses.replace(status(three()), rivers_app=b"app")
    assert isinstance(run(s).operators[0], RiversOp)


# ---------------------------------------------------------------------------
# The decision: NOSPACE
# ---------------------------------------------------------------------------


def test_nospace_compacts_defragments_all_followers_first_then_disarms() -> None:
    d = run(status(three(), alarms=((1, ALARM_NOSPACE),)))
    assert d.phase == Phase.ETCD_MAINTAIN
    (op,) = d.operators
    assert isinstance(op, EtcdNospaceRecoveryOp)
    assert op.targets == [B, C, A]
    steps = [(c.info.name, c.info.target) for c in _commands(op)]
    assert steps == [
        ("etcd-compact", f"{A},{B},{C}"),
        ("etcd-defragment", B),
        ("wait-etcd-healthy", B),
        ("etcd-defragment", C),
        ("wait-etcd-healthy", C),
        ("etcd-defragment", A),
        ("wait-etcd-healthy", A),
        ("etcd-alarm-disarm", f"{A},{B},{C}"),
    ]
    assert rules(d) == {RULE_ETCD_NOSPACE: (A,)}


def test_nospace_goes_before_other_maintenance_and_skips_silent_members() -> None:
    members = three(b=FRAGMENTED)
    members[2] = dataclasses.replace(members[2], healthy=False)
    d = run(status(members, alarms=((1, ALARM_NOSPACE),)))
    (op,) = d.operators
    assert isinstance(op, EtcdNospaceRecoveryOp) and op.targets == [B, A]


def test_nospace_recovery_and_defragmentation_go_on_while_vault_is_away() -> None:
    nospace = run(status(three(), alarms=((1, ALARM_NOSPACE),)))
    assert held_for_vault(nospace, "sealed") == nospace
    defrag = run(status(three(b=FRAGMENTED)))
    assert isinstance(defrag.operators[0], EtcdDefragOp)
    assert held_for_vault(defrag, "sealed") == defrag
    # What needs Vault is held, as before.
    s = dataclasses.replace(status(three()), rivers_app=b"app")
    held = held_for_vault(run(s), "sealed")
    assert held.operators == [] and RULE_VAULT_AVAILABLE in rules(held)


def test_nospace_without_a_leader_waits_and_says_so() -> None:
    members = [dataclasses.replace(m, leader=False) for m in three()]
    d = run(status(members, alarms=((1, ALARM_NOSPACE),)))
    assert d.operators == [] and d.phase == Phase.ETCD_WAIT
    assert RULE_ETCD_NOSPACE in rules(d)


def _commands(op: Operator) -> list[Commander]:
    found: list[Commander] = []
    while (command := op.next_command()) is not None:
        found.append(command)
    return found


# ---------------------------------------------------------------------------
# The flags
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("104857600", 100 * MiB), ("100MiB", 100 * MiB), ("2GiB", 2048 * MiB), ("512KiB", 512 << 10)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text, "--x") == size


@pytest.mark.parametrize("text", ["", "1.5MiB", "10MB", "-1", "MiB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(FlagError, match="--x: not a size"):
        parse_size(text, "--x")


def test_flags_default_and_bounds() -> None:
    assert defrag_policy(build_parser().parse_args([])) == DefragPolicy(100 * MiB, 0.5)
    args = build_parser().parse_args(
        ["--etcd-defrag-min-db-size", "1MiB", "--etcd-defrag-in-use-ratio", "0.9"]
    )
    assert defrag_policy(args) == DefragPolicy(MiB, 0.9)
    with pytest.raises(FlagError, match=r"between 0 and 0\.9"):
        defrag_policy(build_parser().parse_args(["--etcd-defrag-in-use-ratio", "0.95"]))
