"""``/metrics`` and ``/health`` on ``--metrics``.

The proxy keeps plain integer counters (a Prometheus ``Counter.inc`` per chunk would
cost more than the forwarding itself); a custom collector turns them into metric
families at scrape time. The HTTP side is a tiny asyncio handler rather than
aiohttp: two fixed GET routes do not justify its import time and memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cke.common.logs import get_logger
from rivers.proxy import HostPort, Snapshot, listen_sockets

# Returns the counters to serve: the local proxy's, or every worker's merged.
SnapshotSource = Callable[[], Awaitable[Snapshot]]

log = get_logger("rivers.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class RiversCollector(Collector):
    """Renders the snapshot taken just before the scrape (one worker or all merged)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if not snap:
            return
        accepted = CounterMetricFamily(
            "rivers_connections_accepted",
            "Connections proxied to each upstream.",
            labels=["upstream"],
        )
        active = GaugeMetricFamily(
            "rivers_connections_active", "Open proxied connections.", labels=["upstream"]
        )
        dial_errors = CounterMetricFamily(
            "rivers_dial_errors", "Failed dials to each upstream.", labels=["upstream"]
        )
        healthy = GaugeMetricFamily(
            "rivers_upstream_healthy", "1 if the upstream is healthy.", labels=["upstream"]
        )
        for name, fields in snap["upstreams"].items():
            accepted.add_metric([name], fields["accepted"])
            active.add_metric([name], fields["active"])
            dial_errors.add_metric([name], fields["dial_errors"])
            healthy.add_metric([name], fields["healthy"])
        byte_counter = CounterMetricFamily(
            "rivers_bytes",
            "Bytes forwarded; upstream = client to upstream, downstream = back.",
            labels=["direction"],
        )
        byte_counter.add_metric(["upstream"], snap["bytes_up"])
        byte_counter.add_metric(["downstream"], snap["bytes_down"])
        no_upstream = CounterMetricFamily(
            "rivers_no_upstream", "Clients closed because no upstream was healthy."
        )
        no_upstream.add_metric([], snap["no_upstream"])
        dialing = GaugeMetricFamily(
            "rivers_connections_dialing", "Accepted clients waiting for an upstream dial."
        )
        dialing.add_metric([], snap["dialing"])
        workers = GaugeMetricFamily(
            "rivers_workers", "Worker processes whose counters are in this scrape."
        )
        workers.add_metric([], snap.get("workers", 1))
        shed = CounterMetricFamily(
            "rivers_connections_shed",
            "New clients closed at once because --max-connections was reached.",
        )
        shed.add_metric([], snap["shed"])
        limit = GaugeMetricFamily(
            "rivers_connections_limit",
            "Client connections allowed (sum over workers); 0 means no limit.",
        )
        limit.add_metric([], snap["max_connections"])
        local_errors = CounterMetricFamily(
            "rivers_local_errors",
            "Dials (proxying and health checks) failed for a local reason "
            "(EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL); upstream health unchanged.",
            labels=["error"],
        )
        for name, count in sorted(snap["local_errors"].items()):
            local_errors.add_metric([name], count)
        yield from (
            accepted,
            active,
            dial_errors,
            healthy,
            byte_counter,
            no_upstream,
            dialing,
            workers,
            shed,
            limit,
            local_errors,
        )


class MetricsServer:
    def __init__(self, source: SnapshotSource, address: HostPort) -> None:
        self.source = source
        self.address = address
        self.collector = RiversCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        """Bind (raises OSError if it cannot).

        On the proxy's ``Listener`` sockets: out of descriptors, a scrape waits (asyncio)
        or is closed (uvloop) instead of making the accept loop spin.
        """
        sockets = await listen_sockets(self.address)
        try:
            for sock in sockets:
                self._servers.append(await asyncio.start_server(self._handle, sock=sock))
        except BaseException:
            self.close()
            for sock in sockets:
                sock.close()
            raise

    @property
    def bound_port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    def close(self) -> None:
        for server in self._servers:
            server.close()

    def _health(self, snap: Snapshot) -> tuple[int, bytes]:
        states = {name: bool(f["healthy"]) for name, f in snap["upstreams"].items()}
        status = 200 if any(states.values()) else 503
        return status, json.dumps({"healthy": status == 200, "upstreams": states}).encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method = request_line[0] if request_line else ""
            path = request_line[1].split("?", 1)[0] if len(request_line) >= 2 else ""
            if not path:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            elif method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path == "/metrics":
                self.collector.snapshot = await self.source()
                status, ctype, body = 200, CONTENT_TYPE, generate_latest(self.registry)
            elif path == "/health":
                status, body = self._health(await self.source())
                ctype = "application/json"
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            head_out = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head_out if method == "HEAD" else head_out + body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that went away or sent garbage; nothing to answer
        finally:
            writer.close()
