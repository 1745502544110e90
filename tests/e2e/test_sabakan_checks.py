"""The state setter's checks end to end, against listeners this test starts on loopback.

Each machine has its own loopback address; on it the test serves the "SSH port" (a
plain TCP listener), and for role ``web`` an HTTP health endpoint; role ``cmd`` runs
a command whose outcome the test steers through files. Thresholds are checked three
ways: the time a real failure takes to change the state (at least threshold-1
intervals, at most threshold intervals plus slack), checks that flap every round
(never a state change), and the audit records (each change says which check failed
how many times in a row). ``decide`` is also checked on its own, round by round.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cke.devenv import BedConfig, TestBed
from cke.devenv.procs import free_port
from sabakan.model import Machine, MachineSpec, MachineState, MachineStatus
from sabakan.statesetter import Observation, RoleCheck, StateSetter, StateSetterConfig
from sabakan.testing import SabakanProcess

S = MachineState
INTERVAL = 0.3
UNREACHABLE_T = 3
UNHEALTHY_T = 3
HEALTHY_T = 2
SLACK = 1.5  # probe timeout, polling, a busy machine


@pytest.fixture(scope="module")
async def etcd1() -> AsyncIterator[TestBed]:
    bed = TestBed(BedConfig(etcd_members=1, nodes=0, vault=False))
    await bed.start()
    try:
        yield bed
    finally:
        await bed.stop()


# -- listeners the test owns -------------------------------------------------------------


class TcpListener:
    """Something that accepts (and at once closes) connections on ip:port."""

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port = ip, port
        self.server: asyncio.Server | None = None
        self.accepted = 0

    async def _accept(self, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        w.close()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._accept, self.ip, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


class HealthServer:
    """``GET /health`` on ip:port: 200 in mode ``ok``, 503 in ``fail``, and the two in
    turn in ``flap`` (one request per round, so the outcome alternates every round)."""

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port = ip, port
        self.mode = "ok"
        self.requests = 0
        app = web.Application()
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app, access_log=None)

    async def _health(self, _request: web.Request) -> web.Response:
        self.requests += 1
        good = self.mode == "ok" or (self.mode == "flap" and self.requests % 2 == 0)
        return web.Response(status=200 if good else 503, text="ok" if good else "sick")

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, self.ip, self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()


# The command check: fails while <dir>/<serial>.fail exists; while <serial>.flap
# exists it fails and succeeds in turn (a counter file), one call per round. The counter
# is replaced by a rename: the test reads it while the setter runs the check, and a
# file truncated by ">" reads empty for an instant (that once failed the test).
CHECK_SCRIPT = (
    'if [ -e "$1.fail" ]; then exit 1; fi; '
    'if [ -e "$1.flap" ]; then n=$(cat "$1.count" 2>/dev/null || echo 0); '
    'echo $((n + 1)) > "$1.count.tmp" && mv "$1.count.tmp" "$1.count"; '
    "test $((n % 2)) -eq 1; exit; fi; "
    "exit 0"
)


class Site:
    """Three machines on their own loopback addresses, with their listeners."""

    def __init__(self, base: Path) -> None:
        net = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.ssh_port = free_port()
        self.http_port = free_port()
        self.dir = base / "checks"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ips = {"t1": f"{net}.1", "h1": f"{net}.2", "c1": f"{net}.3"}
        self.roles = {"t1": "plain", "h1": "web", "c1": "cmd"}
        self.ssh = {serial: TcpListener(ip, self.ssh_port) for serial, ip in self.ips.items()}
        self.http = HealthServer(self.ips["h1"], self.http_port)

    def state_setter(self, **overrides: Any) -> dict[str, Any]:
        return {
            "interval": f"{INTERVAL}s",
            "timeout": "0.5s",
            "ssh-port": self.ssh_port,
            "unreachable-threshold": UNREACHABLE_T,
            "unhealthy-threshold": UNHEALTHY_T,
            "healthy-threshold": HEALTHY_T,
            "roles": {
                "web": {"http": f"http://{{ipv4}}:{self.http_port}/health"},
                "cmd": {
                    "command": ["/bin/sh", "-c", CHECK_SCRIPT, "check", f"{self.dir}/{{serial}}"]
                },
            },
            **overrides,
        }

    def specs(self) -> list[dict[str, Any]]:
        return [{"serial": s, "role": self.roles[s], "ipv4": [ip]} for s, ip in self.ips.items()]

    def flag(self, serial: str, kind: str) -> Path:
        return self.dir / f"{serial}.{kind}"

    async def start(self) -> None:
        for listener in self.ssh.values():
            await listener.open()
        await self.http.start()

    async def stop(self) -> None:
        for listener in self.ssh.values():
            await listener.close()
        await self.http.stop()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    s = Site(tmp_path)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


# -- talking to sabakan ------------------------------------------------------------------


async def state(url: str, serial: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v1/state/{serial}") as resp:
        assert resp.status == 200
        return await resp.text()


async def wait_state(url: str, serial: str, want: str, within: float) -> float:
    """Seconds until ``serial`` is ``want`` (fails after ``within``)."""
    started = time.monotonic()
    while (now := await state(url, serial)) != want:
        took = time.monotonic() - started
        assert took < within, f"{serial} still {now} after {took:.1f}s (want {want})"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def register(url: str, specs: list[dict[str, Any]]) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/api/v1/machines", data=json.dumps(specs)) as resp,
    ):
        assert resp.status == 201, await resp.text()


async def setter_records(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v1/logs") as resp:
        assert resp.status == 200
        records = [json.loads(x) for x in (await resp.text()).splitlines()]
    return [r for r in records if r["user"] == "state-setter"]


def prefix() -> str:
    return f"/sabakan-checks-{uuid.uuid4().hex}/"


@pytest.fixture
async def sabakan(etcd1: TestBed, site: Site, tmp_path: Path) -> AsyncIterator[SabakanProcess]:
    proc = SabakanProcess(
        tmp_path / "sabakan", etcd1.etcd.settings(prefix()), state_setter=site.state_setter()
    )
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


def bounds(threshold: int) -> tuple[float, float]:
    """When a change after ``threshold`` bad rounds may show: the first bad round comes
    at most one interval after the fault, the others one interval apart each."""
    return (threshold - 1) * INTERVAL - 0.1, threshold * INTERVAL + SLACK


# -- end to end --------------------------------------------------------------------------


async def test_each_check_changes_state_only_after_its_threshold_and_says_why(
    site: Site, sabakan: SabakanProcess
) -> None:
    url = sabakan.url
    await register(url, site.specs())
    for serial in site.ips:
        await wait_state(url, serial, "healthy", within=HEALTHY_T * INTERVAL + 5)
    figures: dict[str, float] = {}

    # TCP: the "SSH port" stops listening.
    await site.ssh["t1"].close()
    figures["tcp down"] = await wait_state(url, "t1", "unreachable", within=30)
    # HTTP: the health endpoint answers 503 (the port still accepts connections).
    site.http.mode = "fail"
    figures["http 503"] = await wait_state(url, "h1", "unhealthy", within=30)
    # Command: exits 1.
    site.flag("c1", "fail").touch()
    figures["command exit 1"] = await wait_state(url, "c1", "unhealthy", within=30)
    # All good again: healthy after healthy-threshold good rounds.
    restored = time.monotonic()
    await site.ssh["t1"].open()
    site.http.mode = "ok"
    site.flag("c1", "fail").unlink()
    for serial in site.ips:
        await wait_state(url, serial, "healthy", within=30)
        figures[f"{serial} back"] = time.monotonic() - restored
    # An unreachable machine whose port comes back but whose check fails is unhealthy.
    await site.ssh["h1"].close()
    await wait_state(url, "h1", "unreachable", within=30)
    site.http.mode = "fail"
    await site.ssh["h1"].open()
    figures["unreachable -> unhealthy"] = await wait_state(url, "h1", "unhealthy", within=30)

    print("\ndetection times (s):", {k: round(v, 2) for k, v in figures.items()})
    low, high = bounds(UNREACHABLE_T)
    assert low <= figures["tcp down"] <= high, figures
    low, high = bounds(UNHEALTHY_T)
    assert low <= figures["http 503"] <= high, figures
    assert low <= figures["command exit 1"] <= high, figures
    assert low <= figures["unreachable -> unhealthy"] <= high, figures
    low, high = bounds(HEALTHY_T)
    for serial in site.ips:
        assert low <= figures[f"{serial} back"] <= high, figures

    records = await setter_records(url)
    changes = [(r["instance"], r["before"], r["after"]) for r in records]
    # Changes made in one round may be recorded in any order.
    assert len(changes) == 11, changes
    assert sorted(changes[:3]) == [(s, "uninitialized", "healthy") for s in sorted(site.ips)]
    assert changes[3:6] == [
        ("t1", "healthy", "unreachable"),
        ("h1", "healthy", "unhealthy"),
        ("c1", "healthy", "unhealthy"),
    ]
    assert sorted(changes[6:9]) == [
        ("c1", "unhealthy", "healthy"),
        ("h1", "unhealthy", "healthy"),
        ("t1", "unreachable", "healthy"),
    ]
    assert changes[9:] == [("h1", "healthy", "unreachable"), ("h1", "unreachable", "unhealthy")]
    reasons = {(r["instance"], r["after"], r["before"]): r["reason"] for r in records}
    t1 = site.ips["t1"]
    assert reasons["t1", "unreachable", "healthy"].startswith(
        f"connect to {t1}:{site.ssh_port} failed {UNREACHABLE_T} times in a row "
        f"(threshold {UNREACHABLE_T}): ConnectionRefusedError"
    ), reasons
    assert reasons["h1", "unhealthy", "healthy"] == (
        f"http check http://{site.ips['h1']}:{site.http_port}/health failed {UNHEALTHY_T} "
        f"times in a row (threshold {UNHEALTHY_T}): status 503"
    ), reasons
    assert reasons["c1", "unhealthy", "healthy"] == (
        f"command check /bin/sh failed {UNHEALTHY_T} times in a row "
        f"(threshold {UNHEALTHY_T}): exit status 1"
    ), reasons
    assert reasons["t1", "healthy", "unreachable"] == (
        f"every check passed {HEALTHY_T} times in a row (threshold {HEALTHY_T})"
    )
    assert "status 503" in reasons["h1", "unhealthy", "unreachable"]


async def test_flapping_checks_never_change_the_state(site: Site, sabakan: SabakanProcess) -> None:
    """An HTTP check and a command that fail every other round: never threshold (3)
    failures in a row, so healthy machines stay healthy; uninitialized ones never get
    healthy-threshold (2) good rounds in a row either. Then a steady failure still counts."""
    url = sabakan.url
    # h1 and c1 flap from the start: they must stay uninitialized.
    site.http.mode = "flap"
    site.flag("c1", "flap").touch()
    await register(url, site.specs())
    await wait_state(url, "t1", "healthy", within=HEALTHY_T * INTERVAL + 5)
    rounds_before = site.http.requests
    await asyncio.sleep(12 * INTERVAL)
    assert site.http.requests - rounds_before >= 8, "the setter did not probe every round"
    assert await state(url, "h1") == "uninitialized"
    assert await state(url, "c1") == "uninitialized"
    # Steady: both become healthy; then flapping again must leave them healthy.
    site.http.mode = "ok"
    site.flag("c1", "flap").unlink()
    await wait_state(url, "h1", "healthy", within=30)
    await wait_state(url, "c1", "healthy", within=30)
    site.http.mode = "flap"
    site.flag("c1", "flap").touch()
    calls_before = site.http.requests
    await asyncio.sleep(15 * INTERVAL)
    assert site.http.requests - calls_before >= 10
    count = int(site.flag("c1", "count").read_text())
    assert count >= 10, count
    assert await state(url, "h1") == "healthy"
    assert await state(url, "c1") == "healthy"
    # A steady failure after the flapping: unhealthy after the threshold.
    site.http.mode = "fail"
    await wait_state(url, "h1", "unhealthy", within=UNHEALTHY_T * INTERVAL + SLACK)
    changes = [(r["instance"], r["before"], r["after"]) for r in await setter_records(url)]
    assert sorted(changes) == sorted(
        [
            ("t1", "uninitialized", "healthy"),
            ("h1", "uninitialized", "healthy"),
            ("c1", "uninitialized", "healthy"),
            ("h1", "healthy", "unhealthy"),
        ]
    ), changes


async def test_operator_states_are_never_touched(site: Site, sabakan: SabakanProcess) -> None:
    """updating/retiring machines stay as the operator set them, whatever the probes say."""
    url = sabakan.url
    await register(url, site.specs())
    for serial in site.ips:
        await wait_state(url, serial, "healthy", within=HEALTHY_T * INTERVAL + 5)
    async with aiohttp.ClientSession() as s:
        for serial, target in (("t1", "retiring"), ("h1", "updating")):
            async with s.put(f"{url}/api/v1/state/{serial}", data=target) as resp:
                assert resp.status == 200
    await site.ssh["t1"].close()
    site.http.mode = "fail"
    await asyncio.sleep((max(UNREACHABLE_T, UNHEALTHY_T) + 3) * INTERVAL)
    assert await state(url, "t1") == "retiring"
    assert await state(url, "h1") == "updating"


# -- decide(), round by round --------------------------------------------------------------


def _machine(state: MachineState) -> Machine:
    spec = MachineSpec.model_validate(
        {"serial": "m1", "role": "web", "ipv4": ["127.0.0.9"], "register-date": _NOW}
    )
    return Machine(spec=spec, status=MachineStatus(state=state, timestamp=_NOW))


_NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DOWN = Observation(tcp_ok=False, detail="ConnectionRefusedError", check="connect to x:22")
SICK = Observation(tcp_ok=True, check_ok=False, detail="status 503", check="http check u")
GOOD = Observation(tcp_ok=True)


def _replay(start: MachineState, observations: list[Observation]) -> Iterator[str]:
    """Feed ``observations`` to ``decide`` as consecutive rounds; yield the state after each."""
    setter = StateSetter(
        None,
        StateSetterConfig.model_validate(
            {"unreachable-threshold": 3, "unhealthy-threshold": 3, "healthy-threshold": 2}
        ),
    )
    current = start
    for obs in observations:
        change = setter.decide(_machine(current), obs)
        if change is not None:
            current = change.target
        yield current.value


def test_decide_damps_every_kind_of_failure() -> None:
    H, UH, UR = "healthy", "unhealthy", "unreachable"
    assert list(_replay(S.HEALTHY, [DOWN, DOWN, DOWN])) == [H, H, UR]
    assert list(_replay(S.HEALTHY, [DOWN, DOWN, GOOD, DOWN, DOWN, GOOD] * 3)) == [H] * 18
    assert list(_replay(S.HEALTHY, [DOWN, GOOD] * 10)) == [H] * 20
    assert list(_replay(S.HEALTHY, [SICK, SICK, SICK])) == [H, H, UH]
    assert list(_replay(S.HEALTHY, [SICK, SICK, GOOD] * 5)) == [H] * 15
    # A different failure breaks the run: two connects and two checks failed is no run.
    assert list(_replay(S.HEALTHY, [DOWN, DOWN, SICK, SICK, DOWN, DOWN])) == [H] * 6
    # Back: healthy-threshold good rounds in a row.
    assert list(_replay(S.UNREACHABLE, [GOOD, DOWN, GOOD, GOOD])) == [UR, UR, UR, H]
    assert list(_replay(S.UNHEALTHY, [GOOD, SICK, GOOD, GOOD])) == [UH, UH, UH, H]
    assert list(_replay(S.UNINITIALIZED, [GOOD, GOOD])) == ["uninitialized", H]
    # uninitialized never becomes unreachable or unhealthy (the lifecycle forbids it).
    assert list(_replay(S.UNINITIALIZED, [DOWN] * 5 + [SICK] * 5)) == ["uninitialized"] * 10
    # Operator states: never.
    for s in (S.UPDATING, S.RETIRING, S.RETIRED):
        assert list(_replay(s, [DOWN] * 5 + [GOOD] * 5)) == [s.value] * 10


def test_decide_says_why() -> None:
    setter = StateSetter(None, StateSetterConfig.model_validate({"unreachable-threshold": 1}))
    change = setter.decide(_machine(S.HEALTHY), DOWN)
    assert change is not None
    assert change.reason == (
        "connect to x:22 failed 1 time in a row (threshold 1): ConnectionRefusedError"
    )


@pytest.mark.parametrize(
    "check",
    [{"http": "http://{ip}/"}, {"command": ["sh", "-c", "${x}"]}, {"command": []}],
)
def test_a_check_that_cannot_be_run_is_refused_with_the_config(check: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RoleCheck.model_validate(check)
