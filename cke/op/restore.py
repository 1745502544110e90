"""``etcd-restore``: rebuild the etcd cluster from a snapshot after a quorum loss.

Every desired control plane gets a new member restored from the same snapshot with a
new cluster token (``etcdutl snapshot restore``), as etcd's disaster-recovery guide
says; then all start at once, auth is checked, and the request is deleted. Nothing is
deleted on a node: the data directory a member had is moved aside, named with the
time, for the operator to inspect or remove.

Resumable: the decision sees the quorum still lost and the request still there, and
runs the whole operation again; each run moves aside what the previous one left.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from cke.cluster import Cluster, Node
from cke.op.base import Commander, OpContext, Parallel
from cke.op.etcd import (
    ETCD_DATA_DIR,
    CertBundle,
    IssueEtcdCerts,
    SetupEtcdAuth,
    StartEtcd,
    StepOperator,
    StopEtcd,
    WaitEtcdHealthy,
    WriteEtcdCerts,
    _Command,
    initial_cluster_args,
    peer_url,
    tools,
)
from cke.restore import RestoreRequest, read_snapshot
from cke.server.clusterstatus import Trust
from cke.storage import LeaderKey, Storage

# Where the snapshot is written on a node while it is restored (removed afterwards).
SNAPSHOT_ON_NODE = "/var/lib/cke/etcd-restore.db"
# How long one node may take to receive and restore the snapshot.
RESTORE_TIMEOUT = 600.0


@dataclass
class SnapshotHolder:
    """The snapshot's bytes, held in memory only for the life of one operation."""

    data: bytes = b""


class ReadSnapshot(_Command):
    def __init__(self, request: RestoreRequest, holder: SnapshotHolder) -> None:
        super().__init__("read-snapshot", "", f"{request.snapshot} (revision {request.revision})")
        self.request = request
        self.holder = holder

    async def run(self, ctx: OpContext) -> None:
        self.holder.data = await read_snapshot(self.request)


def restore_data_script(etcdutl: str, node: Node, initial: tuple[str, ...]) -> str:
    """Shell run on a node, the snapshot on stdin: move the data aside, restore, clean up."""
    data = shlex.quote(ETCD_DATA_DIR)
    snap = shlex.quote(SNAPSHOT_ON_NODE)
    restore = [
        etcdutl,
        "snapshot",
        "restore",
        SNAPSHOT_ON_NODE,
        f"--name={node.name}",
        f"--data-dir={ETCD_DATA_DIR}",
        *initial,
    ]
    return (
        "set -eu; umask 077; "
        f"mkdir -p {shlex.quote(ETCD_DATA_DIR.rsplit('/', 1)[0])}; "
        f"cat > {snap}; "
        f"if [ -e {data} ]; then mv {data} {data}.before-restore.$(date +%Y%m%dT%H%M%S.%N); fi; "
        f"{shlex.join(restore)} >/dev/null 2>{snap}.log || "
        f"{{ tail -n 5 {snap}.log >&2; rm -f {snap}; exit 1; }}; "
        f"rm -f {snap} {snap}.log"
    )


class RestoreEtcdData(_Command):
    def __init__(
        self, node: Node, cluster: Cluster, initial: tuple[str, ...], holder: SnapshotHolder
    ) -> None:
        super().__init__("restore-etcd-data", node.address, ETCD_DATA_DIR)
        self.node = node
        self.script = restore_data_script(cluster.binaries.etcdutl, node, initial)
        self.holder = holder

    async def run(self, ctx: OpContext) -> None:
        t = tools(ctx)
        command = f"sh -c {shlex.quote(self.script)}"
        result = await t.pool.run(
            self.node, command, input=self.holder.data, timeout=RESTORE_TIMEOUT, update=True
        )
        if not result.ok:
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"{self.node.address}: {lines[-1] if lines else 'failed'}")


class FinishRestore(_Command):
    def __init__(self, mod_revision: int) -> None:
        super().__init__("finish-restore", "", "delete the etcd-restore request")
        self.mod_revision = mod_revision

    async def run(self, ctx: OpContext) -> None:
        storage = ctx.services["storage"]
        leader = ctx.services["leader"]
        assert isinstance(storage, Storage) and isinstance(leader, LeaderKey)
        if not await storage.fenced_finish_restore(leader, self.mod_revision):
            raise RuntimeError("the etcd-restore request changed while it was carried out")


class EtcdRestoreOp(StepOperator):
    """Rebuild every control plane's member from the requested snapshot."""

    def __init__(
        self,
        nodes: list[Node],
        cluster: Cluster,
        request: RestoreRequest,
        request_revision: int,
        trust: Trust | None = None,
    ) -> None:
        self.nodes = nodes
        self.request = request
        addresses = [n.address for n in nodes]
        holder = SnapshotHolder()
        bundle = CertBundle()
        initial = initial_cluster_args([(n.name, n.address) for n in nodes], "new", request.token)
        steps: list[Commander] = [
            ReadSnapshot(request, holder),
            IssueEtcdCerts(nodes, bundle, trust),
            Parallel([StopEtcd(n) for n in nodes]),
            Parallel(
                [RestoreEtcdData(n, cluster, _restore_flags(n, initial), holder) for n in nodes]
            ),
            Parallel([WriteEtcdCerts(n, bundle) for n in nodes]),
            Parallel([StartEtcd(n, cluster, trust=trust) for n in nodes]),
            WaitEtcdHealthy(addresses),
            SetupEtcdAuth(addresses),
            FinishRestore(request_revision),
        ]
        super().__init__("etcd-restore", addresses, steps)


def _restore_flags(node: Node, initial: tuple[str, ...]) -> tuple[str, ...]:
    """etcdutl's flags: the new cluster and token, and the peer URL of this member."""
    cluster_flags = tuple(a for a in initial if not a.startswith("--initial-cluster-state"))
    return (*cluster_flags, f"--initial-advertise-peer-urls={peer_url(node.address)}")
