"""The one SSH layer through which cke (and the test bed) runs commands on nodes.

Host keys are always verified: a connection is given the node's pinned public key
and refuses a server that presents another one. ``fetch_host_key`` is the single
place where an unknown key is read, so that a caller can pin it on first contact.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncssh


class SSHError(Exception):
    """A node could not be reached or a command could not be run on it."""


class HostKeyMismatch(SSHError):
    """The node presented a host key other than the pinned one."""


# Inputs larger than this (a rivers zipapp, an etcd snapshot) are streamed in chunks.
STREAM_INPUT_ABOVE = 16 * 1024
STREAM_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass(frozen=True)
class NodeAddress:
    address: str
    port: int = 22
    user: str = "root"

    def __str__(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


def host_key_fingerprint(key: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a one-line public key (``type base64 ...``)."""
    fields = key.split()
    blob = base64.b64decode(fields[1]) if len(fields) > 1 else key.encode()
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


async def fetch_host_key(
    target: NodeAddress, timeout: float = 10.0, algorithms: Sequence[str] = ()
) -> str:
    """Read the host key a node presents, in OpenSSH one-line form, without logging in.

    ``algorithms`` limits the host key algorithms offered (default: asyncssh's).
    """
    try:
        key = await asyncio.wait_for(
            asyncssh.get_server_host_key(
                target.address, target.port, server_host_key_algs=tuple(algorithms)
            ),
            timeout,
        )
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise SSHError(f"{target}: cannot read host key: {exc}") from exc
    if key is None:
        raise SSHError(f"{target}: server sent no host key")
    return key.export_public_key("openssh").decode().strip()


class NodeConnection:
    """One SSH connection to one node, opened on first use and reused."""

    def __init__(
        self,
        target: NodeAddress,
        private_key: str,
        host_key: str,
        connect_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self._client_key = asyncssh.import_private_key(private_key)
        self._host_key = asyncssh.import_public_key(host_key)
        self._connect_timeout = connect_timeout
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            try:
                self._conn = await asyncssh.connect(
                    self.target.address,
                    self.target.port,
                    username=self.target.user,
                    client_keys=[self._client_key],
                    known_hosts=([self._host_key], [], []),
                    connect_timeout=self._connect_timeout,
                    agent_path=None,
                    config=None,
                )
            except asyncssh.HostKeyNotVerifiable as exc:
                raise HostKeyMismatch(
                    f"{self.target}: host key does not match the pinned key"
                ) from exc
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                raise SSHError(f"{self.target}: cannot connect: {exc}") from exc
            return self._conn

    async def run(
        self, command: str, *, input: bytes | None = None, timeout: float = 60.0
    ) -> CommandResult:
        """Run ``command`` in the node's shell and return its exit status and output."""
        conn = await self._connection()
        try:
            if input is not None and len(input) > STREAM_INPUT_ABOVE:
                done = await self._run_streaming(conn, command, input, timeout)
            else:
                done = await conn.run(
                    command, input=input, encoding=None, timeout=timeout, check=False
                )
        except (asyncssh.TimeoutError, TimeoutError) as exc:
            raise SSHError(f"{self.target}: command timed out after {timeout}s") from exc
        except (OSError, asyncssh.Error) as exc:
            await self.close()
            raise SSHError(f"{self.target}: command failed to run: {exc}") from exc
        status = done.exit_status if done.exit_status is not None else 255
        stdout = done.stdout if isinstance(done.stdout, bytes) else b""
        stderr = done.stderr if isinstance(done.stderr, bytes) else b""
        return CommandResult(status, stdout, stderr)

    @staticmethod
    async def _run_streaming(
        conn: asyncssh.SSHClientConnection, command: str, data: bytes, timeout: float
    ) -> asyncssh.SSHCompletedProcess:
        """A large ``input`` (a snapshot to restore) sent in pieces, each once the channel
        took the last: ``conn.run(input=...)`` copies all of it into the channel's buffer,
        once per node, so sending 100 MB to three nodes held about 3.5x that in memory."""
        process = await conn.create_process(command, encoding=None)
        try:
            async with asyncio.timeout(timeout):
                try:
                    for start in range(0, len(data), STREAM_CHUNK):
                        process.stdin.write(data[start : start + STREAM_CHUNK])
                        await process.stdin.drain()
                    process.stdin.write_eof()
                except (BrokenPipeError, ConnectionResetError, asyncssh.Error):
                    pass  # the command stopped reading (it failed): its exit status says why
                return await process.wait(check=False)
        finally:
            process.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await conn.wait_closed()
