"""``ckecli etcd backup`` (alias ``local-backup``, upstream's name) and ``etcd backup list``.

The work is cke/backup.py's, shared with the leader's scheduled backups.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cke.backup import BackupError, BackupInfo, BackupSettings, list_backups, take_backup
from cke.cli.ckecli import CLIError
from cke.cli.vaultcmd import managed_etcd
from cke.storage import Storage


def _absolute(path: str) -> Path:
    return Path(os.path.abspath(path))  # relative to where ckecli runs


def _line(info: BackupInfo) -> str:
    revision = "?" if info.revision is None else str(info.revision)
    keys = "?" if info.total_keys is None else str(info.total_keys)
    return f"{info.time:<20}  {revision:>10}  {keys:>8}  {info.size:>12}  {info.name}"


async def cmd_etcd_backup_list(storage: Storage, args: argparse.Namespace) -> None:
    directory = _absolute(args.list_dir or args.dir)
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


async def cmd_etcd_backup(storage: Storage, args: argparse.Namespace) -> None:
    if args.backup_command == "list":
        await cmd_etcd_backup_list(storage, args)
        return
    if args.keep < 1:
        raise CLIError(f"--max-backups: must be at least 1, got {args.keep}")
    directory = _absolute(args.dir)
    copy = _absolute(args.copy_dir) if args.copy_dir else None
    if copy == directory:
        raise CLIError("--copy-dir: must differ from --dir")
    settings = BackupSettings(directory, args.keep, copy, args.etcdutl)
    addresses, credentials = await managed_etcd(storage)
    try:
        result = await take_backup(settings, credentials, addresses)
    except BackupError as exc:
        raise CLIError(f"etcd backup: {exc}") from None
    info = result.info
    for skipped in result.skipped:
        print(f"etcd member {skipped}; took the backup from another member")
    print(
        f"created backup {info.name} in {directory} (revision {info.revision}, "
        f"{info.total_keys} keys, {info.size} bytes, from {info.member}, {info.seconds}s)"
    )
    for name in result.removed:
        print(f"removed {name}")
    if result.copy is not None:
        print(f"copied {info.name} to {copy}")
        for name in result.copy_removed:
            print(f"removed {name} from {copy}")
    if result.copy_error:
        raise CLIError(f"the backup is good, but its copy failed: {result.copy_error}")
