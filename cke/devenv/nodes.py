"""Test-bed nodes: each an OpenSSH server with private node directories.

A node is a mount namespace held open by a small holder process, in which the
paths a manager writes (``NODE_PRIVATE_PATHS``) are bind mounts of the node's own
directories. sshd runs inside that namespace, so every command that arrives over
SSH, and every process it starts, sees only that node's files. Everything else
(binaries, /usr, the venv) is shared with the host, as on identical machines.
"""

from __future__ import annotations

import asyncio
import os
import random
import shlex
import signal
import socket
from pathlib import Path

from cke.devenv.procs import (
    LEDGER,
    ManagedProcess,
    mount_namespace,
    pid_alive,
    pids_in_mount_namespace,
    wait_for_tcp,
)
from cke.nodes.ssh import CommandResult, NodeAddress, NodeConnection

# /root too: a node's login shell must not read the host's rc files (which may run
# tools such as pyenv, whose locks a crashed node would leave behind on the host).
NODE_PRIVATE_PATHS = ("/etc/cke", "/var/lib/cke", "/var/log/cke", "/opt/cke", "/root")
SSHD = "/usr/sbin/sshd"


def _mount_dir_name(path: str) -> str:
    return path.strip("/").replace("/", "-")


def address_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def pick_node_subnet(count: int, port: int = 22, preferred: str | None = None) -> str:
    """A loopback /24 prefix (``127.X.Y``) whose first ``count`` addresses are free on ``port``.

    The demo prefers ``127.0.1``; tests pick a random block so that several beds
    (a developer's and CI's, say) never meet.
    """
    candidates = [preferred] if preferred else []
    rng = random.Random()
    candidates += [f"127.{rng.randint(10, 250)}.{rng.randint(1, 250)}" for _ in range(50)]
    for prefix in candidates:
        if prefix and all(address_free(f"{prefix}.{i}", port) for i in range(1, count + 1)):
            return prefix
    raise RuntimeError(f"no free loopback block with {count} addresses on port {port}")


async def run_local(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {out.decode(errors='replace').strip()}")


class Node:
    """One test-bed node: ``address:port`` served by its own sshd."""

    def __init__(
        self, name: str, address: str, directory: Path, client_public_key: str, port: int = 22
    ) -> None:
        self.name = name
        self.address = address
        self.port = port
        self.directory = directory
        self.client_public_key = client_public_key
        self.host_key_path = directory / "ssh_host_ed25519_key"
        self.sshd_config = directory / "sshd_config"
        self.log_dir = directory / "log"
        self._holder: ManagedProcess | None = None
        self._sshd: ManagedProcess | None = None
        self.namespace: str | None = None

    # -- set-up ---------------------------------------------------------------------------

    def private_dir(self, node_path: str) -> Path:
        """The host directory that backs ``node_path`` on this node."""
        return self.directory / "root" / _mount_dir_name(node_path)

    @property
    def host_public_key(self) -> str:
        """The node's host key in OpenSSH one-line form, for pinning."""
        return Path(f"{self.host_key_path}.pub").read_text().strip()

    async def prepare(self) -> None:
        """Create the node's directories, host key and sshd configuration (once)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        for path in NODE_PRIVATE_PATHS:
            self.private_dir(path).mkdir(parents=True, exist_ok=True)
            # The mount point must exist on the host; it stays empty there.
            Path(path).mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        if not self.host_key_path.exists():
            await run_local(
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"{self.name}-host",
                "-f",
                str(self.host_key_path),
            )
        authorized = self.directory / "authorized_keys"
        authorized.write_text(self.client_public_key.strip() + "\n")
        authorized.chmod(0o600)
        self.sshd_config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.address}:{self.port}",
                    f"HostKey {self.host_key_path}",
                    f"PidFile {self.directory / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "MaxSessions 64",
                    "MaxStartups 100:30:200",
                    "LogLevel INFO",
                    "",
                ]
            )
        )

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the namespace (if not running) and sshd; wait until sshd listens."""
        await self.prepare()
        if self._holder is None or not self._holder.running:
            await self._start_holder()
        await self.start_sshd()

    async def _start_holder(self) -> None:
        mounts = " && ".join(
            f"mount --bind {shlex.quote(str(self.private_dir(p)))} {shlex.quote(p)}"
            for p in NODE_PRIVATE_PATHS
        )
        self._holder = ManagedProcess(
            f"{self.name}/namespace",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                f"{mounts} && exec sleep infinity",
            ],
            self.log_dir / "namespace.log",
        )
        await self._holder.start()
        assert self._holder.pid is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        own = mount_namespace(os.getpid())
        while True:
            ns = mount_namespace(self._holder.pid)
            comm = (
                Path(f"/proc/{self._holder.pid}/comm").read_text().strip()
                if pid_alive(self._holder.pid)
                else ""
            )
            if ns and ns != own and comm == "sleep":
                self.namespace = ns
                LEDGER.record_namespace(ns, self.name)
                return
            if not self._holder.running or loop.time() > deadline:
                raise RuntimeError(
                    f"{self.name}: node namespace did not come up: {self._holder.log_tail()}"
                )
            await asyncio.sleep(0.02)

    async def start_sshd(self) -> None:
        if self._holder is None or not self._holder.running or self._holder.pid is None:
            raise RuntimeError(f"{self.name} is down; start() it first")
        if self._sshd is None or not self._sshd.running:
            self._sshd = ManagedProcess(
                f"{self.name}/sshd",
                [
                    "nsenter",
                    f"--target={self._holder.pid}",
                    "--mount",
                    "--",
                    SSHD,
                    "-D",
                    "-e",
                    "-f",
                    str(self.sshd_config),
                ],
                self.log_dir / "sshd.log",
            )
            await self._sshd.start()
        await wait_for_tcp(self.address, self.port, 15, f"{self.name} sshd")

    async def stop_sshd(self) -> None:
        """Stop sshd and cut its open sessions; services on the node keep running.

        Open connections are cut too, so that the node is unreachable over SSH as
        after a network cut, not merely closed to new logins.
        """
        if self._sshd is not None:
            await self._sshd.stop()
        for pid in self.processes():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "sshd" or comm.startswith("sshd-"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @property
    def sshd_running(self) -> bool:
        return self._sshd is not None and self._sshd.running

    @property
    def up(self) -> bool:
        return self._holder is not None and self._holder.running

    def processes(self) -> list[int]:
        """PIDs of every process running in this node."""
        return pids_in_mount_namespace(self.namespace) if self.namespace else []

    async def crash(self) -> None:
        """Kill every process of the node at once, as a power loss would. Files stay."""
        if self.namespace:
            for _ in range(20):
                pids = self.processes()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                await asyncio.sleep(0.05)
        for proc in (self._sshd, self._holder):
            if proc is not None:
                await proc.kill()

    async def restart(self) -> None:
        """Crash the node and boot it again with its files intact."""
        await self.crash()
        await self.start()

    async def stop(self) -> None:
        """Shut the node down for good (teardown): stop sshd, then kill what is left."""
        await self.stop_sshd()
        await self.crash()

    # -- access ---------------------------------------------------------------------------

    @property
    def ssh_target(self) -> NodeAddress:
        return NodeAddress(self.address, self.port, "root")

    def connect(self, private_key: str) -> NodeConnection:
        """An SSH connection exactly like the manager's: key login, pinned host key."""
        return NodeConnection(self.ssh_target, private_key, self.host_public_key)

    async def run(self, private_key: str, command: str, timeout: float = 60.0) -> CommandResult:
        """Run one command on the node over SSH (a new connection each call)."""
        conn = self.connect(private_key)
        try:
            return await conn.run(command, timeout=timeout)
        finally:
            await conn.close()
