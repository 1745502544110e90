"""``ckecli auto-repair`` (as CKE): sabakan-triggered repair.

``enable`` / ``disable`` / ``is-enabled`` the ``auto-repair/disabled`` flag (on unless
``true``, as upstream; it also needs ``ckecli sabakan set-url`` and the constraint
``maximum-repair-queue-entries`` above 0 before anything is queued);
``set-variables FILE`` stores which machines to ask sabakan for (JSON, checked as
``ckecli sabakan set-variables`` checks); ``get-variables`` prints them (the default
when none are set). The leader's side is :mod:`cke.sabakan.autorepair`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from cke.cli.ckecli import store_variables
from cke.sabakan.settings import (
    DEFAULT_AUTO_REPAIR_VARIABLES,
    parse_auto_repair_variables,
)
from cke.storage import (
    KEY_AUTO_REPAIR_QUERY_VARIABLES,
    Storage,
    stored_text,
)


async def cmd_enable(storage: Storage, args: argparse.Namespace) -> None:
    await storage.set_auto_repair_disabled(False)


async def cmd_disable(storage: Storage, args: argparse.Namespace) -> None:
    await storage.set_auto_repair_disabled(True)


async def cmd_is_enabled(storage: Storage, args: argparse.Namespace) -> None:
    print("true" if await storage.auto_repair_enabled() else "false")


async def cmd_set_variables(storage: Storage, args: argparse.Namespace) -> None:
    await store_variables(
        storage, args.file, KEY_AUTO_REPAIR_QUERY_VARIABLES, parse_auto_repair_variables
    )


async def cmd_get_variables(storage: Storage, args: argparse.Namespace) -> None:
    got = await storage.get(KEY_AUTO_REPAIR_QUERY_VARIABLES)
    text = stored_text(got.value, "variables")
    if text is None:
        text = json.dumps(DEFAULT_AUTO_REPAIR_VARIABLES)
    print(text)


def add_auto_repair_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``auto-repair`` and its subcommands."""
    auto = sub.add_parser("auto-repair", help="queue repairs for machines sabakan reports")
    asub = auto.add_subparsers(dest="subcommand", required=True, parser_class=parser_class)
    for name, func, text in (
        ("enable", cmd_enable, "queue repairs from sabakan's failure reports"),
        ("disable", cmd_disable, "stop queueing them (the queue itself keeps running)"),
        ("is-enabled", cmd_is_enabled, "print true or false"),
        ("get-variables", cmd_get_variables, "print the query variables (JSON)"),
    ):
        p = asub.add_parser(name, help=text)
        p.set_defaults(func=func)
    p = asub.add_parser("set-variables", help="which machines to ask for (JSON file or -)")
    p.add_argument("file")
    p.set_defaults(func=cmd_set_variables)
