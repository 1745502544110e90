"""The decision function: ``decide(cluster, constraints, status) -> (operators, phase)``.

Pure: it reads nothing and changes nothing; everything it needs is in its
arguments. Each safety rule is a small named predicate, so that a refusal can
say which rule held the step back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cke.cluster import Cluster, Constraints
from cke.op.base import Operator
from cke.server.phases import Phase


@dataclass(frozen=True)
class Blocked:
    """A step the decision held back, and why (shown by ``ckecli status``)."""

    rule: str
    message: str
    nodes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "message": self.message, "nodes": list(self.nodes)}


@dataclass(frozen=True)
class ClusterStatus:
    """The real state of the nodes, as collected over SSH (filled by later issues)."""

    nodes: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    operators: list[Operator]
    phase: Phase
    blocked: list[Blocked] = field(default_factory=list)


def decide(cluster: Cluster | None, constraints: Constraints, status: ClusterStatus) -> Decision:
    if cluster is None:
        return Decision([], Phase.WAITING_FOR_CLUSTER)
    return Decision([], Phase.COMPLETED)
