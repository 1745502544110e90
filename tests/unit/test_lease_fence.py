"""The lease fence: what a leader may still send to nodes and Vault, by its lease clock."""

from __future__ import annotations

import pytest

from cke.common.election import LeaseFence
from cke.storage import NotLeader


class Clock:
    def __init__(self, remaining: float) -> None:
        self.remaining = remaining

    def valid_for(self) -> float:
        return self.remaining


def test_a_healthy_leader_may_send() -> None:
    fence = LeaseFence(margin=10 / 3)  # --session-ttl 10s
    fence.arm(Clock(6.7))  # just before a renewal: two thirds of the TTL left
    fence.check(60.0, "send a command to 10.0.0.1")
    fence.check(2.0, "send a command to 10.0.0.1")


def test_a_paused_leader_may_not() -> None:
    fence = LeaseFence(margin=10 / 3)
    fence.arm(Clock(0.0))  # resumed after a pause longer than the TTL
    with pytest.raises(NotLeader, match=r"refusing to send a command to 10\.0\.0\.1"):
        fence.check(60.0, "send a command to 10.0.0.1")
    fence.arm(Clock(3.0))  # a renewal is late by more than a third of the TTL
    with pytest.raises(NotLeader, match=r"known valid for 3\.0s more, less than the 3\.3s"):
        fence.check(60.0, "write to Vault")


def test_unarmed_or_disarmed_refuses_everything() -> None:
    fence = LeaseFence(margin=1.0)
    with pytest.raises(NotLeader):
        fence.check(0.5, "send a command to 10.0.0.1")
    fence.arm(Clock(5.0))
    fence.check(0.5, "send a command to 10.0.0.1")
    fence.disarm()
    with pytest.raises(NotLeader):
        fence.check(0.5, "send a command to 10.0.0.1")
