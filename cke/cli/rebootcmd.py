"""``ckecli reboot-queue`` (alias ``rq``, as CKE): the queue of nodes the leader reboots.

``add FILE|-`` queues the nodes named in FILE (addresses, as CKE, or hostnames of the
stored cluster; whitespace-separated), one entry each, atomically; ``list`` prints the
entries (CKE's JSON, or ``-o simple``); ``cancel INDEX`` / ``cancel-all`` mark entries
``cancelled`` (the leader removes them); ``enable`` / ``disable`` / ``is-enabled`` the
``reboots/disabled`` flag; ``reset-backoff`` clears the backoff of every entry.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

from cke.cli.ckecli import CLIError, _read_input
from cke.cluster import cluster_from_json
from cke.rebootqueue import STATUS_CANCELLED, EntryError, parse_node_list
from cke.storage import KEY_CLUSTER, Storage, stored_text


async def cmd_add(storage: Storage, args: argparse.Namespace) -> None:
    text = await _read_input(args.file)
    stored = stored_text((await storage.get(KEY_CLUSTER)).value, "cluster")
    cluster = cluster_from_json(stored) if stored else None
    try:
        addresses = parse_node_list(text, cluster)
    except EntryError as exc:
        raise CLIError(f"{args.file}: {exc}") from None
    await storage.add_reboot_entries(addresses)


def _time(value: object) -> str:
    return str(value) if value else "-"


async def cmd_list(storage: Storage, args: argparse.Namespace) -> None:
    entries = [e for e, _ in await storage.get_reboot_entries()]
    if args.output == "json":
        print(json.dumps([e.to_dict() for e in entries], indent=4))
        return
    rows = [["INDEX", "NODE", "STATUS", "LAST-TRANSITION", "BACKOFF-COUNT", "BACKOFF-EXPIRE"]]
    for e in entries:
        d = e.to_dict()
        rows.append(
            [
                str(e.index),
                e.node,
                e.status,
                _time(d.get("last_transition_time")),
                str(e.drain_backoff_count),
                _time(d.get("drain_backoff_expire")),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _index(text: str) -> int:
    if not text.isdecimal() or len(text) > 18:
        raise CLIError(f"INDEX: not an entry index (a decimal number): {text!r}")
    return int(text)


async def cmd_cancel(storage: Storage, args: argparse.Namespace) -> None:
    index = _index(args.index)
    entry, revision = await storage.get_reboot_entry(index)
    if entry is None:
        raise CLIError(f"INDEX: no reboot queue entry {index}")
    if entry.status == STATUS_CANCELLED:
        return
    cancelled = replace(entry, status=STATUS_CANCELLED)
    if not await storage.update_reboot_entry(cancelled, revision):
        raise CLIError(f"INDEX: entry {index} changed meanwhile (done?); run 'list' again")


async def cmd_cancel_all(storage: Storage, args: argparse.Namespace) -> None:
    for entry, revision in await storage.get_reboot_entries():
        if entry.status == STATUS_CANCELLED:
            continue
        cancelled = replace(entry, status=STATUS_CANCELLED)
        # False: the entry just finished (removed) or changed; CKE skips it too.
        await storage.update_reboot_entry(cancelled, revision)


async def cmd_reset_backoff(storage: Storage, args: argparse.Namespace) -> None:
    for entry, revision in await storage.get_reboot_entries():
        if entry.drain_backoff_count or entry.drain_backoff_expire is not None:
            await storage.update_reboot_entry(entry.reset_backoff(), revision)


async def cmd_enable(storage: Storage, args: argparse.Namespace) -> None:
    await storage.set_reboot_queue_disabled(False)


async def cmd_disable(storage: Storage, args: argparse.Namespace) -> None:
    await storage.set_reboot_queue_disabled(True)


async def cmd_is_enabled(storage: Storage, args: argparse.Namespace) -> None:
    print("true" if await storage.reboot_queue_enabled() else "false")


def add_reboot_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``reboot-queue`` (alias ``rq``) and its subcommands."""
    rq = sub.add_parser("reboot-queue", aliases=["rq"], help="the queue of nodes to reboot")
    rsub = rq.add_subparsers(dest="subcommand", required=True, parser_class=parser_class)
    p = rsub.add_parser("add", help="queue the nodes (addresses or hostnames) in FILE or -")
    p.add_argument("file")
    p.set_defaults(func=cmd_add)
    p = rsub.add_parser("list", help="the entries (JSON unless -o simple)")
    p.add_argument("-o", "--output", choices=("json", "simple"), default="json")
    p.set_defaults(func=cmd_list)
    p = rsub.add_parser("cancel", help="cancel the entry INDEX")
    p.add_argument("index")
    p.set_defaults(func=cmd_cancel)
    for name, func, text in (
        ("cancel-all", cmd_cancel_all, "cancel every entry"),
        ("enable", cmd_enable, "process the queue"),
        ("disable", cmd_disable, "stop processing the queue (entries are kept)"),
        ("is-enabled", cmd_is_enabled, "print true or false"),
        ("reset-backoff", cmd_reset_backoff, "retry backed-off entries at once"),
    ):
        p = rsub.add_parser(name, help=text)
        p.set_defaults(func=func)
