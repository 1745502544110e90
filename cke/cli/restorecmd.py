"""``ckecli etcd restore SNAPSHOT --yes`` and ``ckecli etcd restore --cancel``.

ckecli checks the snapshot (``etcdutl snapshot status``), makes sure the leader reported
the quorum lost for good, and stores the request; the leader carries it out
(cke/op/restore.py) and deletes it. Runbook: README, "Restore after quorum loss".
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path
from typing import Any

from cke.backup import DEFAULT_ETCDUTL, BackupError, snapshot_status
from cke.cli.ckecli import CLIError
from cke.restore import RestoreRequest, sha256_of
from cke.server.safety import RULE_ETCD_QUORUM_LOST
from cke.storage import Storage


def _token(now: dt.datetime) -> str:
    """A new --initial-cluster-token: the restored cluster must not meet the old one."""
    return "cke-restore-" + now.strftime("%Y%m%dT%H%M%SZ")


def _readable_file(given: str) -> Path:
    path = Path(os.path.abspath(given))  # the leader reads the same absolute path
    if not path.is_file() or not os.access(path, os.R_OK):
        raise CLIError(f"SNAPSHOT: {path}: not a readable file")
    return path


async def cmd_etcd_restore(storage: Storage, args: argparse.Namespace) -> None:
    if args.cancel:
        if args.snapshot is not None:
            raise CLIError("--cancel: takes no SNAPSHOT")
        if not await storage.cancel_restore():
            raise CLIError("no restore is requested")
        print("restore request cancelled")
        return
    if args.snapshot is None:
        raise CLIError("SNAPSHOT: required (or --cancel)")
    path = _readable_file(args.snapshot)
    try:
        snap = await snapshot_status(args.etcdutl, path)
    except BackupError as exc:
        raise CLIError(f"SNAPSHOT: {path}: {exc}") from None
    digest, size = await sha256_of(path)

    status = await storage.get_status()
    rules = {str(b.get("rule")) for b in status.blocked} if status is not None else set()
    if RULE_ETCD_QUORUM_LOST not in rules:
        phase = status.phase if status is not None else "no status yet"
        raise CLIError(
            f"etcd has not lost its quorum (phase {phase}): restoring would lose every write "
            "since the snapshot; refusing"
        )
    what = (
        f"{path} (revision {snap.revision}, {snap.total_keys} keys, {size} bytes, "
        f"sha256 {digest[:12]}...)"
    )
    if not args.yes:
        raise CLIError(
            f"this replaces the etcd data on every control plane with {what}; "
            "run again with --yes to confirm"
        )
    now = dt.datetime.now(dt.UTC)
    request = RestoreRequest(
        snapshot=str(path),
        sha256=digest,
        revision=snap.revision,
        token=_token(now),
        requested=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    if not await storage.request_restore(request.model_dump_json()):
        raise CLIError("a restore is requested already ('ckecli etcd restore --cancel' first)")
    print(
        f"restore requested from {what}; the leader reads the snapshot at the same path on "
        "its admin host. Follow it with 'ckecli history -f' and 'ckecli status'."
    )


def add_restore_parser(esub: Any) -> None:
    p = esub.add_parser(
        "restore",
        help="after a quorum loss: rebuild etcd from SNAPSHOT (--yes), or --cancel",
    )
    p.add_argument("snapshot", nargs="?", default=None, metavar="SNAPSHOT")
    p.add_argument("--yes", action="store_true", help="confirm: replace every member's data")
    p.add_argument("--cancel", action="store_true", help="remove a restore request")
    p.add_argument(
        "--etcdutl", default=DEFAULT_ETCDUTL, help="etcdutl that verifies (path or name on PATH)"
    )
    p.set_defaults(func=cmd_etcd_restore)
