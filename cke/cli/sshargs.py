"""The command lines of ``ckecli ssh`` and ``ckecli scp``: parsed here, before anything
heavy loads; the commands themselves are in :mod:`cke.cli.sshcmd` (named, not imported,
so that other commands start without SSH and Vault's clients)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def split_user(spec: str) -> tuple[str | None, str]:
    """``user@NODE`` -> (user, NODE); ``NODE`` -> (None, NODE)."""
    user, at, node = spec.rpartition("@")
    if not at:
        return None, spec
    return user, node


def colon(arg: str) -> int | None:
    """Where OpenSSH's scp splits ``[user@]host:path``; None for a local path."""
    if arg.startswith(":"):
        return None
    bracket = arg.startswith("[")
    for i, ch in enumerate(arg):
        if ch == "@" and arg[i + 1 : i + 2] == "[":
            bracket = True
        if ch == "]" and arg[i + 1 : i + 2] == ":" and bracket:
            return i + 1
        if ch == ":" and not bracket:
            return i
        if ch == "/":
            return None
    return None


class _ScpPaths(argparse.Action):
    """SRC... DST: at least two, one of them ``[user@]NODE:PATH`` (bad usage otherwise)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        paths = [str(v) for v in values or []]
        if len(paths) < 2:
            parser.error("scp: want at least one SRC and a DST")
        remote: list[tuple[int, str | None, str, str]] = []
        for i, arg in enumerate(paths):
            at = colon(arg)
            if at is not None:
                user, name = split_user(arg[:at])
                if not name:
                    parser.error(f"scp: {arg}: no NODE before ':'")
                remote.append((i, user, name, arg[at + 1 :]))
        if not remote:
            parser.error("scp: no [user@]NODE:PATH argument; one side must be a node")
        setattr(namespace, self.dest, paths)
        namespace.remote = remote


def add_ssh_parsers(sub: Any) -> None:
    """``ssh`` and ``scp`` under ckecli's subcommands."""
    p = sub.add_parser(
        "ssh",
        help="ssh to a node (by address or hostname) with cke's key and pinned host key",
    )
    p.add_argument("node", metavar="[user@]NODE")
    p.add_argument("remote_command", metavar="[COMMAND ...]", nargs=argparse.REMAINDER)
    p.set_defaults(func="cke.cli.sshcmd:cmd_ssh")
    p = sub.add_parser(
        "scp",
        help="copy files to or from one node with cke's key and pinned host key",
    )
    p.add_argument("-r", dest="recursive", action="store_true", help="copy directories")
    p.add_argument("paths", metavar="[[user@]NODE:]PATH", nargs="+", action=_ScpPaths)
    p.set_defaults(func="cke.cli.sshcmd:cmd_scp")
