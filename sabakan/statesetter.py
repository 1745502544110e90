"""The state setter: turns probe results into machine states (runs on the elected replica).

Per machine and round: a TCP connect to the SSH port of the first IPv4 address, then,
when the machine's role has one, an HTTP health URL or a command. ``unreachable``
after ``unreachable-threshold`` failed connects in a row; ``healthy`` again after
``healthy-threshold`` good rounds; a failing health check gives ``unhealthy``.
updating, retiring and retired machines are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from etcd3aio import SortOrder, SortTarget, prefix_range_end
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cke.common.durations import parse_duration
from cke.common.logs import get_logger
from sabakan.model import Machine, MachineState
from sabakan.storage import Actor, ConflictError, NotFoundError, Storage

log = get_logger("sabakan.statesetter")
S = MachineState
ACTOR = Actor(user="state-setter", ip="")
# The only states the setter reads and writes.
MANAGED = frozenset({S.UNINITIALIZED, S.HEALTHY, S.UNHEALTHY, S.UNREACHABLE})


def _duration(value: Any) -> float:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError("want a duration such as 10s")


class RoleCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # ``{ipv4}`` and ``{serial}`` are replaced; 2xx is healthy.
    http: str | None = None
    # argv; exit status 0 is healthy.
    command: list[str] | None = None


class StateSetterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = True
    interval: float = 10.0
    timeout: float = 2.0
    ssh_port: int = Field(default=22, alias="ssh-port", ge=1, le=65535)
    unreachable_threshold: int = Field(default=3, alias="unreachable-threshold", ge=1)
    healthy_threshold: int = Field(default=2, alias="healthy-threshold", ge=1)
    concurrency: int = Field(default=200, ge=1, le=5000)
    roles: dict[str, RoleCheck] = Field(default_factory=dict)

    @field_validator("interval", "timeout", mode="before")
    @classmethod
    def _dur(cls, value: Any) -> float:
        return _duration(value)


@dataclass
class Observation:
    tcp_ok: bool
    check_ok: bool = True
    detail: str = ""


@dataclass
class _Counters:
    failures: int = 0
    successes: int = 0


async def probe_tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, ""


@dataclass
class RoundStats:
    machines: int = 0
    probed: int = 0
    changes: int = 0
    seconds: float = 0.0
    changed: list[tuple[str, str, str]] = field(default_factory=list)


class StateSetter:
    def __init__(self, storage: Storage | None, config: StateSetterConfig) -> None:
        self.storage = storage
        self.config = config
        self.counters: dict[str, _Counters] = {}
        self._sem = asyncio.Semaphore(config.concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _check(self, machine: Machine, ip: str) -> tuple[bool, str]:
        check = self.config.roles.get(machine.spec.role)
        if check is None:
            return True, ""
        subst = {"ipv4": ip, "serial": machine.spec.serial}
        if check.http:
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout)
                )
            try:
                async with self._session.get(check.http.format(**subst)) as resp:
                    if not 200 <= resp.status < 300:
                        return False, f"http status {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                return False, f"http: {type(exc).__name__}"
        if check.command:
            argv = [a.format(**subst) for a in check.command]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            except OSError as exc:
                return False, f"command: {exc}"
            try:
                code = await asyncio.wait_for(proc.wait(), self.config.timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return False, "command timed out"
            if code != 0:
                return False, f"command exit status {code}"
        return True, ""

    async def observe(self, machine: Machine) -> Observation:
        ip = machine.spec.ipv4[0]
        async with self._sem:
            ok, detail = await probe_tcp(ip, self.config.ssh_port, self.config.timeout)
            if not ok:
                return Observation(tcp_ok=False, detail=detail)
            good, detail = await self._check(machine, ip)
            return Observation(tcp_ok=True, check_ok=good, detail=detail)

    def decide(self, machine: Machine, obs: Observation) -> MachineState | None:
        """The state ``machine`` should move to after ``obs`` (None: leave it)."""
        c = self.counters.setdefault(machine.spec.serial, _Counters())
        state = machine.status.state
        if state not in MANAGED:
            c.failures = c.successes = 0
            return None
        if not obs.tcp_ok:
            c.failures += 1
            c.successes = 0
            if c.failures >= self.config.unreachable_threshold and state in (
                S.HEALTHY,
                S.UNHEALTHY,
            ):
                return S.UNREACHABLE
            return None
        c.failures = 0
        if not obs.check_ok:
            c.successes = 0
            return S.UNHEALTHY if state in (S.HEALTHY, S.UNREACHABLE) else None
        c.successes += 1
        if state != S.HEALTHY and c.successes >= self.config.healthy_threshold:
            return S.HEALTHY
        return None

    async def _one(self, machine: Machine, stats: RoundStats) -> None:
        if machine.status.state not in MANAGED or not machine.spec.ipv4:
            return
        obs = await self.observe(machine)
        stats.probed += 1
        target = self.decide(machine, obs)
        if target is None or self.storage is None:
            return
        try:
            await self.storage.set_state(machine.spec.serial, target, ACTOR, only_from=MANAGED)
        except (ConflictError, NotFoundError, ValueError) as exc:
            log.info("state not changed", serial=machine.spec.serial, reason=str(exc))
            return
        stats.changes += 1
        stats.changed.append((machine.spec.serial, machine.status.state.value, target.value))
        log.info(
            "state changed",
            serial=machine.spec.serial,
            before=machine.status.state.value,
            after=target.value,
            detail=obs.detail,
        )

    async def run_round(self, machines: list[Machine]) -> RoundStats:
        start = time.perf_counter()
        stats = RoundStats(machines=len(machines))
        await asyncio.gather(*(self._one(m, stats) for m in machines))
        live = {m.spec.serial for m in machines}
        for serial in list(self.counters):
            if serial not in live:
                del self.counters[serial]
        stats.seconds = time.perf_counter() - start
        return stats

    async def run(self) -> None:
        """Probe forever at the configured interval (cancel to stop)."""
        assert self.storage is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                try:
                    stats = await self.run_round(await self.storage.list_machines())
                    log.debug("round done", machines=stats.machines, seconds=stats.seconds)
                except Exception as exc:
                    log.error("round failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(max(0.0, self.config.interval - (loop.time() - started)))
        finally:
            await self.close()


class Election:
    """Leader election on etcd: a lease-bound key; the lowest create revision leads.

    ``run(work)`` campaigns, runs ``work()`` while it leads and cancels it as soon
    as the lease cannot be renewed or the key is gone; then it campaigns again.
    """

    def __init__(self, storage: Storage, name: str, ttl: int = 5) -> None:
        self.storage = storage
        self.name = name
        self.ttl = ttl
        self.leader = False

    async def _keepalive_once(self, lease_id: int) -> bool:
        lease = self.storage.client.lease
        assert lease is not None
        stream = lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(max(1.0, self.ttl / 3)):
                async for resp in stream:
                    return bool(resp.TTL > 0)
        except Exception:
            return False
        finally:
            stream.cancel()
        return False

    async def _hold(self, lease_id: int, key: bytes) -> None:
        """Return when leadership is lost."""
        kv = self.storage.kv
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(max(0.3, self.ttl / 4))
            if await self._keepalive_once(lease_id):
                last_ok = time.monotonic()
                try:
                    if not (await kv.get(key, timeout=2)).kvs:
                        return
                except Exception:
                    pass
            elif time.monotonic() - last_ok > self.ttl * 0.75:
                return

    async def run(
        self, work: Callable[[], Coroutine[Any, Any, None]], status: dict[str, Any]
    ) -> None:
        lease_svc = self.storage.client.lease
        assert lease_svc is not None
        kv = self.storage.kv
        prefix = self.storage.leader_prefix.encode()
        while True:
            lease_id = 0
            try:
                lease_id = int((await lease_svc.grant(self.ttl)).ID)
                key = prefix + f"{lease_id:016x}".encode()
                await kv.put(key, self.name.encode(), lease=lease_id)
                holder = asyncio.create_task(self._hold(lease_id, key))
                try:
                    while not holder.done():
                        resp = await kv.get(
                            prefix,
                            range_end=prefix_range_end(prefix),
                            sort_target=SortTarget.CREATE,
                            sort_order=SortOrder.ASCEND,
                            limit=1,
                        )
                        if resp.kvs and resp.kvs[0].key == key:
                            break
                        await asyncio.wait({holder}, timeout=0.5)
                    if holder.done():
                        continue
                    log.info("elected leader", name=self.name)
                    self.leader = status["leader"] = True
                    task = asyncio.create_task(work())
                    await asyncio.wait({holder, task}, return_when=asyncio.FIRST_COMPLETED)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    log.warning("leadership lost", name=self.name)
                finally:
                    self.leader = status["leader"] = False
                    holder.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await holder
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("election error", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
            finally:
                if lease_id:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(lease_svc.revoke(lease_id, timeout=2))


def new_name() -> str:
    return f"sabakan-{secrets.token_hex(4)}"
