"""The state setter: turns probe results into machine states (runs on the elected replica).

Per machine and round: a TCP connect to ``ssh-port`` of the first IPv4 address, then,
when the machine's role has one, an HTTP health URL and/or a command. Each outcome is
counted per machine, and a machine changes state only after a run of the same
outcome in consecutive rounds (flapping is damped):

* ``unreachable`` after ``unreachable-threshold`` failed connects in a row
  (from healthy or unhealthy);
* ``unhealthy`` after ``unhealthy-threshold`` failed health checks in a row (from
  healthy or unreachable; the connect worked in those rounds);
* ``healthy`` after ``healthy-threshold`` rounds in a row with every check good (from
  uninitialized, unhealthy or unreachable).

Any other outcome breaks the run. updating, retiring and retired machines are never
touched: the state compare is part of the write's compare-and-swap, so an operator's
change always wins. Each change is written together with its audit record, which
says why (``reason``: which check failed how many times in a row, and how), and is
fenced on the leader key: a replica that lost the election changes nothing. The
counters live in the leader's memory; a new leader starts counting afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cke.common.durations import parse_duration
from cke.common.election import LeaderKey, LeadershipLost, fence
from cke.common.logs import error_line, get_logger
from sabakan.model import Machine, MachineState, MachineStatus, check_transition, now
from sabakan.storage import (
    MAX_CAS_ATTEMPTS,
    Actor,
    ConflictError,
    NotFoundError,
    Storage,
    _mod_revision_is,
)

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

    @field_validator("http")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None:
            _placeholders_ok(value)
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value or not value[0]:
                raise ValueError("want a program and its arguments")
            for arg in value:
                _placeholders_ok(arg)
        return value


def _placeholders_ok(text: str) -> None:
    """Refuse, when the config is read, what would fail at every probe: only
    ``{ipv4}`` and ``{serial}`` may appear in braces (``{{``/``}}`` for literal ones)."""
    try:
        text.format(ipv4="", serial="")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"only {{ipv4}} and {{serial}} are replaced (write {{{{ and }}}} for braces): {exc}"
        ) from None


class StateSetterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = True
    interval: float = 10.0
    timeout: float = 2.0
    ssh_port: int = Field(default=22, alias="ssh-port", ge=1, le=65535)
    unreachable_threshold: int = Field(default=3, alias="unreachable-threshold", ge=1)
    unhealthy_threshold: int = Field(default=3, alias="unhealthy-threshold", ge=1)
    healthy_threshold: int = Field(default=2, alias="healthy-threshold", ge=1)
    concurrency: int = Field(default=200, ge=1, le=5000)
    roles: dict[str, RoleCheck] = Field(default_factory=dict)

    @field_validator("interval", "timeout", mode="before")
    @classmethod
    def _dur(cls, value: Any) -> float:
        return _duration(value)


@dataclass
class Observation:
    """One round's probe of one machine. ``check`` names what failed (empty: nothing)."""

    tcp_ok: bool
    check_ok: bool = True
    detail: str = ""
    check: str = ""


@dataclass
class _Counters:
    failures: int = 0  # failed connects in a row
    check_failures: int = 0  # failed health checks in a row (the connect worked)
    successes: int = 0  # rounds in a row with every check good


class Change(NamedTuple):
    """A state change the setter decided on, and why (goes into the audit record)."""

    target: MachineState
    reason: str


async def probe_tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
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


def _times(count: int) -> str:
    return f"{count} time" if count == 1 else f"{count} times"


def _in_a_row(what: str, count: int, threshold: int, detail: str) -> str:
    return f"{what} failed {_times(count)} in a row (threshold {threshold}): {detail}"


class StateSetter:
    def __init__(self, storage: Storage | None, config: StateSetterConfig) -> None:
        self.storage = storage
        self.config = config
        self.counters: dict[str, _Counters] = {}
        # Set while this replica leads: every state write is fenced on it.
        self.leader: LeaderKey | None = None
        self._sem = asyncio.Semaphore(config.concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _check(self, machine: Machine, ip: str) -> tuple[bool, str, str]:
        """The role's health checks: (good, which check failed, how)."""
        check = self.config.roles.get(machine.spec.role)
        if check is None:
            return True, "", ""
        subst = {"ipv4": ip, "serial": machine.spec.serial}
        if check.http:
            url = check.http.format(**subst)
            what = f"http check {url}"
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout)
                )
            try:
                async with self._session.get(url) as resp:
                    if not 200 <= resp.status < 300:
                        return False, what, f"status {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                return False, what, type(exc).__name__
        if check.command:
            argv = [a.format(**subst) for a in check.command]
            what = f"command check {argv[0]}"
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            except OSError as exc:
                return False, what, f"cannot run: {exc}"
            try:
                code = await asyncio.wait_for(proc.wait(), self.config.timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return False, what, f"timed out after {self.config.timeout:g}s"
            if code != 0:
                return False, what, f"exit status {code}"
        return True, "", ""

    async def observe(self, machine: Machine) -> Observation:
        ip = machine.spec.ipv4[0]
        port = self.config.ssh_port
        async with self._sem:
            ok, detail = await probe_tcp(ip, port, self.config.timeout)
            if not ok:
                return Observation(tcp_ok=False, detail=detail, check=f"connect to {ip}:{port}")
            good, what, detail = await self._check(machine, ip)
            return Observation(tcp_ok=True, check_ok=good, detail=detail, check=what)

    def decide(self, machine: Machine, obs: Observation) -> Change | None:
        """The state ``machine`` should move to after ``obs``, and why (None: leave it)."""
        c = self.counters.setdefault(machine.spec.serial, _Counters())
        state = machine.status.state
        cfg = self.config
        if state not in MANAGED:
            c.failures = c.check_failures = c.successes = 0
            return None
        if not obs.tcp_ok:
            c.failures += 1
            c.check_failures = c.successes = 0
            if c.failures >= cfg.unreachable_threshold and state in (S.HEALTHY, S.UNHEALTHY):
                why = _in_a_row(obs.check, c.failures, cfg.unreachable_threshold, obs.detail)
                return Change(S.UNREACHABLE, why)
            return None
        if not obs.check_ok:
            c.check_failures += 1
            c.failures = c.successes = 0
            if c.check_failures >= cfg.unhealthy_threshold and state in (S.HEALTHY, S.UNREACHABLE):
                why = _in_a_row(obs.check, c.check_failures, cfg.unhealthy_threshold, obs.detail)
                return Change(S.UNHEALTHY, why)
            return None
        c.failures = c.check_failures = 0
        c.successes += 1
        if state != S.HEALTHY and c.successes >= cfg.healthy_threshold:
            return Change(
                S.HEALTHY,
                f"every check passed {_times(c.successes)} in a row "
                f"(threshold {cfg.healthy_threshold})",
            )
        return None

    async def set_state(self, serial: str, change: Change) -> Machine:
        """Write ``change`` with its audit record (which carries the reason) in one
        transaction, if the machine is still in a state the setter manages and this
        replica still leads (``self.leader``); compare-and-swap like every write.

        Raises ConflictError when the machine left the managed states, TransitionError
        when the lifecycle forbids the change, LeadershipLost when the fence failed.
        """
        storage = self.storage
        assert storage is not None
        key = storage.machine_key(serial)
        for _ in range(MAX_CAS_ATTEMPTS):
            machine, revision = await storage.get(serial)
            current = machine.status.state
            if current not in MANAGED:
                raise ConflictError(f"machine {serial} is {current.value}; left alone")
            check_transition(current, change.target)
            when = now()
            new = machine.model_copy(
                update={"status": MachineStatus(state=change.target, timestamp=when)}, deep=True
            )
            audit = storage._audit_op(
                ACTOR, "state", serial, current.value, change.target.value, when
            )
            record = json.loads(audit.request_put.value)
            record["reason"] = change.reason
            audit.request_put.value = json.dumps(record).encode()
            compare = [_mod_revision_is(key, revision)]
            failure = []
            if self.leader is not None:
                compare.append(fence(self.leader))
                failure.append(storage.kv.txn_op_get(self.leader.key))
            resp = await storage.kv.txn(
                compare=compare,
                success=[storage.kv.txn_op_put(key, new.dump()), audit],
                failure=failure,
            )
            if resp.succeeded:
                return new
            if self.leader is not None:
                kvs = resp.responses[0].response_range.kvs
                if not kvs or kvs[0].create_revision != self.leader.create_revision:
                    raise LeadershipLost("a state write was refused: the leader key is gone")
        raise ConflictError(f"machine {serial} is too busy; try again")

    async def _one(self, machine: Machine, stats: RoundStats) -> None:
        if machine.status.state not in MANAGED or not machine.spec.ipv4:
            return
        obs = await self.observe(machine)
        stats.probed += 1
        change = self.decide(machine, obs)
        if change is None or self.storage is None:
            return
        serial = machine.spec.serial
        try:
            await self.set_state(serial, change)
        except LeadershipLost:
            raise
        except (ConflictError, NotFoundError, ValueError) as exc:
            log.info("state not changed", serial=serial, reason=str(exc))
            return
        except Exception as exc:  # etcd trouble: the counters stand, the next round retries
            log.warning("state not changed", serial=serial, error=error_line(exc))
            return
        stats.changes += 1
        stats.changed.append((serial, machine.status.state.value, change.target.value))
        log.info(
            "state changed",
            serial=serial,
            before=machine.status.state.value,
            after=change.target.value,
            reason=change.reason,
        )

    async def run_round(self, machines: list[Machine]) -> RoundStats:
        start = time.perf_counter()
        stats = RoundStats(machines=len(machines))
        tasks = [asyncio.ensure_future(self._one(m, stats)) for m in machines]
        try:
            await asyncio.gather(*tasks)
        finally:  # lost leadership: stop the other probes of this round too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        live = {m.spec.serial for m in machines}
        for serial in list(self.counters):
            if serial not in live:
                del self.counters[serial]
        stats.seconds = time.perf_counter() - start
        return stats

    async def run(self) -> None:
        """Probe forever at the configured interval (cancel to stop); raises
        LeadershipLost when a fenced write was refused."""
        assert self.storage is not None
        self.counters.clear()  # counts from an earlier term are stale
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                try:
                    stats = await self.run_round(await self.storage.list_machines())
                    log.debug("round done", machines=stats.machines, seconds=stats.seconds)
                except LeadershipLost:
                    raise
                except Exception as exc:
                    log.error("round failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(max(0.0, self.config.interval - (loop.time() - started)))
        finally:
            await self.close()


def new_name() -> str:
    return f"sabakan-{secrets.token_hex(4)}"
