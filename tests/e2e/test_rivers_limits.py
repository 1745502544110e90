"""rivers at its limits: out of descriptors, --max-connections, stalled readers' memory.

Real ``rivers`` processes on 127.0.0.1, as in test_rivers_proxy (whose helpers these
tests use). Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

import pytest

from rivers.proxy import WRITE_HIGH_WATER
from tests.e2e.test_rivers_proxy import (
    LOOPBACK,
    Rivers,
    Upstream,
    echo,
    round_trip,
    running,
    vm_rss_mib,
    wait_for,
)

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def proxied(port: int, timeout: float = 2) -> Conn | None:
    """A connection through rivers that echoes, or None if rivers closed (or never
    served) it within ``timeout``."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(b"ping")
        if await asyncio.wait_for(reader.readexactly(4), timeout) == b"ping":
            return reader, writer
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    writer.close()
    return None


async def still_echo(conns: list[Conn]) -> int:
    """How many of ``conns`` still echo a new message."""
    working = 0
    for reader, writer in conns:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            writer.write(b"more")
            working += await asyncio.wait_for(reader.readexactly(4), 5) == b"more"
    return working


async def closed_at_once(port: int) -> bool:
    """A new client is closed by rivers (EOF or reset) without an answer, within 2 s."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"ping")
        return await asyncio.wait_for(reader.read(), 2) == b""
    except ConnectionError:
        return True
    finally:
        writer.close()


async def scrape(rivers: Rivers) -> dict[str, float]:
    """``rivers.metrics()``, retried for up to 5 s while rivers has no descriptor left
    to accept the scrape with (uvloop then closes it at once)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return await rivers.metrics()
        except (OSError, IndexError):  # reset, or closed before an answer
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- out of descriptors ---------------------------------------------------------------

# RLIMIT_NOFILE of rivers in these tests: room for a few dozen connections after the
# ~10-20 descriptors an idle rivers holds.
NOFILE = 100


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_out_of_descriptors_is_not_an_upstream_failure(tmp_path: Path, loop: str) -> None:
    upstream = await Upstream(echo).start()
    healthy = f'rivers_upstream_healthy{{upstream="{upstream.address}"}}'
    active = f'rivers_connections_active{{upstream="{upstream.address}"}}'
    held: list[Conn] = []
    # --max-connections 0: no limit, so that rivers does run out of descriptors.
    args = ["--max-connections", "0", "--event-loop", loop]
    rivers = Rivers([upstream.address], *args, tmp=tmp_path, nofile=NOFILE)
    try:
        async with running(rivers):
            # Hold connections until rivers cannot serve one more: its dials (and
            # accepts) now fail with EMFILE.
            for _ in range(NOFILE):
                conn = await proxied(rivers.port)
                if conn is None:
                    break
                held.append(conn)
            assert 20 <= len(held) < NOFILE // 2, len(held)
            # Stay out of descriptors for a while: clients knock, health checks (every
            # 200 ms) fail with EMFILE too. Nothing may spin.
            cpu_before = cpu_seconds(rivers.pid)
            started = time.monotonic()
            for _ in range(5):
                assert await proxied(rivers.port, timeout=0.3) is None
            await asyncio.sleep(max(0.0, 1.5 - (time.monotonic() - started)))
            busy = cpu_seconds(rivers.pid) - cpu_before
            assert busy < 0.5, f"rivers used {busy:.2f} s of CPU in 1.5 s out of descriptors"

            # The connections already proxied were never touched.
            assert await still_echo(held) == len(held)
            # Free a few descriptors so that a scrape can be accepted.
            for _, writer in held[:5]:
                writer.close()
            del held[:5]

            async def five_closed() -> bool:
                return (await scrape(rivers))[active] == len(held)

            await wait_for(five_closed)
            metrics = await scrape(rivers)
            assert metrics[healthy] == 1
            assert metrics['rivers_local_errors_total{error="EMFILE"}'] >= 1
            assert metrics[f'rivers_dial_errors_total{{upstream="{upstream.address}"}}'] == 0
            assert metrics["rivers_no_upstream_total"] == 0
            log = rivers.log()
            assert "upstream unhealthy" not in log
            assert "failed on a local resource limit, upstream health unchanged" in log
            # asyncio's accept loop logs once per pause (1 s), not once per backlog slot.
            assert log.count("socket.accept() out of system resource") <= 10

            # Once the clients are gone, new ones are served at once.
            for _, writer in held:
                writer.close()
            held.clear()

            async def all_closed() -> bool:
                return (await rivers.metrics())[active] == 0

            await wait_for(all_closed)
            started = time.monotonic()
            for _ in range(20):
                assert await round_trip(rivers.port) == b"ping"
            assert time.monotonic() - started < 5
            metrics = await rivers.metrics()
            assert metrics[healthy] == 1
            assert metrics["rivers_no_upstream_total"] == 0
    finally:
        for _, writer in held:
            writer.close()
        upstream.kill()


# --- --max-connections ----------------------------------------------------------------


async def test_max_connections_sheds_new_clients_only(tmp_path: Path) -> None:
    upstream = await Upstream(echo).start()
    active = f'rivers_connections_active{{upstream="{upstream.address}"}}'
    held: list[Conn] = []
    try:
        async with running(
            Rivers([upstream.address], "--max-connections", "5", tmp=tmp_path)
        ) as rivers:
            for _ in range(5):
                conn = await proxied(rivers.port)
                assert conn is not None
                held.append(conn)
            # The 6th and 7th are closed at once; the five stay as they are.
            assert await closed_at_once(rivers.port)
            assert await closed_at_once(rivers.port)
            assert await still_echo(held) == 5
            metrics = await rivers.metrics()
            assert metrics["rivers_connections_shed_total"] == 2
            assert metrics["rivers_connections_limit"] == 5
            assert metrics[active] == 5
            assert metrics[f'rivers_upstream_healthy{{upstream="{upstream.address}"}}'] == 1
            assert metrics["rivers_no_upstream_total"] == 0
            assert not any(name.startswith("rivers_local_errors_total") for name in metrics)
            assert "connection limit reached, closing new client" in rivers.log()

            # One leaves: there is room for one more, and only one.
            _, writer = held.pop()
            writer.close()

            async def four() -> bool:
                return (await rivers.metrics())[active] == 4

            await wait_for(four)
            conn = await proxied(rivers.port)
            assert conn is not None
            held.append(conn)
            assert await closed_at_once(rivers.port)
            assert (await rivers.metrics())["rivers_connections_shed_total"] == 3
    finally:
        for _, writer in held:
            writer.close()
        upstream.kill()


async def test_auto_limit_sheds_before_descriptors_run_out(tmp_path: Path) -> None:
    # Default --max-connections auto: (128 - 64 reserved - 1 upstream) // 2 = 31.
    upstream = await Upstream(echo).start()
    held: list[Conn] = []
    try:
        async with running(Rivers([upstream.address], tmp=tmp_path, nofile=128)) as rivers:
            assert (await rivers.metrics())["rivers_connections_limit"] == 31
            for _ in range(31):
                conn = await proxied(rivers.port)
                assert conn is not None
                held.append(conn)
            for _ in range(3):
                assert await closed_at_once(rivers.port)
            assert await still_echo(held) == 31
            metrics = await rivers.metrics()
            assert metrics["rivers_connections_shed_total"] == 3
            # Shed by the limit, not by running out of descriptors.
            assert not any(name.startswith("rivers_local_errors_total") for name in metrics)
    finally:
        for _, writer in held:
            writer.close()
        upstream.kill()


# --- memory of stalled readers ----------------------------------------------------------

STALLED_CLIENTS = 200
# The bound by design: a stalled direction holds at most the write high-water mark plus
# the one read that crossed it (the event loop reads up to 256 KiB at a time), so
# 200 x (64 + 256) KiB = 62.5 MiB, plus 10 MiB for the rest. Measured on the 2-core
# machine (uvloop): +26 MiB when quiet, +57 MiB once under a full test suite's load
# (full-size reads); +1.3 MiB one second after they closed. Before the fix (256 KiB
# high-water mark, no malloc_trim): +65 MiB stalled, still +60 to +66 MiB long after
# they closed, which the after-close bound catches.
EVENT_LOOP_READ = 256 << 10
STALLED_GROWTH_MIB = STALLED_CLIENTS * (WRITE_HIGH_WATER + EVENT_LOOP_READ) / (1 << 20) + 10
AFTER_CLOSE_GROWTH_MIB = 20


async def test_stalled_readers_memory_is_bounded_and_given_back(tmp_path: Path) -> None:
    chunk = os.urandom(64 << 10)
    stop = asyncio.Event()
    stalled = 0
    ended: list[str] = []  # floods that ended otherwise: finished or cut off, and how
    all_stalled = asyncio.Event()
    # Every client is connected (and proxied) before any flood starts: floods already
    # running (~1 GB through loopback in all) starved this process's event loop, so a
    # late client's dial once went unanswered for 10 s on a loaded machine.
    go = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # At most 64 MiB per connection; done once rivers stops taking data for 1 s.
        nonlocal stalled
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
        await go.wait()
        try:
            for _ in range(1024):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 1)
            ended.append("sent 64 MiB without stalling")
        except TimeoutError:
            stalled += 1
            if stalled >= STALLED_CLIENTS:
                all_stalled.set()
        except OSError as exc:
            ended.append(f"{type(exc).__name__}")
            raise
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 30)

    upstream = await Upstream(flood).start()
    clients: list[asyncio.StreamWriter] = []
    try:
        async with running(
            Rivers([upstream.address], "--check-interval", "20s", tmp=tmp_path)
        ) as rivers:
            await asyncio.sleep(0.5)
            baseline = vm_rss_mib(rivers.pid)
            loop = asyncio.get_running_loop()
            for _ in range(STALLED_CLIENTS):
                # Clients that never read, with small receive buffers.
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, (LOOPBACK, rivers.port)), 5)
                _, writer = await asyncio.open_connection(sock=sock)
                clients.append(writer)
                # One at a time: rivers has dialled the upstream for this client before
                # the next connects (200 dials at once can overflow the listen backlog
                # of the test's busy loop and time out in rivers, ending floods unseen).
                for _ in range(200):  # 10 s
                    if upstream.accepted >= len(clients):
                        break
                    await asyncio.sleep(0.05)
                assert upstream.accepted >= len(clients), "rivers did not dial the upstream"
            go.set()

            # Before a flood stalls, rivers' kernel buffers fill (about 5 MB per
            # connection, 1 GB in all): 5 s on a quiet machine. This waits for
            # backpressure, not speed: under a loaded suite (CI, 2 cores) 1 GB over
            # loopback took longer than the 25 s once allowed here, and only 3 of 200
            # had stalled; 90 s is 1 GB at 11 MB/s.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_stalled.wait(), 90)
            assert stalled >= STALLED_CLIENTS, (
                f"{stalled} of {STALLED_CLIENTS} floods stalled; {len(ended)} ended otherwise: "
                f"{sorted(set(ended))}"
            )
            peak = baseline
            for _ in range(5):
                peak = max(peak, vm_rss_mib(rivers.pid))
                await asyncio.sleep(0.1)
            assert peak < baseline + STALLED_GROWTH_MIB, (
                f"RSS {baseline:.1f} -> {peak:.1f} MiB with {STALLED_CLIENTS} stalled readers"
            )

            for writer in clients:
                writer.transport.abort()
            clients.clear()
            stop.set()
            after = peak
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                after = vm_rss_mib(rivers.pid)
                if after < baseline + AFTER_CLOSE_GROWTH_MIB:
                    break
            assert after < baseline + AFTER_CLOSE_GROWTH_MIB, (
                f"RSS {baseline:.1f} -> {peak:.1f} MiB stalled, still {after:.1f} MiB after close"
            )
    finally:
        stop.set()
        for writer in clients:
            writer.transport.abort()
        upstream.kill()
