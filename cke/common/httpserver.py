"""The ``/metrics`` and ``/health`` endpoint every service exposes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

HealthCheck = Callable[[], Awaitable[tuple[bool, str]]]


def parse_listen_address(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ValueError names ``flag``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag}: want HOST:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def make_app(registry: CollectorRegistry, health: HealthCheck) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        ok, detail = await health()
        return web.json_response(
            {"health": "healthy" if ok else "unhealthy", "detail": detail},
            status=200 if ok else 500,
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", healthz)
    return app


async def start_http(
    host: str, port: int, registry: CollectorRegistry, health: HealthCheck
) -> web.AppRunner:
    """Start serving; the caller keeps the runner and calls ``cleanup()`` at exit."""
    runner = web.AppRunner(make_app(registry, health), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
