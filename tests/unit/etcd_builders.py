"""Builders shared by the decision and safety-rule tests."""

from __future__ import annotations

from cke.server.clusterstatus import EtcdMember


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
