"""The cluster model, its checks, the parser and the constraints."""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cke import cluster as cl
from cke.cluster import (
    CONSTRAINT_NAMES,
    Cluster,
    ClusterError,
    Constraints,
    Node,
    cluster_from_json,
    cluster_to_json,
    cluster_to_yaml,
    constraints_from_json,
    constraints_to_json,
    parse_cluster,
    set_constraint,
    validate_cluster,
)
from cke.common import fields

ROOT = Path(__file__).resolve().parents[2]

HOST_KEY = (
    ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    .decode()
)


def _host_key(seed: int) -> str:
    """A valid OpenSSH ed25519 public key of its own for each seed."""
    private = ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed % 256] * 32))
    public = private.public_key()
    return public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def _doc(**top: Any) -> dict[str, Any]:
    """A minimal valid cluster document (1 control plane + 1 worker), with overrides."""
    doc: dict[str, Any] = {
        "name": "test",
        "service_subnet": "10.68.0.0/16",
        "nodes": [
            {"address": "10.0.0.1", "user": "cybozu", "control_plane": True},
            {"address": "10.0.0.2", "user": "cybozu"},
        ],
    }
    doc.update(top)
    return doc


def _node(**fields: Any) -> dict[str, Any]:
    return {"address": "10.0.0.9", "user": "cybozu", **fields}


def _with_node(**fields: Any) -> dict[str, Any]:
    doc = _doc()
    doc["nodes"].append(_node(**fields))
    return doc


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_NoAliasDumper)


def _errors(doc: Any) -> str:
    with pytest.raises(ClusterError) as info:
        parse_cluster(_dump(doc))
    return str(info.value)


def _model(doc: dict[str, Any]) -> Cluster:
    """The model without the semantic checks (to test the check functions alone)."""
    return Cluster.model_validate(doc)


# --- the example file -------------------------------------------------------------------------


def test_example_config_parses_and_validates_with_three_control_planes() -> None:
    cluster = parse_cluster((ROOT / "configs" / "cluster.yml").read_text())
    assert [n.name for n in cluster.control_planes] == ["cp-1", "cp-2", "cp-3"]
    assert [n.name for n in cluster.workers] == ["worker-1", "worker-2"]
    assert cluster.runtime == "systemd"
    assert all(n.address.startswith("10.0.0.") for n in cluster.nodes)
    validate_cluster(cluster, set_constraint(Constraints(), "control-plane-count", "3"))
    with pytest.raises(ClusterError, match="control-plane-count is 1"):
        validate_cluster(cluster, Constraints())


# --- defaults ---------------------------------------------------------------------------------


def test_defaults() -> None:
    cluster = parse_cluster(_dump(_doc()))
    node = cluster.nodes[1]
    assert (node.hostname, node.port, node.host_key, node.control_plane) == ("", 22, None, False)
    assert (node.labels, node.annotations, node.taints) == ({}, {}, [])
    assert node.name == "10.0.0.2"
    assert cluster.dns_servers == []
    assert cluster.runtime == "systemd"
    assert cluster.binaries.etcd == "/usr/local/bin/etcd"
    assert cluster.binaries.path_of("kube-apiserver") == "/usr/local/bin/kube-apiserver"
    assert cluster.options.for_component("kube-api").extra_args == []
    assert cluster.options.etcd_rivers.extra_binds == []
    c = Constraints()
    assert (
        c.control_plane_count,
        c.minimum_workers_rate,
        c.maximum_unreachable_nodes_for_reboot,
        c.maximum_repair_queue_entries,
        c.wait_seconds_to_repair_rebooting,
    ) == (1, 80, 0, 0, 0)


def test_lookup_helpers_reject_unknown_names() -> None:
    cluster = parse_cluster(_dump(_doc()))
    with pytest.raises(KeyError):
        cluster.options.for_component("kube_api")
    with pytest.raises(KeyError):
        cluster.binaries.path_of("kube_apiserver")
    with pytest.raises(KeyError):
        cluster.binaries.path_of("sh")


def test_models_are_frozen() -> None:
    cluster = parse_cluster(_dump(_doc()))
    with pytest.raises(ValidationError):
        cluster.name = "other"


# --- table of good and bad clusters -----------------------------------------------------------

GOOD: list[tuple[str, dict[str, Any]]] = [
    ("minimal", _doc()),
    ("only a control plane", _doc(nodes=[_node(control_plane=True)])),
    (
        "ipv6 with hostname",
        _doc(nodes=[_node(address="fd00::1", hostname="n1", control_plane=True)]),
    ),
    ("ipv6 service subnet", _doc(service_subnet="fd00:10::/108")),
    ("dns servers", _doc(dns_servers=["10.0.0.53", "2001:db8::53"])),
    ("process runtime", _doc(runtime="process")),
    ("binaries", _doc(binaries={"etcd": "/opt/etcd/bin/etcd", "kubelet": "/opt/k/kubelet"})),
    ("host key and port", _with_node(host_key=HOST_KEY, port=2222)),
    ("host key with comment", _with_node(host_key=HOST_KEY + " root@cp-1")),
    (
        "labels",
        _with_node(labels={"a": "", "example.com/x.y_z": "V-1", "k8s.io/zone": "rack-1"}),
    ),
    ("annotations upper-case prefix", _with_node(annotations={"Example.COM/Any": "any text"})),
    (
        "taints same key different effect",
        _with_node(
            taints=[
                {"key": "example.com/t", "effect": "NoSchedule"},
                {"key": "example.com/t", "value": "v", "effect": "NoExecute"},
                {"key": "t", "effect": "PreferNoSchedule"},
            ]
        ),
    ),
    (
        "options",
        _doc(
            options={
                c: {
                    "extra_args": ["--v=2", "x y"],
                    "extra_env": {"A_1": "b", "_X": ""},
                    "extra_binds": [{"source": "/a", "destination": "/b", "read_only": True}],
                }
                for c in cl.COMPONENTS
            }
        ),
    ),
    ("hostname with dots", _with_node(hostname="node-1.example.com")),
]


@pytest.mark.parametrize(("doc"), [d for _, d in GOOD], ids=[n for n, _ in GOOD])
def test_good_clusters(doc: dict[str, Any]) -> None:
    cluster = parse_cluster(_dump(doc))
    count = str(len(cluster.control_planes))
    validate_cluster(cluster, set_constraint(Constraints(), "control-plane-count", count))
    assert parse_cluster(cluster_to_yaml(cluster)) == cluster
    assert cluster_from_json(cluster_to_json(cluster)) == cluster


BAD: list[tuple[str, Any, str]] = [
    ("unknown top field", _doc(bogus=1), "bogus: Extra inputs are not permitted"),
    ("unknown top field near a CKE one", _doc(dns_services="a/b"), "dns_services: Extra inputs"),
    ("unknown node field", _with_node(roles=["x"]), "nodes[2].roles: Extra inputs"),
    ("unknown component", _doc(options={"kube-dns": {}}), "options.kube-dns: Extra inputs"),
    (
        "unknown component field",
        _doc(options={"etcd": {"volume": "x"}}),
        "options.etcd.volume: Extra inputs",
    ),
    (
        "unknown mount field",
        _doc(options={"etcd": {"extra_binds": [{"source": "/a", "destination": "/b", "x": 1}]}}),
        "options.etcd.extra_binds[0].x: Extra inputs",
    ),
    ("unknown binary", _doc(binaries={"sh": "/bin/sh"}), "binaries.sh: Extra inputs"),
    ("missing name", {k: v for k, v in _doc().items() if k != "name"}, "name: Field required"),
    ("missing user", _doc(nodes=[{"address": "10.0.0.1"}]), "nodes[0].user: Field required"),
    ("string bool", _with_node(control_plane="true"), "nodes[2].control_plane: Input should be"),
    ("int for string", _with_node(user=5), "nodes[2].user: Input should be a valid string"),
    ("port zero", _with_node(port=0), "nodes[2].port: Input should be greater than or equal"),
    ("port too big", _with_node(port=65536), "nodes[2].port: Input should be less than"),
    ("bool port", _with_node(port=True), "nodes[2].port: Input should be a valid integer"),
    ("runtime", _doc(runtime="docker"), "runtime: Input should be 'systemd' or 'process'"),
    ("empty name", _doc(name=""), "name: must not be empty"),
    ("bad address", _with_node(address="10.0.0.256"), "nodes[2].address: must be an IPv4 or IPv6"),
    ("hostname as address", _with_node(address="node1"), "nodes[2].address: must be an IPv4"),
    (
        "duplicate address",
        _with_node(address="10.0.0.1"),
        "nodes[2].address: duplicate of nodes[0]",
    ),
    (
        "duplicate ipv6 address spelled differently",
        _doc(
            nodes=[
                _node(address="fd00::1", hostname="a", control_plane=True),
                _node(address="fd00:0::0:1", hostname="b"),
            ]
        ),
        "nodes[1].address: duplicate of nodes[0]",
    ),
    (
        "two entries with one host key",
        _doc(
            nodes=[
                _node(address="10.0.0.1", host_key=HOST_KEY, control_plane=True),
                _node(address="10.0.0.2", host_key=HOST_KEY + " other comment"),
            ]
        ),
        "nodes[1].host_key: same host key as nodes[0]: one machine",
    ),
    (
        "duplicate hostname",
        _doc(
            nodes=[
                _node(address="10.0.0.1", hostname="a", control_plane=True),
                _node(address="10.0.0.2", hostname="b"),
                _node(address="10.0.0.3", hostname="a"),
            ]
        ),
        "nodes[2].hostname: node name duplicate of nodes[0]",
    ),
    (
        "hostname equal to another node's address",
        _with_node(hostname="10.0.0.1"),
        "nodes[2].hostname: node name duplicate of nodes[0]",
    ),
    ("hostname upper case", _with_node(hostname="Node1"), "nodes[2].hostname: must be an RFC 1123"),
    ("hostname underscore", _with_node(hostname="a_b"), "nodes[2].hostname: must be an RFC 1123"),
    ("hostname label > 63", _with_node(hostname="a" * 64), "nodes[2].hostname: each dot-separated"),
    (
        "ipv6 without hostname",
        _doc(nodes=[_node(address="fd00::1", control_plane=True)]),
        "nodes[0].hostname: required when the address is IPv6",
    ),
    ("empty user", _with_node(user=""), "nodes[2].user: must not be empty"),
    ("user with space", _with_node(user="a b"), "nodes[2].user: must not contain white space"),
    ("host key one field", _with_node(host_key="ssh-ed25519"), "nodes[2].host_key: must be an"),
    (
        "host key bad base64",
        _with_node(host_key="ssh-ed25519 !!!"),
        "nodes[2].host_key: key data is not valid base64",
    ),
    (
        "host key type mismatch",
        _with_node(host_key="ssh-rsa " + HOST_KEY.split()[1]),
        "nodes[2].host_key: key data does not match the key type",
    ),
    (
        "host key two lines",
        _with_node(host_key=HOST_KEY + "\n" + HOST_KEY),
        "nodes[2].host_key: must be a single line",
    ),
    (
        "reserved label",
        _with_node(labels={"cke.cybozu.com/role": "x"}),
        """nodes[2].labels["cke.cybozu.com/role"]: keys containing 'cke.cybozu.com/' are""",
    ),
    (
        "reserved label infix",
        _with_node(labels={"sabakan.cke.cybozu.com/role": "x"}),
        "are reserved for CKE",
    ),
    (
        "reserved node-role label",
        _with_node(labels={"node-role.kubernetes.io/master": ""}),
        "keys starting with 'node-role.kubernetes.io/' are reserved",
    ),
    (
        "reserved annotation",
        _with_node(annotations={"cke.cybozu.com/x": "y"}),
        """nodes[2].annotations["cke.cybozu.com/x"]: keys containing""",
    ),
    (
        "reserved taint",
        _with_node(taints=[{"key": "node-role.kubernetes.io/cp", "effect": "NoSchedule"}]),
        "nodes[2].taints[0].key: keys starting with 'node-role.kubernetes.io/'",
    ),
    ("label key two slashes", _with_node(labels={"a/b/c": "v"}), "must contain at most one '/'"),
    ("label value bad", _with_node(labels={"a": "-x"}), """nodes[2].labels["a"]: value must"""),
    ("label value long", _with_node(labels={"a": "v" * 64}), "value must be at most 63"),
    ("label name long", _with_node(labels={"a" * 64: "v"}), "name must be at most 63"),
    (
        "annotation key bad",
        _with_node(annotations={"a b": "v"}),
        """nodes[2].annotations["a b"]: name must consist""",
    ),
    (
        "taint effect",
        _with_node(taints=[{"key": "k", "effect": "NoWay"}]),
        "nodes[2].taints[0].effect: must be one of NoSchedule, PreferNoSchedule, NoExecute",
    ),
    (
        "duplicate taint",
        _with_node(taints=[{"key": "k", "effect": "NoSchedule"}] * 2),
        "nodes[2].taints[1]: duplicate key and effect of nodes[2].taints[0]",
    ),
    ("taint value", _with_node(taints=[{"key": "k", "value": "a b", "effect": "NoSchedule"}]), ""),
    ("no control plane", _doc(nodes=[_node()]), "nodes: at least one node must have control_plane"),
    ("no nodes", _doc(nodes=[]), "nodes: at least one node"),
    ("subnet not cidr", _doc(service_subnet="10.68.0.0"), "service_subnet: must be a CIDR"),
    ("subnet garbage", _doc(service_subnet="x/16"), "service_subnet: must be a CIDR"),
    ("subnet host bits", _doc(service_subnet="10.68.0.1/16"), "service_subnet: has host bits set"),
    ("dns server", _doc(dns_servers=["10.0.0.1", "dns"]), "dns_servers[1]: must be an IPv4"),
    ("relative binary", _doc(binaries={"etcd": "etcd"}), "binaries.etcd: must be an absolute path"),
    (
        "binary with newline",
        _doc(binaries={"kube-apiserver": "/bin/a\nb"}),
        "binaries.kube-apiserver: may contain only ASCII letters",
    ),
    *[
        (f"binary {path!r}", _doc(binaries={"etcd": path}), f"binaries.etcd: {problem}")
        for path, problem in [
            ("/usr/bin/etcd;touch /tmp/x", "may contain only ASCII letters"),
            ("/opt/etcd/", "must be a normalised path"),
            ("/opt/./etcd", "must be a normalised path"),
            ("/opt/../bin/etcd", "must be a normalised path"),
            ("//opt/etcd", "must be a normalised path"),
            ("/", "must be a normalised path"),
            ("/opt/my etcd", "may contain only ASCII letters"),
            ("/opt/\u00e9tcd", "may contain only ASCII letters"),
            ("/opt/$(id)", "may contain only ASCII letters"),
            ("/" + "a" * 256, "each part must be at most 255"),
            ("/a" * 2049, "must be at most 4096 characters"),
        ]
    ],
    *[
        (f"address {address!r}", _with_node(address=address), f"nodes[2].address: {problem}")
        for address, problem in [
            ("::ffff:127.0.1.3", "must not be an IPv4-mapped IPv6 address: write 127.0.1.3"),
            ("0.0.0.0", "must not be the unspecified address"),
            ("::", "must not be the unspecified address"),
            ("224.0.0.1", "must not be a multicast address"),
            ("ff02::1", "must not be a multicast address"),
            ("255.255.255.255", "must not be the broadcast address"),
            ("fe80::1%eth0", "must not have an IPv6 zone ID"),
            ("FD00::1", "must be written in canonical form: fd00::1"),
            ("fd00:0::1", "must be written in canonical form: fd00::1"),
            ("1" * 300, "must be an IPv4 or IPv6 address (too long)"),
        ]
    ],
    ("dns server multicast", _doc(dns_servers=["224.0.0.1"]), "dns_servers[0]: must not be a"),
    (
        "env name reserved for the runtime",
        _doc(options={"etcd": {"extra_env": {"cke_log": "/etc/passwd"}}}),
        """options.etcd.extra_env["cke_log"]: names starting with 'cke_' are reserved""",
    ),
    (
        "env name reserved for the runtime (setsid)",
        _doc(options={"rivers": {"extra_env": {"cke_setsid": "x"}}}),
        """options.rivers.extra_env["cke_setsid"]: names starting with 'cke_' are reserved""",
    ),
    *[
        (
            f"etcd flag {arg}",
            _doc(options={"etcd": {"extra_args": ["--log-level=info", arg]}}),
            f"options.etcd.extra_args[1]: --{flag} is set by cke",
        )
        for arg, flag in [
            ("--data-dir=/tmp/elsewhere", "data-dir"),
            ("--wal-dir", "wal-dir"),
            ("-name=x", "name"),
            ("--force-new-cluster", "force-new-cluster"),
            ("--config-file=/etc/x.yml", "config-file"),
        ]
    ],
    ("over-long cluster name", _doc(name="n" * 254), "name: must be at most 253 characters"),
    ("over-long user", _with_node(user="u" * 256), "nodes[2].user: must be at most 255"),
    ("over-long host key", _with_node(host_key="ssh-ed25519 " + "A" * 9000), "host_key: must be"),
    (
        "relative bind",
        _doc(options={"kubelet": {"extra_binds": [{"source": "/a", "destination": "b"}]}}),
        "options.kubelet.extra_binds[0].destination: must be an absolute path",
    ),
    (
        "env name",
        _doc(options={"etcd-rivers": {"extra_env": {"A=B": "x"}}}),
        """options.etcd-rivers.extra_env["A=B"]: name must be""",
    ),
    (
        "NUL in arg",
        _doc(options={"rivers": {"extra_args": ["a\x00b"]}}),
        "options.rivers.extra_args[0]: must not contain NUL",
    ),
    ("not a mapping", ["a"], "(top): want a mapping of cluster fields, got a list"),
    ("scalar document", "name", "(top): want a mapping of cluster fields, got a string"),
    ("empty document", None, "(top): want a mapping of cluster fields, got an empty document"),
]


@pytest.mark.parametrize(("doc", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_clusters(doc: Any, expected: str) -> None:
    message = _errors(doc)
    assert expected in message
    if isinstance(doc, dict):
        with pytest.raises(ClusterError):
            cluster_from_json(json.dumps(doc))


def test_taint_value_checked() -> None:
    message = _errors(_with_node(taints=[{"key": "k", "value": "a b", "effect": "NoSchedule"}]))
    assert message.startswith("nodes[2].taints[0].value: value must be empty or consist")


def test_all_problems_reported_in_stable_order() -> None:
    doc = _doc(
        name="",
        nodes=[
            _node(address="10.0.0.1", control_plane=True),
            _node(address="bad", user=""),
            _node(address="10.0.0.3"),
            _node(address="10.0.0.1"),
        ],
        service_subnet="x",
        dns_servers=["y"],
        binaries={"etcd": "etcd"},
    )
    expected = [
        "name: must not be empty",
        "nodes[1].address: must be an IPv4 or IPv6 address",
        "nodes[1].user: must not be empty",
        "nodes[3].address: duplicate of nodes[0]",
        "service_subnet: must be a CIDR subnet such as 10.68.0.0/16",
        "dns_servers[0]: must be an IPv4 or IPv6 address",
        "binaries.etcd: must be an absolute path",
    ]
    with pytest.raises(ClusterError) as info:
        parse_cluster(_dump(doc))
    assert info.value.problems == tuple(expected)
    assert str(info.value) == "; ".join(expected)


def test_messages_do_not_echo_values() -> None:
    secret = "s3cr3t-value-that-must-not-appear"
    doc = _with_node(
        address=secret,
        hostname=secret.upper(),
        labels={"a": secret + " x"},
        annotations={"bad key": secret},
        host_key="ssh-ed25519 " + secret,
    )
    doc["service_subnet"] = secret
    doc["dns_servers"] = [secret]
    message = _errors(doc)
    assert secret not in message.lower()
    # Type errors from pydantic do not echo the input either.
    assert secret not in _errors(_doc(name=[secret], runtime=secret)).lower()


def test_long_keys_are_cut_short_in_paths() -> None:
    message = _errors(_with_node(labels={"x" * 500: "v"}))
    assert len(message) < 200


# --- YAML handling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [", "(yaml): "),
        ("a: &x 1\nb: *x\n", "(yaml): YAML aliases (*name) are not supported at line 2"),
        ("name: a\nname: b\n", "(yaml): duplicate mapping key at line 2, column 1"),
        ("? [a]\n: 1\n", "(yaml): "),
        ("2001-02-30\n", "(yaml): cannot parse (ValueError)"),
        ("a: 1\n---\nb: 2\n", "(yaml): "),
        ("[" * 1500, "(yaml): "),
        ("\t- x", "(yaml): "),
    ],
)
def test_yaml_errors(text: str, expected: str) -> None:
    with pytest.raises(ClusterError) as info:
        parse_cluster(text)
    assert str(info.value).startswith(expected)


def test_yaml_error_does_not_echo_the_document() -> None:
    text = "name: s3cr3t-line-content\nnodes: [\n"
    with pytest.raises(ClusterError) as info:
        parse_cluster(text)
    assert "s3cr3t" not in str(info.value)


def test_json_text_is_yaml() -> None:
    cluster = parse_cluster(json.dumps(_doc()))
    assert cluster.name == "test"


def test_cluster_from_json_rejects_bad_json_and_invalid_clusters() -> None:
    for text in ("{", "[]", "null", json.dumps(_doc(nodes=[_node()]))):
        with pytest.raises(ClusterError):
            cluster_from_json(text)


def test_cluster_to_yaml_leaves_out_defaults_and_json_keeps_them() -> None:
    cluster = parse_cluster(_dump(_doc()))
    assert "runtime" not in cluster_to_yaml(cluster)
    data = json.loads(cluster_to_json(cluster))
    assert data["runtime"] == "systemd"
    assert data["binaries"]["kube-apiserver"] == "/usr/local/bin/kube-apiserver"
    assert data["options"]["kube-controller-manager"] == {
        "extra_args": [],
        "extra_env": {},
        "extra_binds": [],
    }
    assert data["nodes"][0]["port"] == 22


# --- the check functions one by one -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("a", True),
        ("a-b.c-d", True),
        ("0", True),
        ("a." * 126 + "a", True),
        ("a." * 126 + "ab", False),
        ("", False),
        ("-a", False),
        ("a-", False),
        ("a..b", False),
        ("A", False),
        ("a_b", False),
        ("a" * 63, True),
        ("a" * 64, False),
    ],
)
def test_dns_subdomain_problem(value: str, ok: bool) -> None:
    assert (cl.dns_subdomain_problem(value) is None) is ok


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("a", True),
        ("A_b.c-D", True),
        ("example.com/A", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("/a", False),
        ("a/", False),
        ("a/b/c", False),
        ("Example.com/a", False),
        ("_a", False),
        ("a b", False),
        ("", False),
    ],
)
def test_qualified_name_problem(key: str, ok: bool) -> None:
    assert (cl.qualified_name_problem(key) is None) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        *[("", True), ("a", True), ("a.B_c-1", True), ("v" * 63, True), ("v" * 64, False)],
        *[("-a", False), ("a.", False), ("a b", False), ("a/b", False)],
    ],
)
def test_label_value_problem(value: str, ok: bool) -> None:
    assert (cl.label_value_problem(value) is None) is ok


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("cke.cybozu.com/x", False),
        ("sabakan.cke.cybozu.com/x", False),
        ("node-role.kubernetes.io/worker", False),
        ("node-role.kubernetes.io", True),
        ("x.node-role.kubernetes.io/worker", True),
        ("cybozu.com/x", True),
        ("kubernetes.io/hostname", True),
    ],
)
def test_reserved_key_problem(key: str, ok: bool) -> None:
    assert (cl.reserved_key_problem(key) is None) is ok


def _blob(key_type: bytes, rest: bytes = b"\x00\x00\x00\x01x") -> str:
    return base64.b64encode(struct.pack(">I", len(key_type)) + key_type + rest).decode()


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (HOST_KEY, None),
        (HOST_KEY + " comment with spaces", None),
        ("sk-ssh-ed25519@openssh.com " + _blob(b"sk-ssh-ed25519@openssh.com"), None),
        ("ecdsa-sha2-nistp256 " + _blob(b"ecdsa-sha2-nistp256"), None),
        ("", "must be an OpenSSH public key"),
        ("ssh-ed25519", "must be an OpenSSH public key"),
        ("SSH-ED25519 " + _blob(b"SSH-ED25519"), "key type is not"),
        ("ssh-ed25519 " + _blob(b"ssh-ed25519")[:-1], "not valid base64"),
        ("ssh-ed25519 " + _blob(b"ssh-ed25519", b""), "too short"),
        ("ssh-ed25519 " + base64.b64encode(b"\x00\x00").decode(), "too short"),
        ("ssh-ed25519 " + _blob(b"ssh-ed2551"), "does not match"),
        ("ssh-rsa " + _blob(b"ssh-ed25519"), "does not match"),
        (HOST_KEY + "\r", "single line"),
    ],
)
def test_host_key_problem(key: str, problem: str | None) -> None:
    found = cl.host_key_problem(key)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_check_node_address_and_hostname() -> None:
    def node(**fields: Any) -> Node:
        return Node.model_validate(_node(**fields))

    assert cl.check_node_address(node(address="::1", hostname="a"), "n") == []
    assert cl.check_node_address(node(address="1.2.3"), "n") == [
        ("n.address", "must be an IPv4 or IPv6 address")
    ]
    assert cl.check_node_address(node(address=" 10.0.0.1"), "n") != []
    assert cl.check_node_hostname(node(), "n") == []
    assert cl.check_node_hostname(node(address="::1"), "n") == [
        ("n.hostname", "required when the address is IPv6")
    ]
    assert cl.check_node_user(node(user="core"), "n") == []
    assert cl.check_node_user(node(user="a\tb"), "n") != []


def test_check_duplicates() -> None:
    nodes = _model(
        _doc(
            nodes=[
                _node(address="10.0.0.1", control_plane=True),
                _node(address="10.0.0.2", hostname="b"),
                _node(address="10.0.0.1"),
                _node(address="10.0.0.4", hostname="b"),
                _node(address="10.0.0.5", hostname="10.0.0.1"),
                _node(address="10.0.0.1", hostname="f"),
            ]
        )
    ).nodes
    assert cl.check_duplicates(nodes) == [
        ("nodes[2].address", "duplicate of nodes[0]"),
        ("nodes[3].hostname", "node name duplicate of nodes[1]"),
        ("nodes[4].hostname", "node name duplicate of nodes[0]"),
        ("nodes[5].address", "duplicate of nodes[0]"),
    ]


def test_check_control_plane_present_and_count() -> None:
    cluster = _model(_doc())
    assert cl.check_control_plane_present(cluster.nodes) == []
    assert cl.check_control_plane_present(_model(_doc(nodes=[_node()])).nodes) != []
    assert cl.check_control_plane_count(cluster, Constraints()) == []
    three = Constraints.model_validate({"control-plane-count": 3})
    assert cl.check_control_plane_count(cluster, three) == [
        ("nodes", "1 control plane(s), but constraint control-plane-count is 3")
    ]


def test_validate_cluster_checks_count_and_everything_else() -> None:
    cluster = _model(_doc(service_subnet="nope"))
    two = Constraints.model_validate({"control-plane-count": 2})
    with pytest.raises(ClusterError) as info:
        validate_cluster(cluster, two)
    assert info.value.problems == (
        "service_subnet: must be a CIDR subnet such as 10.68.0.0/16",
        "nodes: 1 control plane(s), but constraint control-plane-count is 2",
    )
    # No control plane at all: reported once, not also as a count mismatch.
    with pytest.raises(ClusterError) as info:
        validate_cluster(_model(_doc(nodes=[_node()])), Constraints())
    assert info.value.problems == ("nodes: at least one node must have control_plane: true",)


@pytest.mark.parametrize(
    ("subnet", "ok"),
    [
        ("10.68.0.0/16", True),
        ("fd00::/64", True),
        ("10.0.0.0/8", True),
        ("10.68.0.0", False),
        ("10.68.0.0/33", False),
        ("10.68.0.1/16", False),
        ("", False),
        ("10.68.0.0/16 ", False),
    ],
)
def test_check_service_subnet(subnet: str, ok: bool) -> None:
    assert (cl.check_service_subnet(_model(_doc(service_subnet=subnet))) == []) is ok


def test_check_dns_servers() -> None:
    cluster = _model(_doc(dns_servers=["1.1.1.1", "x", "::1", ""]))
    assert cl.check_dns_servers(cluster) == [
        ("dns_servers[1]", "must be an IPv4 or IPv6 address"),
        ("dns_servers[3]", "must be an IPv4 or IPv6 address"),
    ]


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        *[("/a", True), ("/usr/local/bin/etcd", True), ("a", False), ("", False)],
        *[("./a", False), ("/a\x00", False), ("/a\nb", False)],
    ],
)
def test_absolute_path_problem(path: str, ok: bool) -> None:
    assert (cl.absolute_path_problem(path) is None) is ok


def test_check_binaries_and_options() -> None:
    cluster = _model(
        _doc(
            binaries={"kube-proxy": "kube-proxy"},
            options={
                "kube-scheduler": {
                    "extra_env": {"OK": "\x00", "9": "x"},
                    "extra_binds": [{"source": "s", "destination": "/d"}],
                }
            },
        )
    )
    assert cl.check_binaries(cluster) == [("binaries.kube-proxy", "must be an absolute path")]
    assert [p for p, _ in cl.check_options(cluster)] == [
        'options.kube-scheduler.extra_env["OK"]',
        'options.kube-scheduler.extra_env["9"]',
        "options.kube-scheduler.extra_binds[0].source",
    ]


def test_check_node_taints_labels_annotations() -> None:
    node = Node.model_validate(
        _node(
            labels={"ok": "v", "bad/": "v"},
            annotations={"OK.example.com/fine": "x", "bad/": "x"},
            taints=[{"key": "k", "effect": "NoSchedule"}, {"key": "", "effect": "NoExecute"}],
        )
    )
    assert cl.check_node_labels(node, "n") == [
        ('n.labels["bad/"]', "name must not be empty"),
    ]
    assert cl.check_node_annotations(node, "n") == [
        ('n.annotations["bad/"]', "name must not be empty"),
    ]
    assert cl.check_node_taints(node, "n") == [("n.taints[1].key", "name must not be empty")]


# --- constraints ------------------------------------------------------------------------------


def test_constraint_names() -> None:
    assert CONSTRAINT_NAMES == (
        "control-plane-count",
        "minimum-workers-rate",
        "maximum-unreachable-nodes-for-reboot",
        "maximum-repair-queue-entries",
        "wait-seconds-to-repair-rebooting",
    )


def test_constraints_json_round_trip_and_defaults() -> None:
    assert constraints_from_json(None) == Constraints()
    assert constraints_from_json("{}") == Constraints()
    assert constraints_from_json('{"control-plane-count": 3}').control_plane_count == 3
    c = Constraints.model_validate({"maximum-repair-queue-entries": 7, "minimum-workers-rate": 50})
    text = constraints_to_json(c)
    assert json.loads(text)["maximum-repair-queue-entries"] == 7
    assert constraints_from_json(text) == c


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "(json): not valid JSON"),
        ("[]", "(top): want a mapping of constraints, got a list"),
        ('{"bogus": 1}', "bogus: Extra inputs are not permitted"),
        ('{"control_plane_count": 1}', "control_plane_count: Extra inputs"),
        ('{"control-plane-count": 0}', "control-plane-count: Input should be greater than"),
        ('{"control-plane-count": "2"}', "control-plane-count: Input should be a valid integer"),
        ('{"minimum-workers-rate": 101}', "minimum-workers-rate: Input should be less than"),
        ('{"wait-seconds-to-repair-rebooting": -1}', "wait-seconds-to-repair-rebooting: Input"),
    ],
)
def test_constraints_from_json_errors(text: str, expected: str) -> None:
    with pytest.raises(ClusterError) as info:
        constraints_from_json(text)
    assert str(info.value).startswith(expected)


@pytest.mark.parametrize("name", CONSTRAINT_NAMES)
def test_set_constraint_each(name: str) -> None:
    before = Constraints()
    after = set_constraint(before, name, " 5 ")
    assert json.loads(constraints_to_json(after))[name] == 5
    assert before == Constraints()  # not modified
    others = {k: v for k, v in json.loads(constraints_to_json(after)).items() if k != name}
    assert others == {k: v for k, v in json.loads(constraints_to_json(before)).items() if k != name}


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("control_plane_count", "1", '"control_plane_count": unknown constraint'),
        ("bogus", "1", '"bogus": unknown constraint (want one of control-plane-count,'),
        ("control-plane-count", "0", "control-plane-count: Input should be greater than or equal"),
        ("control-plane-count", "-1", "control-plane-count: Input should be greater"),
        ("minimum-workers-rate", "101", "minimum-workers-rate: Input should be less than"),
        ("maximum-repair-queue-entries", "1.5", "maximum-repair-queue-entries: must be an integer"),
        ("maximum-repair-queue-entries", "1_0", "maximum-repair-queue-entries: must be an integer"),
        ("maximum-repair-queue-entries", "", "maximum-repair-queue-entries: must be an integer"),
        ("wait-seconds-to-repair-rebooting", "9" * 40, "wait-seconds-to-repair-rebooting: must be"),
    ],
)
def test_set_constraint_errors(name: str, value: str, expected: str) -> None:
    with pytest.raises(ClusterError) as info:
        set_constraint(Constraints(), name, value)
    assert str(info.value).startswith(expected)


# --- hypothesis: the parser -------------------------------------------------------------------

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Valid documents are big; fewer examples keep the file fast.
_SLOW_SETTINGS = settings(_SETTINGS, max_examples=60)


def _parse_outcome(text: str) -> Cluster | None:
    """Parse; only ClusterError may come out; a success must round-trip."""
    try:
        cluster = parse_cluster(text)
    except ClusterError as exc:
        assert str(exc)
        return None
    assert parse_cluster(cluster_to_yaml(cluster)) == cluster
    assert cluster_from_json(cluster_to_json(cluster)) == cluster
    return cluster


_YAMLISH = st.text(
    alphabet=st.sampled_from([*"abcn01:-[]{}&*!|>'\"#?,.% \n\t/\\@`~<=", "\x00", "é"]),
    max_size=60,
)


@_SETTINGS
@given(st.one_of(st.text(max_size=200), _YAMLISH))
def test_arbitrary_text_only_raises_cluster_error(text: str) -> None:
    _parse_outcome(text)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["10.0.0.1", "::1", "10.68.0.0/16", "NoSchedule", "systemd", "/bin/x"])
)
_KEYS = st.sampled_from(
    [
        *["name", "nodes", "address", "user", "hostname", "port", "host_key", "labels"],
        *["taints", "options", "etcd", "extra_args", "extra_env", "extra_binds", "binaries"],
        *["runtime", "service_subnet", "dns_servers", "control_plane", "key", "effect"],
        "source",
        # Upstream's fields (issue 18).
        *["reboot", "repair", "sabakan", "dns_service", "kubelet", "kube-api", "kube-proxy"],
        *["config", "boot_taints", "cni_conf_file", "content", "audit_log_policy"],
        *["propagation", "selinux_label", "matchExpressions", "operator", "values"],
    ]
) | st.text(max_size=8)
_DOCS = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=30,
)


@_SETTINGS
@given(_DOCS)
def test_arbitrary_documents_only_raise_cluster_error(doc: Any) -> None:
    _parse_outcome(_dump(doc))
    try:
        cluster_from_json(json.dumps(doc))
    except ClusterError:
        pass


# Valid clusters.

_ALNUM_LOWER = "abcxyz0189"
_ALNUM = _ALNUM_LOWER + "ABXZ"


def _word(ends: str, middle: str, max_middle: int) -> st.SearchStrategy[str]:
    """first char, optional (middle + last char): the shape of DNS labels and label names."""
    last = st.sampled_from(ends).flatmap(
        lambda e: st.text(middle, max_size=max_middle).map(lambda m: m + e)
    )
    return st.tuples(st.sampled_from(ends), st.just("") | last).map("".join)


_DNS_LABEL = _word(_ALNUM_LOWER, _ALNUM_LOWER + "-", 8)
_PREFIX = st.lists(_DNS_LABEL, min_size=1, max_size=3).map(".".join)
_NAME = _word(_ALNUM, _ALNUM + "-_.", 10)
_QUALIFIED = (
    st.tuples(st.none() | _PREFIX, _NAME)
    .map(lambda pn: pn[1] if pn[0] is None else f"{pn[0]}/{pn[1]}")
    .filter(lambda k: cl.reserved_key_problem(k) is None)
)
_LABEL_VALUE = st.just("") | _NAME
_NO_NUL = st.text(max_size=15).filter(lambda s: "\x00" not in s)
_ABS_PATH = st.text("abz09-_./ ", max_size=20).map(lambda p: "/" + p)
_BINARY_PATH = (
    st.lists(st.text("abzAZ09-_.+@", min_size=1, max_size=8), min_size=1, max_size=4)
    .map(lambda parts: "/" + "/".join(parts))
    .filter(lambda p: fields.binary_path_problem(p) is None)
)
_NODE_IP = st.ip_addresses().filter(lambda ip: fields.node_address_problem(str(ip)) is None)
_TAINT = st.fixed_dictionaries(
    {"key": _QUALIFIED, "effect": st.sampled_from(cl.TAINT_EFFECTS)},
    optional={"value": _LABEL_VALUE},
)
_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "extra_args": st.lists(_NO_NUL.filter(lambda a: not a.startswith("-")), max_size=3),
        "extra_env": st.dictionaries(_word("aZ_", "aZ_09", 8), _NO_NUL, max_size=3),
        "extra_binds": st.lists(
            st.fixed_dictionaries(
                {"source": _ABS_PATH, "destination": _ABS_PATH},
                optional={"read_only": st.booleans()},
            ),
            max_size=2,
        ),
    },
)
_SUBNET = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
).map(lambda ap: str(ipaddress.ip_network(f"{ap[0]}/{ap[1]}", strict=False)))


@st.composite
def _valid_docs(draw: st.DrawFn) -> dict[str, Any]:
    addresses = draw(st.lists(_NODE_IP, min_size=1, max_size=6, unique_by=lambda ip: ip.packed))
    nodes = []
    for i, ip in enumerate(addresses):
        node: dict[str, Any] = {"address": str(ip), "user": draw(st.sampled_from(["u", "core"]))}
        if ip.version == 6 or draw(st.booleans()):
            node["hostname"] = f"n{i}.{draw(_PREFIX)}"  # unique: the index
        extra = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "port": st.integers(1, 65535),
                    "host_key": st.just(_host_key(i)),
                    "control_plane": st.booleans(),
                    "labels": st.dictionaries(_QUALIFIED, _LABEL_VALUE, max_size=3),
                    "annotations": st.dictionaries(_QUALIFIED, st.text(max_size=15), max_size=3),
                    "taints": st.lists(
                        _TAINT, max_size=3, unique_by=lambda t: (t["key"], t["effect"])
                    ),
                },
            )
        )
        nodes.append({**node, **extra})
    nodes[draw(st.integers(0, len(nodes) - 1))]["control_plane"] = True
    doc: dict[str, Any] = {
        "name": draw(_DNS_LABEL),
        "nodes": nodes,
        "service_subnet": draw(_SUBNET),
    }
    optional = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "dns_servers": st.lists(_NODE_IP.map(str), max_size=3),
                "runtime": st.sampled_from(["systemd", "process"]),
                "binaries": st.dictionaries(
                    st.sampled_from(cl._BINARY_NAMES), _BINARY_PATH, max_size=3
                ),
                "options": st.dictionaries(st.sampled_from(cl.COMPONENTS), _PARAMS, max_size=3),
            },
        )
    )
    return {**doc, **optional}


@_SLOW_SETTINGS
@given(_valid_docs())
def test_valid_clusters_round_trip(doc: dict[str, Any]) -> None:
    cluster = parse_cluster(_dump(doc))
    assert cluster.model_dump(by_alias=True, exclude_unset=True) == doc
    assert parse_cluster(cluster_to_yaml(cluster)) == cluster
    assert cluster_from_json(cluster_to_json(cluster)) == cluster
    count = len(cluster.control_planes)
    validate_cluster(cluster, set_constraint(Constraints(), "control-plane-count", str(count)))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


@_SLOW_SETTINGS
@given(_valid_docs(), st.data())
def test_mutated_valid_documents_only_raise_cluster_error(doc: dict[str, Any], data: Any) -> None:
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(_paths(doc)[1:]))
    garbage = data.draw(_DOCS)
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    if data.draw(st.booleans()) or not isinstance(target, dict):
        target[path[-1]] = garbage
    else:
        del target[path[-1]]
    _parse_outcome(_dump(doc))
