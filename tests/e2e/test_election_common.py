"""The one election module (``cke.common.election``) on a real etcd, in process: what cke
and sabakan both rely on. The replica-level tests are in test_cke_core.py (cke) and
test_election_sabakan_failover.py (sabakan)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from etcd3aio import Etcd3Client

from cke.common import election as common
from cke.common.election import Election, LeaderKey, LeadershipLost, fence
from cke.common.etcd import make_client
from cke.devenv import BedConfig, TestBed
from cke.server.election import Election as CkeElection
from cke.storage import Storage as CkeStorage
from sabakan.model import MachineInput, MachineState
from sabakan.statesetter import Change, StateSetter, StateSetterConfig
from sabakan.storage import Actor
from sabakan.storage import Storage as SabakanStorage


@pytest.fixture(scope="module")
async def etcd1() -> AsyncIterator[TestBed]:
    bed = TestBed(BedConfig(etcd_members=1, nodes=0, vault=False))
    await bed.start()
    try:
        yield bed
    finally:
        await bed.stop()


@pytest.fixture
async def client(etcd1: TestBed) -> AsyncIterator[Etcd3Client]:
    c = make_client(etcd1.etcd.settings("/"))
    await c.connect()
    try:
        yield c
    finally:
        await c.close()


def _prefix() -> str:
    return f"/election-test-{uuid.uuid4().hex[:8]}/leader/"


async def _within(seconds: float, predicate: object) -> float:
    """Seconds until ``predicate()`` is true (fails after ``seconds``)."""
    assert callable(predicate)
    started = time.monotonic()
    while not predicate():
        took = time.monotonic() - started
        assert took < seconds, f"not within {seconds}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_one_leader_and_resign_hands_over_at_once(client: Etcd3Client) -> None:
    prefix = _prefix()
    a = Election(client, prefix, "a", ttl=10)
    b = Election(client, prefix, "b", ttl=10)
    leader_a = await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    try:
        await asyncio.sleep(0.5)
        assert not waiting.done(), "two leaders"
        assert [c[2] for c in await a.candidates()] == ["a", "b"]
        assert await b.leader_name() == "a"
        resigned = time.monotonic()
        await a.resign()
        leader_b = await asyncio.wait_for(waiting, 2)
        took = time.monotonic() - resigned
        assert took < 1.0, f"the successor took {took:.2f}s (TTL is 10s)"
        assert leader_b.name == "b" and leader_b.create_revision > leader_a.create_revision
        assert [c[2] for c in await b.candidates()] == ["b"]
        assert a.lost.is_set() and not b.lost.is_set()
    finally:
        waiting.cancel()
        await a.resign()
        await b.resign()
    assert await a.candidates() == []


async def test_run_cancels_the_work_the_moment_leadership_is_lost(client: Etcd3Client) -> None:
    """sabakan's way: ``run(work)``; deleting the key (as an operator might) stops the work
    at once, then the replica campaigns again; cancelling ``run`` resigns."""
    prefix = _prefix()
    election = Election(client, prefix, "s", ttl=10)
    flags: list[bool] = []
    terms: list[LeaderKey] = []
    stopped: list[float] = []

    async def work(leader: LeaderKey) -> None:
        terms.append(leader)
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(time.monotonic())

    runner = asyncio.create_task(election.run(work, flags.append))
    try:
        await _within(5, lambda: len(terms) == 1)
        assert flags == [True]
        assert client.kv is not None
        deleted = time.monotonic()
        await client.kv.delete(terms[0].key)
        await _within(1, lambda: len(stopped) == 1)
        assert stopped[0] - deleted < 0.5, f"work ran {stopped[0] - deleted:.2f}s too long"
        await _within(5, lambda: len(terms) == 2)
        assert flags[:3] == [True, False, True]
        assert terms[1].key != terms[0].key
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    assert len(stopped) == 2 and flags[-1] is False
    assert await election.candidates() == [], "cancelling run() must resign"


async def test_work_that_raises_leadership_lost_steps_down(client: Etcd3Client) -> None:
    election = Election(client, _prefix(), "s", ttl=10)
    terms: list[LeaderKey] = []

    async def work(leader: LeaderKey) -> None:
        terms.append(leader)
        if len(terms) == 1:
            raise LeadershipLost("a fenced write was refused")
        await asyncio.Event().wait()

    runner = asyncio.create_task(election.run(work))
    try:
        await _within(5, lambda: len(terms) == 2)
        assert terms[0].key != terms[1].key  # the first term's key was given up
        assert [c[0] for c in await election.candidates()] == [terms[1].key]
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_a_paused_leader_knows_it_lost_as_soon_as_it_runs_again(
    client: Etcd3Client,
) -> None:
    """The event loop blocked for longer than the TTL (a paused process): the next
    thing the election does is declare the leadership lost, and the fence refuses."""
    election = Election(client, _prefix(), "p", ttl=2)
    leader = await election.campaign()
    try:
        await asyncio.sleep(1.0)  # a renewal or two
        assert not election.lost.is_set()
        time.sleep(2.3)  # noqa: ASYNC251  (the point: nothing runs, as in SIGSTOP)
        took = await _within(0.5, election.lost.is_set)
        assert election.lost_reason in {
            "no lease renewal for a whole TTL (paused or cut off)",
            "lease renewal came too late",
            "leader key deleted",
            "lease expired or revoked",
        }, election.lost_reason
        print(f"\npaused leader noticed the loss {took * 1000:.0f} ms after resuming")
        assert client.kv is not None
        await asyncio.sleep(1.5)  # etcd expires the lease by now
        resp = await client.kv.txn(compare=[fence(leader)], success=[], failure=[])
        assert not resp.succeeded
    finally:
        await election.resign()


async def test_campaign_raises_when_the_candidacy_is_lost(client: Etcd3Client) -> None:
    prefix = _prefix()
    first = Election(client, prefix, "first", ttl=10)
    second = Election(client, prefix, "second", ttl=10)
    await first.campaign()
    waiting = asyncio.create_task(second.campaign())
    try:
        await asyncio.sleep(0.3)
        assert second._lease_id is not None and client.lease is not None
        await client.lease.revoke(second._lease_id)
        with pytest.raises(LeadershipLost):
            await asyncio.wait_for(waiting, 5)
    finally:
        waiting.cancel()
        await first.resign()
        await second.resign()


async def test_cke_and_sabakan_share_the_implementation_and_the_layout(
    client: Etcd3Client,
) -> None:
    base = f"/layout-{uuid.uuid4().hex[:8]}"
    cke_storage = CkeStorage(client, prefix=f"{base}/cke/")
    sabakan_storage = SabakanStorage(client, f"{base}/sabakan/")
    cke = CkeElection(client, cke_storage, "cke-1", ttl=10)
    sabakan = Election(client, sabakan_storage.leader_prefix, "sabakan-1", ttl=10)
    assert isinstance(cke, common.Election)
    try:
        cke_leader = await cke.campaign()
        sabakan_leader = await sabakan.campaign()
        assert cke_leader.key == f"{base}/cke/leader/{cke_leader.lease_id:016x}".encode()
        assert sabakan_leader.key == (
            f"{base}/sabakan/leader/{sabakan_leader.lease_id:016x}".encode()
        )
        # ``ckecli leader`` reads the same keys.
        assert await cke_storage.get_leader_name() == "cke-1"
    finally:
        await cke.resign()
        await sabakan.resign()


async def test_state_setter_writes_are_fenced_and_carry_their_reason(
    client: Etcd3Client,
) -> None:
    storage = SabakanStorage(client, f"/fence-{uuid.uuid4().hex[:8]}/")
    await storage.register(
        [MachineInput.model_validate({"serial": "m1", "role": "cs", "ipv4": ["127.0.0.9"]})],
        Actor("test", ""),
    )
    old = Election(client, storage.leader_prefix, "old", ttl=10)
    new = Election(client, storage.leader_prefix, "new", ttl=10)
    stale = await old.campaign()
    await old.resign()
    current = await new.campaign()
    try:
        setter = StateSetter(storage, StateSetterConfig())
        setter.leader = stale
        with pytest.raises(LeadershipLost):
            await setter.set_state("m1", Change(MachineState.HEALTHY, "stale"))
        machine, _ = await storage.get("m1")
        assert machine.status.state == MachineState.UNINITIALIZED
        assert [r["action"] for r in await storage.logs()] == ["register"]
        setter.leader = current
        await setter.set_state("m1", Change(MachineState.HEALTHY, "every check passed"))
        machine, _ = await storage.get("m1")
        assert machine.status.state == MachineState.HEALTHY
        last = (await storage.logs())[-1]
        assert last["user"] == "state-setter" and last["action"] == "state"
        assert (last["before"], last["after"]) == ("uninitialized", "healthy")
        assert last["reason"] == "every check passed"
        assert json.loads(machine.dump())["status"]["state"] == "healthy"
    finally:
        await new.resign()
