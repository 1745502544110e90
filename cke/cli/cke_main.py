"""``cke``: the control-plane manager daemon (one replica of several)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import signal
import socket
import sys
from typing import Any, NoReturn

from etcd3aio import EtcdError

from cke.backup import add_backup_flags, backup_schedule
from cke.cluster import ClusterError, cluster_from_json, constraints_from_json
from cke.common.durations import parse_duration
from cke.common.etcd import ConfigError, authenticate, load_etcd_settings, make_client
from cke.common.httpserver import parse_listen_address, start_http
from cke.common.logs import error_line, get_logger, setup_logging
from cke.sabakan.autorepair import AutoRepairer
from cke.sabakan.integration import Integrator
from cke.server.clusterstatus import DEFAULT_DEFRAG_IN_USE_RATIO, DefragPolicy
from cke.server.control import Server
from cke.server.infra import Infrastructure
from cke.server.metrics import ServerMetrics
from cke.storage import Storage, UnreadableValue, stored_text
from cke.vault import VaultConfig, VaultSession, parse_vault_config

log = get_logger("cke")


class FlagError(Exception):
    pass


# A week: every cluster renews each certificate every ~4.7 days, so renewal is a path
# that runs all the time, not once a year; the last third (2.3 days) tolerates a long
# Vault outage before anything expires.
DEFAULT_LEAF_TTL = "168h"
CERT_TTL_FLAGS = {
    "server": "etcd members' server certificates",
    "peer": "etcd members' peer certificates",
    "client": "cke's own etcd client certificate (at most 2h: Vault's admin role cap)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise FlagError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cke", description="cke: self-healing control-plane manager")
    p.add_argument("--config", default="/etc/cke/config.yml", help="etcd configuration file")
    p.add_argument("--interval", default="1m", help="check interval")
    p.add_argument("--session-ttl", default="10s", help="leader session's TTL")
    p.add_argument("--http", default="0.0.0.0:10180", help="listen address of /metrics, /health")
    p.add_argument("--certs-gc-interval", default="1h", help="tidy interval of Vault PKI")
    p.add_argument(
        "--max-concurrent-updates", type=int, default=10, help="the number of nodes changed at once"
    )
    p.add_argument("--name", default=socket.gethostname(), help="this replica's name")
    p.add_argument(
        "--cert-ttl",
        default=DEFAULT_LEAF_TTL,
        help="lifetime of the certificates cke issues, unless set per kind below (not CKE's)",
    )
    for kind, what in CERT_TTL_FLAGS.items():
        p.add_argument(
            f"--{kind}-cert-ttl", default=None, help=f"lifetime of {what} (default: --cert-ttl)"
        )
    p.add_argument(
        "--ca-rotation-grace",
        default="10m",
        help="time clients outside cke get to fetch a rotated CA or new client certificates",
    )
    p.add_argument(
        "--cert-renew-fraction",
        type=float,
        default=1 / 3,
        help="renew a certificate when this fraction of its lifetime is left (0 < f < 1)",
    )
    p.add_argument(
        "--etcd-defrag-min-db-size",
        default="100MiB",
        help="defragment an etcd member only when its database is at least this large "
        "(bytes, or with KiB, MiB, GiB) (not CKE's)",
    )
    p.add_argument(
        "--etcd-defrag-in-use-ratio",
        type=float,
        default=DEFAULT_DEFRAG_IN_USE_RATIO,
        help="... and less than this fraction of it is in use (0 <= r <= 0.9; 0: never, "
        "but to recover from NOSPACE) (not CKE's)",
    )
    add_backup_flags(p)
    p.add_argument(
        "--debug-sabakan",
        action="store_true",
        help="print what the sabakan integration (generation and auto-repair) would do "
        "now, as JSON, and exit; nothing is stored (upstream's runs it without an election)",
    )
    p.add_argument("--loglevel", default="info")
    p.add_argument("--logformat", default="plain")
    p.add_argument("--logfile", default=None)
    return p


_SIZE_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_SIZE_RE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB)?")


def parse_size(text: str, flag: str) -> int:
    """A byte count: ``104857600``, ``100MiB``, ``2GiB``, ``512KiB``."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise FlagError(f"{flag}: not a size (bytes, or a number with KiB, MiB, GiB): {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]


def defrag_policy(args: argparse.Namespace) -> DefragPolicy:
    ratio = args.etcd_defrag_in_use_ratio
    if not 0 <= ratio <= 0.9:
        raise FlagError(f"--etcd-defrag-in-use-ratio: must be between 0 and 0.9, got {ratio}")
    return DefragPolicy(
        parse_size(args.etcd_defrag_min_db_size, "--etcd-defrag-min-db-size"), ratio
    )


def parse_duration_or_flag_error(text: str, flag: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise FlagError(f"{flag}: {exc}") from exc


def _duration(args: argparse.Namespace, flag: str) -> float:
    text = getattr(args, flag.lstrip("-").replace("-", "_"))
    seconds = parse_duration_or_flag_error(text, flag)
    if seconds <= 0:
        raise FlagError(f"{flag}: must be positive, got {text!r}")
    return seconds


# Vault's PKI dates a certificate's start this far back (its roles' not_before_duration).
VAULT_BACKDATE = 30.0


def renews_at_once(args: argparse.Namespace) -> None:
    """Refuse a renewal fraction that makes a certificate due as soon as it is issued: a
    certificate of TTL t lives t + VAULT_BACKDATE by its dates, so with fraction f it is
    due at issue when f * (t + 30s) >= t (then cke would renew every round)."""
    fraction = args.cert_renew_fraction
    in_force = {"--cert-ttl": args.cert_ttl}
    for kind in CERT_TTL_FLAGS:
        if getattr(args, f"{kind}_cert_ttl") is not None:
            in_force[f"--{kind}-cert-ttl"] = getattr(args, f"{kind}_cert_ttl")
    for flag, text in in_force.items():
        ttl = parse_duration_or_flag_error(text, flag)
        if fraction * (ttl + VAULT_BACKDATE) >= ttl:
            raise FlagError(
                f"--cert-renew-fraction: {fraction} with {flag} {text} makes each certificate "
                f"due as soon as it is issued (Vault dates certificates "
                f"{VAULT_BACKDATE:.0f}s back); use a smaller fraction or a longer TTL"
            )


async def _serve(
    args: argparse.Namespace,
    interval: float,
    ttl: int,
    gc_interval: float,
    defrag: DefragPolicy | None = None,
) -> int:
    settings = load_etcd_settings(args.config)
    client = make_client(settings)
    await client.connect()
    await authenticate(client, settings)  # etcdutil's username/password, if set
    storage = Storage(client, settings.prefix, timeout=max(settings.timeout, 2.0))
    metrics = ServerMetrics()

    async def vault_config() -> VaultConfig | None:
        stored = await storage.get_vault_config()
        return parse_vault_config(stored.value) if stored.value is not None else None

    vault = VaultSession(vault_config, check_interval=min(5.0, interval))
    ttls = {
        kind: getattr(args, f"{kind}_cert_ttl")
        for kind in CERT_TTL_FLAGS
        if getattr(args, f"{kind}_cert_ttl") is not None
    }
    infra = Infrastructure(
        storage,
        vault,
        args.max_concurrent_updates,
        args.cert_ttl,
        ttls=ttls,
        renew_fraction=args.cert_renew_fraction,
        rotation_grace=parse_duration(args.ca_rotation_grace),
        defrag=defrag,
    )
    server = Server(
        client,
        storage,
        args.name,
        interval,
        ttl,
        metrics,
        vault,
        gc_interval,
        infra,
        sabakan=Integrator(storage),
        backups=backup_schedule(args),
    )

    async def health() -> tuple[bool, str]:
        try:
            await asyncio.wait_for(storage.get("status"), 3)
        except Exception as exc:
            return False, f"etcd: {type(exc).__name__}"
        return True, "ok"

    host, port = parse_listen_address(args.http, "--http")
    runner = await start_http(host, port, metrics.exposed, health)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop_requested.set)
    log.info("cke started", name=args.name, http=args.http, interval=interval, session_ttl=ttl)
    vault_task = asyncio.create_task(vault.run(), name="vault-session")
    try:
        await server.run()
    finally:
        vault_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await vault_task
        await infra.close()
        await runner.cleanup()
        await client.close()
    log.info("cke stopped", name=args.name)
    return 0


async def _debug_sabakan(args: argparse.Namespace) -> int:
    """``--debug-sabakan``: one generation and one auto-repair round as a leader would
    run them now, against the stored cluster, constraints and queues; printed, never
    stored (a replica outside the election must not write what only a leader writes)."""
    settings = load_etcd_settings(args.config)
    client = make_client(settings)
    await client.connect()
    try:
        await authenticate(client, settings)
        storage = Storage(client, settings.prefix, timeout=max(settings.timeout, 2.0))
        integrator = Integrator(storage)
        status = await storage.get_status()
        generation = await integrator.run(None, status.etcd_members if status else [])
        doc: dict[str, Any] = {
            "generation": generation.to_dict() if generation else "not enabled",
            "auto-repair": "no cluster",
        }
        cluster_text = stored_text((await storage.get_cluster()).value, "cluster")
        if cluster_text:
            constraints_text = stored_text((await storage.get_constraints()).value, "constraints")
            repairs = await AutoRepairer(storage, integrator.client).run(
                None,
                cluster_from_json(cluster_text),
                constraints_from_json(constraints_text),
                [e for e, _ in await storage.get_repair_entries()],
                [e for e, _ in await storage.get_reboot_entries()],
            )
            doc["auto-repair"] = repairs.to_dict() if repairs else "not enabled"
        print(json.dumps(doc, indent=2))
    finally:
        await client.close()
    return 0


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one, as Go programs (CKE) do at start:
    cke keeps one SSH connection per node, and systemd's default soft limit (1024) runs
    out at about 1,000 nodes. Returns the (soft, hard) limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        interval = _duration(args, "--interval")
        ttl_seconds = _duration(args, "--session-ttl")
        gc_interval = _duration(args, "--certs-gc-interval")
        _duration(args, "--cert-ttl")
        if parse_duration_or_flag_error(args.ca_rotation_grace, "--ca-rotation-grace") < 0:
            raise FlagError("--ca-rotation-grace: must not be negative")
        for kind in CERT_TTL_FLAGS:
            if getattr(args, f"{kind}_cert_ttl") is not None:
                _duration(args, f"--{kind}-cert-ttl")
        if not 0 < args.cert_renew_fraction < 1:
            raise FlagError(
                f"--cert-renew-fraction: must be between 0 and 1, got {args.cert_renew_fraction}"
            )
        renews_at_once(args)
        if ttl_seconds < 1:
            raise FlagError("--session-ttl: must be at least 1s")
        if args.max_concurrent_updates < 1:
            raise FlagError("--max-concurrent-updates: must be at least 1")
        parse_listen_address(args.http, "--http")
        backup_schedule(args)  # the --backup-* flags are good
        defrag = defrag_policy(args)
        if not args.name:
            raise FlagError("--name: must not be empty")
        setup_logging(args.loglevel, args.logformat, args.logfile)
    except (FlagError, ValueError) as exc:
        print(f"cke: {exc}", file=sys.stderr)
        return 2
    raise_fd_limit()
    try:
        if args.debug_sabakan:
            return asyncio.run(_debug_sabakan(args))
        return asyncio.run(_serve(args, interval, round(ttl_seconds), gc_interval, defrag))
    except ConfigError as exc:
        print(f"cke: {exc}", file=sys.stderr)
        return 1
    except EtcdError as exc:
        print(f"cke: etcd: {error_line(exc)}", file=sys.stderr)
        return 1
    except (ClusterError, UnreadableValue) as exc:
        print(f"cke: stored configuration: {error_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cke: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
