"""``python -m rivers.bench``: rivers against HAProxy on this machine, same run.

Everything runs on loopback. Each figure is measured in interleaved rounds (direct,
HAProxy, HAProxy with splice, rivers on uvloop, rivers on asyncio, then again) so
that load from other work on the machine hits every target alike; the median of the
rounds is reported with its ratio to HAProxy.

Figures:
- single-stream throughput (iperf3 through each target);
- new connections per second, 64 concurrent clients (connect, one request/reply, close);
- p99 latency of connect + one round trip at concurrency 1;
- rivers RSS with 1,000 idle proxied connections, and its CPU use while idle.

The load client and the echo upstream are this module too (``load`` and ``echo``
sub-commands), each in its own process; every load loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
REQUEST = b"x" * 64


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# --- echo upstream (sub-command) ---------------------------------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the client is done


async def _echo_main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, LOOPBACK, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


# --- load client (sub-command) -----------------------------------------------------------


class _OneShot(asyncio.Protocol):
    """Connect, send one request, wait for the full reply, close."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.got = 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(REQUEST):
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the reply"))


async def _load_main(port: int, concurrency: int, duration: float, max_ops: int) -> None:
    loop = asyncio.get_running_loop()
    ops = 0
    errors = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal ops, errors
        while ops < max_ops and time.perf_counter() < deadline:
            started = time.perf_counter()
            done: asyncio.Future[None] = loop.create_future()
            try:
                await loop.create_connection(lambda: _OneShot(done), LOOPBACK, port)  # noqa: B023
                await asyncio.wait_for(done, 5)
            except (OSError, TimeoutError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            ops += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
    print(json.dumps({"ops": ops, "errors": errors, "elapsed": elapsed, "p99": p99}))


# --- orchestration -----------------------------------------------------------------------


@dataclass
class Procs:
    """Every process the benchmark started; stopped by PID at the end."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, **kwargs)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


def _listening(port: int) -> bool:
    # Read the kernel's table rather than connecting: a probe connection would be
    # taken by iperf3 as a test client and fail it.
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


HAPROXY_CFG = """
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 10s
    timeout client 1m
    timeout server 1m
{extra}
frontend iperf
    bind {host}:{iperf_front}
    default_backend iperf
backend iperf
    server s1 {host}:{iperf_port} check inter 20s
frontend echo
    bind {host}:{echo_front}
    default_backend echo
backend echo
    server s1 {host}:{echo_port} check inter 20s
"""


@dataclass
class Target:
    name: str
    iperf_port: int
    echo_port: int
    pid: int | None = None


def _rivers_args(listen: int, upstream: int, event_loop: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rivers.main",
        "--listen",
        f"{LOOPBACK}:{listen}",
        "--upstreams",
        f"{LOOPBACK}:{upstream}",
        "--loglevel",
        "warning",
        "--event-loop",
        event_loop,
    ]


def start_targets(procs: Procs, tmp: Path, iperf_port: int, echo_port: int) -> list[Target]:
    targets = [Target("direct", iperf_port, echo_port)]
    for name, extra in (("haproxy", ""), ("haproxy-splice", "    option splice-auto")):
        fronts = free_port(), free_port()
        cfg = tmp / f"{name}.cfg"
        cfg.write_text(
            HAPROXY_CFG.format(
                extra=extra,
                host=LOOPBACK,
                iperf_front=fronts[0],
                iperf_port=iperf_port,
                echo_front=fronts[1],
                echo_port=echo_port,
            )
        )
        proc = procs.start(["haproxy", "-db", "-q", "-f", str(cfg)], stdout=subprocess.DEVNULL)
        targets.append(Target(name, fronts[0], fronts[1], proc.pid))
    for name, event_loop in (("rivers", "uvloop"), ("rivers-asyncio", "asyncio")):
        fronts = free_port(), free_port()
        procs.start(_rivers_args(fronts[0], iperf_port, event_loop))
        proc = procs.start(_rivers_args(fronts[1], echo_port, event_loop))
        targets.append(Target(name, fronts[0], fronts[1], proc.pid))
    for target in targets:
        wait_port(target.iperf_port)
        wait_port(target.echo_port)
    return targets


def iperf_gbps(port: int, seconds: int) -> float:
    out = subprocess.run(
        ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", str(seconds), "-J"],
        capture_output=True,
        timeout=seconds + 20,
        check=False,
    )
    try:
        doc = json.loads(out.stdout)
        return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError):
        return float("nan")


def run_load(port: int, concurrency: int, duration: float, max_ops: int) -> dict[str, float]:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "rivers.bench", "load", "--port", str(port)),
            *("--concurrency", str(concurrency), "--duration", str(duration)),
            *("--max-ops", str(max_ops)),
        ],
        capture_output=True,
        timeout=duration + 30,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (rivers --workers runs extra worker processes)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(c) for c in (task / "children").read_text().split()]
    return pids


def tree_rss_mib(pid: int) -> float:
    """Sum of every process's RSS: pages shared between them are counted each time."""
    return sum(vm_rss_mib(p) for p in process_tree(pid))


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _hold_idle(
    port: int, count: int, pid: int, idle_seconds: float
) -> tuple[float, float, int]:
    """Open ``count`` proxied connections, one round trip each; RSS and idle CPU share
    of all rivers processes, and how many processes there are."""
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writers.append(writer)
            writer.write(REQUEST)
            await asyncio.wait_for(reader.readexactly(len(REQUEST)), 5)
        await asyncio.sleep(0.5)
        rss = tree_rss_mib(pid)
        processes = len(process_tree(pid))
        cpu_before = cpu_seconds(pid)
        await asyncio.sleep(idle_seconds)
        cpu_share = (cpu_seconds(pid) - cpu_before) / idle_seconds
        return rss, cpu_share, processes
    finally:
        for writer in writers:
            writer.close()


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run_bench(rounds: int, seconds: int) -> int:
    for tool in ("haproxy", "iperf3"):
        if shutil.which(tool) is None:
            print(f"rivers.bench: {tool} is not installed (make bench-rivers installs it)")
            return 2
    _raise_fd_limit()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="rivers-bench-") as tmpdir:
        try:
            iperf_port, echo_port = free_port(), free_port()
            procs.start(
                ["iperf3", "-s", "-B", LOOPBACK, "-p", str(iperf_port)], stdout=subprocess.DEVNULL
            )
            echo = procs.start(
                [sys.executable, "-m", "rivers.bench", "echo", "--port", str(echo_port)],
                stdout=subprocess.PIPE,
            )
            assert echo.stdout is not None
            echo.stdout.readline()
            wait_port(iperf_port)
            targets = start_targets(procs, Path(tmpdir), iperf_port, echo_port)
            return _measure(procs, targets, rounds, seconds, echo_port)
        finally:
            procs.stop_all()


def _measure(procs: Procs, targets: list[Target], rounds: int, seconds: int, echo: int) -> int:
    names = [t.name for t in targets]
    gbps: dict[str, list[float]] = {n: [] for n in names}
    rate: dict[str, list[float]] = {n: [] for n in names}
    p99: dict[str, list[float]] = {n: [] for n in names}
    for round_no in range(rounds):
        print(f"round {round_no + 1}/{rounds} ...", file=sys.stderr, flush=True)
        for target in targets:
            gbps[target.name].append(iperf_gbps(target.iperf_port, seconds))
        for target in targets:
            load = run_load(target.echo_port, 64, seconds, 200_000)
            rate[target.name].append(load["ops"] / load["elapsed"])
        for target in targets:
            load = run_load(target.echo_port, 1, seconds / 2, 5_000)
            p99[target.name].append(load["p99"] * 1e3)

    def line(title: str, unit: str, values: dict[str, list[float]], digits: int) -> str:
        parts = [f"{n}={median(values[n]):.{digits}f}" for n in names]
        return f"{title} ({unit}, median of {rounds}): " + " ".join(parts)

    g = {n: median(gbps[n]) for n in names}
    r = {n: median(rate[n]) for n in names}
    p = {n: median(p99[n]) for n in names}
    ok = True
    print(line("throughput single stream", "Gbit/s", gbps, 2))
    ratio = g["rivers"] / g["haproxy"]
    ok &= ratio >= 1.0
    print(f"throughput rivers/haproxy = {ratio:.2f}x (goal >= 1.0x) {verdict(ratio >= 1.0)}")
    ratio = g["rivers"] / g["haproxy-splice"]
    print(
        f"throughput rivers/haproxy-splice = {ratio:.2f}x (stretch goal >= 1.0x) "
        f"{verdict(ratio >= 1.0)}"
    )
    print(line("new connections/s at 64 concurrent", "conn/s", rate, 0))
    ratio = r["rivers"] / r["haproxy"]
    ok &= ratio >= 0.6
    print(f"connections/s rivers/haproxy = {ratio:.2f}x (goal >= 0.6x) {verdict(ratio >= 0.6)}")
    print(line("p99 connect+round trip at concurrency 1", "ms", p99, 3))
    ratio = p["rivers"] / p["haproxy"]
    ok &= ratio <= 2.0
    print(f"p99 latency rivers/haproxy = {ratio:.2f}x (goal <= 2.0x) {verdict(ratio <= 2.0)}")

    # Memory and idle CPU on a fresh rivers, so earlier rounds do not count.
    listen = free_port()
    fresh = procs.start(_rivers_args(listen, echo, "auto"))
    wait_port(listen)
    loop = _new_loop()
    try:
        rss, cpu, processes = loop.run_until_complete(_hold_idle(listen, 1000, fresh.pid, 3.0))
    finally:
        loop.close()
    ok &= rss <= 60 and cpu <= 0.01
    print(
        f"rivers RSS with 1000 idle proxied connections = {rss:.1f} MB "
        f"(sum over {processes} processes; goal <= 60) "
        f"{verdict(rss <= 60)}"
    )
    print(
        f"rivers CPU while idle = {cpu * 100:.2f}% of a core (goal near 0) {verdict(cpu <= 0.01)}"
    )
    print(f"overall: {verdict(ok)}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rivers.bench")
    sub = parser.add_subparsers(dest="command")
    echo = sub.add_parser("echo", help="(internal) echo upstream")
    echo.add_argument("--port", type=int, required=True)
    load = sub.add_parser("load", help="(internal) bounded connection load")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--concurrency", type=int, default=64)
    load.add_argument("--duration", type=float, default=2.0)
    load.add_argument("--max-ops", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "echo":
        _raise_fd_limit()
        _run_on_loop(_echo_main(args.port))
        return 0
    if args.command == "load":
        _run_on_loop(_load_main(args.port, args.concurrency, args.duration, args.max_ops))
        return 0
    return run_bench(args.rounds, args.seconds)


def _run_on_loop(coro: Any) -> None:
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(coro)


if __name__ == "__main__":
    sys.exit(main())
