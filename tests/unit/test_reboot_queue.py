"""The reboot queue: its entries (``cke/rebootqueue.py``), its safety rules, its part of
the decision, and ``ckecli reboot-queue`` parsing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest
from prometheus_client import CollectorRegistry

from cke.cli.ckecli import CLIError, build_parser
from cke.cli.rebootcmd import _index, cmd_add, cmd_cancel, cmd_list
from cke.cluster import Cluster, Constraints, Node, Reboot
from cke.op.etcd import MoveLeader
from cke.op.reboot import MarkRebooting, RebootDequeueOp, RebootOp, RunRebootCommand
from cke.rebootqueue import (
    BACKOFF_BASE_SECONDS,
    STATUS_CANCELLED,
    STATUS_QUEUED,
    STATUS_REBOOTING,
    EntryError,
    QueueStatus,
    RebootEntry,
    backoff_seconds,
    choose_candidates,
    count_by_status,
    dedup,
    parse_node_list,
)
from cke.server.clusterstatus import ClusterStatus
from cke.server.metrics import ServerMetrics
from cke.server.phases import Phase
from cke.server.safety import (
    RULE_REBOOT_COMMANDS_CONFIGURED,
    RULE_REBOOT_CONTROL_PLANE_IN_SYNC,
    RULE_REBOOT_ONE_CONTROL_PLANE_AT_A_TIME,
    RULE_REBOOT_UNREACHABLE_WITHIN_LIMIT,
    reboot_commands_configured,
    reboot_control_plane_in_sync,
    reboot_one_control_plane_at_a_time,
    reboot_unreachable_within_limit,
)
from cke.server.strategy import decide
from tests.unit.etcd_builders import member
from tests.unit.test_strategy import A, B, C, D, E, clean, healthy, rules, with_member

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 12, 2, 12, 0, 0, tzinfo=dt.UTC)
REBOOT = Reboot(reboot_command=["systemctl", "reboot"], boot_check_command=["check"])


def rcluster(reboot: Reboot = REBOOT) -> Cluster:
    nodes = [
        Node(address=a, user="root", control_plane=True, hostname=f"cp{a[-1]}") for a in (A, B, C)
    ]
    nodes += [Node(address=a, user="root", hostname=f"w{a[-1]}") for a in (D, E)]
    return Cluster(name="c", service_subnet="10.68.0.0/16", nodes=nodes, reboot=reboot)


def entry(index: int, node: str, status: str = STATUS_QUEUED, **changes: object) -> RebootEntry:
    return dataclasses.replace(RebootEntry(index, node, status), **changes)  # type: ignore[arg-type]


def queued(c: Cluster, entries: list[RebootEntry], **queue: object) -> ClusterStatus:
    s = healthy(c, [A, B, C])
    q = QueueStatus(
        entries=tuple(entries), revisions={e.index: 10 + e.index for e in entries}, now=NOW
    )
    return dataclasses.replace(s, reboots=dataclasses.replace(q, **queue))  # type: ignore[arg-type]


# -- entries ------------------------------------------------------------------------------


def test_entry_json_is_upstreams_shape() -> None:
    e = entry(3, A).rebooting(NOW.replace(microsecond=500))
    doc = e.to_dict()
    assert doc == {
        "index": "3",
        "node": A,
        "status": "rebooting",
        "last_transition_time": "2026-12-02T12:00:00Z",
    }
    assert RebootEntry.from_json(e.to_json()) == e
    # Go's zero time and a numeric index (older writers) are read too.
    go = json.dumps(
        {"index": 4, "node": B, "status": "queued", "drain_backoff_expire": "0001-01-01T00:00:00Z"}
    )
    assert RebootEntry.from_json(go) == entry(4, B)


@pytest.mark.parametrize(
    "raw",
    [
        "[]",
        "{",
        '{"index": "x", "node": "a"}',
        '{"index": "1"}',
        '{"index": "1", "node": "a", "status": "gone"}',
        '{"index": "1", "node": "a", "last_transition_time": "yesterday"}',
    ],
)
def test_bad_entries_are_refused(raw: str) -> None:
    with pytest.raises(EntryError):
        RebootEntry.from_json(raw)


def test_backoff_follows_upstream() -> None:
    assert [backoff_seconds(n) for n in range(5)] == [0, 300, 600, 1200, 1200]
    e = entry(1, D, STATUS_REBOOTING).backed_off(NOW, jitter=0.5)
    assert e.status == STATUS_QUEUED and e.drain_backoff_count == 1
    assert e.drain_backoff_expire == NOW + dt.timedelta(seconds=300 + BACKOFF_BASE_SECONDS // 2)
    assert e.backing_off(NOW) and not e.backing_off(NOW + dt.timedelta(seconds=451))
    again = e.backed_off(NOW, jitter=0.0)
    assert again.drain_backoff_count == 2
    assert again.drain_backoff_expire == NOW + dt.timedelta(seconds=600)
    reset = again.reset_backoff()
    assert reset.drain_backoff_count == 0 and not reset.backing_off(NOW)


def test_dedup_and_counts() -> None:
    entries = [entry(2, A), entry(1, A, STATUS_REBOOTING), entry(3, B, STATUS_CANCELLED)]
    assert [e.index for e in dedup(entries)] == [1, 3]
    assert count_by_status(entries) == {"queued": 1, "draining": 0, "rebooting": 1, "cancelled": 1}


def test_node_list_takes_addresses_and_hostnames() -> None:
    assert parse_node_list(f"{A}\n cp2 \t{E} {A}\n", rcluster()) == [A, B, E]


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "no node"), (f"{A} 10.9.9.9", "10.9.9.9: not a node"), ("nobody", "nobody")],
)
def test_node_list_refuses_unknown_nodes(text: str, message: str) -> None:
    with pytest.raises(EntryError, match=message):
        parse_node_list(text, rcluster())


def test_node_list_needs_a_cluster() -> None:
    with pytest.raises(EntryError, match="no cluster"):
        parse_node_list(A, None)


# -- candidates (upstream's ChooseRebootCandidates) -----------------------------------------


def choose(entries: list[RebootEntry], limit: int = 1) -> list[int]:
    nodes = {A, B, C, D, E}
    return [e.index for e in choose_candidates(entries, nodes, {A, B, C}, limit, NOW)]


def test_workers_go_before_control_planes() -> None:
    assert choose([entry(0, A), entry(1, D), entry(2, E)]) == [1]


def test_workers_up_to_the_limit() -> None:
    busy = entry(1, D, STATUS_REBOOTING)
    assert choose([busy, entry(2, E)], limit=1) == []
    assert choose([busy, entry(2, E)], limit=2) == [2]


def test_a_control_plane_alone() -> None:
    assert choose([entry(0, A), entry(1, B)]) == [0]
    assert choose([entry(0, A, STATUS_REBOOTING), entry(1, B)]) == []
    assert choose([entry(0, A), entry(1, D, STATUS_REBOOTING)]) == []
    assert choose([entry(0, A, STATUS_REBOOTING), entry(1, D)]) == []


def test_backing_off_and_foreign_entries_are_skipped() -> None:
    later = NOW + dt.timedelta(minutes=5)
    assert choose([entry(0, D, drain_backoff_expire=later), entry(1, A)]) == [1]
    assert choose([entry(0, "10.9.9.9"), entry(1, E)]) == [1]


# -- safety rules -----------------------------------------------------------------------------


def test_rule_reboot_commands_configured() -> None:
    assert reboot_commands_configured(rcluster()) is None
    blocked = reboot_commands_configured(rcluster(Reboot(reboot_command=["x"])))
    assert blocked is not None and blocked.rule == RULE_REBOOT_COMMANDS_CONFIGURED
    assert "boot_check_command" in blocked.message


def test_rule_reboot_unreachable_within_limit() -> None:
    c = rcluster()
    s = healthy(c, [A, B, C], [clean(D, ssh_ok=False)])
    blocked = reboot_unreachable_within_limit(c, s, [], 0)
    assert blocked is not None and blocked.rule == RULE_REBOOT_UNREACHABLE_WITHIN_LIMIT
    assert blocked.nodes == (D,)
    assert reboot_unreachable_within_limit(c, s, [], 1) is None
    assert reboot_unreachable_within_limit(c, s, [D], 0) is None  # its reboot is under way


def test_rule_reboot_control_plane_in_sync() -> None:
    c = rcluster()
    s = healthy(c, [A, B, C])
    assert reboot_control_plane_in_sync(s, A) is None
    lagging = with_member(s, member(B, raft_index=1, healthy=True))
    blocked = reboot_control_plane_in_sync(lagging, A)
    assert blocked is not None and blocked.rule == RULE_REBOOT_CONTROL_PLANE_IN_SYNC
    assert B in blocked.message
    no_leader = with_member(s, member(A, leader=True, healthy=False))
    assert reboot_control_plane_in_sync(no_leader, B) is not None


def test_rule_reboot_one_control_plane_at_a_time() -> None:
    cps = {A, B, C}
    assert reboot_one_control_plane_at_a_time(A, cps, []) is None
    assert reboot_one_control_plane_at_a_time(D, cps, [E]) is None  # workers together
    for address, busy in ((A, [B]), (A, [D]), (D, [A])):
        blocked = reboot_one_control_plane_at_a_time(address, cps, busy)
        assert blocked is not None and blocked.rule == RULE_REBOOT_ONE_CONTROL_PLANE_AT_A_TIME


# -- the decision ------------------------------------------------------------------------------


def test_a_queued_worker_is_rebooted() -> None:
    c = rcluster()
    d = decide(c, Constraints(), queued(c, [entry(0, A), entry(1, D)]))
    assert d.phase == Phase.REBOOT
    (op,) = d.operators
    assert isinstance(op, RebootOp) and op.targets == [D]
    steps = [op.next_command() for _ in range(3)]
    assert isinstance(steps[0], MarkRebooting) and steps[0].revision == 11
    assert isinstance(steps[1], RunRebootCommand)
    assert steps[1].argv == ["systemctl", "reboot", D]
    assert steps[2] is None


def test_the_leaders_control_plane_hands_leadership_over_first() -> None:
    c = rcluster()
    d = decide(c, Constraints(), queued(c, [entry(0, A)]))  # A leads
    (op,) = d.operators
    assert isinstance(op, RebootOp) and op.move_leader_to is not None
    assert op.move_leader_to.address == B
    assert isinstance(op.next_command(), MoveLeader)
    follower = decide(c, Constraints(), queued(c, [entry(0, B)]))
    assert isinstance(follower.operators[0], RebootOp)
    assert follower.operators[0].move_leader_to is None


def test_a_rebooting_control_plane_holds_the_next_one_back() -> None:
    c = rcluster()
    busy = entry(0, A, STATUS_REBOOTING, last_transition_time=NOW)
    d = decide(c, Constraints(), queued(c, [busy, entry(1, B)]))
    assert d.operators == [] and d.phase == Phase.REBOOT
    # Booted: the entry leaves the queue first; then B goes.
    d = decide(c, Constraints(), queued(c, [busy, entry(1, B)], booted=frozenset({A})))
    (op,) = d.operators
    assert isinstance(op, RebootDequeueOp) and op.name == "reboot-dequeue" and op.targets == [A]


def test_etcd_maintenance_keeps_priority() -> None:
    c = rcluster()
    s = queued(c, [entry(0, D)])
    lagging = with_member(s, member(B, raft_index=1, healthy=True))
    d = decide(c, Constraints(), lagging)
    assert not any(isinstance(op, RebootOp) for op in d.operators)
    assert d.phase != Phase.REBOOT


def test_cancelled_entries_are_removed_even_when_disabled() -> None:
    c = rcluster()
    d = decide(c, Constraints(), queued(c, [entry(0, D, STATUS_CANCELLED)], enabled=False))
    (op,) = d.operators
    assert isinstance(op, RebootDequeueOp) and op.name == "reboot-cancel"


def test_a_disabled_queue_is_left_alone() -> None:
    c = rcluster()
    d = decide(c, Constraints(), queued(c, [entry(0, D)], enabled=False))
    assert d.operators == [] and d.phase == Phase.COMPLETED


def test_refusals_are_reported() -> None:
    c = rcluster()
    s = queued(c, [entry(0, D)])
    s = dataclasses.replace(s, nodes={**s.nodes, E: clean(E, ssh_ok=False)})
    d = decide(c, Constraints(), s)
    assert d.operators == [] and d.phase == Phase.REBOOT
    assert rules(d) == {RULE_REBOOT_UNREACHABLE_WITHIN_LIMIT: (E,)}
    allowed = Constraints.model_validate({"maximum-unreachable-nodes-for-reboot": 1})
    assert isinstance(decide(c, allowed, s).operators[0], RebootOp)
    bare = rcluster(Reboot())
    d = decide(bare, Constraints(), queued(bare, [entry(0, D)]))
    assert RULE_REBOOT_COMMANDS_CONFIGURED in rules(d)


# -- ckecli ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "func"),
    [
        (["rq", "add", "-"], cmd_add),
        (["reboot-queue", "list", "-o", "simple"], cmd_list),
        (["rq", "cancel", "3"], cmd_cancel),
    ],
)
def test_ckecli_parses_reboot_queue(argv: list[str], func: object) -> None:
    args = build_parser().parse_args(argv)
    assert args.func is func


@pytest.mark.parametrize(
    "argv",
    [["rq"], ["rq", "cancel"], ["rq", "list", "-o", "yaml"], ["rq", "add"], ["rq", "nope"]],
)
def test_ckecli_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("text", ["x", "-1", "1.5", "9" * 30])
def test_ckecli_cancel_index_must_be_decimal(text: str) -> None:
    with pytest.raises(CLIError, match="INDEX"):
        _index(text)


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_are_upstreams() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    entries = [entry(0, A, STATUS_REBOOTING), entry(1, D), entry(2, D, STATUS_CANCELLED)]
    metrics.set_reboot_queue(True, entries, {A: "cp1", D: "w4"})

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("cke_reboot_queue_enabled") == 1
    assert value("cke_reboot_queue_running") == 1
    assert value("cke_reboot_queue_entries") == 3
    assert value("cke_reboot_queue_items", status="queued") == 1
    assert value("cke_reboot_queue_items", status="draining") == 0
    assert value("cke_node_reboot_status", node="cp1", status="rebooting") == 1
    assert value("cke_node_reboot_status", node="cp1", status="queued") == 0
    assert value("cke_node_reboot_status", node="w4", status="queued") == 1  # the oldest
    metrics.set_reboot_queue(False, [], {A: "cp1"})
    assert value("cke_reboot_queue_enabled") == 0
    assert value("cke_reboot_queue_running") == 0
    assert value("cke_node_reboot_status", node="w4", status="queued") is None
