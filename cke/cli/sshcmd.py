"""``ckecli ssh`` and ``ckecli scp``: OpenSSH to a node of the stored cluster.

The node is named by its address or its hostname, optionally as ``user@NODE``. The
private key is cke's own (Vault, ``cke/secrets/ssh``: the node's address, else the
default key). The host key is the one cke trusts: the node's ``host_key`` in the
cluster, else the key cke pinned at first contact (``hostkeys/<address>``); without
one, nothing is sent (no trust on first use here). ckecli first reads the key the node
presents and refuses with one line if it is not the pinned one; OpenSSH then checks it
again (``StrictHostKeyChecking=yes`` against a known_hosts that holds only that key).

The private key lives, while OpenSSH runs, in a 0600 file inside a 0700 directory
made for this run (``$TMPDIR``), removed when OpenSSH exits or ckecli is stopped by
SIGTERM, SIGINT or SIGHUP (which are passed on to OpenSSH).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from cke.cli.ckecli import CLIError, _stored_cluster_text
from cke.cli.sshargs import split_user
from cke.cli.vaultcmd import vault_from_etcd
from cke.cluster import Node, cluster_from_json
from cke.common.logs import error_line
from cke.nodes.ssh import NodeAddress, SSHError, fetch_host_key, host_key_fingerprint
from cke.pki import SECRETS_MOUNT
from cke.storage import KEY_HOSTKEYS_PREFIX, Storage, stored_text
from cke.vault import VaultError

CONNECT_TIMEOUT = 60  # seconds, as upstream's ckecli
PROBE_TIMEOUT = 10.0
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Target:
    node: Node
    host_key: str  # ``type base64``, the key OpenSSH must see


def find_node(nodes: Sequence[Node], name: str) -> Node:
    """The node whose address or hostname is ``name`` (brackets around IPv6 allowed)."""
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    by_address = [n for n in nodes if n.address == bare]
    if by_address:
        return by_address[0]
    by_name = [n for n in nodes if n.hostname and n.hostname == bare]
    if len(by_name) > 1:
        raise CLIError(f"NODE {name}: several nodes have this hostname; give the address")
    if not by_name:
        raise CLIError(f"NODE {name}: no node of the stored cluster has this address or hostname")
    return by_name[0]


def _key_fields(key: str) -> tuple[str, str]:
    fields = key.split()
    if len(fields) < 2:
        raise CLIError("the pinned host key is not an OpenSSH public key line")
    return fields[0], fields[1]


async def resolve(storage: Storage, name: str) -> Target:
    """The cluster's node called ``name`` and the host key cke trusts for it."""
    cluster = cluster_from_json(_stored_cluster_text((await storage.get_cluster()).value))
    node = find_node(cluster.nodes, name)
    key = node.host_key
    where = "host_key in the cluster"
    if not key:
        pinned = await storage.get(KEY_HOSTKEYS_PREFIX + node.address)
        key = stored_text(pinned.value, KEY_HOSTKEYS_PREFIX + node.address)
        where = f"{KEY_HOSTKEYS_PREFIX}{node.address}"
    if not key:
        raise CLIError(
            f"NODE {name}: no host key is known for {node.address} (cke pins it at first "
            "contact, or set host_key in the cluster); refusing to trust an unknown key"
        )
    try:
        asyncssh.import_public_key(key)
    except (asyncssh.KeyImportError, ValueError):
        raise CLIError(f"NODE {name}: {where} is not an OpenSSH public key") from None
    kind, blob = _key_fields(key)
    return Target(node, f"{kind} {blob}")


async def private_key(storage: Storage, address: str) -> str:
    """cke's SSH key for ``address`` from Vault, in OpenSSH's own format."""
    vault = await vault_from_etcd(storage)
    try:
        keys = await vault.read_kv(SECRETS_MOUNT, "ssh") or {}
    except VaultError as exc:
        raise CLIError(f"vault: reading {SECRETS_MOUNT}/ssh: {error_line(exc)}") from None
    finally:
        vault.close()
    text = keys.get(address) or keys.get("")
    if not isinstance(text, str) or not text:
        raise CLIError(f"no SSH private key for {address} in Vault ({SECRETS_MOUNT}/ssh)")
    try:
        key = asyncssh.import_private_key(text)
    except (asyncssh.KeyImportError, ValueError):
        raise CLIError(
            f"the SSH key in Vault for {address} is not an unencrypted private key"
        ) from None
    exported: bytes = key.export_private_key("openssh")
    return exported.decode()


async def verify_host_key(target: Target, name: str) -> None:
    """Refuse, in one line, a node that does not present the pinned host key."""
    node = target.node
    algorithms = [a.decode() for a in asyncssh.import_public_key(target.host_key).sig_algorithms]
    try:
        seen = await fetch_host_key(
            NodeAddress(node.address, node.port, node.user), PROBE_TIMEOUT, algorithms
        )
    except SSHError as exc:
        raise CLIError(
            f"NODE {name}: cannot check the host key of {node.address}:{node.port}: "
            f"{error_line(exc)}"
        ) from None
    if _key_fields(seen) != _key_fields(target.host_key):
        raise CLIError(
            f"NODE {name}: host key changed: {node.address}:{node.port} presents "
            f"{host_key_fingerprint(seen)}, pinned is {host_key_fingerprint(target.host_key)}; "
            "refusing to connect"
        )


def known_hosts_line(node: Node, host_key: str) -> str:
    host = node.address if node.port == 22 else f"[{node.address}]:{node.port}"
    return f"{host} {host_key}\n"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@contextmanager
def key_files(node: Node, host_key: str, private: str) -> Iterator[tuple[Path, Path]]:
    """(identity, known_hosts) in a fresh 0700 directory, removed on the way out."""
    directory = Path(tempfile.mkdtemp(prefix="ckecli-ssh-"))
    try:
        os.chmod(directory, 0o700)
        identity = directory / "id"
        known_hosts = directory / "known_hosts"
        _write_private(identity, private if private.endswith("\n") else private + "\n")
        _write_private(known_hosts, known_hosts_line(node, host_key))
        yield identity, known_hosts
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def openssh_options(node: Node, identity: Path, known_hosts: Path) -> list[str]:
    """Options that make OpenSSH use only this key and trust only the pinned host key.

    The user's ssh_config still applies to everything else (a ProxyJump, say); any
    setting of it that changes which host key is looked up makes the check fail.
    """
    settings = {
        "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "KnownHostsCommand": "none",
        "HashKnownHosts": "no",
        "UpdateHostKeys": "no",
        "CheckHostIP": "no",
        "VerifyHostKeyDNS": "no",
        "ControlMaster": "no",
        "ControlPath": "none",
        "IdentityFile": str(identity),
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "PreferredAuthentications": "publickey",
        "ConnectTimeout": str(CONNECT_TIMEOUT),
        "LogLevel": "ERROR",
        "Port": str(node.port),
    }
    options: list[str] = []
    for name, value in settings.items():
        options += ["-o", f"{name}={value}"]
    return options


async def run_openssh(
    program: str, target: Target, private: str, operands: Sequence[str], extra: Sequence[str] = ()
) -> int:
    """Run ``program`` (ssh or scp) with our terminal, the key files present while it runs.

    SIGINT, SIGTERM and SIGHUP are passed on to it (one that comes before it started
    stops the run), so the files are always removed. Its exit status (128+N: signal N).
    """
    loop = asyncio.get_running_loop()
    proc: asyncio.subprocess.Process | None = None
    pending: list[int] = []

    def on_signal(sig: int) -> None:
        if proc is not None and proc.returncode is None:
            proc.send_signal(sig)
        else:
            pending.append(sig)

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        with key_files(target.node, target.host_key, private) as (identity, known_hosts):
            options = openssh_options(target.node, identity, known_hosts)
            if not pending:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        program, *options, *extra, "--", *operands
                    )
                except OSError as exc:
                    raise CLIError(f"cannot run {program}: {exc.strerror or exc}") from None
            if pending:
                if proc is None:
                    return 128 + pending[0]
                proc.send_signal(pending[0])
            assert proc is not None
            status = await proc.wait()
    finally:
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
    return 128 - status if status < 0 else status


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


async def cmd_ssh(storage: Storage, args: argparse.Namespace) -> None:
    user, name = split_user(args.node)
    if not name:
        raise CLIError("NODE: empty")
    command: list[str] = list(args.remote_command)
    if command[:1] == ["--"]:
        command = command[1:]
    target = await resolve(storage, name)
    await verify_host_key(target, name)
    key = await private_key(storage, target.node.address)
    node = target.node
    status = await run_openssh(
        "ssh", target, key, [node.address, *command], ["-l", user or node.user]
    )
    if status:
        raise SystemExit(status)


async def cmd_scp(storage: Storage, args: argparse.Namespace) -> None:
    paths: list[str] = list(args.paths)
    remote: list[tuple[int, str | None, str, str]] = args.remote
    targets = {name: await resolve(storage, name) for _, _, name, _ in remote}
    addresses = {t.node.address for t in targets.values()}
    if len(addresses) > 1:
        raise CLIError("scp: copying between two nodes is not supported; copy through this host")
    target = next(iter(targets.values()))
    node = target.node
    await verify_host_key(target, remote[0][2])
    key = await private_key(storage, node.address)
    for i, user, _, path in remote:
        paths[i] = f"{user or node.user}@{_host(node.address)}:{path}"
    status = await run_openssh("scp", target, key, paths, ["-r"] if args.recursive else [])
    if status:
        raise SystemExit(status)
