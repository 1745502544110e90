"""rivers end to end: real ``rivers`` processes, real sockets on 127.0.0.1.

The upstreams are small asyncio servers in the test process, so a test can stop
one listening, kill its connections or bring it back on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

LOOPBACK = "127.0.0.1"
CHECK_INTERVAL = "200ms"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def vm_rss_mib(pid: int) -> float:
    """RSS of rivers: the main process and its workers, summed."""
    return sum(_rss_mib(p) for p in tree(pid))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Upstream:
    """A TCP server we can kill (stop listening and drop its connections) and revive."""

    def __init__(self, handler: Handler, port: int = 0) -> None:
        self.handler = handler
        self.port = port
        self.accepted = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.add(writer)
        try:
            await self.handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop_listening(self) -> None:
        """New dials are refused; connections already open stay open."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def kill(self) -> None:
        self.stop_listening()
        for writer in list(self.writers):
            writer.transport.abort()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 20):
        writer.write(data)
        await writer.drain()


class Rivers:
    """One ``rivers`` process; always stopped by its PID in ``finally``."""

    def __init__(
        self, upstreams: list[str], *extra: str, tmp: Path, nofile: int | None = None
    ) -> None:
        # nofile: RLIMIT_NOFILE (soft and hard) of the rivers process, to run it out
        # of descriptors.
        self.nofile = nofile
        self.port = free_port()
        self.metrics_port = free_port()
        self.logfile = tmp / f"rivers-{self.port}.log"
        self.args = [
            "--listen",
            f"{LOOPBACK}:{self.port}",
            "--upstreams",
            ",".join(upstreams),
            "--metrics",
            f"{LOOPBACK}:{self.metrics_port}",
            "--check-interval",
            CHECK_INTERVAL,
            "--dial-timeout",
            "1s",
            "--logfile",
            str(self.logfile),
            "--loglevel",
            "debug",
            # One process unless a test asks for more: the behaviour tests then see one
            # health checker; the --workers tests below cover several processes.
            *([] if "--workers" in extra else ["--workers", "1"]),
            *extra,
        ]
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _limit_descriptors(self) -> None:
        # In the child between fork and exec: rivers raises its soft limit to the hard
        # one at start, so lower both.
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    async def start(self) -> Rivers:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rivers.main",
            *self.args,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=None if self.nofile is None else self._limit_descriptors,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                err = await self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(f"rivers exited {self.proc.returncode}: {err!r}")
            with contextlib.suppress(OSError):
                status, _ = await http_get(self.metrics_port, "/health")
                if status in (200, 503):
                    return self
            await asyncio.sleep(0.05)
        raise AssertionError("rivers did not come up")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def metrics(self) -> dict[str, float]:
        status, body = await http_get(self.metrics_port, "/metrics")
        assert status == 200
        values: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def log(self) -> str:
        return self.logfile.read_text() if self.logfile.exists() else ""


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@contextlib.asynccontextmanager
async def running(rivers: Rivers) -> AsyncIterator[Rivers]:
    try:
        yield await rivers.start()
    finally:
        await rivers.stop()


async def round_trip(port: int, payload: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 5)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    finally:
        writer.close()


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_failover_recovery_and_metrics(tmp_path: Path) -> None:
    first = await Upstream(echo).start()
    second = await Upstream(echo).start()
    async with running(Rivers([first.address, second.address], tmp=tmp_path)) as rivers:
        before = await rivers.metrics()
        for _ in range(20):
            assert await round_trip(rivers.port) == b"ping"
        # Random choice: both upstreams get some of 20 connections.
        assert first.accepted > 0 and second.accepted > 0
        after = await rivers.metrics()
        accepted = [
            f'rivers_connections_accepted_total{{upstream="{u.address}"}}' for u in (first, second)
        ]
        assert sum(after[name] - before.get(name, 0) for name in accepted) == 20
        assert after['rivers_bytes_total{direction="upstream"}'] >= 20 * 4
        assert after['rivers_bytes_total{direction="downstream"}'] >= 20 * 4

        # Kill one: no client sees an error, even before a health check notices.
        first.kill()
        served_by_second = second.accepted
        for _ in range(20):
            assert await round_trip(rivers.port) == b"ping"
        assert second.accepted == served_by_second + 20
        metrics = await rivers.metrics()
        assert metrics[f'rivers_upstream_healthy{{upstream="{first.address}"}}'] == 0
        assert metrics[f'rivers_upstream_healthy{{upstream="{second.address}"}}'] == 1
        assert metrics[f'rivers_dial_errors_total{{upstream="{first.address}"}}'] >= 1

        # Bring it back on the same port: health checks put it back in rotation.
        revived = await Upstream(echo, port=first.port).start()
        try:

            async def healthy_again() -> bool:
                m = await rivers.metrics()
                return m[f'rivers_upstream_healthy{{upstream="{first.address}"}}'] == 1

            await wait_for(healthy_again)
            for _ in range(20):
                assert await round_trip(rivers.port) == b"ping"
            assert revived.accepted > 0
        finally:
            revived.kill()
        assert "upstream unhealthy" in rivers.log()
        assert "upstream healthy" in rivers.log()
        assert "connection closed" in rivers.log()  # debug: one line per connection end
    second.kill()


async def test_connections_to_an_unhealthy_upstream_are_closed(tmp_path: Path) -> None:
    upstream = await Upstream(echo).start()
    async with running(Rivers([upstream.address], tmp=tmp_path)) as rivers:
        reader, writer = await asyncio.open_connection(LOOPBACK, rivers.port)
        try:
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            metrics = await rivers.metrics()
            assert metrics[f'rivers_connections_active{{upstream="{upstream.address}"}}'] == 1
            # The upstream stops listening but its open connection stays up: only the
            # health check can tell, and rivers must then close our connection.
            upstream.stop_listening()
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            metrics = await rivers.metrics()
            assert metrics[f'rivers_connections_active{{upstream="{upstream.address}"}}'] == 0
            assert metrics[f'rivers_upstream_healthy{{upstream="{upstream.address}"}}'] == 0

            # No healthy upstream: a new client is closed at once, and it is counted.
            r2, w2 = await asyncio.open_connection(LOOPBACK, rivers.port)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r2.read(), 5) == b""
            w2.close()
            metrics = await rivers.metrics()
            assert metrics["rivers_no_upstream_total"] >= 1
            status, _ = await http_get(rivers.metrics_port, "/health")
            assert status == 503
            assert "no healthy upstream" in rivers.log()
        finally:
            writer.close()
            upstream.kill()


async def test_half_close_both_ways(tmp_path: Path) -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()

    async def talk_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from upstream")
        writer.write_eof()
        data = await reader.read()  # the client keeps sending after our EOF
        if data:  # rivers' health checks connect and close without sending anything
            received.append(data)

    received: list[bytes] = []
    client_closes = await Upstream(reply_after_eof).start()
    upstream_closes = await Upstream(talk_first).start()
    try:
        async with running(Rivers([client_closes.address], tmp=tmp_path)) as rivers:
            reader, writer = await asyncio.open_connection(LOOPBACK, rivers.port)
            writer.write(b"x" * 100_000)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"got 100000 bytes"
            writer.close()
        async with running(Rivers([upstream_closes.address], tmp=tmp_path)) as rivers:
            reader, writer = await asyncio.open_connection(LOOPBACK, rivers.port)
            assert await asyncio.wait_for(reader.read(), 5) == b"hello from upstream"
            writer.write(b"y" * 100_000)
            await writer.drain()
            writer.write_eof()
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await wait_for(lambda: _true_when(bool(received)))
            assert received == [b"y" * 100_000]
    finally:
        client_closes.kill()
        upstream_closes.kill()


async def _true_when(value: bool) -> bool:
    return value


async def test_256_mib_both_ways_intact(tmp_path: Path) -> None:
    total = 256 << 20
    received_by_upstream = hashlib.sha256()

    async def hashing_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 20):
            received_by_upstream.update(data)
            writer.write(data)
            await writer.drain()

    blocks = [os.urandom(1 << 20) for _ in range(8)]
    order = [random.randrange(len(blocks)) for _ in range(total >> 20)]
    upstream = await Upstream(hashing_echo).start()
    try:
        async with running(Rivers([upstream.address], tmp=tmp_path)) as rivers:
            reader, writer = await asyncio.open_connection(LOOPBACK, rivers.port)
            sent = hashlib.sha256()

            async def send() -> None:
                for index in order:
                    sent.update(blocks[index])
                    writer.write(blocks[index])
                    await writer.drain()
                writer.write_eof()

            async def receive() -> tuple[int, str]:
                got = hashlib.sha256()
                count = 0
                while data := await reader.read(1 << 20):
                    got.update(data)
                    count += len(data)
                return count, got.hexdigest()

            sender = asyncio.create_task(send())
            count, digest = await asyncio.wait_for(receive(), 60)
            await sender
            writer.close()
            assert count == total
            assert digest == sent.hexdigest() == received_by_upstream.hexdigest()
            metrics = await rivers.metrics()
            assert metrics['rivers_bytes_total{direction="upstream"}'] >= total
            assert metrics['rivers_bytes_total{direction="downstream"}'] >= total
    finally:
        upstream.kill()


@pytest.mark.parametrize("slow", ["upstream", "client"])
async def test_slow_reader_keeps_memory_bounded(tmp_path: Path, slow: str) -> None:
    flood = os.urandom(1 << 20)
    stop = asyncio.Event()

    async def upstream_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if slow == "client":
            # Send as fast as rivers lets us; the client never reads.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    for _ in range(512):
                        writer.write(flood)
                        await writer.drain()
        await stop.wait()  # as the slow side, never read

    upstream = await Upstream(upstream_side).start()
    try:
        async with running(Rivers([upstream.address], tmp=tmp_path)) as rivers:
            baseline = vm_rss_mib(rivers.pid)
            _, writer = await asyncio.open_connection(LOOPBACK, rivers.port)
            sent = 0
            if slow == "upstream":
                # Bounded: at most 512 MiB, and we stop once rivers stops taking data.
                for _ in range(512):
                    writer.write(flood)
                    try:
                        await asyncio.wait_for(writer.drain(), 1)
                    except TimeoutError:
                        break
                    sent += len(flood)
                assert sent < 128 << 20, "rivers kept reading from the client"
            else:
                await asyncio.sleep(1.5)  # let the upstream fill whatever rivers will take
            peak = vm_rss_mib(rivers.pid)
            assert peak < baseline + 40, f"RSS grew from {baseline:.0f} to {peak:.0f} MiB"
            assert peak < 100
            stop.set()
            writer.transport.abort()
    finally:
        stop.set()
        upstream.kill()


async def test_graceful_shutdown(tmp_path: Path) -> None:
    upstream = await Upstream(echo).start()
    try:
        async with running(
            Rivers([upstream.address], "--shutdown-timeout", "30s", tmp=tmp_path)
        ) as rivers:
            reader, writer = await asyncio.open_connection(LOOPBACK, rivers.port)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            os.kill(rivers.pid, signal.SIGTERM)

            # New connections are refused at once...
            async def refused() -> bool:
                try:
                    _, w = await asyncio.open_connection(LOOPBACK, rivers.port)
                except ConnectionRefusedError:
                    return True
                w.close()
                return False

            await wait_for(refused)
            # ...while the open one keeps working.
            writer.write(b"during")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"during"
            assert rivers.proc is not None and rivers.proc.returncode is None
            writer.close()
            assert await asyncio.wait_for(rivers.proc.wait(), 10) == 0
    finally:
        upstream.kill()


async def test_shutdown_timeout_closes_lingering_connections(tmp_path: Path) -> None:
    upstream = await Upstream(echo).start()
    try:
        async with running(
            Rivers([upstream.address], "--shutdown-timeout", "500ms", tmp=tmp_path)
        ) as rivers:
            reader, writer = await asyncio.open_connection(LOOPBACK, rivers.port)
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            os.kill(rivers.pid, signal.SIGINT)
            assert rivers.proc is not None
            assert await asyncio.wait_for(rivers.proc.wait(), 10) == 0
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert re.search(r"shutdown timeout, closing connections .*active=1", rivers.log())
    finally:
        upstream.kill()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_shutdown_timeout_zero_waits_for_open_connections(
    tmp_path: Path, workers: str
) -> None:
    # Upstream rivers: --shutdown-timeout 0 disables the timeout; shutdown then waits
    # for every open connection, however long it stays open.
    upstream = await Upstream(echo).start()
    try:
        async with running(
            Rivers(
                [upstream.address], "--workers", workers, "--shutdown-timeout", "0", tmp=tmp_path
            )
        ) as rivers:
            if workers != "1":
                await workers_up(rivers, int(workers))
            conns = [await asyncio.open_connection(LOOPBACK, rivers.port) for _ in range(4)]
            for reader, writer in conns:
                writer.write(b"hi")
                assert await reader.readexactly(2) == b"hi"
            os.kill(rivers.pid, signal.SIGTERM)
            assert rivers.proc is not None
            # Well past the default 10s would be slow; 2s is past "close at once" and
            # past any small timeout (the proxy used to close everything at once).
            await asyncio.sleep(2)
            assert rivers.proc.returncode is None
            for reader, writer in conns:
                writer.write(b"still")
                assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
            for _, writer in conns:
                writer.close()
            assert await asyncio.wait_for(rivers.proc.wait(), 15) == 0
            assert "shutdown timeout" not in rivers.log()
            assert re.search(r"shutting down .*timeout=none", rivers.log())
    finally:
        upstream.kill()


async def test_idle_connections_memory(tmp_path: Path) -> None:
    upstream = await Upstream(echo).start()
    clients: list[asyncio.StreamWriter] = []
    try:
        async with running(Rivers([upstream.address], tmp=tmp_path)) as rivers:
            for _ in range(500):
                reader, writer = await asyncio.open_connection(LOOPBACK, rivers.port)
                clients.append(writer)
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            metrics = await rivers.metrics()
            assert metrics[f'rivers_connections_active{{upstream="{upstream.address}"}}'] == 500
            assert vm_rss_mib(rivers.pid) < 100
    finally:
        for writer in clients:
            writer.close()
        upstream.kill()


# --- --workers ---------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and its children."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *children]


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def tcp_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


async def workers_up(rivers: Rivers, count: int) -> None:
    async def up() -> bool:
        return (await rivers.metrics())["rivers_workers"] == count

    await wait_for(up, 15)


async def test_workers_share_the_load_and_report_totals(tmp_path: Path) -> None:
    upstream = await Upstream(echo).start()
    held: list[asyncio.StreamWriter] = []
    try:
        async with running(Rivers([upstream.address], "--workers", "2", tmp=tmp_path)) as rivers:
            await workers_up(rivers, 2)
            pids = tree(rivers.pid)
            assert len(pids) == 2
            idle = {pid: tcp_sockets(pid) for pid in pids}

            async def hold() -> None:
                reader, writer = await asyncio.open_connection(LOOPBACK, rivers.port)
                held.append(writer)
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"

            # Connections held open at once: each process holds its share's sockets.
            for _ in range(5):
                await asyncio.gather(*(hold() for _ in range(32)))
                if all(tcp_sockets(pid) > idle[pid] for pid in pids):
                    break
            assert all(tcp_sockets(pid) > idle[pid] for pid in pids), "one worker took all"
            metrics = await rivers.metrics()
            name = f'rivers_connections_active{{upstream="{upstream.address}"}}'
            assert metrics[name] == len(held)
            for writer in held:
                writer.close()
            for _ in range(20):
                assert await round_trip(rivers.port) == b"ping"
            total = len(held) + 20

            async def all_counted() -> bool:
                m = await rivers.metrics()
                return (
                    m[f'rivers_connections_accepted_total{{upstream="{upstream.address}"}}']
                    == total
                    and m[name] == 0
                )

            await wait_for(all_counted)
            assert upstream.accepted >= total  # health checks dial it too
            metrics = await rivers.metrics()
            assert metrics['rivers_bytes_total{direction="upstream"}'] == total * 4
            assert metrics[f'rivers_upstream_healthy{{upstream="{upstream.address}"}}'] == 1
    finally:
        for writer in held:
            writer.close()
        upstream.kill()


async def test_workers_sigterm_drains_and_leaves_no_worker(tmp_path: Path) -> None:
    upstream = await Upstream(echo).start()
    try:
        async with running(
            Rivers([upstream.address], "--workers", "2", "--shutdown-timeout", "30s", tmp=tmp_path)
        ) as rivers:
            await workers_up(rivers, 2)
            pids = tree(rivers.pid)
            conns = [await asyncio.open_connection(LOOPBACK, rivers.port) for _ in range(8)]
            for reader, writer in conns:
                writer.write(b"before")
                assert await reader.readexactly(6) == b"before"
            os.kill(rivers.pid, signal.SIGTERM)

            async def refused() -> bool:
                try:
                    _, w = await asyncio.open_connection(LOOPBACK, rivers.port)
                except ConnectionRefusedError:
                    return True
                w.close()
                return False

            await wait_for(refused)
            for reader, writer in conns:  # open ones keep working in every worker
                writer.write(b"during")
                assert await asyncio.wait_for(reader.readexactly(6), 5) == b"during"
                writer.close()
            assert rivers.proc is not None
            assert await asyncio.wait_for(rivers.proc.wait(), 15) == 0
            await wait_for(lambda: _true_when(not any(alive(pid) for pid in pids)))
    finally:
        upstream.kill()


async def test_workers_restart_and_die_with_the_main_process(tmp_path: Path) -> None:
    upstream = await Upstream(echo).start()
    try:
        async with running(Rivers([upstream.address], "--workers", "2", tmp=tmp_path)) as rivers:
            await workers_up(rivers, 2)
            worker = tree(rivers.pid)[1]
            os.kill(worker, signal.SIGKILL)  # a worker that dies is started again
            await wait_for(lambda: _true_when(not alive(worker)))

            async def replaced() -> bool:
                pids = tree(rivers.pid)
                return len(pids) == 2 and pids[1] != worker

            await wait_for(replaced, 15)
            await workers_up(rivers, 2)
            assert "worker died, restarting" in rivers.log()
            for _ in range(10):
                assert await round_trip(rivers.port) == b"ping"

            pids = tree(rivers.pid)
            os.kill(rivers.pid, signal.SIGKILL)  # no orphan workers, ever
            await wait_for(lambda: _true_when(not any(alive(pid) for pid in pids)), 5)
    finally:
        upstream.kill()
