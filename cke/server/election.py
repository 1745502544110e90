"""Leader election through etcd, with a lease that must stay fresh.

Each replica puts ``leader/<lease id>`` (value: its name) under its lease; the
candidate with the oldest key leads, the others watch their predecessor. The
leader keeps its lease alive every TTL/3 and declares itself *lost* as soon as a
renewal is refused or no renewal succeeded for a whole TTL (a paused process
notices this the moment it runs again). Its writes are fenced on the key anyway
(see ``Storage.fenced``), so even a late notice changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from etcd3aio import Etcd3Client, EtcdError

from cke.common.logs import error_line, get_logger
from cke.storage import KEY_LEADER_PREFIX, LeaderKey, Storage

log = get_logger("cke.election")

_EVENT_DELETE = 1


class Election:
    def __init__(self, client: Etcd3Client, storage: Storage, name: str, ttl: int) -> None:
        self.client = client
        self.storage = storage
        self.name = name
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.leader_key: LeaderKey | None = None
        self._lease_id: int | None = None
        self._key: bytes | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def campaign(self) -> LeaderKey:
        """Block until this replica leads; return its proof of leadership."""
        assert self.client.lease is not None and self.client.kv is not None
        self.lost.clear()
        grant = await self.client.lease.grant(ttl=self.ttl, timeout=self.storage.timeout)
        self._lease_id = int(grant.ID)
        self._key = self.storage.key(f"{KEY_LEADER_PREFIX}{self._lease_id:016x}")
        await self.client.kv.put(self._key, self.name, lease=self._lease_id)
        self._tasks = [asyncio.create_task(self._keep_alive(), name="lease-keepalive")]
        log.info("campaigning", name=self.name, lease=f"{self._lease_id:x}")
        while True:
            if self.lost.is_set():
                raise LeadershipLost("lease lost while campaigning")
            candidates = await self.storage.leader_candidates()
            mine = [i for i, c in enumerate(candidates) if c[0] == self._key]
            if not mine:
                self.lost.set()
                raise LeadershipLost("election key vanished while campaigning")
            index = mine[0]
            if index == 0:
                self.leader_key = LeaderKey(self._key, candidates[0][1], self._lease_id, self.name)
                self._tasks.append(asyncio.create_task(self._watch_own_key(), name="leader-key"))
                log.info("became leader", name=self.name)
                return self.leader_key
            predecessor = candidates[index - 1][0]
            await self._wait_deleted(predecessor)

    async def _wait_deleted(self, key: bytes) -> None:
        """Return when ``key`` is deleted or this candidacy is lost, whichever is first."""
        assert self.client.kv is not None
        current = await self.client.kv.get(key, timeout=self.storage.timeout)
        if not current.kvs:
            return
        deleted = asyncio.create_task(self._watch_delete(key, current.header.revision + 1))
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

    async def _keep_alive(self) -> None:
        assert self.client.lease is not None and self._lease_id is not None
        last_renewal = time.monotonic()
        interval = max(self.ttl / 3, 0.5)
        while not self.lost.is_set():
            await asyncio.sleep(interval)
            if time.monotonic() - last_renewal >= self.ttl:
                self._declare_lost("no lease renewal for a whole TTL (paused or cut off)")
                return
            try:
                stream = self.client.lease.keep_alive(self._lease_id)
                try:
                    async with asyncio.timeout(interval):
                        async for response in stream:
                            if response.TTL <= 0:
                                self._declare_lost("lease expired")
                                return
                            break
                finally:
                    stream.cancel()
            except (TimeoutError, EtcdError, OSError) as exc:
                log.warning("lease renewal failed", error=str(exc) or type(exc).__name__)
                continue
            except Exception as exc:  # grpc errors surface as AioRpcError
                log.warning("lease renewal failed", error=error_line(exc, 200))
                continue
            if time.monotonic() - last_renewal >= self.ttl:
                # The renewal came back, but our own clock says the lease may have
                # lapsed in between: trust the fence, not the renewal.
                self._declare_lost("lease renewal came too late")
                return
            last_renewal = time.monotonic()

    async def _watch_own_key(self) -> None:
        assert self.client.watch is not None and self._key is not None
        with contextlib.suppress(Exception):
            async for response in self.client.watch.watch(self._key):
                if any(e.type == _EVENT_DELETE for e in response.events):
                    self._declare_lost("leader key deleted")
                    return

    def _declare_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            log.warning("lost leadership", name=self.name, reason=reason)
            self.lost.set()

    async def resign(self) -> None:
        """Give up leadership (or candidacy) at once so that a successor takes over."""
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


class LeadershipLost(Exception):
    pass
