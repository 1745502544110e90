"""The test bed: the manager's etcd, an OpenBao server and N sshd nodes, in one object.

Used by the pytest fixtures and by ``make demo``; everything lives under one
directory (``base_dir``) that is unique per bed, and ``stop()`` leaves no process.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from cke.devenv.etcd import EtcdCluster
from cke.devenv.nodes import (
    Node,
    ProcessNode,
    SystemdNode,
    make_ssh_key,
    pick_node_subnet,
)
from cke.devenv.pki import DevCA
from cke.devenv.vault import VaultServer
from cke.nodes.ssh import CommandResult


@dataclass
class BedConfig:
    etcd_members: int = 1
    etcd_tls: bool = True
    vault: bool = True
    nodes: int = 3
    # "process": a mount namespace with sshd (fast; no systemd). "systemd": a container
    # booting systemd as PID 1 (systemd-nspawn), for ``runtime: systemd`` and reboots.
    node_kind: Literal["process", "systemd"] = "process"
    # Loopback /24 prefix for node addresses (``127.0.1``); None picks a free random one.
    node_subnet: str | None = None
    base_dir: Path | None = None
    keep_files: bool = False


class TestBed:
    __test__ = False  # not a pytest test class

    def __init__(self, config: BedConfig | None = None) -> None:
        self.config = config or BedConfig()
        if self.config.base_dir is not None:
            self.base_dir = self.config.base_dir
            self.base_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.base_dir = Path(tempfile.mkdtemp(prefix="cke-bed-"))
        self.ca = DevCA(self.base_dir / "pki")
        self.etcd = EtcdCluster(
            self.base_dir / "etcd", self.ca, self.config.etcd_members, self.config.etcd_tls
        )
        self.vault: VaultServer | None = (
            VaultServer(self.base_dir / "vault", self.ca) if self.config.vault else None
        )
        self.ssh_key_path = self.base_dir / "ssh" / "id_ed25519"
        self.nodes: list[Node] = []

    @property
    def ssh_private_key(self) -> str:
        """The private key every node accepts for root (what Vault will hold for cke)."""
        return self.ssh_key_path.read_text()

    async def _make_ssh_key(self) -> None:
        await make_ssh_key(self.ssh_key_path, "cke-bed")

    async def start(self) -> None:
        try:
            await self._make_ssh_key()
            public = Path(f"{self.ssh_key_path}.pub").read_text()
            prefix = pick_node_subnet(self.config.nodes, preferred=self.config.node_subnet)
            kind = SystemdNode if self.config.node_kind == "systemd" else ProcessNode
            self.nodes = [
                kind(f"node{i}", f"{prefix}.{i}", self.base_dir / "nodes" / f"node{i}", public)
                for i in range(1, self.config.nodes + 1)
            ]
            starts = [self.etcd.start(), *(n.start() for n in self.nodes)]
            if self.vault is not None:
                starts.append(self.vault.start())
            await asyncio.gather(*starts)
            self.write_known_hosts()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop everything the bed started; remove its files unless ``keep_files``."""
        stops = [n.stop() for n in self.nodes] + [self.etcd.stop()]
        if self.vault is not None:
            stops.append(self.vault.stop())
        await asyncio.gather(*stops, return_exceptions=True)
        if not self.config.keep_files and self.config.base_dir is None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    async def __aenter__(self) -> TestBed:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def node(self, name_or_address: str) -> Node:
        for n in self.nodes:
            if name_or_address in (n.name, n.address):
                return n
        raise KeyError(name_or_address)

    def openssh_argv(self, node: Node, command: str) -> list[str]:
        """The OpenSSH client running ``command`` on ``node`` as root with the bed's key and
        the node's pinned host key only (nothing from the user's own ssh configuration)."""
        options = (
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "StrictHostKeyChecking=yes",
            f"UserKnownHostsFile={node.directory / 'known_hosts'}",
            "GlobalKnownHostsFile=/dev/null",
            "ControlMaster=no",
            "ControlPath=none",
            "ConnectTimeout=15",
            "LogLevel=ERROR",
        )
        argv = ["ssh", "-F", "/dev/null", "-i", str(self.ssh_key_path)]
        for option in options:
            argv += ["-o", option]
        return [*argv, "-p", str(node.port), f"root@{node.address}", command]

    async def run(self, node: Node | str, command: str, timeout: float = 60.0) -> CommandResult:
        """Run ``command`` on a node over SSH, exactly as the manager does."""
        target = node if isinstance(node, Node) else self.node(node)
        return await target.run(self.ssh_private_key, command, timeout)

    def describe(self) -> str:
        """How to reach each part, for a person."""
        lines = [f"bed directory: {self.base_dir}"]
        lines.append(f"etcd endpoints: {','.join(self.etcd.endpoints)}")
        if self.etcd.tls and self.etcd.root_client is not None:
            lines.append(
                f"  etcdctl --endpoints={','.join(self.etcd.endpoints)} "
                f"--cacert={self.ca.ca_path} --cert={self.etcd.root_client.cert} "
                f"--key={self.etcd.root_client.key} member list"
            )
        if self.vault is not None:
            lines.append(
                f"OpenBao: VAULT_ADDR={self.vault.address} VAULT_CACERT={self.vault.ca_path}"
            )
            lines.append(f"  root token in {self.vault.secrets_path} (0600)")
        for n in self.nodes:
            lines.append(
                f"{n.name}: ssh -i {self.ssh_key_path} -o UserKnownHostsFile="
                f"{n.directory / 'known_hosts'} root@{n.address}"
            )
        lines.append(
            f"logs: {self.base_dir}/etcd/*.log, {self.base_dir}/vault/bao.log, "
            f"{self.base_dir}/nodes/*/log/"
            + (
                " (on a systemd node: journalctl over ssh)"
                if any(n.kind == "systemd" for n in self.nodes)
                else ""
            )
        )
        return "\n".join(lines)

    def write_known_hosts(self) -> None:
        for n in self.nodes:
            (n.directory / "known_hosts").write_text(f"{n.address} {n.host_public_key}\n")
