"""The proxy: listener, upstream pool, health checks and byte forwarding.

Forwarding uses two ``asyncio.Protocol`` objects per connection (client side and
upstream side) that write straight into each other's transport. The transports do
the buffering; flow control is the protocols' ``pause_writing``/``resume_writing``
callbacks, which pause and resume *reading* on the other side, so a slow reader
never makes rivers buffer more than one write-buffer high-water mark per direction.
Per-chunk work is kept to a length add and a ``write`` because this sits on the
path of every control-plane request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from cke.common.logs import get_logger

log = get_logger("rivers")

# Bytes a transport may hold before it asks the other side to stop reading.
# Measured: 256 KiB buffers keep a single stream as fast as with larger ones,
# and 1,000 idle connections hold no buffers at all.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# Data a client may send before its upstream is connected; beyond it we pause reading.
PENDING_LIMIT = 256 * 1024


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ProxyConfig:
    listen: HostPort
    upstreams: tuple[HostPort, ...]
    check_interval: float = 20.0
    dial_timeout: float = 10.0
    dial_keep_alive: float = 15.0
    shutdown_timeout: float = 10.0


class Upstream:
    """One apiserver (or etcd) endpoint and the connections proxied to it."""

    __slots__ = ("accepted", "address", "dial_errors", "healthy", "name", "sessions")

    def __init__(self, address: HostPort) -> None:
        self.address = address
        self.name = str(address)
        # Healthy until a dial says otherwise, so a fresh rivers serves at once.
        self.healthy = True
        self.sessions: set[ClientSide] = set()
        self.accepted = 0
        self.dial_errors = 0


def dial_order(upstreams: Iterable[Upstream], rng: random.Random | None = None) -> list[Upstream]:
    """Healthy upstreams in a random order: the first is the pick, the rest the fallbacks."""
    healthy = [u for u in upstreams if u.healthy]
    (rng or random).shuffle(healthy)
    return healthy


class UpstreamSide(asyncio.Protocol):
    """The connection rivers dialed to an upstream, paired with one client."""

    __slots__ = ("bytes_down", "client", "read_eof", "transport")

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.read_eof = False
        self.bytes_down = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport = cast(asyncio.Transport, transport)
        client = self.client
        if client.closed:
            transport.close()
            return
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        client.peer = self
        if client.pending:
            if client.pending_paused:
                client.pending_paused = False
                client.transport.resume_reading()
            transport.writelines(client.pending)
            client.pending = []
        if client.read_eof:
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        if self.read_eof:
            return True
        self.read_eof = True
        client = self.client
        if client.closed:
            return False
        client.transport.write_eof()
        if client.read_eof:
            client.transport.close()
            return False
        return True

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.client.read_eof:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        if not client.closed:
            if exc is None:
                client.transport.close()
            else:
                client.transport.abort()


class ClientSide(asyncio.Protocol):
    """An accepted client connection; owns the accounting of the pair."""

    __slots__ = (
        "bytes_up",
        "closed",
        "peer",
        "pending",
        "pending_paused",
        "pending_size",
        "proxy",
        "read_eof",
        "started",
        "transport",
        "upstream",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer: UpstreamSide | None = None
        self.upstream: Upstream | None = None
        self.closed = False
        self.read_eof = False
        self.bytes_up = 0
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.pending_paused = False
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.proxy.accept(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_up += len(data)
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)
            return
        # Not connected upstream yet: hold a bounded amount, then stop reading.
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= PENDING_LIMIT and not self.pending_paused:
            self.pending_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.read_eof:
            return True
        self.read_eof = True
        peer = self.peer
        if peer is None:
            return True  # the upstream side sends the EOF once it is connected
        peer.transport.write_eof()
        if peer.read_eof:
            peer.transport.close()
            return False
        return True

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.read_eof:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()
        self.proxy.finished(self, exc)

    def abort(self) -> None:
        """Drop both sides at once (upstream unhealthy, shutdown deadline)."""
        if self.peer is not None:
            self.peer.transport.abort()
        self.transport.abort()

    def client_name(self) -> str:
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            return str(HostPort(str(peer[0]), int(peer[1])))
        return str(peer)


class Proxy:
    """Accepts clients, dials upstreams, checks their health, keeps the counters."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.upstreams = [Upstream(a) for a in config.upstreams]
        self.no_upstream = 0
        # Bytes of connections already finished; live ones are summed at scrape time
        # so the per-chunk path only adds to its own connection.
        self.closed_bytes_up = 0
        self.closed_bytes_down = 0
        self.dialing: set[ClientSide] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.Server] = []
        self._health_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._debug = log.is_enabled_for(logging.DEBUG)
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Bind the listener (raises OSError if it cannot) and start health checks.

        With ``sockets`` (a worker), serve on listening sockets inherited from the
        main process instead of binding: every worker accepts from the same queue.
        """
        self._loop = asyncio.get_running_loop()
        listen = self.config.listen
        if sockets is None:
            self._servers = [
                await self._loop.create_server(
                    lambda: ClientSide(self),
                    listen.host,
                    listen.port,
                    backlog=4096,
                    reuse_address=True,
                )
            ]
        else:
            self._servers = [
                await self._loop.create_server(lambda: ClientSide(self), sock=sock, backlog=4096)
                for sock in sockets
            ]
        self._health_task = asyncio.create_task(self._health_loop())
        log.info(
            "rivers started",
            listen=str(listen),
            upstreams=[u.name for u in self.upstreams],
            loop=type(self._loop).__module__,
        )

    def listen_fds(self) -> list[int]:
        """Descriptors of the listening sockets, for workers to inherit."""
        return [sock.fileno() for server in self._servers for sock in server.sockets]

    @property
    def bound_port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    def close_listener(self) -> None:
        for server in self._servers:
            server.close()

    def active_count(self) -> int:
        return len(self.dialing) + sum(len(u.sessions) for u in self.upstreams)

    async def shutdown(self) -> None:
        """Stop accepting now; let open connections finish up to shutdown_timeout."""
        self.close_listener()
        if self._health_task is not None:
            self._health_task.cancel()
        active = self.active_count()
        log.info("shutting down", active=active, timeout=self.config.shutdown_timeout)
        if active:
            self._all_closed.clear()
            try:
                async with asyncio.timeout(self.config.shutdown_timeout):
                    await self._all_closed.wait()
            except TimeoutError:
                left = self._live_sessions()
                log.warning("shutdown timeout, closing connections", active=len(left))
                for session in left:
                    session.abort()
                # Aborted transports report connection_lost on the next loop turn.
                await asyncio.sleep(0)
        for task in list(self._tasks):
            task.cancel()
        log.info("rivers stopped")

    def _live_sessions(self) -> list[ClientSide]:
        live = list(self.dialing)
        for upstream in self.upstreams:
            live.extend(upstream.sessions)
        return live

    # --- connections -----------------------------------------------------------------

    def accept(self, client: ClientSide) -> None:
        client.started = time.monotonic()
        self.dialing.add(client)
        task = asyncio.ensure_future(self._connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: ClientSide) -> None:
        loop = self._loop
        assert loop is not None
        for upstream in dial_order(self.upstreams):
            if client.closed:
                break
            address = upstream.address
            try:
                async with asyncio.timeout(self.config.dial_timeout):
                    transport, _ = await loop.create_connection(
                        lambda: UpstreamSide(client), address.host, address.port
                    )
            except (OSError, TimeoutError) as exc:
                upstream.dial_errors += 1
                log.warning(
                    "dial failed",
                    client=client.client_name(),
                    upstream=upstream.name,
                    error=_describe(exc),
                )
                self.mark_unhealthy(upstream, exc)
                continue
            self.dialing.discard(client)
            if client.closed:
                transport.close()
                self._maybe_all_closed()
                return
            upstream.accepted += 1
            upstream.sessions.add(client)
            client.upstream = upstream
            self._set_keep_alive(transport)
            return
        self.dialing.discard(client)
        if not client.closed:
            self.no_upstream += 1
            log.warning("no healthy upstream, closing client", client=client.client_name())
            client.transport.abort()
        self._maybe_all_closed()

    def _set_keep_alive(self, transport: asyncio.BaseTransport) -> None:
        idle = self.config.dial_keep_alive
        if idle <= 0:
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        seconds = max(1, int(idle))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, seconds)
        except OSError:
            pass  # the connection is already gone; connection_lost will follow

    def finished(self, client: ClientSide, exc: Exception | None) -> None:
        upstream = client.upstream
        peer = client.peer
        bytes_down = peer.bytes_down if peer is not None else 0
        self.closed_bytes_up += client.bytes_up
        self.closed_bytes_down += bytes_down
        if upstream is not None:
            upstream.sessions.discard(client)
        if exc is not None:
            log.warning(
                "connection error",
                client=client.client_name(),
                upstream=upstream.name if upstream else "",
                error=_describe(exc),
            )
        if self._debug:
            log.debug(
                "connection closed",
                client=client.client_name(),
                upstream=upstream.name if upstream else "",
                bytes_in=client.bytes_up,
                bytes_out=bytes_down,
                duration=round(time.monotonic() - client.started, 6),
            )
        self._maybe_all_closed()

    def _maybe_all_closed(self) -> None:
        if not self._all_closed.is_set() and self.active_count() == 0:
            self._all_closed.set()

    def bytes_totals(self) -> tuple[int, int]:
        """(client->upstream, upstream->client) bytes so far, live connections included."""
        up, down = self.closed_bytes_up, self.closed_bytes_down
        for session in self._live_sessions():
            up += session.bytes_up
            if session.peer is not None:
                down += session.peer.bytes_down
        return up, down

    def snapshot(self) -> Snapshot:
        """The counters and states, as plain data a worker can send to the main process."""
        up, down = self.bytes_totals()
        return {
            "upstreams": {
                u.name: {
                    "accepted": u.accepted,
                    "active": len(u.sessions),
                    "dial_errors": u.dial_errors,
                    "healthy": 1 if u.healthy else 0,
                }
                for u in self.upstreams
            },
            "bytes_up": up,
            "bytes_down": down,
            "no_upstream": self.no_upstream,
            "dialing": len(self.dialing),
            "workers": 1,
        }

    # --- health ----------------------------------------------------------------------

    def mark_unhealthy(self, upstream: Upstream, exc: BaseException) -> None:
        if upstream.healthy:
            upstream.healthy = False
            log.warning("upstream unhealthy", upstream=upstream.name, error=_describe(exc))
        # Clients of a dead upstream would hang until their own timeouts; closing
        # them makes them reconnect to a live one (what CKE's rivers does).
        if upstream.sessions:
            sessions = list(upstream.sessions)
            log.info("closing connections", upstream=upstream.name, count=len(sessions))
            for session in sessions:
                session.abort()

    def mark_healthy(self, upstream: Upstream) -> None:
        if not upstream.healthy:
            upstream.healthy = True
            log.info("upstream healthy", upstream=upstream.name)

    async def check_once(self) -> None:
        await asyncio.gather(*(self._check(u) for u in self.upstreams))

    async def _check(self, upstream: Upstream) -> None:
        address = upstream.address
        try:
            async with asyncio.timeout(self.config.dial_timeout):
                _, writer = await asyncio.open_connection(address.host, address.port)
        except (OSError, TimeoutError) as exc:
            upstream.dial_errors += 1
            self.mark_unhealthy(upstream, exc)
            return
        writer.close()
        self.mark_healthy(upstream)

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # a check must never stop the checking
                log.exception("health check failed")
            await asyncio.sleep(self.config.check_interval)


Snapshot = dict[str, Any]


def merge_snapshots(snapshots: list[Snapshot]) -> Snapshot:
    """Totals across workers. An upstream counts as healthy only if every worker
    sees it healthy (each worker checks on its own; they agree within one interval)."""
    merged: Snapshot = {"upstreams": {}, "bytes_up": 0, "bytes_down": 0}
    merged.update(no_upstream=0, dialing=0, workers=0)
    for snap in snapshots:
        for key in ("bytes_up", "bytes_down", "no_upstream", "dialing", "workers"):
            merged[key] += snap[key]
        for name, fields in snap["upstreams"].items():
            into = merged["upstreams"].setdefault(
                name, {"accepted": 0, "active": 0, "dial_errors": 0, "healthy": 1}
            )
            for key in ("accepted", "active", "dial_errors"):
                into[key] += fields[key]
            into["healthy"] = min(into["healthy"], fields["healthy"])
    return merged


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "dial timeout"
    return f"{type(exc).__name__}: {exc}"
