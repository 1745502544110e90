"""``sabactl``: the command-line client of sabakan's REST API.

The server address and credentials come from flags or a YAML ``--config-file``
(keys ``server``, ``tls-ca``, ``tls-cert``, ``tls-key``); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp

from cke import __version__
from cke.common.yamlfile import YAMLFileError, load_yaml

DEFAULT_SERVER = "http://localhost:10080"
# As upstream's (cobra's) version line.
VERSION_LINE = f"sabactl version {__version__}"
FILTERS = ("serial", "rack", "role", "labels", "ipv4", "ipv6", "bmc-type", "state")


class CLIError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sabactl", description="sabakan client")
    p.add_argument("--server", help=f"sabakan URL (default {DEFAULT_SERVER})")
    p.add_argument("--config-file", help="YAML with server, tls-ca, tls-cert, tls-key")
    p.add_argument("--tls-ca", help="CA certificate to verify an https server")
    p.add_argument("--tls-cert", help="client certificate (mutations over https)")
    p.add_argument("--tls-key", help="client certificate key")
    p.add_argument("--version", action="version", version=VERSION_LINE)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print sabactl's version (as --version)")
    machines = sub.add_parser("machines", help="machine inventory")
    msub = machines.add_subparsers(dest="action", required=True)
    create = msub.add_parser("create", help="register machines from a JSON file")
    create.add_argument("-f", "--file", required=True, help="JSON array of machine specs")
    get = msub.add_parser("get", help="list machines")
    for name in FILTERS:
        get.add_argument(f"--{name}", action="append")
        get.add_argument(f"--without-{name}", action="append")
    get.add_argument("-o", "--output", choices=["json", "table"], default="json")
    st = msub.add_parser("set-state", help="change a machine's state")
    st.add_argument("serial")
    st.add_argument("state")
    gs = msub.add_parser("get-state", help="print a machine's state")
    gs.add_argument("serial")
    rm = msub.add_parser("remove", help="delete a retired machine")
    rm.add_argument("serial")
    rd = msub.add_parser("set-retire-date", help="set the retire date (YYYY-MM-DD or RFC 3339)")
    rd.add_argument("serial")
    rd.add_argument("date")
    cd = msub.add_parser("clear-retire-date", help="remove the retire date")
    cd.add_argument("serial")
    sl = msub.add_parser("set-label", help="add or update a label")
    sl.add_argument("serial")
    sl.add_argument("label")
    sl.add_argument("value")
    rl = msub.add_parser("remove-label", help="remove a label")
    rl.add_argument("serial")
    rl.add_argument("label")
    logs = sub.add_parser("logs", help="print the audit log (JSON lines)")
    logs.add_argument("since", nargs="?", help="YYYYMMDD or RFC 3339")
    logs.add_argument("until", nargs="?", help="YYYYMMDD or RFC 3339 (exclusive)")
    return p


def _settings(args: argparse.Namespace) -> dict[str, str]:
    conf: dict[str, Any] = {}
    if args.config_file:
        try:
            conf = load_yaml(args.config_file) or {}
        except YAMLFileError as exc:
            raise CLIError(str(exc)) from None
        if not isinstance(conf, dict):
            raise CLIError(f"{args.config_file}: want a mapping")
        unknown = set(conf) - {"server", "tls-ca", "tls-cert", "tls-key"}
        if unknown:
            raise CLIError(f"{args.config_file}: unknown keys {sorted(unknown)}")
    out = {k: str(v) for k, v in conf.items()}
    for key in ("server", "tls-ca", "tls-cert", "tls-key"):
        value = getattr(args, key.replace("-", "_"))
        if value:
            out[key] = value
    out.setdefault("server", DEFAULT_SERVER)
    return out


def _retire_date(text: str) -> str:
    try:
        if len(text) == 10:
            return dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC).isoformat()
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CLIError(f"date: want YYYY-MM-DD or RFC 3339, got {text!r}") from exc
    if parsed.tzinfo is None:
        raise CLIError("date: an RFC 3339 date-time needs a time zone")
    return parsed.isoformat()


def _table(machines: list[dict[str, Any]]) -> str:
    header = ["SERIAL", "RACK", "INDEX", "ROLE", "IPV4", "STATE", "LABELS"]
    rows = [header]
    for m in machines:
        spec = m["spec"]
        labels = ",".join(f"{k}={v}" for k, v in sorted(spec["labels"].items()))
        rows.append(
            [
                spec["serial"],
                str(spec["rack"]),
                str(spec["index-in-rack"]),
                spec["role"],
                ",".join(spec["ipv4"]),
                m["status"]["state"],
                labels,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


async def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    server = settings["server"].rstrip("/")
    ctx: ssl.SSLContext | None = None
    if server.startswith("https://"):
        ctx = ssl.create_default_context(cafile=settings.get("tls-ca"))
        if settings.get("tls-cert"):
            ctx.load_cert_chain(settings["tls-cert"], settings.get("tls-key"))
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    headers = {"X-Sabakan-User": user}
    connector = aiohttp.TCPConnector(ssl=ctx) if ctx else aiohttp.TCPConnector()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:

        async def call(
            method: str, path: str, *, data: bytes | str | None = None, params: Any = None
        ) -> str:
            async with session.request(method, f"{server}{path}", data=data, params=params) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    try:
                        message = json.loads(text)["error"]
                    except (ValueError, KeyError, TypeError):
                        message = text.strip() or resp.reason
                    raise CLIError(f"{resp.status}: {message}")
                return text

        if args.command == "logs":
            params = {k: getattr(args, k) for k in ("since", "until") if getattr(args, k)}
            sys.stdout.write(await call("GET", "/api/v1/logs", params=params))
            return 0
        action = args.action
        if action == "create":
            try:
                body = await asyncio.to_thread(Path(args.file).read_bytes)
            except OSError as exc:
                raise CLIError(f"{args.file}: {exc.strerror}") from exc
            await call("POST", "/api/v1/machines", data=body)
        elif action == "get":
            query: list[tuple[str, str]] = []
            for name in FILTERS:
                for prefix in ("", "without-"):
                    for value in getattr(args, (prefix + name).replace("-", "_")) or []:
                        query.append((prefix + name, value))
            machines = json.loads(await call("GET", "/api/v1/machines", params=query))
            if args.output == "table":
                print(_table(machines))
            else:
                print(json.dumps(machines, indent=2))
        elif action == "set-state":
            await call("PUT", f"/api/v1/state/{args.serial}", data=args.state)
        elif action == "get-state":
            print(await call("GET", f"/api/v1/state/{args.serial}"))
        elif action == "remove":
            await call("DELETE", f"/api/v1/machines/{args.serial}")
        elif action == "set-retire-date":
            # Upstream's form: the RFC 3339 date-time as the raw body.
            date = _retire_date(args.date)
            await call("PUT", f"/api/v1/retire-date/{args.serial}", data=date)
        elif action == "clear-retire-date":
            await call("DELETE", f"/api/v1/retire-date/{args.serial}")
        elif action == "set-label":
            # Upstream's form: one label in the path, its value the raw body.
            path = f"/api/v1/labels/{args.serial}/{args.label}"
            await call("PUT", path, data=args.value.encode())
        elif action == "remove-label":
            await call("DELETE", f"/api/v1/labels/{args.serial}/{args.label}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "version":  # upstream's docs/sabactl.md; needs no server
        print(VERSION_LINE)
        return 0
    try:
        return asyncio.run(_run(args))
    except CLIError as exc:
        print(f"sabactl: {exc}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, ssl.SSLError, OSError, TimeoutError) as exc:
        print(f"sabactl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
