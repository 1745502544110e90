"""Two sabakan replicas on one etcd prefix: exactly one runs the state setter, and when
it dies (SIGKILL), stops (SIGTERM) or is paused (SIGSTOP) the other takes over.

The proof that the survivor's *state setter* runs, not only that it says it leads: the
machine's "SSH port" (a listener this test owns) closes at the moment the leader goes,
and the machine must turn unreachable, audited, within TTL + threshold x interval +
slack, which only a running state setter can do.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cke.devenv import BedConfig, TestBed
from cke.devenv.procs import free_port
from sabakan.testing import SabakanProcess

INTERVAL = 0.3
THRESHOLD = 3
TTL = 2
SLACK = 1.5  # etcd checks lease expiry every 500 ms; polling; a busy machine


@pytest.fixture(scope="module")
async def etcd1() -> AsyncIterator[TestBed]:
    bed = TestBed(BedConfig(etcd_members=1, nodes=0, vault=False))
    await bed.start()
    try:
        yield bed
    finally:
        await bed.stop()


class Pair:
    """Two replicas and one machine whose "SSH port" this test serves."""

    def __init__(self, bed: TestBed, base: Path, ttl: int) -> None:
        self.ip = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.1"
        self.port = free_port()
        self.server: asyncio.Server | None = None
        settings = bed.etcd.settings(f"/sabakan-failover-{uuid.uuid4().hex}/")
        state_setter = {
            "interval": f"{INTERVAL}s",
            "timeout": "0.5s",
            "ssh-port": self.port,
            "unreachable-threshold": THRESHOLD,
            "healthy-threshold": 2,
        }
        self.replicas = [
            SabakanProcess(
                base / name,
                settings,
                name=name,
                state_setter=state_setter,
                extra={"election-ttl": ttl},
            )
            for name in ("sabakan-a", "sabakan-b")
        ]

    async def _accept(self, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    async def listen(self) -> None:
        self.server = await asyncio.start_server(self._accept, self.ip, self.port)

    async def unlisten(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def leaders(self) -> list[SabakanProcess]:
        flags = await asyncio.gather(*(r.is_leader() for r in self.replicas))
        return [r for r, f in zip(self.replicas, flags, strict=True) if f]

    async def the_leader(self, within: float = 10.0) -> SabakanProcess:
        deadline = time.monotonic() + within
        while len(leaders := await self.leaders()) != 1:
            assert time.monotonic() < deadline, f"leaders: {[r.process.name for r in leaders]}"
            await asyncio.sleep(0.05)
        return leaders[0]

    async def state(self, replica: SabakanProcess) -> str:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{replica.url}/api/v1/state/m1") as resp,
        ):
            assert resp.status == 200
            return await resp.text()

    async def wait_state(self, replica: SabakanProcess, want: str, within: float) -> float:
        started = time.monotonic()
        while (now := await self.state(replica)) != want:
            took = time.monotonic() - started
            assert took < within, f"m1 still {now} after {took:.1f}s (want {want})"
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    async def records(self, replica: SabakanProcess) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(f"{replica.url}/api/v1/logs") as resp:
            assert resp.status == 200
            lines = (await resp.text()).splitlines()
        return [r for r in map(json.loads, lines) if r["user"] == "state-setter"]

    async def start(self) -> SabakanProcess:
        """Both replicas up, m1 registered and healthy; returns the leader."""
        await self.listen()
        for r in self.replicas:
            await r.start()
        leader = await self.the_leader()
        spec = [{"serial": "m1", "role": "cs", "ipv4": [self.ip]}]
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{leader.url}/api/v1/machines", data=json.dumps(spec)) as resp,
        ):
            assert resp.status == 201
        await self.wait_state(leader, "healthy", within=10)
        return leader

    def other(self, replica: SabakanProcess) -> SabakanProcess:
        return next(r for r in self.replicas if r is not replica)

    async def stop(self) -> None:
        for r in self.replicas:
            await r.resume()
            await r.stop()
        await self.unlisten()


@pytest.fixture
async def pair_factory(etcd1: TestBed, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Pair] = []

    def make(ttl: int = TTL) -> Pair:
        made.append(Pair(etcd1, tmp_path / str(len(made)), ttl))
        return made[-1]

    try:
        yield make
    finally:
        for pair in made:
            await pair.stop()


async def _until_leader(replica: SabakanProcess, within: float) -> float:
    started = time.monotonic()
    while not await replica.is_leader():
        took = time.monotonic() - started
        assert took < within, f"{replica.process.name} not leader after {took:.1f}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_exactly_one_sabakan_replica_leads(pair_factory: Any) -> None:
    pair: Pair = pair_factory()
    leader = await pair.start()
    for _ in range(20):
        assert await pair.leaders() == [leader]
        await asyncio.sleep(0.1)
    assert "became leader" in leader.log()
    assert "became leader" not in pair.other(leader).log()


async def test_killed_sabakan_leader_is_replaced_and_its_state_setter_runs_on(
    pair_factory: Any,
) -> None:
    pair: Pair = pair_factory()
    old = await pair.start()
    survivor = pair.other(old)
    before = len(await pair.records(survivor))
    gone = time.monotonic()
    await old.kill()
    await pair.unlisten()
    took_over = await _until_leader(survivor, within=TTL + SLACK + 2)
    await pair.wait_state(survivor, "unreachable", within=30)
    detected = time.monotonic() - gone
    print(
        f"\nsabakan failover (SIGKILL, TTL {TTL}s): leader after {took_over:.2f}s, "
        f"m1 unreachable after {detected:.2f}s "
        f"(bound {TTL + THRESHOLD * INTERVAL + SLACK:.1f}s)"
    )
    assert took_over <= TTL + SLACK, f"took over after {took_over:.2f}s"
    assert detected <= TTL + THRESHOLD * INTERVAL + SLACK
    new = (await pair.records(survivor))[before:]
    assert [(r["before"], r["after"]) for r in new] == [("healthy", "unreachable")], new
    assert f"failed {THRESHOLD} times in a row" in new[0]["reason"]
    # And back: the survivor keeps probing.
    await pair.listen()
    await pair.wait_state(survivor, "healthy", within=2 * INTERVAL + SLACK)


async def test_sigterm_sabakan_leader_resigns_at_once(pair_factory: Any) -> None:
    """With a 10 s TTL, a successor within a second proves the leader resigned."""
    pair: Pair = pair_factory(ttl=10)
    old = await pair.start()
    survivor = pair.other(old)
    stopped = time.monotonic()
    code = await old.stop()
    assert code == 0
    took_over = await _until_leader(survivor, within=5)
    took_total = time.monotonic() - stopped
    print(f"\nsabakan SIGTERM handover (TTL 10s): {took_total:.2f}s after the signal")
    assert took_total <= 1.5 + 1.0, f"successor after {took_total:.2f}s"  # +1: process exit
    assert took_over <= 1.0, f"successor {took_over:.2f}s after the old one exited"
    assert "resigned leadership" in old.log()
    await pair.unlisten()
    await pair.wait_state(survivor, "unreachable", within=THRESHOLD * INTERVAL + SLACK)


async def test_paused_sabakan_leader_steps_down_when_it_resumes(pair_factory: Any) -> None:
    pair: Pair = pair_factory()
    old = await pair.start()
    survivor = pair.other(old)
    await old.pause()
    await _until_leader(survivor, within=TTL + SLACK + 2)
    await pair.unlisten()
    await pair.wait_state(survivor, "unreachable", within=THRESHOLD * INTERVAL + SLACK)
    await pair.listen()
    resumed = time.monotonic()
    await old.resume()
    while await old.is_leader():
        assert time.monotonic() - resumed < 2.0, "the resumed replica still says it leads"
        await asyncio.sleep(0.02)
    for _ in range(10):
        assert await pair.leaders() == [survivor]
        await asyncio.sleep(0.1)
    log = old.log()
    assert "lost leadership" in log and "stepping down" in log, log[-2000:]
    await pair.wait_state(survivor, "healthy", within=2 * INTERVAL + SLACK)
    changes = [(r["before"], r["after"]) for r in await pair.records(survivor)]
    assert changes == [
        ("uninitialized", "healthy"),
        ("healthy", "unreachable"),
        ("unreachable", "healthy"),
    ], changes
