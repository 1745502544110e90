"""``ckecli repair-queue`` (as CKE): the queue of machines the leader repairs.

``add OPERATION MACHINE_TYPE ADDRESS [SERIAL]`` queues one entry once the stored
cluster has a repair operation OPERATION for MACHINE_TYPE and ADDRESS is one of its
nodes (an address, or a hostname, stored as the address); ``list`` prints the entries
(CKE's JSON); ``delete INDEX`` / ``delete-finished`` / ``delete-unfinished`` mark
entries ``deleted`` (the leader removes them; the latter two print the indexes);
``enable`` / ``disable`` / ``is-enabled`` the ``repairs/disabled`` flag;
``reset-backoff`` clears the drain backoff of every entry; ``wait`` returns once no
entry is left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cke.cli.ckecli import CLIError
from cke.cluster import cluster_from_json
from cke.rebootqueue import EntryError
from cke.repairqueue import RepairEntry, find_operation, nodename_of
from cke.storage import KEY_CLUSTER, Storage, stored_text


async def cmd_add(storage: Storage, args: argparse.Namespace) -> None:
    stored = stored_text((await storage.get(KEY_CLUSTER)).value, "cluster")
    cluster = cluster_from_json(stored) if stored else None
    for name in ("operation", "machine_type", "address"):
        if not getattr(args, name):
            raise CLIError(f"{name.upper()}: empty")
    try:
        find_operation(cluster, args.machine_type, args.operation)
    except EntryError as exc:
        raise CLIError(str(exc)) from None
    assert cluster is not None  # find_operation refuses None
    address = args.address
    by_name = {n.hostname: n.address for n in cluster.nodes if n.hostname}
    if address not in {n.address for n in cluster.nodes}:
        if address not in by_name:
            raise CLIError(
                f"ADDRESS: {address} is not a node of the cluster (address or hostname); "
                "cke runs the repair commands on the node over SSH"
            )
        address = by_name[address]
    entry = RepairEntry(
        index=0,
        address=address,
        machine_type=args.machine_type,
        operation=args.operation,
        nodename=nodename_of(cluster, address),
        serial=args.serial or "",
    )
    await storage.add_repair_entry(entry)


async def cmd_list(storage: Storage, args: argparse.Namespace) -> None:
    entries = [e for e, _ in await storage.get_repair_entries()]
    print(json.dumps([e.to_dict() for e in entries], indent=4))


def _index(text: str) -> int:
    if not text.isdecimal() or len(text) > 18:
        raise CLIError(f"INDEX: not an entry index (a decimal number): {text!r}")
    return int(text)


async def cmd_delete(storage: Storage, args: argparse.Namespace) -> None:
    index = _index(args.index)
    entry, revision = await storage.get_repair_entry(index)
    if entry is None:
        raise CLIError(f"INDEX: no repair queue entry {index}")
    if entry.deleted:
        return
    if not await storage.update_repair_entry(replace(entry, deleted=True), revision):
        raise CLIError(f"INDEX: entry {index} changed meanwhile; run the command again")


async def _delete_where(storage: Storage, finished: bool) -> None:
    for entry, revision in await storage.get_repair_entries():
        if entry.deleted or entry.finished != finished:
            continue
        # False: the entry just changed or was removed; CKE skips it too.
        if await storage.update_repair_entry(replace(entry, deleted=True), revision):
            print(entry.index)


async def cmd_delete_finished(storage: Storage, args: argparse.Namespace) -> None:
    await _delete_where(storage, True)


async def cmd_delete_unfinished(storage: Storage, args: argparse.Namespace) -> None:
    await _delete_where(storage, False)


async def cmd_reset_backoff(storage: Storage, args: argparse.Namespace) -> None:
    for entry, revision in await storage.get_repair_entries():
        if entry.drain_backoff_count or entry.drain_backoff_expire is not None:
            await storage.update_repair_entry(entry.reset_backoff(), revision)


async def cmd_enable(storage: Storage, args: argparse.Namespace) -> None:
    await storage.set_repair_queue_disabled(False)


async def cmd_disable(storage: Storage, args: argparse.Namespace) -> None:
    await storage.set_repair_queue_disabled(True)


async def cmd_is_enabled(storage: Storage, args: argparse.Namespace) -> None:
    print("true" if await storage.repair_queue_enabled() else "false")


async def cmd_wait(storage: Storage, args: argparse.Namespace) -> None:
    """Until no entry is left (finished ones count, as upstream); 0 s: check once."""
    deadline = time.monotonic() + args.timeout_seconds
    while True:
        left = len(await storage.get_repair_entries())
        if not left:
            print("repair queue is empty")
            return
        if args.timeout_seconds == 0:
            raise CLIError("repair queue is not empty")
        print(f"repair queue entries: {left}", flush=True)
        if time.monotonic() + args.interval_seconds > deadline:
            raise CLIError(
                f"timed out waiting for repair queue to become empty after {args.timeout_seconds}s"
            )
        await asyncio.sleep(args.interval_seconds)


def _seconds(minimum: int) -> Callable[[str], int]:
    """A flag's whole number of seconds (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        if not text.strip().isdecimal() or not minimum <= int(text) <= 10**9:
            raise argparse.ArgumentTypeError(
                f"want a whole number of seconds, at least {minimum}, not {text!r}"
            )
        return int(text)

    return parse


def add_repair_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``repair-queue`` and its subcommands."""
    rq = sub.add_parser("repair-queue", help="the queue of machines to repair")
    rsub = rq.add_subparsers(dest="subcommand", required=True, parser_class=parser_class)
    p = rsub.add_parser("add", help="queue a repair of the machine at ADDRESS")
    p.add_argument("operation", metavar="OPERATION")
    p.add_argument("machine_type", metavar="MACHINE_TYPE")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("serial", metavar="SERIAL", nargs="?", default="")
    p.set_defaults(func=cmd_add)
    p = rsub.add_parser("wait", help="wait until the queue has no entries")
    p.add_argument(
        "--timeout-seconds",
        type=_seconds(0),
        default=30,
        help="seconds to wait (0: check once)",
    )
    p.add_argument(
        "--interval-seconds",
        type=_seconds(1),
        default=1,
        help="seconds between checks",
    )
    p.set_defaults(func=cmd_wait)
    p = rsub.add_parser("delete", help="delete the entry INDEX")
    p.add_argument("index", metavar="INDEX")
    p.set_defaults(func=cmd_delete)
    for name, func, text in (
        ("list", cmd_list, "the entries (CKE's JSON)"),
        ("delete-finished", cmd_delete_finished, "delete succeeded and failed entries"),
        ("delete-unfinished", cmd_delete_unfinished, "delete the other entries"),
        ("enable", cmd_enable, "process the queue"),
        ("disable", cmd_disable, "stop starting repair commands (entries are kept)"),
        ("is-enabled", cmd_is_enabled, "print true or false"),
        ("reset-backoff", cmd_reset_backoff, "clear the drain backoff of every entry"),
    ):
        p = rsub.add_parser(name, help=text)
        p.set_defaults(func=func)
