"""``ckecli``: the operator's command line. It talks to cke only through etcd."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import yaml
from etcd3aio import EtcdError, SortOrder, SortTarget, WatchFilter, prefix_range_end

from cke import __version__
from cke.backup import DEFAULT_DIR, DEFAULT_ETCDUTL, DEFAULT_KEEP
from cke.cluster import (
    CONSTRAINT_NAMES,
    ClusterError,
    cluster_from_json,
    cluster_to_json,
    cluster_to_yaml,
    constraints_from_json,
    constraints_to_json,
    parse_cluster,
    set_constraint,
    validate_cluster,
)
from cke.common.etcd import ConfigError, authenticate, load_etcd_settings, make_client
from cke.common.logs import error_line
from cke.pki import (
    USER_CLIENT_TTL,
)
from cke.records import Record
from cke.sabakan.settings import (
    SettingError,
    parse_template,
    parse_tls,
    parse_url,
    parse_variables,
    template_to_json,
)
from cke.server.safety import check_control_plane_change
from cke.storage import (
    KEY_RECORDS_PREFIX,
    KEY_SABAKAN_DISABLED,
    KEY_SABAKAN_QUERY_VARIABLES,
    KEY_SABAKAN_TEMPLATE,
    KEY_SABAKAN_TLS,
    KEY_SABAKAN_URL,
    Conflict,
    Storage,
    UnreadableValue,
    Versioned,
    stored_text,
)


class CLIError(Exception):
    """A one-line error for the operator; exit status 1 unless ``code`` says otherwise."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"ckecli: {message}", file=sys.stderr)
        sys.exit(2)


def _emit(doc: Any, output: str | None, human: Callable[[Any], str]) -> None:
    if output == "json":
        print(json.dumps(doc, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        print(human(doc))


# -- commands ----------------------------------------------------------------------------------


async def cmd_plan(storage: Storage, args: argparse.Namespace) -> None:
    from cke.cli.plancmd import cmd_plan as plan  # here: plancmd imports this module

    await plan(storage, args)


async def cmd_cluster_set(storage: Storage, args: argparse.Namespace) -> None:
    if args.output is not None and not args.dry_run:
        raise CLIError("-o: only with --dry-run")
    if args.dry_run and not 1 <= args.steps <= MAX_PLAN_STEPS:
        raise CLIError(f"--steps: must be between 1 and {MAX_PLAN_STEPS}")
    text = await _read_input(args.file)
    try:
        cluster = parse_cluster(text)
    except ClusterError as exc:
        raise CLIError(f"{args.file}: {exc}") from exc
    current = await storage.get_cluster()
    constraints_raw = await storage.get_constraints()
    constraints = constraints_from_json(stored_text(constraints_raw.value, "constraints"))
    new_constraints_json = None
    if args.control_plane_count is not None:
        # Scaling changes the cluster and this constraint together: one transaction.
        try:
            constraints = set_constraint(
                constraints, "control-plane-count", str(args.control_plane_count)
            )
        except ClusterError as exc:
            raise CLIError(f"--control-plane-count: {exc}") from exc
        new_constraints_json = constraints_to_json(constraints)
    try:
        validate_cluster(cluster, constraints)
    except ClusterError as exc:
        raise CLIError(f"{args.file}: {exc}") from exc
    status = await storage.get_status()
    refused = check_control_plane_change(status.etcd_members if status else [], cluster)
    if refused is not None:
        raise CLIError(f"{args.file}: refused by rule {refused.rule}: {refused.message}")
    old_yaml = _stored_cluster_yaml(current.value)
    new_yaml = cluster_to_yaml(cluster)
    if args.dry_run:
        from cke.cli.plancmd import dry_run  # here: plancmd imports this module

        diff_lines = difflib.unified_diff(
            old_yaml.splitlines(keepends=True),
            new_yaml.splitlines(keepends=True),
            "stored",
            args.file,
        )
        await dry_run(storage, args, cluster, constraints, "".join(diff_lines))
        return
    if old_yaml == new_yaml and new_constraints_json is None:
        print("cluster unchanged")
        return
    diff = difflib.unified_diff(
        old_yaml.splitlines(keepends=True),
        new_yaml.splitlines(keepends=True),
        "stored",
        args.file,
    )
    sys.stdout.writelines(diff)
    try:
        await storage.put_cluster_and_constraints(
            cluster_to_json(cluster),
            current.mod_revision,
            new_constraints_json,
            constraints_raw.mod_revision,
        )
    except Conflict as exc:
        raise CLIError(str(exc)) from exc
    print("cluster stored")


async def cmd_cluster_get(storage: Storage, args: argparse.Namespace) -> None:
    current = await storage.get_cluster()
    if current.value is None:
        raise CLIError("no cluster configuration is stored yet; use 'ckecli cluster set FILE'")
    cluster = cluster_from_json(_stored_cluster_text(current.value))
    if args.output == "json":
        print(json.dumps(json.loads(cluster_to_json(cluster)), indent=2))
    else:
        print(cluster_to_yaml(cluster), end="")


async def cmd_constraints_show(storage: Storage, args: argparse.Namespace) -> None:
    raw = await storage.get_constraints()
    constraints = constraints_from_json(stored_text(raw.value, "constraints"))
    doc = json.loads(constraints_to_json(constraints))
    # As upstream: a JSON object (indented by four spaces) unless -o asks otherwise.
    _emit(doc, args.output, lambda d: json.dumps(d, indent=4))


async def cmd_constraints_set(storage: Storage, args: argparse.Namespace) -> None:
    raw = await storage.get_constraints()
    current = constraints_from_json(stored_text(raw.value, "constraints"))
    try:
        updated = set_constraint(current, args.name, args.value)
    except ClusterError as exc:
        raise CLIError(str(exc)) from exc
    cluster_raw = await storage.get_cluster()
    if cluster_raw.value is not None:
        try:
            validate_cluster(cluster_from_json(_stored_cluster_text(cluster_raw.value)), updated)
        except ClusterError as exc:
            raise CLIError(f"the stored cluster would be invalid: {exc}") from exc
    try:
        await storage.put_cluster_and_constraints(
            None, cluster_raw.mod_revision, constraints_to_json(updated), raw.mod_revision
        )
    except Conflict as exc:
        raise CLIError(str(exc)) from exc


async def cmd_leader(storage: Storage, args: argparse.Namespace) -> None:
    name = await storage.get_leader_name()
    if name is None:
        raise CLIError("no leader")
    _emit({"leader": name}, args.output, lambda d: str(d["leader"]))


def _record_line(r: Record) -> str:
    line = f"{r.id:>6}  {r.status:<9}  {r.start_at:<24}  {r.operation}"
    if r.targets:
        line += f"  targets={','.join(r.targets)}"
    if r.error:
        line += f"  error={r.error}"
    return line


async def cmd_history(storage: Storage, args: argparse.Namespace) -> None:
    if not 0 <= args.n <= MAX_HISTORY:
        raise CLIError(f"-n: must be between 0 and {MAX_HISTORY} (0: all)")
    if args.follow:
        await _follow_history(storage, args)
        return
    records = await storage.get_records(args.n)
    docs = [r.to_dict() for r in records]
    _emit(docs, args.output, lambda _: "\n".join(_record_line(r) for r in records))


# As upstream: ``history -f`` without ``-n`` starts from the newest 20 records.
FOLLOW_INITIAL_COUNT = 20


def _print_followed(record: Record, output: str | None) -> None:
    if output == "json":
        print(json.dumps(record.to_dict()), flush=True)
    elif output == "yaml":
        print("---\n" + yaml.safe_dump(record.to_dict(), sort_keys=False), end="", flush=True)
    else:
        print(_record_line(record), flush=True)


async def _follow_history(storage: Storage, args: argparse.Namespace) -> None:
    """Print the newest records oldest first, then every record written afterwards.

    New records and updates of known ones (new -> running -> completed) come from an
    etcd watch that starts right after the revision the records were read at, so
    nothing is missed or printed twice; it runs until interrupted.
    """
    start = storage.key(KEY_RECORDS_PREFIX)
    end = prefix_range_end(start)
    resp = await storage.kv.get(
        start,
        range_end=end,
        sort_order=SortOrder.DESCEND,
        sort_target=SortTarget.KEY,
        limit=args.n or FOLLOW_INITIAL_COUNT,
        timeout=storage.timeout,
    )
    initial = []
    for kv in resp.kvs:
        try:
            initial.append(Record.from_json(kv.value))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # as get_records: an unreadable record is skipped
    for record in sorted(initial, key=lambda r: r.id):
        _print_followed(record, args.output)
    watch = storage.client.watch
    assert watch is not None
    async for event_batch in watch.watch(
        start,
        range_end=end,
        start_revision=resp.header.revision + 1,
        filters=[WatchFilter.NODELETE],
    ):
        for event in event_batch.events:
            try:
                record = Record.from_json(event.kv.value)
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
            _print_followed(record, args.output)


def _auto_repair_text(report: Any) -> list[str]:
    """The last round of sabakan-triggered repair (``ckecli auto-repair``)."""
    if not isinstance(report, dict) or not report:
        return []
    lines = ["auto-repair: " + (f"error: {report['error']}" if report.get("error") else "ran")]
    for e in report.get("queued", []):
        lines.append(f"  - queued #{e['index']}: {e['operation']} {e['address']}")
    if report.get("refused"):
        lines.append(
            f"  - refused by rule {report['refused']['rule']}: {report['refused']['reason']}"
        )
    for s in report.get("skipped", []):
        lines.append(
            f"  - not queued: {s['serial']} {s['address']} by rule {s['rule']}: {s['reason']}"
        )
    if report.get("skipped-not-shown"):
        lines.append(f"  - and {report['skipped-not-shown']} more not queued")
    return lines


def _status_text(doc: dict[str, Any]) -> str:
    lines = [
        f"leader: {doc['leader'] or '(none)'}",
        f"phase: {doc['phase'] or '(unknown)'}",
        f"updated: {doc['timestamp'] or '(never)'}",
        f"vault: {doc.get('vault') or '(unknown)'}",
        f"etcd members: {', '.join(doc.get('etcd-members') or []) or '(none)'}",
    ]
    last = doc.get("last-record")
    if last:
        lines.append(
            f"last operation: #{last['id']} {last['operation']} {last['status']}"
            + (f" error={last['error']}" if last["error"] else "")
        )
    else:
        lines.append("last operation: (none)")
    sabakan = doc.get("sabakan") or {}
    if sabakan.get("result"):
        what = sabakan["result"]
        if sabakan.get("rule"):
            what += f" by rule {sabakan['rule']}"
        if sabakan.get("reason"):
            what += f": {sabakan['reason']}"
        lines.append(f"sabakan: {what} (at {sabakan.get('timestamp', '?')})")
        lines += [f"  - {change}" for change in sabakan.get("changes", [])]
        lines += [f"  - held: {held}" for held in sabakan.get("held", [])]
    lines += _auto_repair_text(doc.get("auto-repair"))
    certificates = doc.get("certificates") or {}
    if certificates:
        lines.append("certificates (the first to expire on each node):")
        for address, cert in sorted(certificates.items()):
            lines.append(
                f"  - {address}: {cert.get('certificate')} expires {cert.get('not-after')}"
                f" (serial {cert.get('serial')})"
            )
    rivers = doc.get("rivers") or {}
    if rivers:
        lines.append("rivers:")
        for address, services in sorted(rivers.items()):
            states = ", ".join(f"{name} {state}" for name, state in sorted(services.items()))
            lines.append(f"  - {address}: {states}")
    for name, rotation in sorted((doc.get("ca-rotations") or {}).items()):
        waiting = rotation.get("waiting-for") or "ready for the next step"
        lines.append(f"ca rotation {name}: {rotation.get('stage')}; {waiting}")
    if doc["blocked"]:
        lines.append("blocked:")
        for b in doc["blocked"]:
            nodes = f" nodes={','.join(b['nodes'])}" if b.get("nodes") else ""
            lines.append(f"  - [{b['rule']}] {b['message']}{nodes}")
    else:
        lines.append("blocked: nothing")
    if doc.get("inert"):
        lines.append(f"inert here: {', '.join(doc['inert'])}")
    return "\n".join(lines)


async def cmd_status(storage: Storage, args: argparse.Namespace) -> None:
    leader = await storage.get_leader_name()
    status = await storage.get_status()
    if status is None:
        # As upstream: no status (cke never ran on this prefix) is exit status 4.
        raise CLIError("no status", code=4)
    records = await storage.get_records(1)
    doc: dict[str, Any] = {
        "leader": leader or "",
        "phase": status.phase if status else "",
        "timestamp": status.timestamp if status else "",
        "blocked": status.blocked if status else [],
        "vault": status.vault if status else "",
        "etcd-members": status.etcd_members if status else [],
        "cluster-revision": status.cluster_revision if status else 0,
        "sabakan": status.sabakan if status else {},
        "auto-repair": status.auto_repair if status else {},
        "certificates": status.certificates,
        "ca-rotations": status.ca_rotations,
        "rivers": status.rivers,
        "last-record": records[0].to_dict() if records else None,
        "inert": [],
    }
    # The stored cluster's fields that cke keeps but does not act on (issue 18).
    from cke.cluster import inert_fields

    try:
        stored = stored_text((await storage.get_cluster()).value, "cluster")
        if stored is not None:
            doc["inert"] = inert_fields(cluster_from_json(stored))
    except ValueError:  # ClusterError, UnreadableValue: reported where the cluster is used
        pass
    _emit(doc, args.output, _status_text)


# ``cluster set --dry-run --steps``: at most this many (cke.server.plan.MAX_STEPS).
MAX_PLAN_STEPS = 300
# No input of ckecli is anywhere near this; it bounds what is read into memory.
MAX_INPUT_BYTES = 4 * 1024 * 1024
# cke keeps the last 1,000 records.
MAX_HISTORY = 1_000_000


def _read_bytes(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    with open(path, "rb") as f:
        return f.read(MAX_INPUT_BYTES + 1)


async def _read_input(path: str) -> str:
    """A whole input file (or stdin) as UTF-8 text; one-line errors, nothing half read."""
    try:
        data = await asyncio.to_thread(_read_bytes, path)
    except OSError as exc:
        raise CLIError(f"{path}: {exc.strerror}") from exc
    if len(data) > MAX_INPUT_BYTES:
        raise CLIError(f"{path}: larger than {MAX_INPUT_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise CLIError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _stored_cluster_text(value: bytes | None) -> str:
    text = stored_text(value, "cluster")
    if text is None:
        raise CLIError("no cluster configuration is stored yet; use 'ckecli cluster set FILE'")
    return text


def _stored_cluster_yaml(value: bytes | None) -> str:
    """The stored cluster as YAML for a diff ("" when none, or when it is unreadable)."""
    if value is None:
        return ""
    try:
        return cluster_to_yaml(cluster_from_json(_stored_cluster_text(value)))
    except (ClusterError, UnreadableValue):
        return ""


# -- plumbing ----------------------------------------------------------------------------------

Command = Callable[[Storage, argparse.Namespace], Awaitable[None]]
# Commands given as "module:function" are imported once the command line is parsed, before
# the event loop starts: most commands never load what those modules need (Vault, SSH).
VAULTCMD = "cke.cli.vaultcmd:"


def resolve_command(func: Command | str) -> Command:
    if not isinstance(func, str):
        return func
    module, name = func.split(":")
    command: Command = getattr(importlib.import_module(module), name)
    return command


# -- sabakan integration ---------------------------------------------------------------------


async def cmd_sabakan_enable(storage: Storage, args: argparse.Namespace) -> None:
    await storage.put_setting(KEY_SABAKAN_DISABLED, "false")


async def cmd_sabakan_disable(storage: Storage, args: argparse.Namespace) -> None:
    await storage.put_setting(KEY_SABAKAN_DISABLED, "true")


async def cmd_sabakan_is_enabled(storage: Storage, args: argparse.Namespace) -> None:
    disabled = (await storage.get(KEY_SABAKAN_DISABLED)).value
    print("false" if disabled == b"true" else "true")


async def cmd_sabakan_set_url(storage: Storage, args: argparse.Namespace) -> None:
    try:
        url = parse_url(args.url)
        tls = parse_tls(
            await _read_input(args.cacert) if args.cacert else None,
            await _read_input(args.cert) if args.cert else None,
            await _read_input(args.key) if args.key else None,
        )
    except SettingError as exc:
        raise CLIError(str(exc)) from None
    await storage.put_many({KEY_SABAKAN_URL: url, KEY_SABAKAN_TLS: tls.to_json()})


async def cmd_sabakan_get_url(storage: Storage, args: argparse.Namespace) -> None:
    print(_stored_setting(await storage.get(KEY_SABAKAN_URL), "URL", "set-url"))


async def cmd_sabakan_set_template(storage: Storage, args: argparse.Namespace) -> None:
    text = await _read_input(args.file)
    try:
        template = parse_template(text)
    except SettingError as exc:
        raise CLIError(f"{args.file}: {exc}") from None
    await storage.put_setting(KEY_SABAKAN_TEMPLATE, template_to_json(template))


async def cmd_sabakan_get_template(storage: Storage, args: argparse.Namespace) -> None:
    text = _stored_setting(await storage.get(KEY_SABAKAN_TEMPLATE), "template", "set-template")
    try:
        template = parse_template(text)
    except SettingError as exc:
        raise CLIError(f"stored template: {exc}") from None
    if args.output == "json":
        print(json.dumps(json.loads(template_to_json(template)), indent=2))
        return
    doc = template.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    for node in doc.get("nodes", []):
        node.pop("address", None)
    print(yaml.safe_dump(doc, sort_keys=False), end="")


async def store_variables(
    storage: Storage, path: str, key: str, parse: Callable[[str], object]
) -> None:
    """Query variables (JSON) from ``path``, checked by ``parse``, stored under ``key``
    (``sabakan set-variables``, ``auto-repair set-variables``)."""
    text = await _read_input(path)
    try:
        parse(text)
    except SettingError as exc:
        raise CLIError(f"{path}: {exc}") from None
    await storage.put_setting(key, json.dumps(json.loads(text)))


async def cmd_sabakan_set_variables(storage: Storage, args: argparse.Namespace) -> None:
    await store_variables(storage, args.file, KEY_SABAKAN_QUERY_VARIABLES, parse_variables)


async def cmd_sabakan_get_variables(storage: Storage, args: argparse.Namespace) -> None:
    got = await storage.get(KEY_SABAKAN_QUERY_VARIABLES)
    print(stored_text(got.value, "variables") or "{}")


def _stored_setting(got: Versioned, what: str, command: str) -> str:
    text = stored_text(got.value, what)
    if text is None:
        raise CLIError(f"no sabakan {what} is set; use 'ckecli sabakan {command}'")
    return text


def _add_sabakan_parser(sub: Any, reader: Callable[[argparse.ArgumentParser], None]) -> None:
    sabakan = sub.add_parser("sabakan", help="generate the cluster from sabakan's machines")
    ssub = sabakan.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    for name, func, text in (
        ("enable", cmd_sabakan_enable, "run the integration (once URL and template are set)"),
        ("disable", cmd_sabakan_disable, "stop generating; cluster set works as usual"),
        ("is-enabled", cmd_sabakan_is_enabled, "print true or false"),
        ("get-url", cmd_sabakan_get_url, "print sabakan's URL"),
        ("get-variables", cmd_sabakan_get_variables, "print the query variables (JSON)"),
    ):
        p = ssub.add_parser(name, help=text)
        p.set_defaults(func=func)
    p = ssub.add_parser("set-url", help="sabakan's https:// URL, how to verify it and log in")
    p.add_argument("url")
    p.add_argument("--cacert", help="PEM file of the CA of sabakan's certificate")
    p.add_argument("--cert", help="PEM file of the client certificate cke presents")
    p.add_argument("--key", help="PEM file of its private key (stored in cke's etcd)")
    p.set_defaults(func=cmd_sabakan_set_url)
    p = ssub.add_parser("set-template", help="the cluster template (YAML file or -)")
    p.add_argument("file")
    p.set_defaults(func=cmd_sabakan_set_template)
    p = ssub.add_parser("get-template", help="print the cluster template")
    reader(p)
    p.set_defaults(func=cmd_sabakan_get_template)
    p = ssub.add_parser("set-variables", help="which machines to use (JSON file or -)")
    p.add_argument("file")
    p.set_defaults(func=cmd_sabakan_set_variables)


def _add_backup_parser(esub: Any) -> None:
    """``etcd backup`` (and its alias ``local-backup``) with its ``list`` subcommand."""
    p = esub.add_parser(
        "backup",
        aliases=["local-backup"],
        help="take a verified snapshot of the managed etcd into --dir; 'list' lists them",
    )
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"backup directory (default {DEFAULT_DIR})")
    p.add_argument(
        "--max-backups",
        "--retention",
        dest="keep",
        type=int,
        default=DEFAULT_KEEP,
        help=f"keep the newest N backups, remove older ones (default {DEFAULT_KEEP})",
    )
    p.add_argument("--copy-dir", default=None, help="also copy the backup there")
    p.add_argument(
        "--etcdutl", default=DEFAULT_ETCDUTL, help="etcdutl that verifies (path or name on PATH)"
    )
    p.set_defaults(func="cke.cli.backupcmd:cmd_etcd_backup", backup_command=None)
    bsub = p.add_subparsers(dest="backup_command", parser_class=_Parser)
    lp = bsub.add_parser("list", help="the backups in --dir: time, revision, keys, size")
    lp.add_argument("--dir", dest="list_dir", default=None, help=f"default {DEFAULT_DIR}")
    lp.add_argument("--etcdutl", dest="list_etcdutl", default=None, help=argparse.SUPPRESS)
    lp.add_argument("-o", "--output", choices=("json",), default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ckecli", description="control cke through etcd")
    parser.add_argument("--config", default="/etc/cke/config.yml", help="etcd configuration")
    parser.add_argument("--version", action="version", version=f"ckecli {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def reader(p: argparse.ArgumentParser) -> None:
        p.add_argument("-o", "--output", choices=("json", "yaml"), default=None)

    cluster = sub.add_parser("cluster", help="the cluster configuration")
    csub = cluster.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    p = csub.add_parser("set", help="validate and store a cluster YAML (- for stdin)")
    p.add_argument(
        "--control-plane-count",
        type=int,
        default=None,
        help="store this control-plane-count constraint with the cluster, atomically",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="store nothing: print the operations the change would cause (exit 3: held back)",
    )
    p.add_argument(
        "--steps", type=int, default=50, help="with --dry-run: plan at most N operations"
    )
    p.add_argument("-o", "--output", choices=("json",), default=None, help="with --dry-run")
    p.add_argument("file")
    p.set_defaults(func=cmd_cluster_set)
    p = csub.add_parser("get", help="print the stored cluster")
    reader(p)
    p.set_defaults(func=cmd_cluster_get)

    constraints = sub.add_parser("constraints", aliases=["cstr"], help="the constraints")
    ksub = constraints.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    p = ksub.add_parser("show", help="print the constraints (JSON unless -o yaml)")
    reader(p)
    p.set_defaults(func=cmd_constraints_show)
    p = ksub.add_parser("set", help=f"set one of: {', '.join(CONSTRAINT_NAMES)}")
    p.add_argument("name")
    p.add_argument("value")
    p.set_defaults(func=cmd_constraints_set)

    vault = sub.add_parser("vault", help="Vault set-up and secrets")
    vsub = vault.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    insecure = "accept an http:// Vault endpoint (secrets in clear; labs only)"
    p = vsub.add_parser("init", help="set Vault up for cke (VAULT_TOKEN)")
    p.add_argument("--endpoint", default="", help="Vault URL (default: $VAULT_ADDR)")
    p.add_argument("--cacert", default="", help="CA certificate file (default: $VAULT_CACERT)")
    p.add_argument("--allow-insecure-http", action="store_true", help=insecure)
    p.set_defaults(func=VAULTCMD + "cmd_vault_init")
    p = vsub.add_parser("config", help="store the AppRole login (JSON file or -)")
    p.add_argument("--allow-insecure-http", action="store_true", help=insecure)
    p.add_argument("file")
    p.set_defaults(func=VAULTCMD + "cmd_vault_config")
    p = vsub.add_parser("ssh-privkey", help="store an SSH private key for nodes")
    p.add_argument("--host", "-host", default="", help="node address (default: every node)")
    p.add_argument("file")
    p.set_defaults(func=VAULTCMD + "cmd_vault_ssh_privkey")
    p = vsub.add_parser(
        "enckey", help="new Kubernetes encryption key; the current one is kept, older dropped"
    )
    p.set_defaults(func=VAULTCMD + "cmd_vault_enckey")

    ca = sub.add_parser("ca", help="CA certificates stored in etcd")
    casub = ca.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    p = casub.add_parser("get")
    p.add_argument("name")
    p.set_defaults(func=VAULTCMD + "cmd_ca_get")
    p = casub.add_parser("set")
    p.add_argument("name")
    p.add_argument("file")
    p.set_defaults(func=VAULTCMD + "cmd_ca_set")
    p = casub.add_parser("rotate", help="replace a CA with a new one, with no downtime")
    p.add_argument("name")
    p.set_defaults(func=VAULTCMD + "cmd_ca_rotate")
    p = casub.add_parser("rotations", help="CA rotations in progress and what they wait for")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(func=VAULTCMD + "cmd_ca_rotations")

    etcd = sub.add_parser("etcd", help="the etcd cluster cke manages")
    esub = etcd.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    p = esub.add_parser("root-issue", help="a client certificate for root, valid 2h")
    p.add_argument("--output", "-output", choices=("json", "file"), default="json")
    p.set_defaults(func=VAULTCMD + "cmd_etcd_root_issue")
    p = esub.add_parser("user-add", help="an etcd user (and role) limited to PREFIX")
    p.add_argument("user")
    p.add_argument("prefix")
    p.set_defaults(func=VAULTCMD + "cmd_etcd_user_add")
    p = esub.add_parser("issue", help="a client certificate for USER")
    p.add_argument("--ttl", "-ttl", default=USER_CLIENT_TTL, help=f"at most {USER_CLIENT_TTL}")
    p.add_argument("--output", "-output", choices=("json", "file"), default="json")
    p.add_argument("user")
    p.set_defaults(func=VAULTCMD + "cmd_etcd_issue")
    _add_backup_parser(esub)
    from cke.cli.restorecmd import add_restore_parser  # here: restorecmd imports this module

    add_restore_parser(esub)

    p = sub.add_parser("leader", help="print the current leader")
    reader(p)
    p.set_defaults(func=cmd_leader)
    p = sub.add_parser("history", help="operation records, newest first")
    p.add_argument(
        "-n", "--count", dest="n", type=int, default=0, help="at most N records (0: all)"
    )
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new records (until Ctrl-C)"
    )
    reader(p)
    p.set_defaults(func=cmd_history)
    p = sub.add_parser(
        "status", help="leader, phase, last operation and what is blocked (exit 4: no status)"
    )
    reader(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "plan", help="the operation the leader would run next, and what is held back"
    )
    p.add_argument("-o", "--output", choices=("json",), default=None)
    p.set_defaults(func=cmd_plan)
    _add_sabakan_parser(sub, reader)
    from cke.cli.sshargs import add_ssh_parsers

    add_ssh_parsers(sub)
    from cke.cli.rebootcmd import add_reboot_parsers  # here: rebootcmd imports this module

    add_reboot_parsers(sub, _Parser)
    from cke.cli.repaircmd import add_repair_parsers  # here: repaircmd imports this module

    add_repair_parsers(sub, _Parser)
    from cke.cli.autorepaircmd import add_auto_repair_parsers  # here: it imports this module

    add_auto_repair_parsers(sub, _Parser)
    return parser


async def _run(args: argparse.Namespace) -> None:
    settings = load_etcd_settings(args.config)
    client = make_client(settings)
    await client.connect()
    try:
        await authenticate(client, settings)
        storage = Storage(client, settings.prefix, timeout=max(settings.timeout, 5.0))
        func: Command = args.func
        await func(storage, args)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func = resolve_command(args.func)
        asyncio.run(_run(args))
    except CLIError as exc:
        print(f"ckecli: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"ckecli: {exc}", file=sys.stderr)
        return 1
    except EtcdError as exc:
        print(f"ckecli: etcd: {error_line(exc)}", file=sys.stderr)
        return 1
    except (ClusterError, UnreadableValue) as exc:  # a stored value that cannot be used
        print(f"ckecli: stored configuration: {error_line(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback: one line that says what failed
        print(f"ckecli: unexpected error: {type(exc).__name__}: {error_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # The importable module's main: commands kept in other modules (sshcmd, backupcmd)
    # raise cke.cli.ckecli.CLIError, which ``python -m`` would otherwise load a second time
    # as a class main() does not catch.
    from cke.cli.ckecli import main as _main

    sys.exit(_main())
