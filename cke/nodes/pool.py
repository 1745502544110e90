"""SSH connections to the cluster's nodes, kept open and reused.

Private keys come from Vault (``cke/secrets/ssh``: a key per node address, the
empty key is the default). Host keys are verified: the cluster YAML may give a
node's ``host_key``; otherwise the key seen on first contact is pinned in etcd and
required ever after. A node that presents another key gets nothing sent to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from cke.cluster import Node
from cke.common import failpoints
from cke.common.election import LeaseFence
from cke.common.logs import get_logger
from cke.nodes.ssh import (
    CommandResult,
    HostKeyMismatch,
    NodeAddress,
    NodeConnection,
    SSHError,
    fetch_host_key,
)

log = get_logger("cke.nodes")


class HostKeyStore(Protocol):
    async def get(self, address: str) -> str | None: ...
    async def pin(self, address: str, key: str) -> None: ...


class NodePool:
    def __init__(
        self,
        private_keys: Callable[[], Awaitable[dict[str, str]]],
        host_keys: HostKeyStore,
        *,
        command_timeout: float = 120.0,
        status_concurrency: int = 64,
        update_concurrency: int = 10,
    ) -> None:
        self._private_keys = private_keys
        self._host_keys = host_keys
        self.command_timeout = command_timeout
        self.reads = asyncio.Semaphore(status_concurrency)
        self.updates = asyncio.Semaphore(update_concurrency)
        self._conns: dict[str, tuple[str, str, NodeConnection]] = {}
        self.mismatched: set[str] = set()
        # cke's leader sets it: no command leaves unless the lease is known valid.
        self.fence: LeaseFence | None = None

    async def _host_key(self, node: Node) -> str:
        if node.host_key:
            return node.host_key
        pinned = await self._host_keys.get(node.address)
        if pinned:
            return pinned
        seen = await fetch_host_key(NodeAddress(node.address, node.port, node.user))
        await self._host_keys.pin(node.address, seen)
        log.info("pinned host key on first contact", node=node.address, key=seen.split()[0])
        return seen

    async def connection(self, node: Node) -> NodeConnection:
        keys = await self._private_keys()
        private = keys.get(node.address) or keys.get("")
        if not private:
            raise SSHError(f"{node.address}: no SSH private key in Vault (cke/secrets/ssh)")
        host_key = await self._host_key(node)
        cached = self._conns.get(node.address)
        if cached is not None and cached[0] == private and cached[1] == host_key:
            return cached[2]
        if cached is not None:
            await cached[2].close()
        conn = NodeConnection(NodeAddress(node.address, node.port, node.user), private, host_key)
        self._conns[node.address] = (private, host_key, conn)
        return conn

    def host_key_of(self, address: str) -> str | None:
        """The host key the connection to ``address`` verified (None: no connection yet).

        Two addresses with one host key are one machine (or machines that share their
        identity): the decision refuses to act on either.
        """
        cached = self._conns.get(address)
        return cached[1] if cached is not None else None

    async def run(
        self,
        node: Node,
        command: str,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        update: bool = False,
    ) -> CommandResult:
        """Run one command; ``update=True`` counts against ``--max-concurrent-updates``."""
        gate = self.updates if update else self.reads
        limit = timeout or self.command_timeout
        async with gate:
            conn = await self.connection(node)
            if update:
                failpoints.stop_at(f"stop-before-update:{node.address}")
            if self.fence is not None:
                # The last moment before the command leaves: after every wait above.
                self.fence.check(limit, f"send a command to {node.address}")
            try:
                result = await conn.run(command, input=input, timeout=limit)
            except HostKeyMismatch:
                if node.address not in self.mismatched:
                    log.error(
                        "host key changed; nothing will be sent to the node", node=node.address
                    )
                self.mismatched.add(node.address)
                raise
            self.mismatched.discard(node.address)
            return result

    async def close(self) -> None:
        for _, _, conn in self._conns.values():
            await conn.close()
        self._conns.clear()
