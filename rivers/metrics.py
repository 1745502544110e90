"""``/metrics`` and ``/health`` on ``--metrics``.

The proxy keeps plain integer counters (a Prometheus ``Counter.inc`` per chunk would
cost more than the forwarding itself); ``render`` turns a snapshot of them into the
Prometheus text exposition format (version 0.0.4) at scrape time. Standard library
only, so that rivers runs on a node with nothing but Python: the output is the same,
byte for byte, as ``prometheus_client.generate_latest`` of the custom collector rivers
used before (counter families named ``..._total``, values as Go prints floats). The
HTTP side is a tiny asyncio handler rather than aiohttp: two fixed GET routes do not
justify a dependency.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Iterable

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

# One sample: (label name, label value) or None for a family without labels, and a value.
Sample = tuple[tuple[str, str] | None, float]


def format_value(value: float) -> str:
    """A sample value as prometheus_client writes it (``3.0``, ``1.234567e+06``, ``+Inf``)."""
    d = float(value)
    if math.isnan(d):
        return "NaN"
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    s = repr(d)
    dot = s.find(".")
    # prometheus_client's rule (floatToGoString): from seven integer digits on, an
    # exponent, as Go prints them (1234567.0 -> 1.234567e+06).
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _family(
    out: list[str], name: str, kind: str, help_text: str, samples: Iterable[Sample]
) -> None:
    """Append one metric family: its HELP and TYPE lines, then one line per sample."""
    doc = help_text.replace("\\", r"\\").replace("\n", r"\n")
    out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
    for label, value in samples:
        labels = "" if label is None else f'{{{label[0]}="{_escape_label(label[1])}"}}'
        out.append(f"{name}{labels} {format_value(value)}\n")


def render(snap: Snapshot) -> bytes:
    """The snapshot (one worker's or all merged) in the text format; empty if no snapshot."""
    if not snap:
        return b""
    upstreams: dict[str, dict[str, int]] = snap["upstreams"]
    out: list[str] = []

    def per_upstream(field: str) -> list[Sample]:
        return [(("upstream", name), fields[field]) for name, fields in upstreams.items()]

    _family(
        out,
        "rivers_connections_accepted_total",
        "counter",
        "Connections proxied to each upstream.",
        per_upstream("accepted"),
    )
    _family(
        out,
        "rivers_connections_active",
        "gauge",
        "Open proxied connections.",
        per_upstream("active"),
    )
    _family(
        out,
        "rivers_dial_errors_total",
        "counter",
        "Failed dials to each upstream.",
        per_upstream("dial_errors"),
    )
    _family(
        out,
        "rivers_upstream_healthy",
        "gauge",
        "1 if the upstream is healthy.",
        per_upstream("healthy"),
    )
    _family(
        out,
        "rivers_bytes_total",
        "counter",
        "Bytes forwarded; upstream = client to upstream, downstream = back.",
        [
            (("direction", "upstream"), snap["bytes_up"]),
            (("direction", "downstream"), snap["bytes_down"]),
        ],
    )
    _family(
        out,
        "rivers_no_upstream_total",
        "counter",
        "Clients closed because no upstream was healthy.",
        [(None, snap["no_upstream"])],
    )
    _family(
        out,
        "rivers_connections_dialing",
        "gauge",
        "Accepted clients waiting for an upstream dial.",
        [(None, snap["dialing"])],
    )
    _family(
        out,
        "rivers_workers",
        "gauge",
        "Worker processes whose counters are in this scrape.",
        [(None, snap.get("workers", 1))],
    )
    _family(
        out,
        "rivers_connections_shed_total",
        "counter",
        "New clients closed at once because --max-connections was reached.",
        [(None, snap["shed"])],
    )
    _family(
        out,
        "rivers_connections_limit",
        "gauge",
        "Client connections allowed (sum over workers); 0 means no limit.",
        [(None, snap["max_connections"])],
    )
    _family(
        out,
        "rivers_local_errors_total",
        "counter",
        "Dials (proxying and health checks) failed for a local reason "
        "(EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL); upstream health unchanged.",
        [(("error", name), count) for name, count in sorted(snap["local_errors"].items())],
    )
    return "".join(out).encode()


class MetricsServer:
    def __init__(self, source: SnapshotSource, address: HostPort) -> None:
        self.source = source
        self.address = address
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
                status, ctype, body = 200, CONTENT_TYPE, render(await self.source())
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
