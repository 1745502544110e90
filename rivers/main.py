"""``rivers``: flags, logging, event loop choice, signals; exit 2 on a bad flag."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import resource
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from cke.common.durations import parse_duration
from cke.common.logs import get_logger, setup_logging
from rivers.proxy import HostPort, ProxyConfig

log = get_logger("rivers")

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


class FlagError(Exception):
    """A bad flag; the message names it and is printed as one line."""


class _Parser(argparse.ArgumentParser):
    # argparse prints its usage block and exits on error; we want one line and exit 2.
    def error(self, message: str) -> NoReturn:
        raise FlagError(message)


@dataclass(frozen=True)
class Options:
    proxy: ProxyConfig
    metrics: HostPort | None
    logfile: str | None
    logformat: str
    loglevel: str
    event_loop: str
    workers: int


def parse_host_port(flag: str, text: str) -> HostPort:
    """``HOST:PORT`` or ``[V6]:PORT``; an empty host means all addresses."""
    value = text.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise FlagError(f"{flag}: invalid address {text!r} (want [IPv6]:PORT)")
        host, port_text = value[1:end], value[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise FlagError(f"{flag}: invalid IPv6 address in {text!r}") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            raise FlagError(f"{flag}: invalid address {text!r} (want HOST:PORT)")
        if host and not _valid_host(host):
            raise FlagError(f"{flag}: invalid host in {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise FlagError(f"{flag}: invalid port in {text!r} (want 0-65535)")
    return HostPort(host or "0.0.0.0", int(port_text))


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isalnum() or c == "-" for c in label)
        for label in labels
    )


def parse_upstreams(text: str) -> tuple[HostPort, ...]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise FlagError("--upstreams: empty upstream list")
    upstreams = tuple(parse_host_port("--upstreams", item) for item in items)
    for upstream in upstreams:
        if upstream.port == 0:
            raise FlagError(f"--upstreams: port 0 in {upstream}")
    return upstreams


def _duration(flag: str, text: str, *, positive: bool) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise FlagError(f"{flag}: invalid duration {text!r} (e.g. 500ms, 20s, 1m)") from None
    if seconds < 0 or (positive and seconds == 0):
        want = "positive" if positive else "zero or more"
        raise FlagError(f"{flag}: duration must be {want}, got {text!r}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rivers",
        description="TCP proxy to healthy upstreams (kube-apiserver, etcd) on every node.",
        allow_abbrev=False,
    )
    parser.add_argument("--listen", required=True, help="ADDR:PORT to listen on")
    parser.add_argument("--upstreams", required=True, help="comma-separated HOST:PORT list")
    parser.add_argument("--check-interval", default="20s", help="health check interval")
    parser.add_argument("--dial-timeout", default="10s", help="upstream dial timeout")
    parser.add_argument("--dial-keep-alive", default="15s", help="TCP keep-alive to upstreams")
    parser.add_argument(
        "--shutdown-timeout",
        default="10s",
        help="time open connections get at shutdown (0: no limit, wait for them all)",
    )
    parser.add_argument("--metrics", default="", help="ADDR:PORT for /metrics and /health")
    parser.add_argument("--logfile", default="", help="log to this file instead of stderr")
    parser.add_argument("--logformat", default="plain", help="plain, logfmt or json")
    parser.add_argument("--loglevel", default="info", help="debug, info, warning, error")
    parser.add_argument(
        "--event-loop", default="auto", help="auto (uvloop if installed), uvloop or asyncio"
    )
    parser.add_argument(
        "--workers",
        default="auto",
        help="processes accepting connections: a number, or auto (CPUs, at most 4)",
    )
    parser.add_argument(
        "--max-connections",
        default="auto",
        help="client connections at most, over all workers; beyond, new clients are closed "
        "at once. auto: what the descriptor limit allows; 0: no limit",
    )
    return parser


MAX_WORKERS = 64


def _workers(text: str) -> int:
    if text == "auto":
        from rivers.workers import auto_workers

        return auto_workers()
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise FlagError(f"--workers: want auto or 1-{MAX_WORKERS}, got {text!r}")
    return int(text)


MAX_CONNECTIONS = 10_000_000


def _max_connections(text: str, workers: int) -> int | None:
    """Each process's share of --max-connections (rounded up); None is auto."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) > MAX_CONNECTIONS:
        raise FlagError(
            f"--max-connections: want auto, 0 (no limit) or 1-{MAX_CONNECTIONS}, got {text!r}"
        )
    total = int(text)
    return -(-total // workers)


def parse_args(argv: Sequence[str]) -> Options:
    """Parse and validate every flag; raises FlagError naming the bad one."""
    args = build_parser().parse_args(list(argv))
    if args.event_loop not in EVENT_LOOPS:
        raise FlagError(
            f"--event-loop: unknown loop {args.event_loop!r} (want auto, uvloop, asyncio)"
        )
    if args.event_loop == "uvloop" and not _uvloop_available():
        raise FlagError("--event-loop: uvloop is not installed")
    workers = _workers(args.workers)
    proxy = ProxyConfig(
        listen=parse_host_port("--listen", args.listen),
        upstreams=parse_upstreams(args.upstreams),
        check_interval=_duration("--check-interval", args.check_interval, positive=True),
        dial_timeout=_duration("--dial-timeout", args.dial_timeout, positive=True),
        dial_keep_alive=_duration("--dial-keep-alive", args.dial_keep_alive, positive=False),
        shutdown_timeout=_duration("--shutdown-timeout", args.shutdown_timeout, positive=False),
        max_connections=_max_connections(args.max_connections, workers),
    )
    metrics = parse_host_port("--metrics", args.metrics) if args.metrics else None
    return Options(
        proxy=proxy,
        metrics=metrics,
        logfile=args.logfile or None,
        logformat=args.logformat,
        loglevel=args.loglevel,
        event_loop=args.event_loop,
        workers=workers,
    )


def _uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _raise_fd_limit() -> None:
    # Every proxied connection holds two descriptors; the default soft limit is low.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(options: Options, argv: Sequence[str]) -> int:
    # Imported here so that flag errors are reported before the heavier imports.
    from rivers.proxy import Proxy, Snapshot
    from rivers.workers import WORKER_ENV, Supervisor, parse_worker_env, serve_worker

    proxy = Proxy(options.proxy)
    worker_env = os.environ.get(WORKER_ENV)
    if worker_env:
        # A worker serves no HTTP: it never imports rivers.metrics.
        listen_fds, control_fd, _, index = parse_worker_env(worker_env)
        return await serve_worker(proxy, listen_fds, control_fd, index)
    from rivers.metrics import MetricsServer

    supervisor: Supervisor | None = None

    async def snapshot() -> Snapshot:
        if supervisor is not None:
            return await supervisor.snapshot()
        return proxy.snapshot()

    # Bind the metrics port first so a bad --metrics fails before anything is served.
    metrics_server: MetricsServer | None = None
    if options.metrics is not None:
        metrics_server = MetricsServer(snapshot, options.metrics)
        try:
            await metrics_server.start()
        except OSError as exc:
            raise FlagError(f"--metrics: cannot listen on {options.metrics}: {exc}") from None
    try:
        await proxy.start()
    except OSError as exc:
        if metrics_server is not None:
            metrics_server.close()
        raise FlagError(f"--listen: cannot listen on {options.proxy.listen}: {exc}") from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if options.workers > 1:
        supervisor = Supervisor(proxy, options.workers, list(argv))
        supervisor.start()
    await stop.wait()
    log.info("signal received, stopping")
    clean = True
    if supervisor is not None:
        supervisor.signal_workers()
        await proxy.shutdown()
        if options.proxy.shutdown_timeout == 0:
            # No limit: the workers drain for as long as their connections stay open.
            for handle in supervisor.handles:
                if handle.proc is not None:
                    await handle.proc.wait()
        # Workers drain on their own clock; allow a little more before SIGKILL.
        clean = await supervisor.wait(options.proxy.shutdown_timeout + 5)
    else:
        await proxy.shutdown()
    if metrics_server is not None:
        metrics_server.close()
    return 0 if clean else 1


def _run(options: Options, argv: Sequence[str]) -> int:
    use_uvloop = options.event_loop == "uvloop" or (
        options.event_loop == "auto" and _uvloop_available()
    )
    if use_uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(options, argv))
    with asyncio.Runner() as runner:
        return runner.run(serve(options, argv))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        options = parse_args(argv)
        try:
            setup_logging(options.loglevel, options.logformat, options.logfile)
        except OSError as exc:
            raise FlagError(f"--logfile: cannot open {options.logfile}: {exc}") from None
        except ValueError as exc:
            raise FlagError(str(exc)) from None
        _raise_fd_limit()
        worker_env = os.environ.get("RIVERS_WORKER")
        if worker_env:
            from rivers.workers import die_with_parent, parse_worker_env

            die_with_parent(parse_worker_env(worker_env)[2])
        return _run(options, argv)
    except FlagError as exc:
        print(f"rivers: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
