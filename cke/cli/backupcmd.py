"""``ckecli etcd backup`` (alias ``local-backup``, upstream's name) and ``etcd backup list``.

The work is cke/backup.py's, shared with the leader's scheduled backups.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cke.backup import (
    DEFAULT_DIR,
    DEFAULT_ETCDUTL,
    DEFAULT_KEEP,
    BackupError,
    BackupInfo,
    list_backups,
)
from cke.cli.ckecli import VAULTCMD, CLIError
from cke.storage import Storage


def absolute(path: str) -> Path:
    return Path(os.path.abspath(path))  # relative to where ckecli runs


def _line(info: BackupInfo) -> str:
    revision = "?" if info.revision is None else str(info.revision)
    keys = "?" if info.total_keys is None else str(info.total_keys)
    return f"{info.time:<20}  {revision:>10}  {keys:>8}  {info.size:>12}  {info.name}"


async def cmd_etcd_backup_list(storage: Storage, args: argparse.Namespace) -> None:
    directory = absolute(args.list_dir or args.dir)
    try:
        infos = await list_backups(directory, args.list_etcdutl or args.etcdutl)
    except BackupError as exc:
        raise CLIError(str(exc)) from None
    if args.output == "json":
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    print(f"{'TIME':<20}  {'REVISION':>10}  {'KEYS':>8}  {'SIZE':>12}  NAME")
    for info in infos:
        print(_line(info))


def add_backup_parsers(esub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
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
    p.set_defaults(func=VAULTCMD + "cmd_etcd_backup", backup_command=None)
    bsub = p.add_subparsers(dest="backup_command", parser_class=parser_class)
    lp = bsub.add_parser("list", help="the backups in --dir: time, revision, keys, size")
    lp.add_argument("--dir", dest="list_dir", default=None, help=f"default {DEFAULT_DIR}")
    lp.add_argument("--etcdutl", dest="list_etcdutl", default=None, help=argparse.SUPPRESS)
    lp.add_argument("-o", "--output", choices=("json",), default=None)
