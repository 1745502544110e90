"""Builders shared by the decision and safety-rule tests."""

from __future__ import annotations

from cke.op.base import Commander, Operator, Parallel
from cke.server.clusterstatus import EtcdMember


def node_commands(op: Operator) -> list[Commander]:
    """Every command an operation runs, one per node (a ``Parallel`` step gives its own)."""
    out: list[Commander] = []
    while (cmd := op.next_command()) is not None:
        out.extend(cmd.commands if isinstance(cmd, Parallel) else [cmd])
    return out


def member(
    address: str,
    *,
    learner: bool = False,
    healthy: bool = True,
    raft_index: int = 5000,
    leader: bool = False,
) -> EtcdMember:
    """A member whose id is the last octet of its address."""
    return EtcdMember(
        id=int(address.rsplit(".", 1)[1]),
        name=address,
        address=address,
        learner=learner,
        healthy=healthy,
        raft_index=raft_index,
        leader=leader,
    )
