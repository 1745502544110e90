"""``ckecli plan`` and ``ckecli cluster set --dry-run``: the leader's decision, again.

Pure: the same :func:`cke.server.control.full_decision` the leader runs, on the stored
cluster (or a proposed one) and the status the leader last collected
(:mod:`cke.server.statusjson`). An operator's commands are all known when it is built
(``StepOperator``), so they are listed by asking ``next_command`` until it says none.

A dry run goes on past the first operation only where the operation's effect on the
status can be modelled honestly: ``etcd-restart`` (the member runs the desired spec, and
leadership went where the operation moved it) and ``rivers-*``/``etcd-rivers-*`` (the
proxies run the desired spec). After any other operation (a membership change, a wipe,
a reboot) the plan stops with "re-plan after this step": what the leader does next
depends on what the nodes and etcd report then.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cke.cluster import Cluster, Constraints
from cke.op.base import Commander, Operator, Parallel
from cke.op.etcd import EtcdRestartOp, desired_etcd_digest
from cke.op.rivers import RiversOp, RiversStopOp, StartRivers
from cke.server.clusterstatus import ClusterStatus, EtcdStatus, ServiceStatus
from cke.server.control import full_decision
from cke.server.safety import RULE_ETCD_NOSPACE, Blocked
from cke.server.strategy import Decision

# A plan never lists more steps than this (a cluster of 1,000 nodes restarting its
# rivers 10 at a time takes 200).
MAX_STEPS = 300
# An operator never has more commands than this; the listing stops there.
MAX_COMMANDS = 10_000
# Rules that report rather than refuse: they do not make a dry run fail.
REPORT_ONLY_RULES = frozenset({RULE_ETCD_NOSPACE})


def commands_of(operator: Operator) -> list[dict[str, Any]]:
    """The operator's commands in order; a parallel step lists its nodes."""
    out: list[dict[str, Any]] = []
    for _ in range(MAX_COMMANDS):
        command: Commander | None = operator.next_command()
        if command is None:
            break
        info = command.info
        doc: dict[str, Any] = {"name": info.name, "target": info.target, "detail": info.detail}
        if isinstance(command, Parallel):
            doc["parallel"] = [c.info.target for c in command.commands]
        out.append(doc)
    return out


def operation_doc(operator: Operator) -> dict[str, Any]:
    return {
        "operation": operator.name,
        "targets": list(operator.targets),
        "commands": commands_of(operator),
    }


@dataclass(frozen=True)
class Step:
    """One decision of a plan: what it would run (None: nothing) and what it holds back."""

    decision: Decision
    operation: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.decision.phase.value,
            "operation": self.operation,
            "blocked": [b.to_dict() for b in self.decision.blocked],
        }


# -- effects that can be modelled ----------------------------------------------------------


def _after_restart(op: EtcdRestartOp, cluster: Cluster, status: ClusterStatus) -> ClusterStatus:
    ns = status.nodes[op.node.address]
    digest = desired_etcd_digest(op.node, cluster, status.pki.trust)
    nodes = dict(status.nodes)
    nodes[ns.address] = dataclasses.replace(ns, etcd_running=True, etcd_digest=digest)
    etcd = status.etcd
    target = op.move_leader_to
    if target is not None:
        members = tuple(dataclasses.replace(m, leader=m.id == target.id) for m in etcd.members)
        etcd = EtcdStatus(etcd.reachable, members, target.id, etcd.alarms)
    return dataclasses.replace(status, nodes=nodes, etcd=etcd)


def _after_rivers(op: Operator, status: ClusterStatus) -> ClusterStatus | None:
    nodes = dict(status.nodes)
    command = op.next_command()
    if not isinstance(command, Parallel):
        return None
    for c in command.commands:
        address = c.info.target
        ns = nodes.get(address)
        if ns is None:
            return None
        services = dict(ns.services)
        if isinstance(c, StartRivers):
            services[c.spec.name] = ServiceStatus(True, c.spec.digest())
        elif isinstance(op, RiversStopOp):
            services[op.kind.service] = ServiceStatus(
                False, services.get(op.kind.service, ServiceStatus()).digest
            )
        else:
            return None
        nodes[address] = dataclasses.replace(ns, services=services)
    return dataclasses.replace(status, nodes=nodes)


def after(op: Operator, cluster: Cluster, status: ClusterStatus) -> ClusterStatus | None:
    """The status once ``op`` succeeded, when that can be told without the nodes;
    None when it cannot. ``op`` must be a fresh operator (its commands are read)."""
    if isinstance(op, EtcdRestartOp) and op.node.address in status.nodes:
        return _after_restart(op, cluster, status)
    if isinstance(op, RiversOp | RiversStopOp):
        return _after_rivers(op, status)
    return None


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    steps: list[Step]
    # Why the plan ends where it does: "done" (nothing more to do), "held" (the last step
    # holds something back and runs nothing), "re-plan" (the last operation's effect is
    # not modelled), "limit" (MAX_STEPS).
    end: str

    @property
    def refusals(self) -> list[Blocked]:
        """Every refusal along the plan, each rule and node set once, in order."""
        seen: list[Blocked] = []
        for step in self.steps:
            for b in step.decision.blocked:
                if b.rule not in REPORT_ONLY_RULES and b not in seen:
                    seen.append(b)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps], "end": self.end}


def make_plan(
    cluster: Cluster | None,
    constraints: Constraints,
    status: ClusterStatus,
    extra_blocked: Sequence[Blocked] = (),
    vault_away: str = "",
    max_steps: int = 1,
) -> Plan:
    """The leader's next decision, and (up to ``max_steps``) the ones after it as far as
    each operation's effect can be modelled."""
    steps: list[Step] = []
    for _ in range(max(1, min(max_steps, MAX_STEPS))):
        decision = full_decision(cluster, constraints, status, extra_blocked, vault_away)
        if not decision.operators:
            steps.append(Step(decision, None))
            return Plan(steps, "held" if decision.blocked else "done")
        op = decision.operators[0]
        steps.append(Step(decision, operation_doc(op)))
        # The listing consumed the operator: build the same decision again for its effect.
        fresh = full_decision(cluster, constraints, status, extra_blocked, vault_away)
        nxt = after(fresh.operators[0], cluster, status) if cluster is not None else None
        if nxt is None:
            return Plan(steps, "re-plan")
        status = nxt
    return Plan(steps, "limit")


# -- age of the collected status ---------------------------------------------------------------


def parse_rfc3339(text: str) -> dt.datetime | None:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def age_text(seconds: float) -> str:
    if seconds < 0:
        return "in the future (clocks differ)"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"
