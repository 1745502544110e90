"""Collect the real state: every node over SSH in parallel, and the managed etcd's API."""

from __future__ import annotations

import asyncio
import base64
import binascii

from cke.certinfo import CertificateError, CertInfo, bundle_key_ids, parse_certificate
from cke.cluster import Cluster, Node
from cke.common.logs import error_line, get_logger
from cke.etcdadmin import EtcdAdmin
from cke.nodes.pool import NodePool
from cke.nodes.runtime import Runtime
from cke.nodes.ssh import HostKeyMismatch, SSHError, host_key_fingerprint
from cke.op.etcd import (
    ETCD_CONF_DIR,
    ETCD_DATA_DIR,
    ETCD_SERVICE,
    PEER_MARK,
    parse_recorded_peer_url,
    recorded_peer_url_sh,
)
from cke.op.rivers import ETCD_RIVERS, RIVERS
from cke.server.clusterstatus import ClusterStatus, EtcdStatus, NodeStatus, ServiceStatus

log = get_logger("cke.collect")

_DATA_MARK = b"cke-etcd-data="
_CERT_MARK = b"cke-cert-"
_MARKS = (_DATA_MARK, PEER_MARK, _CERT_MARK)
# The public certificate files read on every node (never a key): leaves and trust bundles.
LEAF_FILES = ("server", "peer")
TRUST_FILES = ("ca-client", "ca-peer")
STATUS_TIMEOUT = 15.0
STATUS_SERVICES = (ETCD_SERVICE, RIVERS, ETCD_RIVERS)


def node_status_script(runtime: Runtime) -> bytes:
    """One script per node: the services' status, whether etcd has data, and the peer URL
    its spec record names (the member that data belongs to)."""
    return (
        runtime.status_script(STATUS_SERVICES)
        + (
            f"\nif [ -d {ETCD_DATA_DIR}/member ]; then echo cke-etcd-data=1; "
            "else echo cke-etcd-data=0; fi\n"
        ).encode()
        + recorded_peer_url_sh().encode()
        + _cert_files_sh().encode()
    )


def _cert_files_sh() -> str:
    """Print ``cke-cert-<name>=<base64 of the file>`` for each certificate file present."""
    lines = []
    for name in (*LEAF_FILES, *TRUST_FILES):
        path = f"{ETCD_CONF_DIR}/{name}.crt"
        lines.append(
            f"if [ -f {path} ]; then printf 'cke-cert-{name}='; "
            f"head -c 65536 {path} | base64 | tr -d '\\n'; echo; fi"
        )
    # The echo ends the line before: the peer URL comes from sed, which keeps a missing
    # final newline of the spec record as missing.
    return "\necho\n" + "\n".join(lines) + "\n"


def parse_cert_lines(
    output: bytes, node: str = ""
) -> tuple[dict[str, CertInfo], dict[str, tuple[str, ...]]]:
    """The leaves and trust bundles the status script printed; unreadable ones are left
    out (a leaf left out is renewed; a bundle left out makes the member outdated)."""
    certs: dict[str, CertInfo] = {}
    trusted: dict[str, tuple[str, ...]] = {}
    for line in output.splitlines():
        if not line.startswith(_CERT_MARK):
            continue
        name, _, encoded = line[len(_CERT_MARK) :].partition(b"=")
        key = name.decode(errors="replace")
        try:
            pem = base64.b64decode(encoded.strip(), validate=True)
            if key in LEAF_FILES:
                certs[key] = parse_certificate(pem)
            elif key in TRUST_FILES:
                trusted[key] = bundle_key_ids(pem)
        except (binascii.Error, CertificateError, ValueError) as exc:
            log.warning("certificate file unreadable", node=node, file=key, error=str(exc)[:100])
    return certs, trusted


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
    settling = runtime.settling(result.stdout)
    if settling is not None:
        # Booting, shutting down, or a unit starting or stopping: systemd changes its
        # services right now, and an operation of ours would race it (a start during a
        # shutdown fails, one during a boot or an auto-restart is not needed, a restart
        # during someone's stop cancels their job). Treat it as unreachable this round.
        log.info(
            "node is settling: no operation on it this round",
            node=node.address,
            state=settling,
        )
        return NodeStatus(node.address, ssh_ok=False)
    lines = result.stdout.splitlines()
    has_data = any(line.strip() == _DATA_MARK + b"1" for line in lines)
    body = b"\n".join(line for line in lines if not line.startswith(_MARKS))
    try:
        states = runtime.parse_status(body, STATUS_SERVICES)
    except ValueError as exc:  # cut short or garbled: the state is unknown, not "stopped"
        log.warning("node status unreadable", node=node.address, error=str(exc))
        return NodeStatus(node.address, ssh_ok=False)
    certs, trusted = parse_cert_lines(result.stdout, node.address)
    state = states.get(ETCD_SERVICE)
    services = {
        name: ServiceStatus(st.running, st.digest)
        for name, st in states.items()
        if name != ETCD_SERVICE
    }
    return NodeStatus(
        node.address,
        ssh_ok=True,
        etcd_running=bool(state and state.running),
        etcd_digest=state.digest if state else None,
        etcd_has_data=has_data,
        identity=_identity(pool, node),
        etcd_peer_url=parse_recorded_peer_url(result.stdout),
        certs=certs,
        trusted=trusted,
        services=services,
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
