"""The sabakan cluster generator (``cke/sabakan``): each rule, the scenarios, and properties."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cke.cluster import (
    Cluster,
    Constraints,
    Node,
    Taint,
    reserved_key_problem,
    validate_cluster,
)
from cke.sabakan.generator import (
    KEPT_CONTROL_PLANE_STATES,
    LABEL_ZONE,
    Generated,
    generate,
    machine_metadata,
)
from cke.sabakan.rules import (
    LABEL_ROLE,
    RULE_ENOUGH_CONTROL_PLANES_SURVIVE,
    RULE_HEALTHY_CANDIDATE_AVAILABLE,
    RULE_KEEP_ETCD_MAJORITY,
    RULE_MINIMUM_WORKERS_RATE,
    RULE_ONE_CONTROL_PLANE_CHANGE,
    RULE_ONE_MACHINE_PER_ADDRESS,
    RULE_VALID_CLUSTER,
    RULE_VALID_TEMPLATE,
    RULE_WORKER_TEMPLATE_MATCHES,
    Refusal,
    enough_control_planes_survive,
    healthy_candidate_available,
    keep_etcd_majority,
    minimum_workers_rate,
    one_control_plane_change,
    one_control_plane_step,
    valid_cluster,
    valid_template,
)
from sabakan.model import Machine, MachineSpec, MachineState, MachineStatus

pytestmark = pytest.mark.unit

S = MachineState
BASE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def ip(n: int) -> str:
    return f"10.0.{n // 250}.{n % 250 + 1}"


def machine(
    n: int,
    *,
    rack: int = 0,
    role: str = "cs",
    state: S = S.HEALTHY,
    retire_days: int | None = 1000,
    labels: dict[str, str] | None = None,
    ipv4: list[str] | None = None,
) -> Machine:
    return Machine(
        spec=MachineSpec(
            serial=f"s{n:04d}",
            rack=rack,
            index_in_rack=n,
            role=role,
            ipv4=[ip(n)] if ipv4 is None else ipv4,
            labels=labels or {},
            register_date=BASE,
            retire_date=None if retire_days is None else BASE + dt.timedelta(days=retire_days),
        ),
        status=MachineStatus(state=state, timestamp=BASE),
    )


def with_state(m: Machine, state: S) -> Machine:
    return m.model_copy(update={"status": MachineStatus(state=state, timestamp=BASE)})


def template(
    cp_role: str = "",
    worker_roles: Sequence[str] = ("",),
    *,
    user: str = "cybozu",
    extra: dict[str, object] | None = None,
) -> Cluster:
    def labels(role: str) -> dict[str, str]:
        return {LABEL_ROLE: role} if role else {}

    nodes = [Node(address="", user=user, control_plane=True, labels=labels(cp_role))]
    nodes += [Node(address="", user=user, labels=labels(r)) for r in worker_roles]
    return Cluster.model_validate(
        {"name": "c", "service_subnet": "10.68.0.0/16", "nodes": nodes, **(extra or {})}
    )


def cons(count: int = 3, rate: int = 80) -> Constraints:
    return Constraints(control_plane_count=count, minimum_workers_rate=rate)


def ok(result: Generated | Refusal) -> Generated:
    assert isinstance(result, Generated), result
    return result


def refused(result: Generated | Refusal, rule: str) -> Refusal:
    assert isinstance(result, Refusal), result
    assert result.rule == rule, result
    return result


def cps(c: Cluster) -> list[str]:
    return [n.address for n in c.control_planes]


def workers(c: Cluster) -> list[str]:
    return [n.address for n in c.workers]


# ---------------------------------------------------------------------------
# The rules on their own.
# ---------------------------------------------------------------------------


def test_valid_template_accepts_upstream_shapes() -> None:
    assert valid_template(template()) is None
    assert valid_template(template("cs", ("cs", "ss", "gpu"))) is None
    assert valid_template(template("", ("cs",))) is None


@pytest.mark.parametrize(
    ("tmpl", "expected"),
    [
        (
            Cluster(name="c", service_subnet="10.68.0.0/16", nodes=[Node(address="", user="u")]),
            "want exactly one control-plane node template, got 0",
        ),
        (
            Cluster(
                name="c",
                service_subnet="10.68.0.0/16",
                nodes=[Node(address="", user="u", control_plane=True)] * 2
                + [Node(address="", user="u")],
            ),
            "got 2",
        ),
        (
            Cluster(
                name="c",
                service_subnet="10.68.0.0/16",
                nodes=[Node(address="", user="u", control_plane=True)],
            ),
            "want at least one worker node template",
        ),
        (template("", ("", "")), "each needs its own cke.cybozu.com/role"),
        (template("", ("cs", "cs")), "each needs its own cke.cybozu.com/role"),
        (template("", ("cs", "")), "each needs its own cke.cybozu.com/role"),
        (
            template().model_copy(
                update={
                    "nodes": [
                        Node(address="10.0.0.1", user="u", control_plane=True),
                        Node(address="", user="u"),
                    ]
                }
            ),
            "template.nodes[0].address: must be empty in a template",
        ),
        (
            template().model_copy(
                update={
                    "nodes": [
                        Node(address="", user="u", control_plane=True),
                        Node(
                            address="",
                            user="u",
                            taints=[Taint(key="cke.cybozu.com/role", effect="NoExecute")],
                        ),
                    ]
                }
            ),
            "template.nodes[1].taints[0].key: keys containing 'cke.cybozu.com/' are reserved",
        ),
        (template(user=""), "template.nodes[0].user: must not be empty"),
        (
            template().model_copy(update={"service_subnet": "nope"}),
            "template.service_subnet:",
        ),
    ],
)
def test_valid_template_refuses(tmpl: Cluster, expected: str) -> None:
    refusal = valid_template(tmpl)
    assert refusal is not None
    assert refusal.rule == RULE_VALID_TEMPLATE
    assert expected in refusal.reason


def test_valid_template_allows_the_role_selector_label_only() -> None:
    bad = template().model_copy(
        update={
            "nodes": [
                Node(address="", user="u", control_plane=True, labels={LABEL_ROLE: "cs"}),
                Node(address="", user="u", labels={"cke.cybozu.com/rack": "1"}),
            ]
        }
    )
    refusal = valid_template(bad)
    assert refusal is not None
    assert 'template.nodes[1].labels["cke.cybozu.com/rack"]' in refusal.reason
    assert "nodes[0]" not in refusal.reason


@pytest.mark.parametrize(
    ("current", "lost", "refuse"),
    [
        ([], {}, False),
        (["a"], {}, False),
        (["a"], {"a": "unreachable"}, True),
        (["a", "b"], {"a": "unhealthy"}, True),
        (["a", "b", "c"], {"a": "retired"}, False),
        (["a", "b", "c"], {"a": "retired", "c": "missing from sabakan"}, True),
        (["a", "b", "c", "d", "e"], {"a": "x", "b": "y"}, False),
        (["a", "b", "c", "d"], {"a": "x", "b": "y"}, True),
    ],
)
def test_enough_control_planes_survive(
    current: list[str], lost: dict[str, str], refuse: bool
) -> None:
    refusal = enough_control_planes_survive(current, lost)
    if not refuse:
        assert refusal is None
        return
    assert refusal is not None
    assert refusal.rule == RULE_ENOUGH_CONTROL_PLANES_SURVIVE
    assert refusal.nodes == tuple(a for a in current if a in lost)
    assert f"of the {len(current)} control planes survive" in refusal.reason


@pytest.mark.parametrize(
    ("count", "target", "refuse"),
    [(0, 5, False), (3, 3, False), (3, 4, False), (3, 2, False), (3, 5, True), (5, 3, True)],
)
def test_one_control_plane_step(count: int, target: int, refuse: bool) -> None:
    refusal = one_control_plane_step(count, target)
    assert (refusal is not None) == refuse
    if refusal is not None:
        assert refusal.rule == RULE_ONE_CONTROL_PLANE_CHANGE


@pytest.mark.parametrize(
    ("old", "new", "refuse"),
    [
        (set(), {"a", "b", "c"}, False),
        ({"a", "b", "c"}, {"a", "b", "c"}, False),
        ({"a", "b", "c"}, {"a", "b", "d"}, False),
        ({"a", "b", "c"}, {"a", "b", "c", "d"}, False),
        ({"a", "b", "c"}, {"a", "b"}, False),
        ({"a", "b", "c"}, {"a", "d", "e"}, True),
        ({"a", "b", "c"}, {"a", "b", "c", "d", "e"}, True),
        ({"a", "b", "c"}, {"a"}, True),
    ],
)
def test_one_control_plane_change(old: set[str], new: set[str], refuse: bool) -> None:
    refusal = one_control_plane_change(old, new)
    assert (refusal is not None) == refuse
    if refusal is not None:
        assert refusal.rule == RULE_ONE_CONTROL_PLANE_CHANGE
        assert set(refusal.nodes) == old ^ new


def test_healthy_candidate_available() -> None:
    assert healthy_candidate_available(["a"], 1, "cs") is None
    assert healthy_candidate_available(["a", "b", "c"], 3, "") is None
    refusal = healthy_candidate_available(["a"], 3, "cs")
    assert refusal is not None
    assert refusal.rule == RULE_HEALTHY_CANDIDATE_AVAILABLE
    assert "3 healthy machine(s) of role 'cs' needed" in refusal.reason
    assert "1 available" in refusal.reason
    no_role = healthy_candidate_available([], 1, "")
    assert no_role is not None and "role" not in no_role.reason


@pytest.mark.parametrize(
    ("after", "machines", "rate", "refuse"),
    [
        (8, 10, 80, False),
        (7, 10, 80, True),
        (0, 10, 0, False),
        (9, 10, 100, True),
        (1, 0, 80, False),
    ],
)
def test_minimum_workers_rate(after: int, machines: int, rate: int, refuse: bool) -> None:
    refusal = minimum_workers_rate(after, machines, rate, "10.0.0.9")
    assert (refusal is not None) == refuse
    if refusal is not None:
        assert refusal.rule == RULE_MINIMUM_WORKERS_RATE
        assert refusal.nodes == ("10.0.0.9",)
        assert f"{after} worker(s) for {machines} machine(s)" in refusal.reason


def test_keep_etcd_majority() -> None:
    one = Cluster(
        name="c",
        service_subnet="10.68.0.0/16",
        nodes=[Node(address="10.0.0.1", user="u", control_plane=True)],
    )
    assert keep_etcd_majority([], one) is None
    assert keep_etcd_majority(["10.0.0.1"], one) is None
    refusal = keep_etcd_majority(["10.0.0.1", "10.0.0.2"], one)
    assert refusal is not None
    assert refusal.rule == RULE_KEEP_ETCD_MAJORITY
    assert refusal.nodes == ("10.0.0.2",)


def test_valid_cluster_names_the_field() -> None:
    c = Cluster(
        name="c",
        service_subnet="10.68.0.0/16",
        nodes=[Node(address="10.0.0.1", user="u", control_plane=True)],
    )
    assert valid_cluster(c, cons(1)) is None
    refusal = valid_cluster(c, cons(3))
    assert refusal is not None
    assert refusal.rule == RULE_VALID_CLUSTER
    assert "nodes: 1 control plane(s), but constraint control-plane-count is 3" in refusal.reason


# ---------------------------------------------------------------------------
# The first generation.
# ---------------------------------------------------------------------------


def test_first_generation_spreads_control_planes_over_racks() -> None:
    ms = [machine(i, rack=i // 2) for i in range(6)]  # racks 0, 0, 1, 1, 2, 2
    g = ok(generate(ms, template(), None, cons(3)))
    racks = {m.spec.rack for m in ms if m.spec.ipv4[0] in cps(g.cluster)}
    assert racks == {0, 1, 2}
    assert sorted(workers(g.cluster)) == sorted(
        ip(i) for i in range(6) if ip(i) not in cps(g.cluster)
    )
    assert g.changes[:3] == tuple(f"add control plane {ip(i)} (rack {i // 2})" for i in (0, 2, 4))
    assert validate_cluster(g.cluster, cons(3)) is None


def test_first_generation_more_control_planes_than_racks() -> None:
    ms = [machine(i, rack=i % 2) for i in range(6)]
    g = ok(generate(ms, template(), None, cons(3)))
    racks = sorted(m.spec.rack for m in ms if m.spec.ipv4[0] in cps(g.cluster))
    assert racks in ([0, 0, 1], [0, 1, 1])


def test_first_generation_prefers_machines_that_retire_later() -> None:
    ms = [
        machine(0, retire_days=100),
        machine(1, retire_days=None),
        machine(2, retire_days=3000),
        machine(3, retire_days=-50),
    ]
    assert cps(ok(generate(ms, template(), None, cons(1))).cluster) == [ip(2)]
    assert sorted(cps(ok(generate(ms, template(), None, cons(3))).cluster)) == [ip(0), ip(2), ip(3)]


def test_first_generation_picks_healthy_machines_of_the_control_plane_role() -> None:
    ms = [
        machine(0, role="ss"),
        machine(1, state=S.UNREACHABLE),
        machine(2, state=S.RETIRING),
        machine(3),
        machine(4, state=S.UNINITIALIZED),
    ]
    g = ok(generate(ms, template("cs", ("cs", "ss")), None, cons(1)))
    assert cps(g.cluster) == [ip(3)]
    assert workers(g.cluster) == [ip(0)]  # only healthy machines become nodes


def test_first_generation_refuses_without_enough_healthy_machines() -> None:
    ms = [machine(0), machine(1, state=S.UNHEALTHY), machine(2, role="ss")]
    refusal = refused(
        generate(ms, template("cs", ("cs", "ss")), None, cons(2)), RULE_HEALTHY_CANDIDATE_AVAILABLE
    )
    assert refusal.nodes == (ip(0),)
    refused(generate([], template(), None, cons(1)), RULE_HEALTHY_CANDIDATE_AVAILABLE)


def test_first_generation_refuses_a_bad_template() -> None:
    refused(generate([machine(0)], template("", ("", "")), None, cons(1)), RULE_VALID_TEMPLATE)


def test_workers_follow_their_role_template() -> None:
    ms = [machine(0, role="cs"), machine(1, role="ss"), machine(2, role="gpu"), machine(3)]
    tmpl = template("cs", ("cs", "ss"))
    tmpl = tmpl.model_copy(
        update={
            "nodes": [
                tmpl.nodes[0],
                tmpl.nodes[1].model_copy(update={"user": "compute"}),
                tmpl.nodes[2].model_copy(
                    update={
                        "user": "storage",
                        "taints": [Taint(key="storage", value="yes", effect="NoExecute")],
                    }
                ),
            ]
        }
    )
    g = ok(generate(ms, tmpl, None, cons(1)))
    nodes = {n.address: n for n in g.cluster.nodes}
    assert ip(2) not in nodes  # no template for gpu
    assert nodes[ip(1)].user == "storage" and nodes[ip(1)].taints[0].key == "storage"
    worker_cs = ip(0) if nodes[ip(3)].control_plane else ip(3)
    assert nodes[worker_cs].user == "compute"
    assert "add worker 10.0.0.2 (rack 0, role ss)" in g.changes


def test_node_fields_come_from_template_and_machine_without_reserved_keys() -> None:
    tmpl = template("cs", ("cs",))
    tmpl = tmpl.model_copy(
        update={
            "nodes": [
                tmpl.nodes[0].model_copy(
                    update={
                        "port": 2222,
                        "hostname": "ignored",
                        "labels": {LABEL_ROLE: "cs", "team": "a", LABEL_ZONE: "overridden"},
                        "annotations": {"note": "x"},
                        "taints": [Taint(key="dedicated", value="cp", effect="NoSchedule")],
                    }
                ),
                tmpl.nodes[1],
            ]
        }
    )
    ms = [machine(0, rack=7, labels={"product": "x"}, state=S.HEALTHY)]
    node = ok(generate(ms, tmpl, None, cons(1))).cluster.nodes[0]
    assert node.address == ip(0)
    assert node.hostname == ""
    assert node.port == 2222
    assert node.user == "cybozu"
    assert node.control_plane
    assert node.labels == {"team": "a", LABEL_ZONE: "rack7"}
    assert node.annotations == {"note": "x"}
    assert node.taints == [Taint(key="dedicated", value="cp", effect="NoSchedule")]
    for key in [*node.labels, *node.annotations, *(t.key for t in node.taints)]:
        assert reserved_key_problem(key) is None


def test_machine_metadata_is_what_upstream_sets() -> None:
    m = with_state(machine(3, rack=2, role="cs", labels={"product": "x"}), S.RETIRING)
    meta = machine_metadata(m, control_plane=True)
    assert meta.labels == {
        "sabakan.cke.cybozu.com/product": "x",
        "cke.cybozu.com/rack": "2",
        "cke.cybozu.com/index-in-rack": "3",
        "cke.cybozu.com/role": "cs",
        "cke.cybozu.com/register-month": "2025-01",
        "cke.cybozu.com/retire-month": "2027-09",
        "cke.cybozu.com/retire-year": "2027",
        "node-role.kubernetes.io/cs": "true",
        "node-role.kubernetes.io/master": "true",
        "node-role.kubernetes.io/control-plane": "true",
        "topology.kubernetes.io/zone": "rack2",
    }
    assert meta.annotations == {
        "cke.cybozu.com/serial": "s0003",
        "cke.cybozu.com/register-date": "2025-01-01T00:00:00Z",
        "cke.cybozu.com/retire-date": "2027-09-28T00:00:00Z",
    }
    assert meta.taints == (Taint(key="cke.cybozu.com/state", value="retiring", effect="NoExecute"),)
    assert machine_metadata(machine(1), control_plane=False).taints == ()
    unreachable = machine_metadata(with_state(machine(1), S.UNREACHABLE), control_plane=False)
    assert unreachable.taints[0].effect == "NoSchedule"


def test_machines_without_ipv4_or_sharing_an_address_are_left_out() -> None:
    ms = [
        machine(0),
        machine(1, ipv4=[]),
        machine(2, ipv4=[ip(5)]),
        machine(3, ipv4=[ip(5)]),
    ]
    g = ok(generate(ms, template(), None, cons(1)))
    assert [n.address for n in g.cluster.nodes] == [ip(0)]
    assert [h.rule for h in g.held] == [RULE_ONE_MACHINE_PER_ADDRESS]
    assert g.held[0].nodes == (ip(5),)
    assert "s0002, s0003" in g.held[0].reason


def test_generation_is_independent_of_machine_order() -> None:
    ms = [machine(i, rack=i % 3, retire_days=(i * 37) % 500) for i in range(12)]
    a = ok(generate(ms, template(), None, cons(3)))
    b = ok(generate(list(reversed(ms)), template(), None, cons(3)))
    assert a == b


# ---------------------------------------------------------------------------
# Later generations: control planes.
# ---------------------------------------------------------------------------


def three_racks() -> list[Machine]:
    """Control planes will be 0, 2, 4 (racks 0, 1, 2); workers 1, 3, 5, and 6 in rack 3."""
    return [machine(i, rack=i // 2) for i in range(7)]


def start(ms: Sequence[Machine], count: int = 3, tmpl: Cluster | None = None) -> Cluster:
    g = ok(generate(ms, tmpl or template(), None, cons(count)))
    return g.cluster


def test_unchanged_machines_give_no_change() -> None:
    ms = three_racks()
    first = start(ms)
    again = ok(generate(ms, template(), first, cons(3)))
    assert again.changes == ()
    assert not again.changed and not again.pending
    assert again.cluster == first


def test_replace_unreachable_control_plane_in_an_unused_rack() -> None:
    ms = three_racks()
    first = start(ms)
    assert cps(first) == [ip(0), ip(2), ip(4)]
    ms[2] = with_state(ms[2], S.UNREACHABLE)
    # 1 (rack 0) and 5 (rack 2) share a rack with a control plane; 3 (rack 1) and 6
    # (rack 3) do not, and 6 retires later.
    ms[3] = machine(3, rack=1, retire_days=500)
    g = ok(generate(ms, template(), first, cons(3)))
    assert cps(g.cluster) == [ip(0), ip(4), ip(6)]
    assert g.changes == (
        f"replace control plane {ip(2)} (unreachable) with worker {ip(6)} (rack 3)",
        f"demote control plane {ip(2)} (unreachable) to worker",
    )
    assert ip(2) in workers(g.cluster)
    assert not g.pending


def test_replace_prefers_unused_machines_and_later_retirement() -> None:
    ms = three_racks()
    first = start(ms)
    ms[0] = with_state(ms[0], S.RETIRING)
    ms += [machine(10, rack=0, retire_days=10), machine(11, rack=1, retire_days=2000)]
    ms += [machine(12, rack=5, retire_days=50), machine(13, rack=6, retire_days=400)]
    g = ok(generate(ms, template(), first, cons(3)))
    assert g.changes[0] == f"replace control plane {ip(0)} (retiring) with {ip(13)} (rack 6)"
    assert set(cps(g.cluster)) == {ip(2), ip(4), ip(13)}
    assert {ip(10), ip(11), ip(12)} <= set(workers(g.cluster))


def test_replace_missing_control_plane() -> None:
    ms = three_racks()
    first = start(ms)
    del ms[4]
    g = ok(generate(ms, template(), first, cons(3)))
    assert g.changes == (
        f"replace control plane {ip(4)} (missing from sabakan) with worker {ip(5)} (rack 2)",
        f"remove control plane {ip(4)} (missing from sabakan)",
    )
    assert ip(4) not in [n.address for n in g.cluster.nodes]


def test_updating_and_uninitialized_control_planes_stay() -> None:
    ms = three_racks()
    first = start(ms)
    ms[0] = with_state(ms[0], S.UPDATING)
    ms[2] = with_state(ms[2], S.UNINITIALIZED)
    g = ok(generate(ms, template(), first, cons(3)))
    assert cps(g.cluster) == cps(first)
    assert g.changes == ()


def test_one_control_plane_change_per_generation() -> None:
    ms = [machine(i, rack=i) for i in range(8)]
    first = start(ms, 5)
    assert cps(first) == [ip(i) for i in range(5)]
    ms[1] = with_state(ms[1], S.UNHEALTHY)
    del ms[3]
    g1 = ok(generate(ms, template(), first, cons(5)))
    assert g1.pending
    assert [h.rule for h in g1.held] == [RULE_ONE_CONTROL_PLANE_CHANGE]
    assert g1.changes[0].startswith(f"replace control plane {ip(3)} (missing from sabakan)")
    assert ip(3) not in cps(g1.cluster) and ip(1) in cps(g1.cluster)
    assert g1.held[0].nodes == (ip(1),)
    g2 = ok(generate(ms, template(), g1.cluster, cons(5)))
    assert g2.changes[0].startswith(f"replace control plane {ip(1)} (unhealthy)")
    assert not g2.pending
    g3 = ok(generate(ms, template(), g2.cluster, cons(5)))
    assert g3.changes == () and g3.cluster == g2.cluster


def test_a_missing_control_plane_waiting_is_kept_as_it_was() -> None:
    ms = [machine(i, rack=i) for i in range(8)]
    first = start(ms, 5)
    del ms[4]
    del ms[3]
    g = ok(generate(ms, template(), first, cons(5)))
    kept = [n for n in g.cluster.nodes if n.address == ip(4)]
    assert kept == [n for n in first.nodes if n.address == ip(4)]
    assert g.pending


def test_refuses_when_too_few_control_planes_survive() -> None:
    ms = three_racks()
    first = start(ms)
    ms[0] = with_state(ms[0], S.UNREACHABLE)
    ms[2] = with_state(ms[2], S.RETIRED)
    refusal = refused(generate(ms, template(), first, cons(3)), RULE_ENOUGH_CONTROL_PLANES_SURVIVE)
    assert refusal.nodes == (ip(0), ip(2))
    assert "only 1 of the 3 control planes survive" in refusal.reason


def test_refuses_to_replace_the_only_control_plane() -> None:
    ms = three_racks()
    first = start(ms, 1)
    ms[0] = with_state(ms[0], S.UNREACHABLE)
    refused(generate(ms, template(), first, cons(1)), RULE_ENOUGH_CONTROL_PLANES_SURVIVE)


def test_refuses_when_no_healthy_candidate() -> None:
    ms = [machine(i, rack=i, role="cs" if i < 3 else "ss") for i in range(5)]
    tmpl = template("cs", ("cs", "ss"))
    first = start(ms, 3, tmpl)
    ms[1] = with_state(ms[1], S.UNHEALTHY)
    refusal = refused(generate(ms, tmpl, first, cons(3)), RULE_HEALTHY_CANDIDATE_AVAILABLE)
    assert "of role 'cs'" in refusal.reason


def test_increase_control_plane_count_by_one() -> None:
    ms = three_racks()
    first = start(ms, 3)
    g = ok(generate(ms, template(), first, cons(4)))
    assert cps(g.cluster) == [ip(0), ip(2), ip(4), ip(6)]
    assert g.changes == (f"promote control plane worker {ip(6)} (rack 3)",)
    ms.append(machine(20, rack=9))
    g = ok(generate(ms, template(), first, cons(4)))
    assert g.changes[0] == f"add control plane {ip(20)} (rack 9)"


def test_decrease_control_plane_count_demotes_the_worst() -> None:
    ms = three_racks()
    first = start(ms, 3)
    g = ok(generate(ms, template(), first, cons(2)))
    assert len(cps(g.cluster)) == 2
    assert len(g.changes) == 1 and g.changes[0].startswith("demote control plane")
    ms[2] = with_state(ms[2], S.UNHEALTHY)
    g = ok(generate(ms, template(), first, cons(2)))
    assert g.changes == (f"demote control plane {ip(2)} (unhealthy) to worker",)
    assert cps(g.cluster) == [ip(0), ip(4)]


def test_refuses_control_plane_count_two_away() -> None:
    ms = three_racks()
    first = start(ms, 3)
    refused(generate(ms, template(), first, cons(5)), RULE_ONE_CONTROL_PLANE_CHANGE)
    refused(generate(ms, template(), first, cons(1)), RULE_ONE_CONTROL_PLANE_CHANGE)


def test_two_to_one_control_plane_is_refused_as_the_server_would() -> None:
    ms = three_racks()
    first = start(ms, 2)
    refused(generate(ms, template(), first, cons(1)), RULE_KEEP_ETCD_MAJORITY)


def test_demoted_control_plane_without_worker_template_is_removed() -> None:
    ms = [machine(i, rack=i, role="cp" if i < 4 else "cs") for i in range(6)]
    tmpl = template("cp", ("cs",))
    first = start(ms, 3, tmpl)
    ms[0] = with_state(ms[0], S.UNHEALTHY)
    g = ok(generate(ms, tmpl, first, cons(3)))
    assert g.changes == (
        f"replace control plane {ip(0)} (unhealthy) with {ip(3)} (rack 3)",
        f"remove control plane {ip(0)} (unhealthy, no worker template fits it)",
    )


# ---------------------------------------------------------------------------
# Later generations: workers and templates.
# ---------------------------------------------------------------------------


def test_workers_added_removed_and_kept() -> None:
    ms = [machine(i, rack=i) for i in range(8)]
    first = start(ms, 1)
    ms[1] = with_state(ms[1], S.UNREACHABLE)
    ms[2] = with_state(ms[2], S.RETIRING)
    ms[3] = with_state(ms[3], S.UNHEALTHY)
    del ms[4]
    ms.append(machine(9, rack=1))
    ms.append(machine(10, rack=1, state=S.UNINITIALIZED))
    g = ok(generate(ms, template(), first, cons(1)))
    assert g.changes == (
        f"remove worker {ip(4)} (missing from sabakan)",
        f"add worker {ip(9)} (rack 1, role cs)",
    )
    assert workers(g.cluster) == [ip(i) for i in (1, 2, 3, 5, 6, 7, 9)]


def test_retired_workers_leave_within_the_minimum_workers_rate() -> None:
    ms = [machine(i, rack=i) for i in range(11)]  # 1 control plane, 10 workers
    first = start(ms, 1)
    for i in (1, 2, 3):
        ms[i] = with_state(ms[i], S.RETIRED)
    # 11 machines at 80%: at least 8.8 workers, so only 1 of 10 may go (9 left).
    g = ok(generate(ms, template(), first, cons(1, rate=80)))
    assert g.changes == (f"remove worker {ip(1)} (retired)",)
    assert [h.rule for h in g.held] == [RULE_MINIMUM_WORKERS_RATE] * 2
    assert [h.nodes for h in g.held] == [(ip(2),), (ip(3),)]
    again = ok(generate(ms, template(), g.cluster, cons(1, rate=80)))
    assert again.changes == () and again.cluster == g.cluster
    g = ok(generate(ms, template(), first, cons(1, rate=0)))
    assert g.changes == tuple(f"remove worker {ip(i)} (retired)" for i in (1, 2, 3))


def test_template_change_updates_every_node() -> None:
    ms = three_racks()
    first = start(ms)
    tmpl = template(user="admin", extra={"dns_servers": ["10.0.9.9"]})
    g = ok(generate(ms, tmpl, first, cons(3)))
    assert g.changes == (
        *(f"update node {ip(i)} (user)" for i in (0, 2, 4, 1, 3, 5, 6)),
        "update cluster settings from the template (dns_servers)",
    )
    assert {n.user for n in g.cluster.nodes} == {"admin"}


def test_worker_no_template_fits_is_kept_as_it_is() -> None:
    ms = [machine(i, rack=i, role="cs" if i < 3 else "ss") for i in range(5)]
    first = start(ms, 1, template("cs", ("cs", "ss")))
    tmpl = template("cs", ("cs",))
    g = ok(generate(ms, tmpl, first, cons(1)))
    assert g.changes == ()
    assert {h.rule for h in g.held} == {RULE_WORKER_TEMPLATE_MATCHES}
    assert sorted(h.nodes[0] for h in g.held) == [ip(3), ip(4)]


def test_reorder_is_a_change() -> None:
    ms = three_racks()
    first = start(ms)
    shuffled = first.model_copy(update={"nodes": list(reversed(first.nodes))})
    g = ok(generate(ms, template(), shuffled, cons(3)))
    assert g.changes == ("reorder nodes (control planes first, then by address)",)
    assert g.cluster == first


def test_invalid_result_is_refused_naming_the_field() -> None:
    ms = [machine(i, rack=i, role="cs" if i < 3 else "ss") for i in range(4)]
    first = start(ms, 1, template("cs", ("cs", "ss")))
    # A kept worker (no template fits it any more) is named like a new machine's address.
    odd = first.model_copy(
        update={
            "nodes": [
                n.model_copy(update={"hostname": ip(5)}) if n.address == ip(3) else n
                for n in first.nodes
            ]
        }
    )
    ms.append(machine(5))
    refusal = refused(generate(ms, template("cs", ("cs",)), odd, cons(1)), RULE_VALID_CLUSTER)
    assert "nodes[4].address: node name duplicate of nodes[3]" in refusal.reason


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------

STATES = [S.HEALTHY] * 6 + list(S)
TEMPLATES = [
    template("", ("",)),
    template("cs", ("",)),
    template("cs", ("cs",)),
    template("", ("cs", "ss")),
    template("cs", ("cs", "ss")),
]


@st.composite
def machine_lists(draw: st.DrawFn, states: Sequence[S] = STATES) -> list[Machine]:
    numbers = draw(st.lists(st.integers(0, 40), unique=True, max_size=16))
    return [
        machine(
            n,
            rack=draw(st.integers(0, 3)),
            role=draw(st.sampled_from(["cs", "ss"])),
            state=draw(st.sampled_from(states)),
            retire_days=draw(st.none() | st.integers(-2000, 2000)),
        )
        for n in numbers
    ]


CHANGED_STATES = [S.RETIRED, S.RETIRED, S.UNREACHABLE, S.UNHEALTHY, *S]


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (hypothesis favours small integers, so not 0)."""
    return st.sampled_from([False] * (n - 1) + [True])


@st.composite
def evolve(draw: st.DrawFn, ms: list[Machine], control_planes: set[str]) -> list[Machine]:
    """Time passes: machines change state, leave, and arrive (control planes less often)."""
    out: list[Machine] = []
    for m in ms:
        rare = m.spec.ipv4[0] in control_planes
        if draw(one_in(16 if rare else 8)):
            continue
        if draw(one_in(8 if rare else 3)):
            m = with_state(m, draw(st.sampled_from(CHANGED_STATES)))
        out.append(m)
    taken = {m.spec.ipv4[0] for m in out} | {m.spec.ipv4[0] for m in ms}
    for new in draw(machine_lists()):
        if new.spec.ipv4[0] not in taken:
            out.append(new)
    return out


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[list[Machine], Cluster, Cluster, Constraints]:
    tmpl = draw(st.sampled_from(TEMPLATES))
    before = draw(machine_lists())
    count = draw(st.sampled_from([1, 2, 3, 3, 4, 5, 5]))
    first = generate(before, tmpl, None, cons(count))
    assume(isinstance(first, Generated))
    assert isinstance(first, Generated)
    after = draw(evolve(before, set(cps(first.cluster))))
    delta = draw(st.sampled_from([0, 0, 0, 1, -1, 2]))
    constraints = cons(max(1, count + delta), rate=draw(st.integers(0, 100)))
    return after, tmpl, first.cluster, constraints


PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much]
)


def machines_by_address(ms: Sequence[Machine]) -> dict[str, list[Machine]]:
    out: dict[str, list[Machine]] = {}
    for m in ms:
        if m.spec.ipv4:
            out.setdefault(m.spec.ipv4[0], []).append(m)
    return out


@PROPERTY
@given(st.sampled_from(TEMPLATES), machine_lists(), st.integers(1, 4))
def test_property_first_generation(tmpl: Cluster, ms: list[Machine], count: int) -> None:
    result = generate(ms, tmpl, None, cons(count))
    by_address = machines_by_address(ms)
    if isinstance(result, Refusal):
        assert result.rule == RULE_HEALTHY_CANDIDATE_AVAILABLE
        return
    validate_cluster(result.cluster, cons(count))
    for node in result.cluster.nodes:
        (m,) = by_address[node.address]
        assert m.status.state == S.HEALTHY
    assert generate(list(reversed(ms)), tmpl, None, cons(count)) == result
    again = ok(generate(ms, tmpl, result.cluster, cons(count)))
    assert again.changes == () and again.cluster == result.cluster


@PROPERTY
@given(scenarios(), st.data())
def test_property_later_generations(
    scenario: tuple[list[Machine], Cluster, Cluster, Constraints], data: st.DataObject
) -> None:
    check_later_generation(*scenario, data.draw(st.permutations(scenario[0])))


@st.composite
def many_control_planes_lost(
    draw: st.DrawFn,
) -> tuple[list[Machine], Cluster, Cluster, Constraints]:
    """Five control planes of a healthy fleet, two of them lost, the rest as it comes."""
    size = draw(st.integers(7, 14))
    fleet = [machine(i, rack=draw(st.integers(0, 4))) for i in range(size)]
    first = ok(generate(fleet, template(), None, cons(5)))
    lost = draw(st.lists(st.sampled_from(cps(first.cluster)), min_size=2, max_size=2, unique=True))
    after: list[Machine] = []
    for m in draw(evolve(fleet, set(cps(first.cluster)))):
        if m.spec.ipv4[0] in lost:
            state = draw(st.sampled_from([None, S.UNREACHABLE, S.UNHEALTHY, S.RETIRED]))
            if state is None:
                continue
            m = with_state(m, state)
        after.append(m)
    return after, template(), first.cluster, cons(5, rate=draw(st.integers(0, 100)))


@PROPERTY
@given(many_control_planes_lost(), st.data())
def test_property_control_planes_replaced_one_at_a_time(
    scenario: tuple[list[Machine], Cluster, Cluster, Constraints], data: st.DataObject
) -> None:
    result = check_later_generation(*scenario, data.draw(st.permutations(scenario[0])))
    if isinstance(result, Generated):
        assert result.pending


def check_later_generation(
    ms: list[Machine],
    tmpl: Cluster,
    current: Cluster,
    constraints: Constraints,
    permuted: list[Machine],
) -> Generated | Refusal:
    result = generate(ms, tmpl, current, constraints)
    # Deterministic, whatever the order of the machines.
    assert generate(ms, tmpl, current, constraints) == result
    assert generate(permuted, tmpl, current, constraints) == result
    if isinstance(result, Refusal):
        return result
    validate_cluster(result.cluster, constraints)

    by_address = machines_by_address(ms)
    old_cps, new_cps = set(cps(current)), set(cps(result.cluster))
    # Never more than one control-plane change.
    assert len(old_cps - new_cps) <= 1 and len(new_cps - old_cps) <= 1
    # Never picks a machine that is not healthy: new nodes and new control planes.
    old_nodes = {n.address for n in current.nodes}
    for node in result.cluster.nodes:
        if node.address not in old_nodes or (node.control_plane and node.address not in old_cps):
            (m,) = by_address[node.address]
            assert m.status.state == S.HEALTHY
    # Never goes on when half of the control planes or more are lost.
    surviving = [
        a
        for a in old_cps
        if len(by_address.get(a, [])) == 1
        and by_address[a][0].status.state in KEPT_CONTROL_PLANE_STATES
    ]
    assert len(surviving) * 2 > len(old_cps)
    # The changes say whether anything changed.
    assert (result.changes == ()) == (result.cluster == current)
    # Done: a fixed point.  Pending: converges within a few generations.
    cluster = result.cluster
    pending = result.pending
    for _ in range(6):
        if not pending:
            again = ok(generate(ms, tmpl, cluster, constraints))
            assert again.changes == ()
            assert again.cluster == cluster
            return result
        step = generate(ms, tmpl, cluster, constraints)
        if isinstance(step, Refusal):
            return result
        assert one_control_plane_change(cps(cluster), cps(step.cluster)) is None
        cluster, pending = step.cluster, step.pending
    pytest.fail("the generations did not converge")
