"""Issue 18: cluster documents written by upstream CKE load here.

CKE (Go) writes every key of its structs, ``null`` for nil slices, maps and pointers,
and has fields that cke stores but does not act on.  The documents below are built
from the Go struct definitions of upstream's ``cluster.go`` (json tags, ``omitempty``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from cke.cli import ckecli
from cke.cluster import (
    DEFAULT_CRI_ENDPOINT,
    DEFAULT_ETCD_VOLUME_NAME,
    Cluster,
    ClusterError,
    Constraints,
    cluster_from_json,
    cluster_to_json,
    cluster_to_yaml,
    inert_fields,
    parse_cluster,
    validate_cluster,
)
from cke.storage import Status

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"

_NIL_PARAMS = {"extra_args": None, "extra_binds": None, "extra_env": None}


def _go_node(address: str, *, control_plane: bool = False) -> dict[str, Any]:
    """A ``Node`` as Go marshals it: every key, nil maps and slices as null."""
    return {
        "address": address,
        "hostname": "",
        "user": "core",
        "control_plane": control_plane,
        "annotations": None,
        "labels": None,
        "taints": None,
    }


def as_cke_writes_it() -> dict[str, Any]:
    """``json.Marshal`` of upstream's ``NewCluster()`` with name, nodes and subnet set.

    Keys with ``omitempty`` are left out when empty (``config``, ``disable``, the
    reboot/repair pointers so tagged, ``trusted_rest_mappings``); all others are present,
    ``null`` where Go has nil.
    """
    return {
        "name": "tutorial",
        "nodes": [
            _go_node("192.168.1.101", control_plane=True),
            _go_node("192.168.1.102"),
            _go_node("192.168.1.103"),
        ],
        "taint_control_plane": False,
        "control_plane_tolerations": None,
        "service_subnet": "10.100.0.0/16",
        "dns_servers": None,
        "dns_service": "",
        "reboot": {
            "reboot_command": None,
            "boot_check_command": None,
            "command_retries": None,
            "command_interval": None,
            "evict_retries": None,
            "evict_interval": None,
        },
        "repair": {"repair_procedures": None},
        "sabakan": {"spare_node_taint_key": ""},
        "options": {
            "etcd": {**_NIL_PARAMS, "volume_name": "etcd-cke"},
            "rivers": dict(_NIL_PARAMS),
            "etcd-rivers": dict(_NIL_PARAMS),
            "kube-api": {
                **_NIL_PARAMS,
                "audit_log_enabled": False,
                "audit_log_policy": "",
                "audit_log_path": "",
            },
            "kube-controller-manager": dict(_NIL_PARAMS),
            "kube-scheduler": dict(_NIL_PARAMS),
            "kube-proxy": dict(_NIL_PARAMS),
            "kubelet": {
                **_NIL_PARAMS,
                "boot_taints": None,
                "cni_conf_file": {"name": "", "content": ""},
                "cri_endpoint": "/run/containerd/containerd.sock",
                "in_place_update": False,
            },
        },
    }


def every_field_set() -> dict[str, Any]:
    """A document that sets each upstream field (what CKE would write for it)."""
    doc = as_cke_writes_it()
    selector = {
        "matchLabels": {"team": "neco"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "skip", "operator": "DoesNotExist"},
        ],
    }
    mount = {
        "source": "/var/lib/x",
        "destination": "/x",
        "read_only": True,
        "propagation": "rshared",
        "selinux_label": "z",
    }
    doc.update(
        taint_control_plane=True,
        control_plane_tolerations=["example.com/spare"],
        dns_servers=["8.8.8.8"],
        dns_service="kube-system/dns",
        reboot={
            "reboot_command": ["true"],
            "boot_check_command": ["bash", "-c", "echo true"],
            "max_concurrent_reboots": 2,
            "eviction_timeout_seconds": 600,
            "command_timeout_seconds": 0,
            "command_retries": 1,
            "command_interval": 5,
            "evict_retries": 3,
            "evict_interval": 10,
            "protected_namespaces": selector,
            "protected_job_pods": {"matchLabels": {"keep": "yes"}},
        },
        repair={
            "repair_procedures": [
                {
                    "machine_types": ["qemu"],
                    "repair_operations": [
                        {
                            "operation": "unreachable",
                            "repair_steps": [
                                {
                                    "repair_command": ["reboot-it"],
                                    "command_timeout_seconds": 30,
                                    "command_retries": 1,
                                    "command_interval": 5,
                                    "need_drain": True,
                                    "watch_seconds": 60,
                                }
                            ],
                            "health_check_command": ["check"],
                            "command_timeout_seconds": 30,
                            "success_command": ["done"],
                            "success_command_timeout": 30,
                        }
                    ],
                }
            ],
            "max_concurrent_repairs": 1,
            "protected_namespaces": copy.deepcopy(selector),
            "evict_retries": 1,
            "evict_interval": 1,
            "eviction_timeout_seconds": 60,
            "protected_job_pods": None,
        },
        sabakan={"spare_node_taint_key": "example.com/spare"},
        trusted_rest_mappings=[
            {
                "group": "example.com",
                "version": "v1",
                "kind": "Test",
                "resource": "tests",
                "namespaced": True,
            }
        ],
    )
    options = doc["options"]
    options["etcd"].update(volume_name="etcd-data", extra_binds=[mount])
    options["kube-api"].update(
        audit_log_enabled=True,
        audit_log_policy="apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n",
        audit_log_path="/var/log/audit.log",
    )
    options["kube-scheduler"]["config"] = {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "podMaxBackoffSeconds": 100,
    }
    options["kube-proxy"].update(
        disable=True,
        config={
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
        },
    )
    options["kubelet"].update(
        boot_taints=[{"key": "example.com/booting", "value": "", "effect": "NoSchedule"}],
        cni_conf_file={
            "name": "99-loopback.conf",
            "content": '{"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}',
        },
        config={
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "clusterDomain": "cluster.local",
            "containerLogMaxSize": "10Mi",
            "evictionHard": {"memory.available": "100Mi"},
            "cpuCFSQuotaPeriod": 0.5,
        },
        cri_endpoint="/var/run/k3s/containerd/containerd.sock",
        in_place_update=True,
    )
    return doc


def _load(doc: Any) -> Cluster:
    """Both entry points (stored JSON and ``ckecli cluster set`` YAML) must agree."""
    from_json = cluster_from_json(json.dumps(doc))
    # (a copy through JSON: shared sub-documents would be written as YAML aliases)
    assert parse_cluster(yaml.safe_dump(json.loads(json.dumps(doc)))) == from_json
    return from_json


def _problems(doc: Any) -> str:
    with pytest.raises(ClusterError) as info:
        cluster_from_json(json.dumps(doc))
    return str(info.value)


# --- upstream's example, as is -------------------------------------------------------------


def test_upstream_example_loads_as_is() -> None:
    cluster = parse_cluster((FIXTURES / "cke-cluster.yml").read_text())
    validate_cluster(cluster, Constraints())
    assert cluster.name == "tutorial"
    assert [n.address for n in cluster.control_planes] == ["192.168.1.101"]
    assert cluster.dns_servers == ["8.8.8.8", "1.1.1.1"]
    config = cluster.options.kubelet.config
    assert config is not None and config["volumePluginDir"] == "/var/lib/kubelet/volumeplugins"
    assert cluster.options.kubelet.cri_endpoint == DEFAULT_CRI_ENDPOINT
    assert inert_fields(cluster) == [
        "options.kube-controller-manager.extra_args",
        "options.kubelet.config",
    ]
    assert cluster_from_json(cluster_to_json(cluster)) == cluster
    assert parse_cluster(cluster_to_yaml(cluster)) == cluster


# --- as CKE writes it: every key, nulls ----------------------------------------------------


def test_document_as_cke_writes_it_loads() -> None:
    cluster = _load(as_cke_writes_it())
    minimal = {
        "name": "tutorial",
        "service_subnet": "10.100.0.0/16",
        "nodes": [
            {"address": "192.168.1.101", "user": "core", "control_plane": True},
            {"address": "192.168.1.102", "user": "core"},
            {"address": "192.168.1.103", "user": "core"},
        ],
    }
    # Every null is the default: the same cluster as the one that leaves the keys out.
    assert cluster == _load(minimal)
    assert cluster.options.etcd.volume_name == DEFAULT_ETCD_VOLUME_NAME
    assert cluster.reboot.reboot_command == [] and cluster.reboot.command_retries is None
    assert cluster.nodes[0].labels == {} and cluster.nodes[0].taints == []
    assert inert_fields(cluster) == []


def test_nulls_for_pointer_and_omitempty_fields_too() -> None:
    doc = as_cke_writes_it()
    doc["reboot"].update(
        max_concurrent_reboots=None,
        eviction_timeout_seconds=None,
        command_timeout_seconds=None,
        protected_namespaces=None,
        protected_job_pods=None,
    )
    doc["repair"] = {
        "repair_procedures": [
            {
                "machine_types": None,
                "repair_operations": [
                    {
                        "operation": "op",
                        "repair_steps": [{"repair_command": None, "need_drain": None}],
                        "health_check_command": None,
                        "success_command": None,
                    }
                ],
            }
        ],
        "max_concurrent_repairs": None,
        "protected_namespaces": {"matchLabels": None, "matchExpressions": None},
    }
    doc["sabakan"] = None
    doc["trusted_rest_mappings"] = None
    doc["options"]["kube-scheduler"]["config"] = None
    doc["options"]["kube-proxy"].update(config=None, disable=None)
    doc["options"]["kubelet"].update(config=None, cni_conf_file=None, cri_endpoint=None)
    doc["options"]["etcd"]["volume_name"] = None
    doc["options"]["etcd"]["extra_binds"] = [
        {"source": "/a", "destination": "/b", "read_only": None, "propagation": None}
    ]
    doc["nodes"][1]["host_key"] = None
    doc["nodes"][1]["port"] = None
    cluster = _load(doc)
    assert cluster.options.kubelet.cri_endpoint == DEFAULT_CRI_ENDPOINT
    assert cluster.options.etcd.volume_name == DEFAULT_ETCD_VOLUME_NAME
    assert cluster.options.etcd.extra_binds[0].propagation == ""
    assert cluster.nodes[1].port == 22
    step = cluster.repair.repair_procedures[0].repair_operations[0].repair_steps[0]
    assert (step.repair_command, step.need_drain) == ([], False)
    assert cluster.repair.protected_namespaces is not None
    assert cluster.repair.protected_namespaces.match_labels == {}


def test_null_for_a_required_field_is_still_an_error() -> None:
    doc = as_cke_writes_it()
    doc["name"] = None
    doc["nodes"][0]["user"] = None
    message = _problems(doc)
    assert "name: Input should be a valid string" in message
    assert "nodes[0].user: Input should be a valid string" in message


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ((), "bogus"),
        (("reboot",), "reboot.bogus"),
        (("repair",), "repair.bogus"),
        (("sabakan",), "sabakan.bogus"),
        (("options", "etcd"), "options.etcd.bogus"),
        (("options", "kube-api"), "options.kube-api.bogus"),
        (("options", "kube-scheduler"), "options.kube-scheduler.bogus"),
        (("options", "kube-proxy"), "options.kube-proxy.bogus"),
        (("options", "kubelet"), "options.kubelet.bogus"),
        (("options", "kubelet", "cni_conf_file"), "options.kubelet.cni_conf_file.bogus"),
        (("nodes", 0), "nodes[0].bogus"),
    ],
)
@pytest.mark.parametrize("value", [None, 1])
def test_unknown_fields_are_still_refused(
    where: tuple[Any, ...], expected: str, value: Any
) -> None:
    doc = as_cke_writes_it()
    target: Any = doc
    for part in where:
        target = target[part]
    target["bogus"] = value
    assert f"{expected}: Extra inputs are not permitted" in _problems(doc)


def test_unknown_fields_in_nested_upstream_structures_are_refused() -> None:
    doc = every_field_set()
    doc["reboot"]["protected_namespaces"]["matchFields"] = {}
    doc["repair"]["repair_procedures"][0]["repair_operations"][0]["repair_steps"][0]["x"] = 1
    doc["options"]["etcd"]["extra_binds"][0]["consistency"] = "cached"
    message = _problems(doc)
    assert "reboot.protected_namespaces.matchFields: Extra inputs" in message
    assert (
        "repair.repair_procedures[0].repair_operations[0].repair_steps[0].x: Extra inputs"
        in message
    )
    assert "options.etcd.extra_binds[0].consistency: Extra inputs" in message


# --- every field set: kept through a round trip, listed as inert ---------------------------


def test_every_upstream_field_is_kept_through_a_round_trip() -> None:
    doc = every_field_set()
    cluster = _load(doc)
    validate_cluster(cluster, Constraints())
    assert cluster_from_json(cluster_to_json(cluster)) == cluster
    assert parse_cluster(cluster_to_yaml(cluster)) == cluster
    stored = json.loads(cluster_to_json(cluster))
    for key in ("taint_control_plane", "control_plane_tolerations", "dns_service", "sabakan"):
        assert stored[key] == doc[key]
    assert stored["reboot"]["protected_namespaces"] == doc["reboot"]["protected_namespaces"] | {
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "skip", "operator": "DoesNotExist", "values": []},
        ]
    }
    assert stored["repair"]["repair_procedures"] == doc["repair"]["repair_procedures"]
    assert stored["trusted_rest_mappings"] == doc["trusted_rest_mappings"]
    for component, params in doc["options"].items():
        for key, value in params.items():
            if value is not None:
                assert stored["options"][component][key] == value, (component, key)
    assert stored["options"]["etcd"]["extra_binds"][0]["selinux_label"] == "z"


def test_inert_fields_lists_what_cke_does_not_act_on() -> None:
    cluster = _load(every_field_set())
    assert inert_fields(cluster) == [
        "taint_control_plane",
        "control_plane_tolerations",
        "dns_service",
        "sabakan",
        "trusted_rest_mappings",
        # The reboot queue uses the commands; the drain settings need Kubernetes.
        "reboot.eviction_timeout_seconds",
        "reboot.evict_retries",
        "reboot.evict_interval",
        "reboot.protected_namespaces",
        "reboot.protected_job_pods",
        # So does the repair queue.
        "repair.protected_namespaces",
        "repair.evict_retries",
        "repair.evict_interval",
        "repair.eviction_timeout_seconds",
        "options.etcd.extra_binds",
        "options.etcd.volume_name",
        "options.kube-api.audit_log_enabled",
        "options.kube-api.audit_log_policy",
        "options.kube-api.audit_log_path",
        "options.kube-scheduler.config",
        "options.kube-proxy.disable",
        "options.kube-proxy.config",
        "options.kubelet.boot_taints",
        "options.kubelet.cni_conf_file",
        "options.kubelet.config",
        "options.kubelet.cri_endpoint",
        "options.kubelet.in_place_update",
    ]
    # What cke acts on is never listed.
    doc = as_cke_writes_it()
    doc["dns_servers"] = ["8.8.8.8"]
    doc["options"]["etcd"].update(extra_args=["--log-level=debug"], extra_env={"GOGC": "50"})
    doc["binaries"] = {"etcd": "/opt/bin/etcd", "kubelet": "/opt/bin/kubelet"}
    assert inert_fields(_load(doc)) == ["binaries.kubelet"]


# --- validation of the new fields, each error naming its path ------------------------------


def _bad(update: Any) -> dict[str, Any]:
    doc = every_field_set()
    update(doc)
    return doc


def _opt(component: str, **fields: Any) -> Any:
    return lambda d: d["options"][component].update(fields)


def _top(**fields: Any) -> Any:
    return lambda d: d.update(fields)


def _reboot(**fields: Any) -> Any:
    return lambda d: d["reboot"].update(fields)


BAD: list[tuple[str, Any, str]] = [
    ("toleration key", _top(control_plane_tolerations=["a b"]), "control_plane_tolerations[0]:"),
    ("dns service no namespace", _top(dns_service="dns"), "dns_service: must be namespace/"),
    ("dns service upper case", _top(dns_service="kube-system/DNS"), "dns_service: must be"),
    ("bool as int", _top(taint_control_plane=1), "taint_control_plane: Input should be a valid"),
    ("reboot zero", _reboot(max_concurrent_reboots=0), "reboot.max_concurrent_reboots: Input"),
    ("reboot eviction", _reboot(eviction_timeout_seconds=0), "reboot.eviction_timeout_seconds:"),
    ("reboot negative", _reboot(command_retries=-1), "reboot.command_retries: Input should be"),
    ("reboot string int", _reboot(evict_interval="5"), "reboot.evict_interval: Input should be"),
    ("reboot command", _reboot(reboot_command="reboot"), "reboot.reboot_command: Input should"),
    (
        "selector operator",
        _reboot(protected_job_pods={"matchExpressions": [{"key": "a", "operator": "Is"}]}),
        "reboot.protected_job_pods.matchExpressions[0].operator: must be one of",
    ),
    (
        "selector In without values",
        _reboot(protected_job_pods={"matchExpressions": [{"key": "a", "operator": "In"}]}),
        "reboot.protected_job_pods.matchExpressions[0].values: must not be empty for In",
    ),
    (
        "selector label value",
        _reboot(protected_namespaces={"matchLabels": {"a": "b c"}}),
        'reboot.protected_namespaces.matchLabels["a"]: value must',
    ),
    (
        "repair concurrency",
        lambda d: d["repair"].update(max_concurrent_repairs=0),
        "repair.max_concurrent_repairs: Input should be greater than 0",
    ),
    (
        "sabakan taint key",
        _top(sabakan={"spare_node_taint_key": "-x"}),
        "sabakan.spare_node_taint_key: name must",
    ),
    (
        "trusted mapping",
        _top(trusted_rest_mappings=[{"group": "g", "kind": "K", "resource": "ks"}]),
        "trusted_rest_mappings[0].version: must not be empty",
    ),
    (
        "mount propagation",
        lambda d: d["options"]["etcd"]["extra_binds"][0].update(propagation="shard"),
        "options.etcd.extra_binds[0].propagation: must be one of '', 'shared'",
    ),
    (
        "mount selinux label",
        lambda d: d["options"]["etcd"]["extra_binds"][0].update(selinux_label="Zz"),
        "options.etcd.extra_binds[0].selinux_label: must be one of",
    ),
    ("volume name", _opt("etcd", volume_name="a/b"), "options.etcd.volume_name: must be a Docker"),
    (
        "audit without policy",
        _opt("kube-api", audit_log_policy=""),
        "options.kube-api.audit_log_policy: required when audit_log_enabled is true",
    ),
    (
        "audit policy not a mapping",
        _opt("kube-api", audit_log_policy="- a\n- b\n"),
        "options.kube-api.audit_log_policy: must be a YAML mapping",
    ),
    (
        "audit policy not yaml",
        _opt("kube-api", audit_log_policy="a: [\n"),
        "options.kube-api.audit_log_policy: must be a YAML document",
    ),
    (
        "scheduler api version",
        lambda d: d["options"]["kube-scheduler"]["config"].update(apiVersion="v1beta3"),
        "options.kube-scheduler.config.apiVersion: must be kubescheduler.config.k8s.io/v1",
    ),
    (
        "proxy kind",
        lambda d: d["options"]["kube-proxy"]["config"].update(kind="Other"),
        "options.kube-proxy.config.kind: must be KubeProxyConfiguration",
    ),
    (
        "proxy mode",
        lambda d: d["options"]["kube-proxy"]["config"].update(mode="nftable"),
        "options.kube-proxy.config.mode: must be one of",
    ),
    (
        "kubelet config not a mapping",
        _opt("kubelet", config=["a"]),
        "options.kubelet.config: Input should be a valid dictionary",
    ),
    (
        "kubelet cluster domain",
        lambda d: d["options"]["kubelet"]["config"].update(clusterDomain="Cluster_Local"),
        "options.kubelet.config.clusterDomain: must be an RFC 1123",
    ),
    ("cri endpoint empty", _opt("kubelet", cri_endpoint=""), "options.kubelet.cri_endpoint: must"),
    (
        "boot taint effect",
        _opt("kubelet", boot_taints=[{"key": "k", "effect": "Never"}]),
        "options.kubelet.boot_taints[0].effect: must be one of NoSchedule",
    ),
    (
        "cni content without name",
        _opt("kubelet", cni_conf_file={"name": "", "content": "{}"}),
        "options.kubelet.cni_conf_file.name: required when content is set",
    ),
    (
        "cni bad name",
        _opt("kubelet", cni_conf_file={"name": "../x.conf", "content": "{}"}),
        "options.kubelet.cni_conf_file.name: must be a file name",
    ),
    (
        "cni not json",
        _opt("kubelet", cni_conf_file={"name": "a.conf", "content": "{"}),
        "options.kubelet.cni_conf_file.content: must be a JSON CNI configuration",
    ),
    (
        "cni conflist without plugins",
        _opt("kubelet", cni_conf_file={"name": "a.conflist", "content": '{"name": "n"}'}),
        "options.kubelet.cni_conf_file.content: a .conflist must have a non-empty 'plugins'",
    ),
    (
        "cni conf without type",
        _opt("kubelet", cni_conf_file={"name": "a.conf", "content": '{"name": "n"}'}),
        "options.kubelet.cni_conf_file.content: each CNI configuration must be an object",
    ),
]


@pytest.mark.parametrize(("update", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_upstream_fields(update: Any, expected: str) -> None:
    assert expected in _problems(_bad(update))


def test_non_finite_numbers_in_a_component_config_are_refused() -> None:
    """They would not survive the JSON round trip of the stored cluster."""
    doc = every_field_set()
    doc["options"]["kubelet"]["config"]["evictionHard"] = {"x": [float("inf")]}
    with pytest.raises(ClusterError) as info:
        parse_cluster(yaml.safe_dump(doc))
    assert 'options.kubelet.config["evictionHard"]["x"][0]: must be a finite number' in str(
        info.value
    )


def test_example_documents_are_not_mutated() -> None:
    doc = every_field_set()
    before = copy.deepcopy(doc)
    _load(doc)
    assert doc == before


# --- ckecli status -------------------------------------------------------------------------


class _Storage:
    def __init__(self, cluster: bytes | None) -> None:
        self.cluster = cluster

    async def get_leader_name(self) -> str:
        return "cke-1"

    async def get_status(self) -> Any:
        return Status(
            phase="completed",
            timestamp="2026-01-01T00:00:00Z",
            vault="ok",
            cluster_revision=3,
        )

    async def get_records(self, count: int) -> list[Any]:
        return []

    async def get_cluster(self) -> Any:
        return SimpleNamespace(value=self.cluster, mod_revision=3)


def _status(cluster: bytes | None, output: str | None, capsys: Any) -> str:
    storage: Any = _Storage(cluster)
    asyncio.run(ckecli.cmd_status(storage, argparse.Namespace(output=output)))
    out: str = capsys.readouterr().out
    return out


def test_ckecli_status_says_which_fields_are_inert(capsys: Any) -> None:
    stored = cluster_to_json(parse_cluster((FIXTURES / "cke-cluster.yml").read_text()))
    text = _status(stored.encode(), None, capsys)
    assert (
        "inert here: options.kube-controller-manager.extra_args, options.kubelet.config\n" in text
    )
    doc = json.loads(_status(stored.encode(), "json", capsys))
    assert doc["inert"] == ["options.kube-controller-manager.extra_args", "options.kubelet.config"]


@pytest.mark.parametrize("stored", [None, b"{", b"\xff", json.dumps(as_cke_writes_it()).encode()])
def test_ckecli_status_without_inert_fields_has_no_line(stored: bytes | None, capsys: Any) -> None:
    text = _status(stored, None, capsys)
    assert "inert here" not in text
    assert "phase: completed" in text
