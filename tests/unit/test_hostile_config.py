"""Any cluster the validator accepts can be decided on and turned into node scripts.

Issue 10: ``binaries.etcd: /usr/bin/etcd;touch /tmp/x`` was accepted by ``ckecli cluster
set`` and then crashed every replica in ``decide()``, because the runtime was stricter
than the validator.  These properties feed hostile strings and addresses through the
validator; whatever it accepts must give a decision, operators and scripts without an
exception, for any status.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cke.cluster import COMPONENTS, Cluster, ClusterError, Constraints, cluster_from_json
from cke.nodes.runtime import ProcessRuntime, SystemdRuntime
from cke.op.etcd import etcd_service_spec
from cke.server.clusterstatus import ClusterStatus, EtcdMember, EtcdStatus, NodeStatus
from cke.server.strategy import decide

pytestmark = pytest.mark.unit

_HOSTILE_TEXT = st.sampled_from(
    [
        "/usr/bin/etcd;touch /tmp/x",
        "/opt/etcd/",
        "/opt/./etcd",
        "/opt/../bin/etcd",
        "/opt/my etcd",
        "/opt/\u00e9tcd",
        "/opt/$(id)",
        "/opt/`id`",
        "/opt/a\nb",
        "/opt/a\x00b",
        "//opt/etcd",
        "/",
        "",
        "etcd",
        "/opt/" + "a" * 300,
        "/opt/%n%s",
        "/opt/'quoted'",
        '/opt/"q"',
        "/opt/a\\b",
        "/opt/\u202eevil",
    ]
)
_PATH_PART = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=6)
_PATHS = st.one_of(
    _HOSTILE_TEXT,
    st.lists(_PATH_PART, min_size=1, max_size=4).map(lambda p: "/" + "/".join(p)),
    st.sampled_from(["/usr/local/bin/etcd", "/usr/bin/etcd", "/opt/cke/bin/etcd-3.5+x@y"]),
    st.text(max_size=12),
)
_ADDRESSES = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda ip: f"::ffff:{ip}"),
    st.ip_addresses(v=6).map(lambda ip: ip.exploded),
    st.ip_addresses(v=6).map(lambda ip: f"{ip}%eth0"),
    st.sampled_from(["0.0.0.0", "::", "255.255.255.255", "224.0.0.1", "127.0.1.3", "fd00::3"]),
    st.text(max_size=20),
)
_ENV_NAMES = st.one_of(
    st.sampled_from(["cke_log", "CKE_SETSID", "cke_v", "PATH", "ETCD_X", "_", "A1", "1A", "A-B"]),
    st.text(max_size=8),
)
_ARGS = st.one_of(
    st.sampled_from(
        ["--data-dir=/tmp/x", "--wal-dir", "-name=x", "--force-new-cluster", "--log-level=debug"]
    ),
    st.text(max_size=20),
)
_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "extra_args": st.lists(_ARGS, max_size=3),
        "extra_env": st.dictionaries(_ENV_NAMES, st.text(max_size=10), max_size=3),
    },
)


@st.composite
def hostile_docs(draw: st.DrawFn) -> dict[str, Any]:
    addresses = draw(st.lists(_ADDRESSES, min_size=1, max_size=5))
    nodes: list[dict[str, Any]] = []
    for i, address in enumerate(addresses):
        node: dict[str, Any] = {"address": address, "user": draw(st.sampled_from(["root", "u"]))}
        if draw(st.booleans()):
            node["hostname"] = f"n{i}.example"
        node["control_plane"] = i == 0 or draw(st.booleans())
        nodes.append(node)
    doc: dict[str, Any] = {
        "name": draw(st.sampled_from(["c", "prod", "a" * 300, "x\ny"])),
        "nodes": nodes,
        "service_subnet": "10.68.0.0/16",
        "runtime": draw(st.sampled_from(["systemd", "process"])),
        "binaries": draw(st.dictionaries(st.sampled_from(["etcd", "rivers"]), _PATHS, max_size=2)),
        "options": draw(st.dictionaries(st.sampled_from(COMPONENTS), _PARAMS, max_size=3)),
    }
    if draw(st.booleans()):
        doc["dns_servers"] = draw(st.lists(_ADDRESSES, max_size=2))
    return doc


@st.composite
def statuses(draw: st.DrawFn, cluster: Cluster) -> ClusterStatus:
    """Any status of the cluster's nodes: running or not, data or not, any digest."""
    nodes: dict[str, NodeStatus] = {}
    members: list[EtcdMember] = []
    for i, node in enumerate(cluster.nodes):
        nodes[node.address] = NodeStatus(
            node.address,
            ssh_ok=draw(st.booleans()),
            host_key_mismatch=draw(st.integers(0, 9)) == 0,
            etcd_running=draw(st.booleans()),
            etcd_digest=draw(st.sampled_from([None, "0" * 64, "junk"])),
            etcd_has_data=draw(st.booleans()),
            identity=draw(st.sampled_from([None, f"SHA256:{i}", "SHA256:shared"])),
            etcd_peer_url=draw(st.sampled_from([None, f"https://{node.address}:2380", "x"])),
        )
        if draw(st.booleans()):
            members.append(
                EtcdMember(
                    id=i + 1,
                    name=node.name,
                    address=node.address,
                    learner=draw(st.integers(0, 3)) == 0,
                    healthy=draw(st.booleans()),
                    raft_index=draw(st.sampled_from([0, 5000])),
                    peer_urls=(f"https://{node.address}:2380",),
                )
            )
    leader = draw(st.sampled_from([None, *[m.id for m in members]]))
    etcd = EtcdStatus(reachable=bool(members), members=tuple(members), leader_id=leader)
    return ClusterStatus(nodes=nodes, etcd=etcd)


def _accepted(doc: dict[str, Any]) -> Cluster | None:
    try:
        return cluster_from_json(json.dumps(doc))
    except ClusterError:
        return None


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(hostile_docs(), st.data())
def test_every_accepted_cluster_decides_and_scripts_without_exception(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    cluster = _accepted(doc)
    if cluster is None:
        return
    # Everything the runtime builds from the stored values (the crash of issue 10).
    for runtime in (ProcessRuntime(), SystemdRuntime()):
        for node in cluster.nodes:
            runtime.start_script(etcd_service_spec(node, cluster, ("--initial-cluster-state=new",)))
    status = data.draw(statuses(cluster))
    decision = decide(cluster, Constraints(), status)
    for op in decision.operators:
        while op.next_command() is not None:
            pass


def test_hostile_examples_are_refused_with_the_field() -> None:
    """The generator does reach the refusals (the property above is not vacuous)."""
    base = {"name": "c", "service_subnet": "10.68.0.0/16"}
    for binary in ["/usr/bin/etcd;touch /tmp/x", "/opt/etcd/", "/opt/my etcd", "/opt/\u00e9"]:
        doc = {
            **base,
            "nodes": [{"address": "10.0.0.1", "user": "u", "control_plane": True}],
            "binaries": {"etcd": binary},
        }
        with pytest.raises(ClusterError, match=r"^binaries\.etcd: "):
            cluster_from_json(json.dumps(doc))
    mapped = str(ipaddress.IPv6Address("::ffff:127.0.1.3"))
    doc = {**base, "nodes": [{"address": mapped, "user": "u", "control_plane": True}]}
    with pytest.raises(ClusterError, match=r"^nodes\[0\]\.address: "):
        cluster_from_json(json.dumps(doc))
