"""The proxy: listener, upstream pool, health checks and byte forwarding.

Forwarding uses two ``asyncio.Protocol`` objects per connection (client side and
upstream side) that write straight into each other's transport. The transports do
the buffering; flow control is the protocols' ``pause_writing``/``resume_writing``
callbacks, which pause and resume *reading* on the other side, so a slow reader
never makes rivers buffer more than the write-buffer high-water mark plus one read
per direction. Per-chunk work is kept to a length add and a ``write`` because this
sits on the path of every control-plane request.

Limits: a dial that fails for a reason of our own (out of descriptors, kernel memory
or local ports, see ``LOCAL_ERRNOS``) says nothing about the upstream, so it never
marks it unhealthy nor closes its connections; ``max_connections`` sheds clients
beyond the limit before descriptors run out; an accept() that runs out of descriptors
pauses accepting (``Listener``); memory that stalled connections buffered is handed
back to the system (``malloc_trim``) once they drain or close.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import random
import resource
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from cke.common.logs import get_logger

log = get_logger("rivers")

# Bytes a transport may hold before it asks the other side to stop reading. The
# event loop reads up to 256 KB at a time (uvloop: 256,000 bytes, asyncio 256 KiB),
# and a stalled reader keeps the chunk that crossed the mark: so a stalled direction
# holds at most WRITE_HIGH_WATER + one read. With 256 KiB here that was ~500 KB per
# stalled connection (300 clients not reading a flooding upstream: +146 MB RSS);
# with 64 KiB the first read that does not fit pauses at once (~250 KB). Idle
# connections hold no buffers at all. Single-stream throughput is unchanged: a
# reader that keeps up never leaves data in these buffers (the kernel's take it).
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
# Data a client may send before its upstream is connected; beyond it we pause reading.
PENDING_LIMIT = 64 * 1024

# Dial errors that are about this host, not the upstream: out of descriptors
# (EMFILE: this process; ENFILE: the whole system), out of kernel memory for sockets
# (ENOBUFS, ENOMEM), no free local port/address for the connection (EADDRNOTAVAIL:
# ephemeral ports exhausted towards that address). Such a failure must not mark the
# upstream unhealthy (that closed every connection proxied to it, and refused clients
# until the next health check). Refusals, resets, unreachable networks and timeouts
# do come from the upstream's side and still count against it.
LOCAL_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)
# Ports are per destination, so another upstream may still be dialable after
# EADDRNOTAVAIL; after the others no dial can succeed until something is freed.
PER_DESTINATION_ERRNOS = frozenset({errno.EADDRNOTAVAIL})

# Descriptors kept out of the connection limit's reach (listeners, event loop,
# log file, metrics scrapes, worker channels, health checks are added per upstream),
# so that shedding at the limit happens before accept() or a dial sees EMFILE.
FD_RESERVE = 64
# After memory held by stalled connections is freed, hand it back to the system this
# much later (one malloc_trim for many connections closing at once).
TRIM_DELAY = 1.0
# A repeating warning (shed clients, local dial errors) is logged at most this often;
# the lines in between are counted in the next one.
LOG_EVERY = 1.0
# Listen backlog of the proxy's listening sockets.
BACKLOG = 4096
# accept() errors on which asyncio's selector loop stops accepting for a second.
ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# After such an error, Listener.accept() reports "nothing to accept" this long: less
# than asyncio's retry delay (1 s), so that the retry accepts for real.
ACCEPT_QUIET = 0.5


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another libc).

    Buffers of stalled connections are bytes objects of up to 256 KB. Once glibc's
    dynamic mmap threshold has risen past that size (it does at the first such buffer
    freed), they come from the heap, and free() only gives back memory at the heap's
    top, which live objects pin: RSS stayed at its peak after the clients left.
    ``malloc_trim(0)`` returns the free pages of every arena to the system.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


malloc_trim = _libc_malloc_trim()


def local_errno(exc: BaseException) -> str | None:
    """The errno name (``EMFILE``...) if ``exc`` is a local resource error, else None."""
    code = getattr(exc, "errno", None)
    if code in LOCAL_ERRNOS:
        return errno.errorcode[code]
    return None


def connection_limit(configured: int | None, upstreams: int) -> tuple[int, int]:
    """(limit, descriptor cap) for this process; 0 means no limit.

    ``configured`` None is auto: as many connections as the descriptor limit allows
    (two descriptors each, FD_RESERVE and one per upstream kept aside), as HAProxy
    derives its maxconn from ``ulimit -n``. A configured limit is capped the same way.
    0 disables both (dials and accepts may then meet EMFILE, which is handled).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = soft == resource.RLIM_INFINITY
    cap = 0 if unlimited else max(1, (soft - FD_RESERVE - upstreams) // 2)
    if configured == 0:
        return 0, cap
    if configured is None:
        return cap, cap
    return (min(configured, cap) if cap else configured), cap


class Throttle:
    """Lets a repeating log line through at most once per ``every`` seconds."""

    __slots__ = ("every", "last", "skipped")

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self.last = -every
        self.skipped = 0

    def ready(self) -> int | None:
        """None to stay quiet; else the number of lines skipped since the last one."""
        now = time.monotonic()
        if now - self.last < self.every:
            self.skipped += 1
            return None
        skipped, self.skipped, self.last = self.skipped, 0, now
        return skipped


class Listener(socket.socket):
    """A listening socket that ends asyncio's accept loop once descriptors run out.

    On EMFILE (or ENFILE, ENOBUFS, ENOMEM) asyncio's selector loop logs the error,
    stops watching the socket and retries a second later, but stays in its accept loop:
    it calls accept() again up to the backlog (4,096) times, each failing, logging a
    traceback and scheduling one more retry (measured: 135,000 log lines in 2 s and 13%
    of a core while out of descriptors). After such an error this accept() says
    "nothing to accept" (BlockingIOError) for ACCEPT_QUIET, which ends that loop, so
    accepting pauses for the second asyncio waits. One attribute check per accept.

    uvloop never calls it: libuv accepts on the descriptor itself and, on EMFILE,
    frees a descriptor it keeps in reserve to accept and close the clients waiting in
    the backlog (they see the connection closed at once; nothing spins).
    """

    quiet_until = 0.0

    def accept(self) -> tuple[socket.socket, Any]:
        if self.quiet_until:
            if time.monotonic() < self.quiet_until:
                raise BlockingIOError(errno.EAGAIN, "paused after running out of resources")
            self.quiet_until = 0.0
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno in ACCEPT_PAUSE_ERRNOS:
                self.quiet_until = time.monotonic() + ACCEPT_QUIET
            raise


async def listen_sockets(address: HostPort) -> list[socket.socket]:
    """Bound (not yet listening) sockets for ``address``, one per resolved address.

    What ``loop.create_server(host, port, reuse_address=True)`` would bind, but as
    ``Listener`` objects. Raises OSError (address in use...) with nothing left open.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = Listener(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
    except BaseException:
        for opened in sockets:
            opened.close()
        raise
    return sockets


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
    shutdown_timeout: float = 10.0  # seconds; 0: wait for open connections forever
    # Per process (main.py gives each worker its share of --max-connections).
    # None: auto, from the descriptor limit; 0: no limit.
    max_connections: int | None = None


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
        client = self.client
        client.stalled = True
        client.transport.pause_reading()

    def resume_writing(self) -> None:
        client = self.client
        if not client.read_eof:
            client.transport.resume_reading()
        client.proxy.schedule_trim()

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
        "stalled",
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
        # Set once a side of the pair buffered past the high-water mark.
        self.stalled = False
        # Set when admitted (not shed).
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
        self.stalled = True
        peer = self.peer
        if peer is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.read_eof:
            peer.transport.resume_reading()
        self.proxy.schedule_trim()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()
        self.proxy.finished(self, exc)
        # Break the client <-> upstream-side cycle so both go with the last reference
        # instead of waiting for the cyclic garbage collector.
        self.peer = None

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
        # Admitted clients not yet closed (dialing or proxied), against max_connections.
        self.live = 0
        self.max_connections, self.fd_cap = connection_limit(
            config.max_connections, len(config.upstreams)
        )
        self.shed = 0
        # Dials (proxying and health checks) failed for a local reason, by errno name.
        self.local_errors: dict[str, int] = {}
        self._shed_log = Throttle()
        self._local_log = Throttle()
        self._trim_handle: asyncio.TimerHandle | None = None
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
            sockets = await listen_sockets(listen)
        try:
            for sock in sockets:
                self._servers.append(
                    await self._loop.create_server(
                        lambda: ClientSide(self), sock=sock, backlog=BACKLOG
                    )
                )
        except BaseException:
            self.close_listener()
            for sock in sockets:
                sock.close()
            raise
        self._health_task = asyncio.create_task(self._health_loop())
        log.info(
            "rivers started",
            listen=str(listen),
            upstreams=[u.name for u in self.upstreams],
            loop=type(self._loop).__module__,
            max_connections=self.max_connections or "unlimited",
        )
        configured = self.config.max_connections
        if configured and self.fd_cap and configured > self.fd_cap:
            log.warning(
                "max connections lowered to what the descriptor limit allows",
                configured=configured,
                max_connections=self.max_connections,
                nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
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
        """Stop accepting now; let open connections finish up to shutdown_timeout
        (0: no limit, wait until every connection has closed, as upstream rivers)."""
        self.close_listener()
        if self._health_task is not None:
            self._health_task.cancel()
        active = self.active_count()
        limit = self.config.shutdown_timeout or None
        log.info("shutting down", active=active, timeout=limit if limit else "none")
        if active:
            self._all_closed.clear()
            try:
                async with asyncio.timeout(limit):
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
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        log.info("rivers stopped")

    def _live_sessions(self) -> list[ClientSide]:
        live = list(self.dialing)
        for upstream in self.upstreams:
            live.extend(upstream.sessions)
        return live

    # --- connections -----------------------------------------------------------------

    def accept(self, client: ClientSide) -> None:
        if self.max_connections and self.live >= self.max_connections:
            self._shed(client)
            return
        self.live += 1
        client.started = time.monotonic()
        self.dialing.add(client)
        task = asyncio.ensure_future(self._connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _shed(self, client: ClientSide) -> None:
        """Over max_connections: close the new client at once; the others are untouched."""
        self.shed += 1
        skipped = self._shed_log.ready()
        if skipped is not None:
            log.warning(
                "connection limit reached, closing new client",
                client=client.client_name(),
                max_connections=self.max_connections,
                suppressed=skipped,
            )
        client.transport.abort()

    def local_error(self, name: str, what: str, upstream: Upstream, exc: BaseException) -> None:
        """Count and log (throttled) a dial that failed for a local reason."""
        self.local_errors[name] = self.local_errors.get(name, 0) + 1
        skipped = self._local_log.ready()
        if skipped is not None:
            log.warning(
                f"{what} failed on a local resource limit, upstream health unchanged",
                upstream=upstream.name,
                error=_describe(exc),
                suppressed=skipped,
            )

    async def _connect(self, client: ClientSide) -> None:
        loop = self._loop
        assert loop is not None
        local: str | None = None
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
                name = local_errno(exc)
                if name is not None:
                    # Ours, not the upstream's: its health and connections stay as they are.
                    local = name
                    self.local_error(name, "dial", upstream, exc)
                    if exc.errno in PER_DESTINATION_ERRNOS:
                        continue
                    break
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
            if local is not None:
                # Counted in local_errors and logged (throttled) by local_error.
                client.transport.abort()
            else:
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
        if not client.started:
            return  # shed at accept: never admitted, nothing to account
        self.live -= 1
        if client.stalled:
            self.schedule_trim()
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

    def schedule_trim(self) -> None:
        """Give freed buffer memory back to the system soon (once for many calls).

        Called when a stalled connection drains or closes: that is when its buffers
        (up to ~320 KB per direction) return to malloc. Not on the per-chunk path.
        """
        if self._trim_handle is None and malloc_trim is not None and self._loop is not None:
            self._trim_handle = self._loop.call_later(TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        if malloc_trim is not None:
            malloc_trim(0)

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
            "shed": self.shed,
            "max_connections": self.max_connections,
            "local_errors": dict(self.local_errors),
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
            name = local_errno(exc)
            if name is not None:
                # Could not even try: the upstream's state is unknown, keep it.
                self.local_error(name, "health check", upstream, exc)
                return
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
    merged.update(no_upstream=0, dialing=0, workers=0, shed=0, max_connections=0)
    local_errors: dict[str, int] = {}
    merged["local_errors"] = local_errors
    unlimited = False
    for snap in snapshots:
        for key in ("bytes_up", "bytes_down", "no_upstream", "dialing", "workers", "shed"):
            merged[key] += snap[key]
        unlimited |= snap["max_connections"] == 0
        merged["max_connections"] += snap["max_connections"]
        for name, count in snap["local_errors"].items():
            local_errors[name] = local_errors.get(name, 0) + count
        for name, fields in snap["upstreams"].items():
            into = merged["upstreams"].setdefault(
                name, {"accepted": 0, "active": 0, "dial_errors": 0, "healthy": 1}
            )
            for key in ("accepted", "active", "dial_errors"):
                into[key] += fields[key]
            into["healthy"] = min(into["healthy"], fields["healthy"])
    if unlimited:
        merged["max_connections"] = 0
    return merged


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "dial timeout"
    return f"{type(exc).__name__}: {exc}"
