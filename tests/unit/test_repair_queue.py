"""The repair queue: its entries (``cke/repairqueue.py``), its plan, the
``etcd-good-for-repair`` rule, its part of the decision, ``ckecli repair-queue``
parsing and the metrics."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from cke.cli.ckecli import CLIError, build_parser
from cke.cli.repaircmd import (
    _index,
    cmd_add,
    cmd_delete,
    cmd_delete_finished,
    cmd_delete_unfinished,
    cmd_disable,
    cmd_list,
    cmd_reset_backoff,
    cmd_wait,
)
from cke.cluster import Cluster, Constraints, Node, Repair, cluster_to_json
from cke.op.repair import (
    RepairDequeueOp,
    RepairExecuteOp,
    RepairFinishOp,
    RunRepairStep,
    healthy_machines,
)
from cke.rebootqueue import STATUS_REBOOTING, EntryError, QueueStatus, RebootEntry
from cke.repairqueue import (
    ACTION_DEQUEUE,
    ACTION_EXECUTE,
    ACTION_FAIL,
    ACTION_SUCCEED,
    STATUS_FAILED,
    STATUS_PROCESSING,
    STATUS_QUEUED,
    STATUS_SUCCEEDED,
    STEP_WATCHING,
    RepairEntry,
    RepairQueueStatus,
    count_by_status,
    current_step,
    find_operation,
    nodename_of,
    plan_repairs,
)
from cke.server.clusterstatus import ClusterStatus
from cke.server.metrics import ServerMetrics
from cke.server.phases import Phase
from cke.server.safety import (
    RULE_ETCD_GOOD_FOR_REPAIR,
    RULE_REPAIR_ENTRY_USABLE,
    etcd_good_for_repair,
)
from cke.server.strategy import decide
from cke.storage import Versioned
from tests.unit.etcd_builders import member
from tests.unit.test_strategy import A, B, C, D, E, clean, healthy, rules, with_member

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 12, 2, 12, 0, 0, tzinfo=dt.UTC)
REPAIR = Repair.model_validate(
    {
        "repair_procedures": [
            {
                "machine_types": ["qemu", "kvm"],
                "repair_operations": [
                    {
                        "operation": "unreachable",
                        "repair_steps": [
                            {"repair_command": ["reset", "soft"], "watch_seconds": 30},
                            {"repair_command": ["reset", "hard"], "watch_seconds": 60},
                        ],
                        "health_check_command": ["check"],
                        "success_command": ["done"],
                    }
                ],
            }
        ],
        "max_concurrent_repairs": 2,
    }
)


def rcluster(repair: Repair = REPAIR) -> Cluster:
    nodes = [
        Node(address=a, user="root", control_plane=True, hostname=f"cp{a[-1]}") for a in (A, B, C)
    ]
    nodes += [Node(address=a, user="root", hostname=f"w{a[-1]}") for a in (D, E)]
    return Cluster(name="c", service_subnet="10.68.0.0/16", nodes=nodes, repair=repair)


def entry(index: int, address: str, **changes: object) -> RepairEntry:
    e = RepairEntry(index, address, "qemu", "unreachable")
    return dataclasses.replace(e, **changes)  # type: ignore[arg-type]


def watching(index: int, address: str, step: int = 0, seconds_ago: int = 5) -> RepairEntry:
    since = NOW - dt.timedelta(seconds=seconds_ago)
    return entry(index, address).watching(step, since)


def queue(entries: list[RepairEntry], **changes: object) -> RepairQueueStatus:
    q = RepairQueueStatus(
        entries=tuple(entries), revisions={e.index: 10 + e.index for e in entries}, now=NOW
    )
    return dataclasses.replace(q, **changes)  # type: ignore[arg-type]


def queued(c: Cluster, entries: list[RepairEntry], **changes: object) -> ClusterStatus:
    return dataclasses.replace(healthy(c, [A, B, C]), repairs=queue(entries, **changes))


def plan(entries: list[RepairEntry], rebooting: tuple[str, ...] = (), **changes: object) -> list:
    p = plan_repairs(rcluster(), queue(entries, **changes), {A, B, C}, rebooting)
    return [(a.kind, a.entry.index, a.step) for a in p.actions]


# -- entries ------------------------------------------------------------------------------


def test_entry_json_is_upstreams_shape() -> None:
    e = entry(7, D, serial="abc", nodename="w4").watching(1, NOW.replace(microsecond=9))
    doc = e.to_dict()
    assert doc == {
        "index": "7",
        "address": D,
        "nodename": "w4",
        "serial": "abc",
        "machine_type": "qemu",
        "operation": "unreachable",
        "status": "processing",
        "step": 1,
        "step_status": "watching",
        "deleted": False,
        "last_transition_time": "2026-12-02T12:00:00Z",
    }
    assert RepairEntry.from_json(e.to_json()) == e
    # As CKE writes a new entry (Go's zero time, no serial).
    upstream = (
        '{"index":"0","address":"10.0.0.1","nodename":"","machine_type":"qemu",'
        '"operation":"op","status":"queued","step":0,"step_status":"waiting",'
        '"deleted":false,"last_transition_time":"0001-01-01T00:00:00Z"}'
    )
    parsed = RepairEntry.from_json(upstream)
    assert parsed.last_transition_time is None and parsed.status == STATUS_QUEUED


@pytest.mark.parametrize(
    "raw",
    [
        "x",
        "[]",
        '{"index": "a", "address": "x"}',
        '{"index": "1"}',
        '{"index": "1", "address": "x", "status": "done"}',
        '{"index": "1", "address": "x", "step_status": "sleeping"}',
        '{"index": "1", "address": "x", "step": -1}',
        '{"index": "1", "address": "x", "deleted": "yes"}',
        '{"index": "1", "address": 3}',
    ],
)
def test_bad_entries_are_refused(raw: str) -> None:
    with pytest.raises(EntryError):
        RepairEntry.from_json(raw)


def test_operations_are_found_as_upstream() -> None:
    c = rcluster()
    assert find_operation(c, "kvm", "unreachable").success_command == ["done"]
    with pytest.raises(EntryError, match="MACHINE_TYPE"):
        find_operation(c, "baremetal", "unreachable")
    with pytest.raises(EntryError, match="OPERATION"):
        find_operation(c, "qemu", "unhealthy")
    with pytest.raises(EntryError, match="no cluster"):
        find_operation(None, "qemu", "unreachable")
    step = current_step(c, entry(0, D), 1)
    assert step is not None and step.repair_command == ["reset", "hard"]
    assert current_step(c, entry(0, D), 2) is None
    assert nodename_of(c, D) == "w4" and nodename_of(c, "10.9.9.9") == ""


def test_counts_list_every_status() -> None:
    counts = count_by_status([entry(0, D), entry(1, E, status=STATUS_FAILED)])
    assert counts == {"queued": 1, "processing": 0, "succeeded": 0, "failed": 1}


# -- the plan ---------------------------------------------------------------------------------


def test_a_queued_entry_runs_its_first_step() -> None:
    assert plan([entry(0, D)]) == [(ACTION_EXECUTE, 0, 0)]


def test_a_healthy_machine_succeeds_and_deleted_entries_leave() -> None:
    entries = [entry(0, D, deleted=True), watching(1, E)]
    assert plan(entries, healthy=frozenset({E})) == [(ACTION_DEQUEUE, 0, 0), (ACTION_SUCCEED, 1, 0)]


def test_watching_waits_then_moves_to_the_next_step_then_fails() -> None:
    p = plan_repairs(rcluster(), queue([watching(0, D, seconds_ago=5)]), {A, B, C}, ())
    assert p.actions == () and p.active  # still watching: the repair phase holds
    assert plan([watching(0, D, seconds_ago=31)]) == [(ACTION_EXECUTE, 0, 1)]
    assert plan([watching(0, D, step=1, seconds_ago=61)]) == [(ACTION_FAIL, 0, 0)]
    assert plan([watching(0, D, step=1, seconds_ago=59)]) == []


def test_finished_entries_are_left_alone() -> None:
    done = [entry(0, D, status=STATUS_SUCCEEDED), entry(1, E, status=STATUS_FAILED)]
    p = plan_repairs(rcluster(), queue(done), {A, B, C}, ())
    assert p.actions == () and not p.active


def test_a_disabled_queue_starts_nothing_but_still_finishes() -> None:
    assert plan([entry(0, D)], enabled=False) == []
    assert plan([watching(0, D)], enabled=False, healthy=frozenset({D})) == [(ACTION_SUCCEED, 0, 0)]


def test_concurrency_limits_and_priorities() -> None:
    # max_concurrent_repairs 2: the entry under way first, then a control plane.
    entries = [entry(0, D), entry(1, E), entry(2, A), watching(3, B, seconds_ago=40)]
    # B under way first; A waits (one control plane at a time); D fills the second slot.
    assert plan(entries) == [(ACTION_EXECUTE, 3, 1), (ACTION_EXECUTE, 0, 0)]
    entries = [entry(0, D), entry(1, E), entry(2, A)]
    assert plan(entries) == [(ACTION_EXECUTE, 2, 0), (ACTION_EXECUTE, 0, 0)]


def test_one_entry_per_machine() -> None:
    assert plan([entry(0, D), entry(1, D)]) == [(ACTION_EXECUTE, 0, 0)]


def test_no_control_plane_while_another_reboots() -> None:
    assert plan([entry(0, A)], rebooting=(B,)) == []
    assert plan([entry(0, A)], rebooting=(A,)) == [(ACTION_EXECUTE, 0, 0)]
    assert plan([entry(0, D)], rebooting=(B,)) == [(ACTION_EXECUTE, 0, 0)]


def test_unknown_machines_and_procedures_are_left_alone() -> None:
    p = plan_repairs(
        rcluster(),
        queue([entry(0, "10.9.9.9"), entry(1, D, machine_type="arm")]),
        {A, B, C},
        (),
    )
    assert p.actions == () and [e.index for e in p.unknown] == [0, 1]


# -- rule 14: etcd-good-for-repair --------------------------------------------------------------


def test_rule_etcd_good_for_repair() -> None:
    c = rcluster()
    s = healthy(c, [A, B, C])
    assert etcd_good_for_repair(c, s, 3) is None
    # An out-of-sync member on an unreachable control plane is the failure to repair.
    down = dataclasses.replace(s, nodes={**s.nodes, C: clean(C, ssh_ok=False)})
    down = with_member(down, member(C, healthy=False))
    assert etcd_good_for_repair(c, down, 3) is None
    # ... but not on a reachable one.
    lagging = with_member(s, member(C, healthy=False))
    blocked = etcd_good_for_repair(c, lagging, 3)
    assert blocked is not None and blocked.rule == RULE_ETCD_GOOD_FOR_REPAIR
    assert blocked.nodes == (C,)
    # Two control planes short of control-plane-count: refused.
    two_down = dataclasses.replace(down, nodes={**down.nodes, B: clean(B, ssh_ok=False)})
    two_down = with_member(two_down, member(B, healthy=False))
    blocked = etcd_good_for_repair(c, two_down, 3)
    assert blocked is not None and "control-plane-count" in blocked.message
    no_leader = with_member(s, member(A, leader=True, healthy=False))
    blocked = etcd_good_for_repair(c, no_leader, 3)
    assert blocked is not None and "no healthy leader" in blocked.message


# -- the decision ------------------------------------------------------------------------------


def test_a_queued_entry_is_repaired() -> None:
    c = rcluster()
    d = decide(c, Constraints(), queued(c, [entry(0, D)]))
    assert d.phase == Phase.REPAIR
    (op,) = d.operators
    assert isinstance(op, RepairExecuteOp) and op.targets == [D] and op.name == "repair-execute"
    step = op.next_command()
    assert isinstance(step, RunRepairStep)
    assert step.argv == ["reset", "soft", D] and step.revision == 10
    assert op.next_command() is None


def test_finish_and_dequeue_operations() -> None:
    c = rcluster()
    d = decide(c, Constraints(), queued(c, [watching(0, D)], healthy=frozenset({D})))
    (op,) = d.operators
    assert isinstance(op, RepairFinishOp) and op.ok and op.name == "repair-finish"
    d = decide(c, Constraints(), queued(c, [entry(0, D, status=STATUS_FAILED, deleted=True)]))
    (op,) = d.operators
    assert isinstance(op, RepairDequeueOp) and op.name == "repair-dequeue"
    d = decide(c, Constraints(), queued(c, [watching(0, D, step=1, seconds_ago=100)]))
    (op,) = d.operators
    assert isinstance(op, RepairFinishOp) and not op.ok


def test_watching_holds_the_repair_phase_and_finished_entries_do_not() -> None:
    c = rcluster()
    d = decide(c, Constraints(), queued(c, [watching(0, D)]))
    assert d.operators == [] and d.phase == Phase.REPAIR
    d = decide(c, Constraints(), queued(c, [entry(0, D, status=STATUS_SUCCEEDED)]))
    assert d.operators == [] and d.phase == Phase.COMPLETED


def test_repairs_wait_while_etcd_cannot_afford_them() -> None:
    c = rcluster()
    s = queued(c, [entry(0, D)])
    s = with_member(s, member(C, healthy=False))  # C is reachable: not a failure to repair
    d = decide(c, Constraints.model_validate({"control-plane-count": 3}), s)
    assert d.operators == [] and d.phase == Phase.REPAIR
    assert RULE_ETCD_GOOD_FOR_REPAIR in rules(d)


def test_an_unreachable_control_plane_is_repaired() -> None:
    c = rcluster()
    s = queued(c, [entry(0, C)])
    s = dataclasses.replace(s, nodes={**s.nodes, C: clean(C, ssh_ok=False)})
    s = with_member(s, member(C, healthy=False))
    d = decide(c, Constraints.model_validate({"control-plane-count": 3}), s)
    # SSH cannot reach C: the command could not run; nothing is sent, the phase holds.
    assert d.operators == [] and d.phase == Phase.REPAIR


def test_unusable_entries_are_reported() -> None:
    c = rcluster()
    d = decide(c, Constraints(), queued(c, [entry(0, "10.9.9.9"), entry(1, D)]))
    assert rules(d) == {RULE_REPAIR_ENTRY_USABLE: ("10.9.9.9",)}
    assert isinstance(d.operators[0], RepairExecuteOp)


def test_a_rebooting_control_plane_holds_control_plane_repairs() -> None:
    c = rcluster()
    s = queued(c, [entry(0, A)])
    busy = RebootEntry(0, B, STATUS_REBOOTING, last_transition_time=NOW)
    s = dataclasses.replace(s, reboots=QueueStatus(entries=(busy,), now=NOW))
    d = decide(c, Constraints(), s)
    assert not any(isinstance(op, RepairExecuteOp) for op in d.operators)


def test_entry_marks() -> None:
    e = entry(0, D).watching(1, NOW)
    assert (e.status, e.step, e.step_status) == (STATUS_PROCESSING, 1, STEP_WATCHING)
    assert e.finish(True, NOW).status == STATUS_SUCCEEDED and e.finish(True, NOW).finished
    assert e.finish(False, NOW).status == STATUS_FAILED


# -- ckecli ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "func"),
    [
        (["repair-queue", "add", "op", "qemu", "10.0.0.1"], cmd_add),
        (["repair-queue", "add", "op", "qemu", "10.0.0.1", "SN1"], cmd_add),
        (["repair-queue", "list"], cmd_list),
        (["repair-queue", "delete", "3"], cmd_delete),
        (["repair-queue", "delete-finished"], cmd_delete_finished),
        (["repair-queue", "delete-unfinished"], cmd_delete_unfinished),
        (["repair-queue", "disable"], cmd_disable),
        (["repair-queue", "reset-backoff"], cmd_reset_backoff),
        (["repair-queue", "wait"], cmd_wait),
    ],
)
def test_ckecli_parses_repair_queue(argv: list[str], func: object) -> None:
    args = build_parser().parse_args(argv)
    assert args.func is func
    if func is cmd_add:
        assert (args.operation, args.machine_type, args.address) == ("op", "qemu", "10.0.0.1")


@pytest.mark.parametrize(
    "argv",
    [
        ["repair-queue"],
        ["repair-queue", "add", "op", "qemu"],
        ["repair-queue", "add", "a", "b", "c", "d", "e"],
        ["repair-queue", "delete"],
        ["repair-queue", "nope"],
        ["repair-queue", "wait", "--interval-seconds", "0"],
        ["repair-queue", "wait", "--timeout-seconds", "-1"],
        ["repair-queue", "wait", "--timeout-seconds", "1.5"],
    ],
)
def test_ckecli_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("text", ["x", "-1", "1.5", "9" * 30])
def test_ckecli_delete_index_must_be_decimal(text: str) -> None:
    with pytest.raises(CLIError, match="INDEX"):
        _index(text)


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_are_upstreams() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    entries = [watching(0, D), entry(1, E, status=STATUS_FAILED), entry(2, "10.9.9.9")]
    metrics.set_repair_queue(True, entries, [A, D, E])

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("cke_repair_queue_enabled") == 1
    assert value("cke_repair_queue_items", status="processing") == 1
    assert value("cke_repair_queue_items", status="succeeded") == 0
    assert value("cke_machine_repair_status", address=D, status="processing") == 1
    assert value("cke_machine_repair_status", address=A, status="queued") == 0
    assert value("cke_machine_repair_status", address="10.9.9.9", status="queued") == 1
    labels = {"index": "0", "address": D, "operation": "unreachable"}
    assert value("cke_repair_queue_entries", **labels, status="processing", step="0") == 1
    metrics.set_repair_queue(False, [], [A])
    assert value("cke_repair_queue_enabled") == 0
    assert value("cke_machine_repair_status", address=D, status="processing") is None
    json.dumps(entries[0].to_dict())


# -- the health check ---------------------------------------------------------------------------


class _Pool:
    """Answers ``true`` for D, fails for E; records the commands."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, str]] = []

    async def run(self, node: Node, command: str, **_: object) -> object:
        self.commands.append((node.address, command))
        if node.address == E:
            raise OSError("unreachable")
        return SimpleNamespace(ok=True, stdout=b"true\n" if node.address == D else b"false")


async def test_health_checks_run_for_unfinished_entries_only() -> None:
    pool = _Pool()
    entries = [
        watching(0, D),
        entry(1, E),
        entry(2, A, status=STATUS_SUCCEEDED),
        entry(3, B, deleted=True),
        entry(4, C, machine_type="arm"),
    ]
    healthy_now = await healthy_machines(pool, rcluster(), entries)  # type: ignore[arg-type]
    assert healthy_now == frozenset({D})
    assert sorted(pool.commands) == [(D, f"check {D}"), (E, f"check {E}")]


class _Storage:
    def __init__(self, cluster: Cluster | None) -> None:
        self.value = cluster_to_json(cluster).encode() if cluster is not None else None
        self.added: list[RepairEntry] = []

    async def get(self, name: str) -> Versioned:
        return Versioned(self.value, 1)

    async def add_repair_entry(self, e: RepairEntry) -> RepairEntry:
        self.added.append(e)
        return e


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["unreachable", "arm", D], "MACHINE_TYPE"),
        (["reboot", "qemu", D], "OPERATION"),
        (["unreachable", "qemu", "10.9.9.9"], "ADDRESS"),
        (["", "qemu", D], "OPERATION"),
    ],
)
async def test_ckecli_add_refuses_bad_input(argv: list[str], word: str) -> None:
    storage = _Storage(rcluster())
    args = build_parser().parse_args(["repair-queue", "add", *argv])
    with pytest.raises(CLIError, match=word) as exc:
        await cmd_add(storage, args)  # type: ignore[arg-type]
    assert "\n" not in str(exc.value) and storage.added == []


async def test_ckecli_add_takes_a_hostname_and_stores_the_address() -> None:
    storage = _Storage(rcluster())
    args = build_parser().parse_args(["repair-queue", "add", "unreachable", "kvm", "w4", "SN"])
    await cmd_add(storage, args)  # type: ignore[arg-type]
    (added,) = storage.added
    assert (added.address, added.nodename, added.serial, added.machine_type) == (
        D,
        "w4",
        "SN",
        "kvm",
    )
    with pytest.raises(CLIError, match="no cluster"):
        await cmd_add(_Storage(None), args)  # type: ignore[arg-type]


def test_unusable_entries_alone_hold_nothing_back() -> None:
    c = rcluster()
    d = decide(c, Constraints(), queued(c, [entry(0, "10.9.9.9")]))
    assert d.operators == [] and d.phase == Phase.COMPLETED
    assert rules(d) == {RULE_REPAIR_ENTRY_USABLE: ("10.9.9.9",)}


class _Draining:
    """A queue that loses one entry at each read."""

    def __init__(self, entries: int) -> None:
        self.left = entries

    async def get_repair_entries(self) -> list[tuple[RepairEntry, int]]:
        got = [(entry(i, D), 1) for i in range(self.left)]
        self.left = max(0, self.left - 1)
        return got


async def test_ckecli_wait_returns_once_the_queue_is_empty(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["repair-queue", "wait", "--interval-seconds", "1"])
    args.interval_seconds = 0.01  # the flag takes whole seconds; the loop does not care
    await cmd_wait(_Draining(2), args)  # type: ignore[arg-type]
    assert capsys.readouterr().out.splitlines() == [
        "repair queue entries: 2",
        "repair queue entries: 1",
        "repair queue is empty",
    ]


async def test_ckecli_wait_zero_checks_once_and_a_timeout_says_so() -> None:
    args = build_parser().parse_args(["repair-queue", "wait", "--timeout-seconds", "0"])
    with pytest.raises(CLIError, match=r"^repair queue is not empty$"):
        await cmd_wait(_Draining(5), args)  # type: ignore[arg-type]
    args = build_parser().parse_args(["repair-queue", "wait", "--timeout-seconds", "1"])
    args.interval_seconds = 0.3
    with pytest.raises(CLIError, match=r"timed out .* after 1s"):
        await cmd_wait(_Draining(50), args)  # type: ignore[arg-type]
