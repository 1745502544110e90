"""rivers and etcd-rivers in the decision function (``cke/server/strategy.py``) and their
specs (``cke/op/rivers.py``): which proxies are started, restarted or stopped, with which
upstream list, and how a removal of a member waits for them. Pure: no processes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pytest

from cke.cluster import (
    Cluster,
    ClusterError,
    Constraints,
    Node,
    inert_fields,
    validate_cluster,
)
from cke.nodes.runtime import NodeFile
from cke.op.base import Operator
from cke.op.etcd import EtcdDestroyDataOp, EtcdPromoteOp, EtcdRemoveMemberOp
from cke.op.rivers import (
    ETCD_RIVERS_KIND,
    RIVERS_KIND,
    RiversKind,
    RiversOp,
    RiversStopOp,
    StartRivers,
    StopRivers,
    listen_host,
    rivers_spec,
)
from cke.server.clusterstatus import ClusterStatus, NodeStatus, ServiceStatus
from cke.server.phases import Phase
from cke.server.strategy import Decision
from tests.unit.etcd_builders import member, node_commands
from tests.unit.test_strategy import (
    A,
    B,
    C,
    D,
    E,
    clean,
    cluster,
    healthy,
    node_of,
    only,
    rules,
    run,
    running,
    status,
    with_member,
    with_node,
)

pytestmark = pytest.mark.unit

APP = b"#!/usr/bin/env python3\nrivers-test-app"
KINDS = (RIVERS_KIND, ETCD_RIVERS_KIND)


# ---------------------------------------------------------------------------
# Builders (the etcd ones come from test_strategy)
# ---------------------------------------------------------------------------


def with_app(s: ClusterStatus, app: bytes = APP, limit: int = 10) -> ClusterStatus:
    return dataclasses.replace(s, rivers_app=app, max_concurrent_updates=limit)


def with_services(
    s: ClusterStatus, address: str, services: Mapping[str, ServiceStatus]
) -> ClusterStatus:
    """``address`` also reports ``services`` (merged over what it reported)."""
    ns = s.nodes[address]
    return with_node(s, dataclasses.replace(ns, services={**ns.services, **services}))


def proxy(
    kind: RiversKind, c: Cluster, address: str, upstreams: Sequence[str], app: bytes = APP
) -> dict[str, ServiceStatus]:
    """A running ``kind`` on ``address`` started with that upstream list."""
    digest = rivers_spec(kind, node_of(c, address), upstreams, c, app).digest()
    return {kind.service: ServiceStatus(True, digest)}


def proxies(
    s: ClusterStatus, c: Cluster, upstreams: Sequence[str], app: bytes = APP
) -> ClusterStatus:
    """Every node of ``c`` runs rivers, every control plane etcd-rivers, listing
    ``upstreams``."""
    for n in c.nodes:
        s = with_services(s, n.address, proxy(RIVERS_KIND, c, n.address, upstreams, app))
        if n.control_plane:
            s = with_services(s, n.address, proxy(ETCD_RIVERS_KIND, c, n.address, upstreams, app))
    return s


def apply(s: ClusterStatus, op: Operator) -> ClusterStatus:
    """The status once every command of a rivers operation ran: what it started runs
    with the digest of the spec it was given; what it stopped is stopped."""
    for cmd in node_commands(op):
        if isinstance(cmd, StartRivers):
            started = {cmd.spec.name: ServiceStatus(True, cmd.spec.digest())}
            s = with_services(s, cmd.node.address, started)
        elif isinstance(cmd, StopRivers):
            s = with_services(s, cmd.node.address, {cmd.service: ServiceStatus(False)})
        else:
            raise AssertionError(f"not a rivers command: {cmd!r}")
    return s


def rivers_op(d: Decision, name: str, targets: Sequence[str]) -> RiversOp:
    op = only(d, RiversOp, targets)
    assert isinstance(op, RiversOp)
    assert op.name == name
    assert d.phase is Phase.RIVERS
    return op


def started_upstreams(op: RiversOp) -> set[str]:
    """The ``--upstreams`` argument of every spec the operation starts."""
    found = set()
    steps = copy.copy(op)  # its own position in the same commands: ``op`` is not consumed
    for cmd in node_commands(steps):
        assert isinstance(cmd, StartRivers)
        (arg,) = [a for a in cmd.spec.args if a.startswith("--upstreams=")]
        found.add(arg)
    return found


def states(d: Decision, addresses: Iterable[str], kind: RiversKind) -> set[str]:
    return {d.rivers[a][kind.service] for a in addresses}


def no_rivers_op(d: Decision) -> None:
    assert not any(isinstance(op, RiversOp | RiversStopOp) for op in d.operators), d


def with_doc(c: Cluster, **changes: Any) -> Cluster:
    """``c`` with top-level keys of its document replaced, validated as stored."""
    return Cluster.model_validate({**c.model_dump(by_alias=True), **changes})


# ---------------------------------------------------------------------------
# 1. Without the app nothing happens
# ---------------------------------------------------------------------------


def test_without_app_rivers_are_left_alone() -> None:
    c = cluster([A, B, C], [D])
    s = healthy(c, [A, B, C])
    assert s.rivers_app == b""
    d = run(c, s)
    assert d == Decision([], Phase.COMPLETED)
    assert d.rivers == {}
    no_rivers_op(d)


# ---------------------------------------------------------------------------
# 2. Bootstrap: rivers everywhere, then etcd-rivers on the control planes
# ---------------------------------------------------------------------------


def test_bootstrap_rivers_then_etcd_rivers_bounded_by_max_concurrent_updates() -> None:
    c = cluster([C, A, B], [E, D])  # not in address order
    s = with_app(healthy(c, [A, B, C]), limit=2)

    d = run(c, s)
    op = rivers_op(d, "rivers-bootstrap", [A, B])
    assert op.kind == RIVERS_KIND and op.upstreams == [A, B, C]
    assert started_upstreams(op) == {"--upstreams=10.0.0.1:6443,10.0.0.2:6443,10.0.0.3:6443"}
    assert d.blocked == []
    assert d.rivers == {
        A: {"rivers": "stopped", "etcd-rivers": "stopped"},
        B: {"rivers": "stopped", "etcd-rivers": "stopped"},
        C: {"rivers": "stopped", "etcd-rivers": "stopped"},
        D: {"rivers": "stopped"},
        E: {"rivers": "stopped"},
    }

    s = apply(s, op)
    d = run(c, s)
    assert d.rivers[A] == {"rivers": "current", "etcd-rivers": "stopped"}
    s = apply(s, rivers_op(d, "rivers-bootstrap", [C, D]))
    s = apply(s, rivers_op(run(c, s), "rivers-bootstrap", [E]))
    assert states(run(c, s), [A, B, C, D, E], RIVERS_KIND) == {"current"}

    # rivers is current everywhere: etcd-rivers, on the control planes only.
    d = run(c, s)
    op = rivers_op(d, "etcd-rivers-bootstrap", [A, B])
    assert op.kind == ETCD_RIVERS_KIND and op.upstreams == [A, B, C]
    assert started_upstreams(op) == {"--upstreams=10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379"}
    s = apply(s, op)
    s = apply(s, rivers_op(run(c, s), "etcd-rivers-bootstrap", [C]))

    d = run(c, s)
    assert d.operators == [] and d.phase is Phase.COMPLETED and d.blocked == []
    both = {"rivers": "current", "etcd-rivers": "current"}
    assert d.rivers == {
        A: both,
        B: both,
        C: both,
        D: {"rivers": "current"},
        E: {"rivers": "current"},
    }
    # What the decision calls current is what rivers_spec describes.
    assert s == proxies(s, c, [A, B, C])


# ---------------------------------------------------------------------------
# 3. A learner is no upstream until promoted
# ---------------------------------------------------------------------------


def test_learner_joins_the_upstreams_once_promoted() -> None:
    c = cluster([A, B, C, D], [E])
    base = with_app(healthy(c, [A, B, C], [running(c, D)]))

    # A lagging learner: promotion waits, the proxies start without it.
    s = with_member(base, member(D, learner=True, raft_index=1))
    d = run(c, s)
    op = rivers_op(d, "rivers-bootstrap", [A, B, C, D, E])
    assert op.upstreams == [A, B, C]
    assert started_upstreams(op) == {"--upstreams=10.0.0.1:6443,10.0.0.2:6443,10.0.0.3:6443"}
    assert rules(d) == {"learner-caught-up": (D,)}

    # An in-sync learner is promoted; proxies listing the voters only are current.
    s = proxies(with_member(base, member(D, learner=True)), c, [A, B, C])
    d = run(c, s)
    only(d, EtcdPromoteOp, [D])
    for kind in KINDS:
        assert states(d, [A, B, C, D], kind) == {"current"}
    assert d.rivers[E] == {"rivers": "current"}

    # Promoted: every proxy is outdated and is restarted with D in its list.
    s = with_member(s, member(D))
    d = run(c, s)
    for kind in KINDS:
        assert states(d, [A, B, C, D], kind) == {"outdated"}
    assert d.rivers[E] == {"rivers": "outdated"}
    op = rivers_op(d, "rivers-restart", [A, B, C, D, E])
    assert op.upstreams == [A, B, C, D]
    s = apply(s, op)
    op = rivers_op(run(c, s), "etcd-rivers-restart", [A, B, C, D])
    assert op.upstreams == [A, B, C, D]
    assert run(c, apply(s, op)) == Decision(
        [],
        Phase.COMPLETED,
        rivers={
            **{a: {"rivers": "current", "etcd-rivers": "current"} for a in (A, B, C, D)},
            E: {"rivers": "current"},
        },
    )


# ---------------------------------------------------------------------------
# 4. A dropped control plane leaves the lists before its member is removed
# ---------------------------------------------------------------------------


def test_dropped_control_plane_is_removed_once_no_proxy_lists_it() -> None:
    before = cluster([A, B, C, D], [E])
    c = cluster([A, B, C], [D, E])  # D dropped from the control planes
    s = with_app(healthy(c, [A, B, C, D]))  # D still a healthy voter
    s = proxies(s, before, [A, B, C, D])

    d = run(c, s)
    op = rivers_op(d, "rivers-restart", [A, B, C, D, E])
    assert op.upstreams == [A, B, C]
    assert started_upstreams(op) == {"--upstreams=10.0.0.1:6443,10.0.0.2:6443,10.0.0.3:6443"}
    assert not any(isinstance(o, EtcdRemoveMemberOp) for o in d.operators)
    assert list(rules(d)) == ["rivers-updated-first"]
    (blocked,) = d.blocked
    assert blocked.nodes == (D, A, B, C, E)  # the member first, each node once
    assert f"etcd member {D} leaves" in blocked.message
    # D is now a worker: no etcd-rivers of its own in the summary.
    assert d.rivers[D] == {"rivers": "outdated"}

    s = apply(s, op)
    d = run(c, s)
    op = rivers_op(d, "etcd-rivers-restart", [A, B, C])
    assert op.upstreams == [A, B, C]
    assert rules(d) == {"rivers-updated-first": (D, A, B, C)}

    s = apply(s, op)
    d = run(c, s)
    remove = only(d, EtcdRemoveMemberOp, [D])
    assert isinstance(remove, EtcdRemoveMemberOp) and remove.member.address == D
    assert d.phase is Phase.ETCD_MAINTAIN and d.blocked == []

    # Then, as ever, its data goes, and so does its etcd-rivers.
    s = dataclasses.replace(
        s,
        etcd=dataclasses.replace(
            s.etcd, members=tuple(m for m in s.etcd.members if m.address != D)
        ),
    )
    only(run(c, s), EtcdDestroyDataOp, [D])
    s = with_node(s, dataclasses.replace(s.nodes[D], etcd_running=False, etcd_has_data=False))
    d = run(c, s)
    stop = only(d, RiversStopOp, [D])
    assert stop.name == "etcd-rivers-stop" and d.phase is Phase.RIVERS


def test_unreachable_node_does_not_hold_back_the_removal() -> None:
    # Nothing can be sent to E anyway; its state is unknown, not outdated.
    before = cluster([A, B, C, D], [E])
    c = cluster([A, B, C], [D, E])
    s = proxies(with_app(healthy(c, [A, B, C, D])), c, [A, B, C])
    s = with_services(s, D, proxy(ETCD_RIVERS_KIND, before, D, [A, B, C, D]))
    s = with_services(s, E, proxy(RIVERS_KIND, before, E, [A, B, C, D]))
    s = with_node(s, dataclasses.replace(s.nodes[E], ssh_ok=False))
    d = run(c, s)
    only(d, EtcdRemoveMemberOp, [D])
    assert d.rivers[E] == {"rivers": "unknown"}
    # Reachable, E's old list holds the removal back.
    d = run(c, with_node(s, dataclasses.replace(s.nodes[E], ssh_ok=True)))
    rivers_op(d, "rivers-restart", [E])
    assert rules(d) == {"rivers-updated-first": (D, E)}


# ---------------------------------------------------------------------------
# 5. No voter among the desired control planes: no list, nothing touched
# ---------------------------------------------------------------------------


def test_etcd_unreachable_no_rivers_op() -> None:
    c = cluster([A, B, C], [D])
    s = status([], [running(c, a) for a in (A, B, C)] + [clean(D)])
    s = with_app(proxies(s, c, [A, B, C]))
    s = with_services(s, D, {"etcd-rivers": ServiceStatus(True, "old")})
    d = run(c, s)
    no_rivers_op(d)
    assert d.operators == [] and d.phase is Phase.ETCD_WAIT


def test_no_desired_voter_no_rivers_op_and_nothing_stopped() -> None:
    # The voters A, B, C are all dropped; the only control plane D is a lagging learner.
    before = cluster([A, B, C], [D])
    c = cluster([D], [A, B, C])
    s = with_app(healthy(c, [A, B, C], [running(c, D)]))
    s = with_member(s, member(D, learner=True, raft_index=1))
    s = proxies(s, before, [A, B, C])  # A, B, C run etcd-rivers (no longer control planes)
    d = run(c, s)
    no_rivers_op(d)
    assert d.operators == [] and d.phase is Phase.ETCD_MAINTAIN_ABORTED
    assert "rivers-updated-first" not in rules(d)
    assert d.rivers == {
        A: {"rivers": "waiting"},
        B: {"rivers": "waiting"},
        C: {"rivers": "waiting"},
        D: {"rivers": "waiting", "etcd-rivers": "waiting"},
    }


# ---------------------------------------------------------------------------
# 6. etcd-rivers on a node that is no control plane is stopped
# ---------------------------------------------------------------------------


def test_etcd_rivers_on_a_worker_is_stopped() -> None:
    c = cluster([A, B, C], [D, E])
    s = proxies(with_app(healthy(c, [A, B, C])), c, [A, B, C])
    s = with_services(s, D, {"etcd-rivers": ServiceStatus(True, "old")})

    # rivers comes first: E's stopped rivers is started before anything is stopped.
    s_first = with_services(s, E, {"rivers": ServiceStatus(False)})
    rivers_op(run(c, s_first), "rivers-bootstrap", [E])

    d = run(c, s)
    op = only(d, RiversStopOp, [D])
    assert isinstance(op, RiversStopOp)
    assert op.name == "etcd-rivers-stop" and op.kind == ETCD_RIVERS_KIND
    assert d.phase is Phase.RIVERS
    assert d.rivers[D] == {"rivers": "current"}

    s = apply(s, op)
    assert s.nodes[D].services["etcd-rivers"].running is False
    assert s.nodes[D].services["rivers"].running is True
    d = run(c, s)
    assert d.operators == [] and d.phase is Phase.COMPLETED


# ---------------------------------------------------------------------------
# 7. Unreachable nodes are never targeted
# ---------------------------------------------------------------------------


def test_unreachable_nodes_are_never_targeted() -> None:
    c = cluster([A, B, C], [D, E])
    s = with_app(healthy(c, [A, B, C]))
    s = with_node(s, running(c, C, ssh_ok=False))  # its etcd still healthy
    s = with_node(s, NodeStatus(E, ssh_ok=False, services={"rivers": ServiceStatus(False)}))

    targeted: set[str] = set()
    d = run(c, s)
    for _ in range(10):
        if not d.operators:
            break
        (op,) = d.operators
        assert isinstance(op, RiversOp)
        targeted.update(op.targets)
        s = apply(s, op)
        d = run(c, s)
    assert targeted == {A, B, D}
    assert d.operators == [] and d.phase is Phase.COMPLETED
    assert d.rivers[C] == {"rivers": "unknown", "etcd-rivers": "unknown"}
    assert d.rivers[E] == {"rivers": "unknown"}


def test_host_key_mismatch_node_is_never_targeted() -> None:
    c = cluster([A, B, C], [D])
    s = with_app(healthy(c, [A, B, C], [clean(D, host_key_mismatch=True)]))
    d = run(c, s)
    rivers_op(d, "rivers-bootstrap", [A, B, C])
    assert rules(d) == {"host-key-verified": (D,)}


# ---------------------------------------------------------------------------
# 8. The spec
# ---------------------------------------------------------------------------


def test_listen_host() -> None:
    assert listen_host(Node(address="10.0.0.1", user="root")) == "127.0.0.1"
    assert listen_host(Node(address="127.0.0.3", user="root")) == "127.0.0.3"
    assert listen_host(Node(address="::1", user="root")) == "[::1]"
    assert listen_host(Node(address="node1.example", user="root")) == "127.0.0.1"


def test_rivers_spec() -> None:
    c = with_doc(
        cluster([A, "127.0.0.2"]),
        binaries={"rivers": "/opt/bin/rivers"},
        options={
            "rivers": {"extra_args": ["--check-interval=5s"], "extra_env": {"Z": "1", "Y": "2"}},
            "etcd-rivers": {"extra_args": ["--dial-timeout=3s"], "extra_env": {"X": "3"}},
        },
    )
    ups = [C, A, B]

    spec = rivers_spec(RIVERS_KIND, node_of(c, A), ups, c, APP)
    assert spec.name == "rivers" and spec.binary == "/opt/bin/rivers"
    assert spec.args == (
        "--listen=127.0.0.1:16443",
        "--upstreams=10.0.0.1:6443,10.0.0.2:6443,10.0.0.3:6443",
        "--metrics=127.0.0.1:16444",  # on the listen host: loopback
        "--check-interval=5s",
    )
    assert spec.env == (("Y", "2"), ("Z", "1"))
    assert spec.files == (NodeFile("/opt/bin/rivers", APP, 0o755),)

    spec = rivers_spec(ETCD_RIVERS_KIND, node_of(c, "127.0.0.2"), ups, c, APP)
    assert spec.name == "etcd-rivers" and spec.binary == "/opt/bin/rivers"
    assert spec.args == (
        "--listen=127.0.0.2:12379",
        "--upstreams=10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379",
        "--metrics=127.0.0.2:12380",
        "--dial-timeout=3s",
    )
    assert spec.env == (("X", "3"),)
    assert spec.files == (NodeFile("/opt/bin/rivers", APP, 0o755),)

    def digest(app: bytes = APP, upstreams: Sequence[str] = ups) -> str:
        return rivers_spec(RIVERS_KIND, node_of(c, A), upstreams, c, app).digest()

    assert digest() == digest(upstreams=[A, B, C])  # the order given does not matter
    assert digest(app=APP + b"\n# v2") != digest()
    assert digest(upstreams=[A, B]) != digest()


# ---------------------------------------------------------------------------
# 9. Validation and inert fields
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("component", "arg", "flag"),
    [
        ("rivers", "--listen=0.0.0.0:1", "--listen"),
        ("rivers", "-listen=0.0.0.0:1", "--listen"),
        ("rivers", "--listen", "--listen"),
        ("etcd-rivers", "--upstreams=x", "--upstreams"),
    ],
)
def test_flags_cke_sets_are_refused(component: str, arg: str, flag: str) -> None:
    c = with_doc(cluster([A]), options={component: {"extra_args": [arg, "--metrics=:1"]}})
    with pytest.raises(ClusterError) as err:
        validate_cluster(c, Constraints())
    assert err.value.problems == (
        f"options.{component}.extra_args[0]: {flag} is set by cke and cannot be changed",
    )
    # The same options without it are accepted.
    validate_cluster(
        with_doc(c, options={component: {"extra_args": ["--metrics=:1"]}}), Constraints()
    )


def test_inert_fields_of_rivers() -> None:
    bind = {"source": "/a", "destination": "/b"}
    c = with_doc(
        cluster([A]),
        binaries={"rivers": "/opt/bin/rivers"},
        options={
            "rivers": {"extra_args": ["--metrics=:1"], "extra_binds": [bind]},
            "etcd-rivers": {"extra_env": {"X": "1"}, "extra_binds": [bind]},
        },
    )
    validate_cluster(c, Constraints())
    inert = inert_fields(c)
    assert "options.rivers.extra_binds" in inert
    assert "options.etcd-rivers.extra_binds" in inert
    assert not [f for f in inert if f.startswith("binaries.")]
    assert not {
        "options.rivers.extra_args",
        "options.rivers.extra_env",
        "options.etcd-rivers.extra_env",
    } & set(inert)
    assert inert_fields(cluster([A])) == []
