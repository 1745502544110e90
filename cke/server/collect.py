"""Collect the real state: every node over SSH in parallel, and the managed etcd's API."""

from __future__ import annotations

import asyncio

from cke.cluster import Cluster, Node
from cke.common.logs import error_line, get_logger
from cke.etcdadmin import EtcdAdmin
from cke.nodes.pool import NodePool
from cke.nodes.runtime import Runtime
from cke.nodes.ssh import HostKeyMismatch, SSHError, host_key_fingerprint
from cke.op.etcd import (
    ETCD_DATA_DIR,
    ETCD_SERVICE,
    PEER_MARK,
    parse_recorded_peer_url,
    recorded_peer_url_sh,
)
from cke.server.clusterstatus import ClusterStatus, EtcdStatus, NodeStatus

log = get_logger("cke.collect")

_DATA_MARK = b"cke-etcd-data="
_MARKS = (_DATA_MARK, PEER_MARK)
STATUS_TIMEOUT = 15.0


def node_status_script(runtime: Runtime) -> bytes:
    """One script per node: the services' status, whether etcd has data, and the peer URL
    its spec record names (the member that data belongs to)."""
    return (
        runtime.status_script([ETCD_SERVICE])
        + (
            f"\nif [ -d {ETCD_DATA_DIR}/member ]; then echo cke-etcd-data=1; "
            "else echo cke-etcd-data=0; fi\n"
        ).encode()
        + recorded_peer_url_sh().encode()
    )


async def collect_node(pool: NodePool, runtime: Runtime, node: Node) -> NodeStatus:
    try:
        result = await pool.run(
            node, "sh -s", input=node_status_script(runtime), timeout=STATUS_TIMEOUT
        )
    except HostKeyMismatch:
        return NodeStatus(node.address, ssh_ok=False, host_key_mismatch=True)
    except (SSHError, OSError, TimeoutError) as exc:
        log.debug("node unreachable", node=node.address, error=str(exc))
        return NodeStatus(node.address, ssh_ok=False)
    except Exception as exc:  # one node's surprise must not blind cke to the others
        log.warning("node status failed", node=node.address, error=f"{type(exc).__name__}: {exc}")
        return NodeStatus(node.address, ssh_ok=False)
    if not result.ok:
        log.warning(
            "status script failed",
            node=node.address,
            stderr=result.stderr.decode(errors="replace")[:200],
        )
        return NodeStatus(node.address, ssh_ok=False)
    lines = result.stdout.splitlines()
    has_data = any(line.strip() == _DATA_MARK + b"1" for line in lines)
    body = b"\n".join(line for line in lines if not line.startswith(_MARKS))
    try:
        state = runtime.parse_status(body, [ETCD_SERVICE]).get(ETCD_SERVICE)
    except ValueError as exc:  # cut short or garbled: the state is unknown, not "stopped"
        log.warning("node status unreadable", node=node.address, error=str(exc))
        return NodeStatus(node.address, ssh_ok=False)
    return NodeStatus(
        node.address,
        ssh_ok=True,
        etcd_running=bool(state and state.running),
        etcd_digest=state.digest if state else None,
        etcd_has_data=has_data,
        identity=_identity(pool, node),
        etcd_peer_url=parse_recorded_peer_url(result.stdout),
    )


def _identity(pool: NodePool, node: Node) -> str | None:
    key = pool.host_key_of(node.address)
    return host_key_fingerprint(key) if key else None


async def collect(
    cluster: Cluster, pool: NodePool, runtime: Runtime, admin: EtcdAdmin | None
) -> ClusterStatus:
    statuses = await asyncio.gather(*(collect_node(pool, runtime, n) for n in cluster.nodes))
    nodes = {s.address: s for s in statuses}
    etcd = EtcdStatus()
    if admin is not None:
        # Ask every control plane and every node that runs etcd: a member being
        # removed may no longer be a control plane.
        addresses = {n.address for n in cluster.control_planes}
        addresses |= {s.address for s in statuses if s.etcd_running}
        try:
            etcd = await admin.status(addresses)
        except Exception as exc:  # Vault or certificates not ready: etcd state unknown
            log.warning("etcd status unavailable", error=error_line(exc, 200))
    return ClusterStatus(nodes=nodes, etcd=etcd)
