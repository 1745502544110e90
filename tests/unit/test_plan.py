"""``ckecli plan`` / ``cluster set --dry-run``: the stored collected status
(``cke/server/statusjson.py``) and the replayed decision (``cke/server/plan.py``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings

from cke.certinfo import CertInfo
from cke.cli.ckecli import build_parser
from cke.cli.plancmd import plan_doc, plan_text, started_record
from cke.cluster import Cluster, Constraints, EtcdParams, Node, Options
from cke.rebootqueue import QueueStatus, RebootEntry
from cke.records import Record
from cke.repairqueue import RepairEntry, RepairQueueStatus
from cke.restore import RestoreRequest
from cke.server.clusterstatus import (
    ClusterStatus,
    DefragPolicy,
    EtcdMember,
    EtcdStatus,
    NodeStatus,
    PKIStatus,
    ServiceStatus,
    Trust,
)
from cke.server.control import RULE_VAULT_AVAILABLE, full_decision
from cke.server.plan import make_plan
from cke.server.safety import RULE_ALL_CONTROL_PLANES_REACHABLE, RULE_ETCD_NOSPACE, Blocked
from cke.server.statusjson import (
    Collected,
    CollectedError,
    CollectedWriter,
    app_digest,
    collected_from_json,
    collected_to_json,
    status_from_doc,
    status_to_doc,
)
from cke.server.strategy import decide
from tests.unit.test_strategy import cluster, healthy, running, scenarios

pytestmark = pytest.mark.unit

A, B, C, D, E = (f"10.0.0.{i}" for i in range(1, 6))
APP = b"#!/usr/bin/env python3\nrivers"
NOW = dt.datetime(2026, 12, 2, 16, 0, 0, 123456, tzinfo=dt.UTC)


def round_trip(status: ClusterStatus) -> ClusterStatus:
    text = json.dumps(status_to_doc(status))
    return status_from_doc(json.loads(text), status.rivers_app)


def cert(serial: str) -> CertInfo:
    return CertInfo(serial, 1.5e9, 1.9e9 + 0.25, "ab" * 20, "cd" * 20, "ef" * 32)


def full_status() -> ClusterStatus:
    """Every field away from its default."""
    ns = NodeStatus(
        A,
        ssh_ok=True,
        host_key_mismatch=True,
        etcd_running=True,
        etcd_digest="d" * 64,
        etcd_has_data=True,
        identity="SHA256:abc",
        etcd_peer_url=f"https://{A}:2380",
        certs={"server": cert("01"), "peer": cert("02")},
        trusted={"ca-client": ("k1", "k2"), "ca-peer": ("k3",)},
        services={"rivers": ServiceStatus(True, "e" * 64), "etcd-rivers": ServiceStatus()},
    )
    member = EtcdMember(
        7, A, A, True, True, 99, True, (f"https://{A}:2380",), db_size=10, db_size_in_use=4
    )
    reboot = RebootEntry(
        3,
        B,
        "draining",
        last_transition_time=NOW,
        drain_backoff_count=2,
        drain_backoff_expire=NOW + dt.timedelta(seconds=1.5),
    )
    repair = RepairEntry(
        4,
        C,
        "qemu",
        "reboot",
        nodename="c",
        serial="s1",
        status="processing",
        step=1,
        step_status="watching",
        deleted=True,
        last_transition_time=NOW,
        drain_backoff_count=1,
        drain_backoff_expire=NOW,
    )
    return ClusterStatus(
        nodes={A: ns, B: NodeStatus(B, ssh_ok=False)},
        etcd=EtcdStatus(True, (member, EtcdMember(8, "", B)), 7, ((7, "NOSPACE"),)),
        pki=PKIStatus(
            now=1.7e9 + 0.125,
            renew_fraction=0.25,
            trust=Trust({"etcd-peer": "PEM"}, {"etcd-peer": "k3"}),
            rotations={"etcd-peer": "trust-both"},
            rotation_since={"etcd-peer": 1.7e9},
            rotation_grace=600.0,
            own_client_issuer="k9",
        ),
        max_concurrent_updates=3,
        rivers_app=APP,
        defrag=DefragPolicy(1024, 0.25),
        restore=RestoreRequest(
            snapshot="/var/snap.db", sha256="0" * 64, revision=5, token="t", requested="now"
        ),
        restore_revision=12,
        restore_problem="gone",
        reboots=QueueStatus((reboot,), {3: 44}, False, frozenset({B}), NOW),
        repairs=RepairQueueStatus((repair,), {4: 45}, False, frozenset({C}), NOW),
    )


def test_every_field_survives_the_round_trip() -> None:
    status = full_status()
    assert round_trip(status) == status


def test_every_field_of_the_status_is_stored() -> None:
    """A new ClusterStatus field fails here until statusjson stores it."""
    stored = {
        "nodes",
        "etcd",
        "pki",
        "max_concurrent_updates",
        "rivers_app",  # as its digest
        "defrag",
        "restore",
        "restore_revision",
        "restore_problem",
        "reboots",
        "repairs",
    }
    assert {f.name for f in dataclasses.fields(ClusterStatus)} == stored


def test_the_rivers_app_is_stored_as_its_digest_only() -> None:
    doc = status_to_doc(full_status())
    assert doc["rivers-app-sha256"] == app_digest(APP)
    assert APP.decode() not in json.dumps(doc)
    assert status_from_doc(doc).rivers_app == b""  # reader without the app: none
    no_app = dataclasses.replace(full_status(), rivers_app=b"")
    assert status_from_doc(status_to_doc(no_app), APP).rivers_app == b""


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(scenarios())
def test_a_replayed_decision_is_the_leaders(scenario: tuple[Cluster, ClusterStatus]) -> None:
    c, s = scenario
    back = round_trip(s)
    assert back == s
    d, again = decide(c, Constraints(), s), decide(c, Constraints(), back)
    assert (again.phase, again.blocked, again.rivers) == (d.phase, d.blocked, d.rivers)
    assert [(o.name, o.targets) for o in again.operators] == [
        (o.name, o.targets) for o in d.operators
    ]


def big_status(nodes: int, certs_everywhere: bool) -> ClusterStatus:
    statuses = {}
    for i in range(nodes):
        a = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        cp = i < 5
        statuses[a] = NodeStatus(
            a,
            ssh_ok=True,
            etcd_running=cp,
            etcd_digest="d" * 64 if cp else None,
            etcd_has_data=cp,
            identity="SHA256:" + "x" * 43,
            etcd_peer_url=f"https://{a}:2380" if cp else None,
            certs={"server": cert(f"{i:040x}"), "peer": cert(f"{i + 1:040x}")}
            if cp or certs_everywhere
            else {},
            trusted={"ca-client": ("ab" * 20,), "ca-peer": ("ab" * 20,)}
            if cp or certs_everywhere
            else {},
            services={
                "rivers": ServiceStatus(True, "e" * 64),
                **({"etcd-rivers": ServiceStatus(True, "f" * 64)} if cp else {}),
            },
        )
    members = tuple(
        EtcdMember(i + 1, a, a, healthy=True, raft_index=10**9, peer_urls=(f"https://{a}:2380",))
        for i, a in enumerate(list(statuses)[:5])
    )
    bundle = "-----BEGIN CERTIFICATE-----\n" + "A" * 1200 + "\n-----END CERTIFICATE-----\n"
    return ClusterStatus(
        nodes=statuses,
        etcd=EtcdStatus(True, members, 1),
        pki=PKIStatus(now=1.7e9, trust=Trust({"etcd-peer": bundle * 2, "etcd-client": bundle})),
        rivers_app=APP,
    )


def test_1000_nodes_stay_far_below_etcds_request_limit() -> None:
    limit = int(1.5 * 1024 * 1024)
    for everywhere, bound in ((False, 300_000), (True, 1_000_000)):
        status = big_status(1000, everywhere)
        started = time.perf_counter()
        text = collected_to_json(Collected("2026-12-02T16:00:00Z", "cke0", 7, status))
        took = time.perf_counter() - started
        size = len(text.encode())
        print(f"1,000 nodes, certificates on every node={everywhere}: {size} bytes, {took:.3f}s")
        assert size < bound < limit
        assert collected_from_json(text, APP).status == status


def test_collected_round_trip_and_unreadable_values() -> None:
    blocked = Blocked("valid-configuration", "cluster: bad", ("a",))
    nothing = Collected("2026-12-02T16:00:00Z", "cke0", 3, None, phase="config-invalid")
    nothing = dataclasses.replace(nothing, blocked=(blocked,))
    assert collected_from_json(collected_to_json(nothing)) == nothing
    full = Collected(
        "2026-12-02T16:00:00Z",
        "cke1",
        4,
        full_status(),
        app_digest(APP),
        extra_blocked=(blocked,),
        vault_away="unavailable: refused",
    )
    assert collected_from_json(collected_to_json(full), APP) == full
    for bad in (b"\xff", b"[]", b'{"version": 99}', b'{"version": 1}', b"{"):
        with pytest.raises(CollectedError) as exc:
            collected_from_json(bad)
        assert "\n" not in str(exc.value)
    doc = json.loads(collected_to_json(full))
    doc["status"]["reboots"]["entries"][0]["index"] = "x"
    with pytest.raises(CollectedError):
        collected_from_json(json.dumps(doc))


# -- the plan ------------------------------------------------------------------------------


def with_extra_args(c: Cluster, *args: str) -> Cluster:
    return c.model_copy(update={"options": Options(etcd=EtcdParams(extra_args=list(args)))})


def test_plan_lists_each_command_and_the_nodes_of_a_parallel_step() -> None:
    c = cluster([A, B, C])
    s = ClusterStatus(nodes={a: NodeStatus(a, ssh_ok=True) for a in (A, B, C)})
    plan = make_plan(c, Constraints(), s)
    (step,) = plan.steps
    op = step.operation
    assert op is not None and op["operation"] == "etcd-bootstrap"
    names = [cmd["name"] for cmd in op["commands"]]
    assert names[0] == "issue-etcd-certificates" and "start-etcd" in names
    start = next(cmd for cmd in op["commands"] if cmd["name"] == "start-etcd")
    assert start["parallel"] == [A, B, C]
    assert plan.end == "re-plan"  # a bootstrap's effect is not modelled


def test_dry_run_of_an_etcd_option_plans_every_restart_the_leader_last() -> None:
    c = cluster([A, B, C])
    s = healthy(c, [A, B, C])  # A leads
    new = with_extra_args(c, "--quota-backend-bytes=8589934592")
    plan = make_plan(new, Constraints(), s, max_steps=50)
    ops = [st.operation for st in plan.steps if st.operation is not None]
    assert [(o["operation"], o["targets"]) for o in ops] == [
        ("etcd-restart", [B]),
        ("etcd-restart", [C]),
        ("etcd-restart", [A]),
    ]
    moves = [cmd for cmd in ops[2]["commands"] if cmd["name"] == "etcd-move-leader"]
    assert [(m["target"], m["detail"]) for m in moves] == [(A, f"to {B}")]
    assert plan.end == "done" and plan.refusals == []
    # The first step is exactly the leader's decision on that status.
    (first,) = decide(new, Constraints(), s).operators
    assert (first.name, first.targets) == ("etcd-restart", [B])


def test_rivers_are_planned_in_batches_until_every_node_runs_the_desired_spec() -> None:
    c = cluster([A, B, C], [D, E])
    s = dataclasses.replace(healthy(c, [A, B, C]), rivers_app=APP, max_concurrent_updates=2)
    plan = make_plan(c, Constraints(), s, max_steps=50)
    ops = [
        (st.operation["operation"], st.operation["targets"]) for st in plan.steps if st.operation
    ]
    assert ops == [
        ("rivers-bootstrap", [A, B]),
        ("rivers-bootstrap", [C, D]),
        ("rivers-bootstrap", [E]),
        ("etcd-rivers-bootstrap", [A, B]),
        ("etcd-rivers-bootstrap", [C]),
    ]
    assert plan.end == "done"


def test_a_held_back_step_is_a_refusal_with_its_rule_and_nodes() -> None:
    c = cluster([A, B, C, D])
    s = healthy(c, [A, B, C])
    s = dataclasses.replace(s, nodes={**s.nodes, D: NodeStatus(D, ssh_ok=False)})
    plan = make_plan(c, Constraints(), s, max_steps=50)
    assert plan.end == "held"
    assert [(b.rule, b.nodes) for b in plan.refusals] == [(RULE_ALL_CONTROL_PLANES_REACHABLE, (D,))]


def test_the_nospace_report_is_no_refusal() -> None:
    c = cluster([A, B, C])
    s = healthy(c, [A, B, C])
    s = dataclasses.replace(s, etcd=dataclasses.replace(s.etcd, alarms=((1, "NOSPACE"),)))
    plan = make_plan(c, Constraints(), s)
    assert RULE_ETCD_NOSPACE in {b.rule for b in plan.steps[0].decision.blocked}
    assert plan.refusals == []


def test_vault_away_holds_every_operation_back_as_the_leader_does() -> None:
    c = cluster([A, B, C])
    s = healthy(c, [A, B, C])
    s = dataclasses.replace(s, nodes={**s.nodes, B: running(c, B, etcd_digest="old")})
    assert full_decision(c, Constraints(), s).operators
    d = full_decision(c, Constraints(), s, vault_away="unavailable: refused")
    assert d.operators == [] and RULE_VAULT_AVAILABLE in {b.rule for b in d.blocked}
    plan = make_plan(c, Constraints(), s, vault_away="unavailable: refused")
    assert plan.end == "held"


def collected_of(status: ClusterStatus | None, **changes: object) -> Collected:
    base = Collected(
        "2026-12-02T16:00:00Z", "cke0", 7, status, app_digest(status.rivers_app) if status else ""
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_plan_text_says_the_age_the_operation_and_what_is_held_back() -> None:
    c = cluster([A, B, C, D])
    s = healthy(c, [A, B, C])
    s = dataclasses.replace(
        s,
        nodes={**s.nodes, B: running(c, B, etcd_digest="old"), D: NodeStatus(D, ssh_ok=False)},
    )
    now = dt.datetime(2026, 12, 2, 16, 0, 42, tzinfo=dt.UTC)
    doc, plan = plan_doc(collected_of(s), ["a note"], c, Constraints(), now)
    assert plan is not None
    text = plan_text(doc)
    assert "status collected at 2026-12-02T16:00:00Z (42s ago) by cke0" in text
    assert "note: a note" in text
    assert f"next operation: etcd-restart on {B}" in text
    assert f"1. issue-etcd-certificates on {B}" in text
    assert f"[{RULE_ALL_CONTROL_PLANES_REACHABLE}]" in text and f"nodes={D}" in text
    assert "then: re-plan" not in text  # one step: the restart's effect is modelled
    assert doc["steps"][0]["operation"]["operation"] == "etcd-restart"
    json.dumps(doc)  # -o json


def test_plan_text_when_the_leader_collected_nothing() -> None:
    blocked = Blocked("valid-configuration", "cluster: nodes: bad", ())
    collected = collected_of(None, phase="config-invalid", blocked=(blocked,))
    doc, plan = plan_doc(collected, [], None, Constraints(), NOW)
    assert plan is None
    text = plan_text(doc)
    assert "the leader collected nothing: phase config-invalid" in text
    assert "[valid-configuration] cluster: nodes: bad" in text


def test_the_record_the_leader_started_is_found_by_operation_targets_and_time() -> None:
    c = cluster([A, B, C])
    s = healthy(c, [A, B, C])
    s = dataclasses.replace(s, nodes={**s.nodes, B: running(c, B, etcd_digest="old")})
    collected = collected_of(s)
    _, plan = plan_doc(collected, [], c, Constraints(), NOW)
    assert plan is not None
    before = Record("etcd-restart", [B], id=1, start_at="2026-12-02T15:59:59.000Z")
    other = Record("etcd-restart", [C], id=2, start_at="2026-12-02T16:00:00.500Z")
    ours = Record("etcd-restart", [B], id=3, start_at="2026-12-02T16:00:00.500Z")
    assert started_record([ours, other, before], collected, plan) is ours
    assert started_record([other, before], collected, plan) is None


def test_the_commands_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["plan", "-o", "json"])
    assert args.output == "json"
    args = parser.parse_args(["cluster", "set", "--dry-run", "--steps", "5", "-o", "json", "f"])
    assert args.dry_run and args.steps == 5 and args.output == "json"
    args = parser.parse_args(["cluster", "set", "f"])
    assert not args.dry_run and args.output is None


def test_the_step_limits_agree() -> None:
    from cke.cli.ckecli import MAX_PLAN_STEPS
    from cke.server.plan import MAX_STEPS

    assert MAX_PLAN_STEPS == MAX_STEPS


def test_no_secret_reaches_the_stored_document() -> None:
    c = cluster([A, B, C])
    s = healthy(c, [A, B, C])
    text = collected_to_json(Collected("t", "cke0", 1, s))
    for word in ("PRIVATE", "secret", "password", 'token"'):
        assert word not in text
    # The node definitions (user, keys) are the cluster's, not the status's.
    assert "root" not in text
    assert Node(address=A, user="root").user not in text


def test_an_unchanged_status_is_rewritten_only_once_a_minute() -> None:
    c = cluster([A, B, C])
    s = healthy(c, [A, B, C])
    writer = CollectedWriter(refresh=60)
    first = Collected("2026-12-02T16:00:00Z", "cke0", 7, s)
    assert writer.text(first, 1, 100.0, "completed") is not None
    writer.stored()
    later = dataclasses.replace(
        first,
        timestamp="2026-12-02T16:00:10Z",
        status=dataclasses.replace(s, pki=dataclasses.replace(s.pki, now=1e9)),
    )
    assert writer.text(later, 1, 110.0, "completed") is None  # only the clock moved
    assert writer.text(later, 1, 110.0, "etcd-maintain") is not None  # another decision
    assert writer.text(later, 2, 110.0, "completed") is not None  # a new term
    changed = dataclasses.replace(later, status=dataclasses.replace(s, max_concurrent_updates=1))
    assert writer.text(changed, 1, 110.0, "completed") is not None  # the world changed
    # Nothing was stored since the first: a failed write is retried.
    assert writer.text(later, 1, 110.0, "completed") is None
    assert writer.text(later, 1, 161.0, "completed") is not None  # a minute later
    writer.stored()
    assert writer.text(later, 1, 162.0, "completed") is None


def test_a_parallel_step_prints_its_nodes() -> None:
    c = cluster([A, B, C])
    s = ClusterStatus(nodes={a: NodeStatus(a, ssh_ok=True) for a in (A, B, C)})
    doc, _ = plan_doc(collected_of(s), [], c, Constraints(), NOW)
    text = plan_text(doc)
    assert f"start-etcd on {A}, {B}, {C} (in parallel)" in text
    assert "then: re-plan after this step" in text
