"""``sabakan``: the machine inventory service (REST API + the state setter on the leader)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import ssl
import sys
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cke.common.durations import parse_duration
from cke.common.election import Election, LeaderKey
from cke.common.etcd import (
    ConfigError,
    EtcdSettings,
    authenticate,
    format_validation_error,
    make_client,
)
from cke.common.logs import get_logger, setup_logging
from cke.common.yamlfile import YAMLFileError, load_yaml
from sabakan.api import LEADER_KEY, METRICS_KEY, STORAGE_KEY, get_metrics, make_app
from sabakan.statesetter import StateSetter, StateSetterConfig, new_name
from sabakan.storage import Storage

log = get_logger("sabakan")

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
# Loopback unless asked: reads (machines, metrics) are open to anyone who can connect.
# Give --http 0.0.0.0:10080 (upstream's default; configs/sabakan.yml does) for cke and
# sabactl on other hosts, or serve them over --https with client certificates.
DEFAULT_HTTP = "127.0.0.1:10080"


class Config(BaseModel):
    """The YAML ``--config-file``; flags given on the command line win."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    etcd: EtcdSettings = Field(default_factory=lambda: EtcdSettings(prefix="/sabakan/"))
    http: str = DEFAULT_HTTP
    https: str = ""
    server_cert: str = Field(default="", alias="server-cert")
    server_key: str = Field(default="", alias="server-key")
    client_ca: str = Field(default="", alias="client-ca")
    allow_ips: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"], alias="allow-ips")
    metrics: str = ""
    logfile: str = ""
    logformat: str = "plain"
    loglevel: str = "info"
    audit_retention: float = Field(default=30 * 86400.0, alias="audit-retention")
    audit_max_records: int = Field(default=100000, alias="audit-max-records", ge=1)
    election_ttl: int = Field(default=5, alias="election-ttl", ge=1)
    state_setter: StateSetterConfig = Field(default_factory=StateSetterConfig, alias="state-setter")

    @field_validator("audit_retention", mode="before")
    @classmethod
    def _retention(cls, value: Any) -> float:
        if isinstance(value, str):
            return parse_duration(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError("want a duration such as 720h")

    @field_validator("allow_ips")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        for v in value:
            ipaddress.ip_network(v, strict=False)
        return value

    def networks(self) -> list[Net]:
        return [ipaddress.ip_network(v, strict=False) for v in self.allow_ips]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sabakan", description="machine inventory service")
    p.add_argument("--config-file", help="YAML file with the same keys as the flags")
    p.add_argument("--etcd-endpoints", help="comma-separated etcd URLs")
    p.add_argument("--etcd-prefix", help="etcd key prefix (default /sabakan/)")
    p.add_argument("--etcd-timeout", help="etcd dial timeout (e.g. 2s)")
    p.add_argument("--etcd-username")
    p.add_argument("--etcd-password")
    p.add_argument("--etcd-tls-ca")
    p.add_argument("--etcd-tls-cert")
    p.add_argument("--etcd-tls-key")
    p.add_argument("--http", help=f"HTTP listen address (default {DEFAULT_HTTP})")
    p.add_argument("--https", help="HTTPS listen address (needs --server-cert/--server-key)")
    p.add_argument("--server-cert")
    p.add_argument("--server-key")
    p.add_argument("--client-ca", help="CA that signs client certificates allowed to mutate")
    p.add_argument("--allow-ips", help="comma-separated addresses/CIDRs allowed to mutate")
    p.add_argument("--metrics", help="extra listen address serving /metrics only")
    p.add_argument("--logfile")
    p.add_argument("--logformat", choices=["plain", "logfmt", "json"])
    p.add_argument("--loglevel")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> Config:
    raw: dict[str, Any] = {}
    if args.config_file:
        try:
            loaded = load_yaml(args.config_file) or {}
        except YAMLFileError as exc:
            raise ConfigError(str(exc)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config_file}: want a mapping")
        raw = loaded
    etcd = dict(raw.get("etcd") or {"prefix": "/sabakan/"})
    flags_etcd = {
        "endpoints": args.etcd_endpoints.split(",") if args.etcd_endpoints else None,
        "prefix": args.etcd_prefix,
        "timeout": args.etcd_timeout,
        "username": args.etcd_username,
        "password": args.etcd_password,
        "tls-ca-file": args.etcd_tls_ca,
        "tls-cert-file": args.etcd_tls_cert,
        "tls-key-file": args.etcd_tls_key,
    }
    etcd.update({k: v for k, v in flags_etcd.items() if v is not None})
    raw["etcd"] = etcd
    for name in ("http", "https", "server-cert", "server-key", "client-ca", "metrics"):
        value = getattr(args, name.replace("-", "_"))
        if value is not None:
            raw[name] = value
    for name in ("logfile", "logformat", "loglevel"):
        if getattr(args, name) is not None:
            raw[name] = getattr(args, name)
    if args.allow_ips is not None:
        raw["allow-ips"] = [v for v in args.allow_ips.split(",") if v]
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        where = f"{args.config_file}: " if args.config_file else ""
        raise ConfigError(where + format_validation_error(exc)) from exc


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _prune_audit(storage: Storage, config: Config) -> None:
    while True:
        try:
            n = await storage.prune_audit(config.audit_retention, config.audit_max_records)
            if n:
                log.info("audit records pruned", count=n)
        except Exception as exc:
            log.warning("audit prune failed", error=str(exc))
        await asyncio.sleep(60)


async def _migrate(storage: Storage) -> None:
    """Replace a layout-1 ``index`` (the whole registry in one key) with the marker.
    Not fatal: the next registration or deletion does the same."""
    try:
        replaced = await asyncio.wait_for(storage.migrate(), 10)
    except Exception as exc:
        log.warning("etcd layout not checked at start", error=f"{type(exc).__name__}: {exc}")
        return
    if replaced:
        log.info("etcd layout 1 index replaced by the layout 2 marker", old_bytes=replaced)


async def serve(config: Config) -> None:
    client = make_client(config.etcd)
    await client.connect()
    await authenticate(client, config.etcd)  # etcdutil's username/password, if set
    storage = Storage(client, config.etcd.prefix)
    await _migrate(storage)
    app = make_app(storage, config.networks())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sites: list[web.BaseSite] = []
    if config.http:
        host, port = _host_port(config.http)
        sites.append(web.TCPSite(runner, host, port))
    if config.https:
        if not (config.server_cert and config.server_key):
            raise ConfigError("https: needs server-cert and server-key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(config.server_cert, config.server_key)
        if config.client_ca:
            ctx.load_verify_locations(config.client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        host, port = _host_port(config.https)
        sites.append(web.TCPSite(runner, host, port, ssl_context=ctx))
    metrics_runner: web.AppRunner | None = None
    if config.metrics:
        mapp = web.Application()
        mapp[STORAGE_KEY] = storage
        mapp[METRICS_KEY] = app[METRICS_KEY]
        mapp[LEADER_KEY] = app[LEADER_KEY]
        mapp.router.add_get("/metrics", get_metrics)
        metrics_runner = web.AppRunner(mapp, access_log=None)
        await metrics_runner.setup()
        host, port = _host_port(config.metrics)
        sites.append(web.TCPSite(metrics_runner, host, port))
    for site in sites:
        await site.start()
    log.info("sabakan started", http=config.http, https=config.https, prefix=config.etcd.prefix)

    name = new_name()
    setter = StateSetter(storage, config.state_setter)

    async def leader_work(leader: LeaderKey) -> None:
        setter.leader = leader
        jobs = [asyncio.create_task(_prune_audit(storage, config), name="audit-pruner")]
        if config.state_setter.enabled:
            jobs.append(asyncio.create_task(setter.run(), name="state-setter"))
        try:
            # Both run until cancelled; one that fails (the setter's fenced write was
            # refused) ends the term, and the other must not outlive it.
            done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_EXCEPTION)
            for job in done:
                job.result()
        finally:
            setter.leader = None
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)

    status = app[LEADER_KEY]

    def leading(now: bool) -> None:
        status["leader"] = now

    election = Election(
        client,
        storage.leader_prefix,
        name,
        ttl=config.election_ttl,
        timeout=config.etcd.timeout,
        logger="sabakan.election",
    )
    election_task = asyncio.create_task(election.run(leader_work, leading), name="election")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("sabakan stopping")
    election_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await election_task
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    await client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args)
        setup_logging(config.loglevel, config.logformat, config.logfile or None)
    except (ConfigError, ValueError) as exc:
        print(f"sabakan: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"sabakan: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sabakan: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
