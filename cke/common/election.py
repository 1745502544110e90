"""Leader election on etcd with a lease that must stay fresh: one implementation for
cke and sabakan.

Each candidate grants a lease of ``ttl`` seconds and puts ``<prefix><lease id hex>``
(value: its name) under it; the candidate whose key has the lowest create revision
leads, each other one watches its predecessor's key and re-reads when it goes. The
key layout is the same for both users: cke's ``/cke/leader/…`` and sabakan's
``/sabakan/leader/…`` differ only by ``prefix``.

While campaigning and while leading, the lease is renewed every TTL/3 (at least
every 0.5 s). ``lost`` is set, and the holder must stop acting at once, when

* a renewal is refused (the lease expired or was revoked),
* no renewal succeeded for a whole TTL, counted from when the last good renewal was
  *sent* (so never later than etcd's own expiry): a paused or cut-off process notices
  this the moment it runs again,
* the election key is deleted.

Noticing is best effort by nature (a paused process notices nothing while it is
paused), so every write a leader makes must also be fenced: :func:`fence` gives the
etcd comparison that the leader key still exists with the create revision it had when
this candidate won (cke's ``Storage.fenced``, sabakan's state setter).

``resign()`` deletes the key and revokes the lease, so that a successor takes over at
once (on SIGTERM) instead of after the TTL.

Two ways to use it:

* cke (``cke/server/control.py``): ``leader = await campaign()``, act while
  ``lost`` is not set, then ``await resign()``;
* sabakan (``sabakan/main.py``): ``await run(work)``: campaign, run ``work(leader)``
  while leading, cancel it as soon as leadership is lost, resign, campaign again;
  cancelling ``run`` resigns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from etcd3aio import Etcd3Client, EtcdError, SortOrder, SortTarget, prefix_range_end
from etcd3aio._protobuf import Compare

from cke.common.logs import error_line, get_logger
from cke.storage import LeaderKey, NotLeader

__all__ = ["Election", "LeaderKey", "LeadershipLost", "LeaseFence", "fence"]

_EVENT_DELETE = 1
# Renewal period floor, and the pause before campaigning again after an error.
MIN_RENEW_INTERVAL = 0.5
RETRY_DELAY = 1.0


class LeadershipLost(Exception):
    """This candidate lost its lease or its key: it must stop acting as the leader."""


def fence(leader: LeaderKey) -> Compare:
    """The etcd comparison that ``leader`` still leads: its key exists and is the one
    created when it won (a successor's key, even with the same name, has another
    create revision). Put it in every transaction the leader makes."""
    return Compare(
        result=Compare.EQUAL,
        target=Compare.CREATE,
        key=leader.key,
        create_revision=leader.create_revision,
    )


class Election:
    """One candidacy at a time; ``campaign`` again after ``resign`` (or use ``run``)."""

    def __init__(
        self,
        client: Etcd3Client,
        prefix: str | bytes,
        name: str,
        ttl: int,
        *,
        timeout: float = 5.0,
        logger: str = "election",
    ) -> None:
        if ttl < 1:
            raise ValueError("ttl: must be at least 1 second")
        self.client = client
        self.prefix = prefix.encode() if isinstance(prefix, str) else prefix
        self.name = name
        self.ttl = ttl
        self.timeout = timeout
        self.log = get_logger(logger)
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.leader_key: LeaderKey | None = None
        # Monotonic time until which the lease is known to exist: the last good renewal's
        # send time (or the grant's) plus the TTL. 0 when lost.
        self._valid_until = 0.0
        self._lease_id: int | None = None
        self._key: bytes | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._announced = False  # what run() last told on_change

    @property
    def renew_interval(self) -> float:
        return max(self.ttl / 3, MIN_RENEW_INTERVAL)

    def valid_for(self) -> float:
        """Seconds the lease is still known to exist on this process's monotonic clock
        (0 once lost). A paused process reads the truth the moment it runs again."""
        if self.lost.is_set():
            return 0.0
        return max(0.0, self._valid_until - time.monotonic())

    async def candidates(self) -> list[tuple[bytes, int, str]]:
        """(key, create revision, name) of every candidate, the leader first."""
        kvs, _ = await self._candidates()
        return kvs

    async def _candidates(self) -> tuple[list[tuple[bytes, int, str]], int]:
        assert self.client.kv is not None
        resp = await self.client.kv.get(
            self.prefix,
            range_end=prefix_range_end(self.prefix),
            sort_order=SortOrder.ASCEND,
            sort_target=SortTarget.CREATE,
            timeout=self.timeout,
        )
        found = [
            (kv.key, int(kv.create_revision), kv.value.decode(errors="replace")) for kv in resp.kvs
        ]
        return found, int(resp.header.revision)

    async def leader_name(self) -> str | None:
        found = await self.candidates()
        return found[0][2] if found else None

    # -- campaigning ------------------------------------------------------------------------

    async def campaign(self) -> LeaderKey:
        """Block until this candidate leads; return its proof of leadership.

        Raises LeadershipLost when the lease or the key is lost meanwhile (then
        ``resign`` and campaign again).
        """
        assert self.client.lease is not None and self.client.kv is not None
        if self._key is not None:
            raise RuntimeError("already campaigning; resign first")
        self.lost.clear()
        self.lost_reason = ""
        asked = time.monotonic()  # the lease cannot expire before asked + ttl
        grant = await self.client.lease.grant(ttl=self.ttl, timeout=self.timeout)
        self._lease_id = int(grant.ID)
        self._valid_until = asked + self.ttl
        self._key = self.prefix + f"{self._lease_id:016x}".encode()
        self._tasks = [asyncio.create_task(self._keep_alive(asked), name="lease-keepalive")]
        await self.client.kv.put(self._key, self.name, lease=self._lease_id, timeout=self.timeout)
        self.log.info("campaigning", name=self.name, lease=f"{self._lease_id:x}")
        while True:
            if self.lost.is_set():
                raise LeadershipLost(f"lost while campaigning: {self.lost_reason}")
            found, revision = await self._candidates()
            mine = [i for i, c in enumerate(found) if c[0] == self._key]
            if not mine:
                self._declare_lost("election key vanished while campaigning")
                raise LeadershipLost(self.lost_reason)
            index = mine[0]
            if index == 0:
                self.leader_key = LeaderKey(self._key, found[0][1], self._lease_id, self.name)
                self._tasks.append(
                    asyncio.create_task(self._watch_own_key(revision + 1), name="leader-key")
                )
                self.log.info("became leader", name=self.name)
                return self.leader_key
            await self._wait_deleted(found[index - 1][0], revision + 1)

    async def _wait_deleted(self, key: bytes, revision: int) -> None:
        """Return when ``key`` is deleted at or after ``revision``, or this candidacy is
        lost, whichever is first."""
        deleted = asyncio.create_task(self._watch_delete(key, revision))
        lost = asyncio.create_task(self.lost.wait())
        try:
            await asyncio.wait({deleted, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (deleted, lost):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _watch_delete(self, key: bytes, revision: int) -> None:
        assert self.client.watch is not None
        async for response in self.client.watch.watch(key, start_revision=revision):
            if any(e.type == _EVENT_DELETE for e in response.events):
                return

    # -- holding on -------------------------------------------------------------------------

    async def _keep_alive(self, last_sent: float) -> None:
        """Renew the lease every ``renew_interval``; ``last_sent`` is when the last good
        renewal (or the grant) was asked for: etcd keeps the lease at least ``ttl``
        from then, and no longer than that is trusted."""
        assert self.client.lease is not None and self._lease_id is not None
        interval = self.renew_interval
        while not self.lost.is_set():
            await asyncio.sleep(min(interval, max(0.0, last_sent + self.ttl - time.monotonic())))
            if time.monotonic() - last_sent >= self.ttl:
                self._declare_lost("no lease renewal for a whole TTL (paused or cut off)")
                return
            sent = time.monotonic()
            try:
                stream = self.client.lease.keep_alive(self._lease_id)
                try:
                    async with asyncio.timeout(min(interval, last_sent + self.ttl - sent)):
                        async for response in stream:
                            if response.TTL <= 0:
                                self._declare_lost("lease expired or revoked")
                                return
                            break
                finally:
                    stream.cancel()
            except (TimeoutError, EtcdError, OSError) as exc:
                self.log.warning("lease renewal failed", error=str(exc) or type(exc).__name__)
                continue
            except Exception as exc:  # grpc errors surface as AioRpcError
                self.log.warning("lease renewal failed", error=error_line(exc, 200))
                continue
            if time.monotonic() - last_sent >= self.ttl:
                # The renewal came back, but the lease may have lapsed before it
                # arrived (and a successor may have won): trust the fence, not it.
                self._declare_lost("lease renewal came too late")
                return
            last_sent = sent
            self._valid_until = sent + self.ttl

    async def _watch_own_key(self, revision: int) -> None:
        assert self.client.watch is not None and self._key is not None
        with contextlib.suppress(Exception):
            async for response in self.client.watch.watch(self._key, start_revision=revision):
                if any(e.type == _EVENT_DELETE for e in response.events):
                    self._declare_lost("leader key deleted")
                    return

    def _declare_lost(self, reason: str) -> None:
        self._valid_until = 0.0
        if not self.lost.is_set():
            self.lost_reason = reason
            if self.leader_key is not None:
                self.log.warning("lost leadership", name=self.name, reason=reason)
            else:
                self.log.warning("lost candidacy", name=self.name, reason=reason)
            self.lost.set()

    async def resign(self) -> None:
        """Give up leadership (or candidacy) at once so that a successor takes over."""
        if not self.lost.is_set():
            self.lost_reason = "resigned"
            self.lost.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self.client.kv is not None and self._key is not None:
            with contextlib.suppress(Exception):
                await self.client.kv.delete(self._key, timeout=2)
        if self.client.lease is not None and self._lease_id is not None:
            with contextlib.suppress(Exception):
                await self.client.lease.revoke(self._lease_id, timeout=2)
        self._key = None
        self._lease_id = None
        self.leader_key = None

    # -- the loop for services that just run work while they lead ---------------------------

    async def run(
        self,
        work: Callable[[LeaderKey], Awaitable[None]],
        on_change: Callable[[bool], None] | None = None,
        retry_delay: float = RETRY_DELAY,
    ) -> None:
        """Campaign, run ``work(leader)`` while leading and cancel it the moment
        leadership is lost; resign and campaign again, forever. ``on_change(True)`` is
        called on winning, ``on_change(False)`` once, before ``work`` is cancelled. ``work``
        may raise LeadershipLost (e.g. after a fenced write was refused) to step down;
        if it ends otherwise, this replica steps down and campaigns again after
        ``retry_delay``. Cancel the task running this to stop: it resigns first.
        """
        while True:
            delay = 0.0
            try:
                leader = await self.campaign()
                await self._lead(leader, work, on_change)
            except LeadershipLost as exc:
                self.log.warning("stepping down", name=self.name, reason=str(exc))
            except (EtcdError, OSError, TimeoutError) as exc:
                self.log.error("etcd error; campaigning again", error=error_line(exc))
                delay = retry_delay
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.error(
                    "unexpected error; stepping down and campaigning again",
                    error=f"{type(exc).__name__}: {error_line(exc)}",
                )
                delay = retry_delay
            finally:
                was_leader = self.leader_key is not None
                self._announce(on_change, False)
                await self.resign()
                if was_leader:
                    self.log.info("resigned leadership", name=self.name)
            if delay:
                await asyncio.sleep(delay)

    def _announce(self, on_change: Callable[[bool], None] | None, leading: bool) -> None:
        if on_change is not None and leading != self._announced:
            on_change(leading)
        self._announced = leading

    async def _lead(
        self,
        leader: LeaderKey,
        work: Callable[[LeaderKey], Awaitable[None]],
        on_change: Callable[[bool], None] | None,
    ) -> None:
        self._announce(on_change, True)
        worker = asyncio.ensure_future(work(leader))
        lost = asyncio.create_task(self.lost.wait())
        try:
            await asyncio.wait({worker, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._announce(on_change, False)
            for task in (worker, lost):
                task.cancel()
            await asyncio.gather(worker, lost, return_exceptions=True)
        if self.lost.is_set():
            raise LeadershipLost(self.lost_reason)
        if worker.cancelled():
            raise LeadershipLost("work was cancelled")
        exc = worker.exception()
        if exc is not None:
            raise exc
        raise RuntimeError("the leader's work ended")


_fence_log = get_logger("cke.fence")


class LeaseClock(Protocol):
    def valid_for(self) -> float:
        """Seconds the lease is still known to exist (``Election.valid_for``)."""
        ...


class LeaseFence:
    """The fence in front of everything a leader does outside etcd: SSH commands to nodes
    and Vault writes (its etcd writes are fenced by :func:`fence`).

    A leader paused in the middle of an operation (SIGSTOP, a VM freeze) resumes with
    its next command ready to go; etcd would refuse its next write, but a node or Vault
    would not. So before each such request, ``check`` requires the lease to be known
    valid (``Election.valid_for``) for at least ``min(needed, margin)`` seconds more,
    and raises NotLeader otherwise. ``margin`` is a third of the TTL: a healthy leader
    renews every third of the TTL, so it always has two thirds left, and one renewal
    may come late before anything is refused. A request already under way is not cut
    short (killing a remote script half-way does more harm than letting it finish).
    Until ``arm``-ed with a won election, and after ``disarm``, everything is refused.
    """

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self._election: LeaseClock | None = None

    def arm(self, election: LeaseClock) -> None:
        self._election = election

    def disarm(self) -> None:
        self._election = None

    def check(self, needed: float, what: str) -> None:
        """Raise NotLeader unless the lease is known valid for ``min(needed, margin)``."""
        election = self._election
        remaining = election.valid_for() if election is not None else 0.0
        required = min(needed, self.margin)
        if remaining < required:
            message = (
                f"refusing to {what}: the leader lease is known valid for "
                f"{remaining:.1f}s more, less than the {required:.1f}s required "
                "(paused, cut off or no longer leading)"
            )
            # Said here, once: the caller may be cancelled before it can report it.
            _fence_log.error(message)
            raise NotLeader(message)
