"""``Parallel``: one step on several nodes at once, recorded as one command."""

from __future__ import annotations

import asyncio

import pytest

from cke.op.base import Commander, CommandInfo, OpContext, Parallel
from cke.storage import NotLeader

pytestmark = pytest.mark.unit


class Step(Commander):
    """Waits until every step of its group has started (so only runs at once can finish),
    then fails with ``error`` if it has one."""

    def __init__(self, target: str, group: list[Step], error: Exception | None = None) -> None:
        self.target = target
        self.group = group
        self.error = error
        self.started = asyncio.Event()
        self.finished = False
        group.append(self)

    @property
    def info(self) -> CommandInfo:
        return CommandInfo("start-thing", self.target, "detail")

    async def run(self, ctx: OpContext) -> None:
        self.started.set()
        for other in self.group:
            await other.started.wait()
        self.finished = True
        if self.error is not None:
            raise self.error


async def test_steps_run_at_once_and_are_recorded_as_one_command() -> None:
    group: list[Step] = []
    step = Parallel([Step(t, group) for t in ("10.0.0.1", "10.0.0.2", "10.0.0.3")])
    assert step.info == CommandInfo("start-thing", "10.0.0.1,10.0.0.2,10.0.0.3", "detail")
    await asyncio.wait_for(step.run(OpContext()), 5)
    assert all(s.finished for s in group)


async def test_every_node_finishes_before_the_step_fails_with_each_error() -> None:
    group: list[Step] = []
    steps = [
        Step("10.0.0.1", group, RuntimeError("disk full")),
        Step("10.0.0.2", group),
        Step("10.0.0.3", group, RuntimeError("no route")),
    ]
    with pytest.raises(RuntimeError) as raised:
        await asyncio.wait_for(Parallel(steps).run(OpContext()), 5)
    assert str(raised.value) == "10.0.0.1: disk full; 10.0.0.3: no route"
    assert all(s.finished for s in group)


async def test_one_failure_is_raised_as_it_is_and_not_leader_wins() -> None:
    group: list[Step] = []
    one = Parallel([Step("10.0.0.1", group, ValueError("bad")), Step("10.0.0.2", group)])
    with pytest.raises(ValueError, match=r"^bad$"):
        await one.run(OpContext())
    group = []
    fenced = Parallel(
        [Step("10.0.0.1", group, RuntimeError("x")), Step("10.0.0.2", group, NotLeader("lost"))]
    )
    with pytest.raises(NotLeader):
        await fenced.run(OpContext())


def test_an_empty_step_is_refused() -> None:
    with pytest.raises(ValueError):
        Parallel([])
