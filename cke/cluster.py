"""The cluster configuration model (CKE's ``cluster.md`` subset), constraints, and validation.

Pure: the only input is text.  ``parse_cluster`` and ``cluster_from_json`` return only
clusters that pass every check that does not depend on the constraints; ``validate_cluster``
runs those checks again plus the constraint checks, and is what must pass before a cluster
is stored.

Every problem is reported as ``path: problem`` (``nodes[3].address: duplicate of nodes[1]``),
all problems at once, in document order, joined with ``"; "``.  Messages quote at most a short,
truncated key; values from the document are never echoed.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from cke.common.etcd import format_validation_error
from cke.common.fields import (
    CONTROL_RE,
    absolute_path_problem,
    binary_path_problem,
    env_name_problem,
    node_address_problem,
)
from cke.common.yamlfile import yaml_error_position

__all__ = [
    "COMPONENTS",
    "CONSTRAINT_NAMES",
    "DEFAULT_CRI_ENDPOINT",
    "DEFAULT_ETCD_VOLUME_NAME",
    "MOUNT_PROPAGATIONS",
    "RESERVED_KEY_INFIX",
    "RESERVED_KEY_PREFIX",
    "SELINUX_LABELS",
    "TAINT_EFFECTS",
    "APIServerParams",
    "Binaries",
    "CNIConfFile",
    "Cluster",
    "ClusterError",
    "Constraints",
    "EtcdParams",
    "KubeletParams",
    "LabelSelector",
    "LabelSelectorRequirement",
    "Mount",
    "Node",
    "Options",
    "ProxyParams",
    "Reboot",
    "Repair",
    "RepairOperation",
    "RepairProcedure",
    "RepairStep",
    "Sabakan",
    "SchedulerParams",
    "ServiceParams",
    "Taint",
    "TrustedRESTMapping",
    "check_cluster",
    "cluster_from_json",
    "cluster_to_json",
    "cluster_to_yaml",
    "constraints_from_json",
    "constraints_to_json",
    "inert_fields",
    "parse_cluster",
    "set_constraint",
    "validate_cluster",
]

Problem = tuple[str, str]
"""``(path, problem)``; rendered as ``path: problem``."""

TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# Bind propagation and SELinux relabelling of a mount, as CKE passes them to Docker
# ("" leaves the runtime's default).
MOUNT_PROPAGATIONS = ("", "shared", "slave", "private", "rshared", "rslave", "rprivate")
SELINUX_LABELS = ("", "z", "Z")
# CKE's defaults of options.etcd.volume_name and options.kubelet.cri_endpoint.
DEFAULT_ETCD_VOLUME_NAME = "etcd-cke"
DEFAULT_CRI_ENDPOINT = "/run/containerd/containerd.sock"
# CKE reserves keys (labels, annotations, taints) that contain this ...
RESERVED_KEY_INFIX = "cke.cybozu.com/"
# ... or start with this.
RESERVED_KEY_PREFIX = "node-role.kubernetes.io/"

# The etcd flags cke sets itself (``cke/op/etcd.py``: ``etcd_args`` and the initial
# cluster flags), plus the ones that would override them wholesale or re-form the cluster.
ETCD_FLAGS_SET_BY_CKE = frozenset(
    {
        "name",
        "data-dir",
        "wal-dir",
        "listen-client-urls",
        "advertise-client-urls",
        "listen-peer-urls",
        "initial-advertise-peer-urls",
        "initial-cluster",
        "initial-cluster-state",
        "initial-cluster-token",
        "cert-file",
        "key-file",
        "trusted-ca-file",
        "client-cert-auth",
        "peer-cert-file",
        "peer-key-file",
        "peer-trusted-ca-file",
        "peer-client-cert-auth",
        "enable-v2",
        "config-file",
        "force-new-cluster",
        "discovery",
        "discovery-srv",
    }
)

COMPONENTS = (
    "etcd",
    "etcd-rivers",
    "rivers",
    "kube-api",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "kubelet",
)
"""The keys of ``options``."""


class ClusterError(ValueError):
    """An invalid cluster or constraints document; ``str()`` is ``path: problem; ...``."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)

    @classmethod
    def from_problems(cls, problems: Iterable[Problem]) -> ClusterError:
        lines = [f"{path}: {msg}" for path, msg in problems]
        return cls("; ".join(lines), lines)


# ---------------------------------------------------------------------------
# The model.  Types only; the semantic checks are the functions further down.
# ---------------------------------------------------------------------------

_MODEL_CONFIG = ConfigDict(
    extra="forbid",
    frozen=True,
    strict=True,
    validate_by_alias=True,
    validate_by_name=True,
)


class _Model(BaseModel):
    """The base of the cluster models: a ``null`` for a field with a default is the default.

    CKE (Go) writes every key of its structs and ``null`` for a nil slice, map or
    pointer, and reads a ``null`` as "leave the zero value".  So a ``null`` here means
    the field's default (an empty list or map for those); it is dropped before
    validation.  Only keys that name a field with a default are dropped: an unknown
    key stays an error, and a required field given ``null`` is refused by its type.
    Fields whose default is ``None`` keep ``None``.
    """

    model_config = _MODEL_CONFIG

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict) or None not in data.values():
            return data
        droppable = _null_droppable_keys(cls)
        return {k: v for k, v in data.items() if v is not None or k not in droppable}


_DROPPABLE_CACHE: dict[type[BaseModel], frozenset[str]] = {}


def _null_droppable_keys(model: type[BaseModel]) -> frozenset[str]:
    """The keys (names and aliases) of ``model``'s fields that have a non-None default."""
    keys = _DROPPABLE_CACHE.get(model)
    if keys is None:
        found: set[str] = set()
        for name, info in model.model_fields.items():
            if info.is_required() or (info.default_factory is None and info.default is None):
                continue
            found.add(name)
            if info.alias:
                found.add(info.alias)
        keys = _DROPPABLE_CACHE[model] = frozenset(found)
    return keys


class Taint(_Model):
    key: str
    value: str = ""
    effect: str


class Mount(_Model):
    """One entry of ``extra_binds``; both paths absolute."""

    source: str
    destination: str
    read_only: bool = False
    propagation: str = ""
    selinux_label: str = ""


class ServiceParams(_Model):
    """The fields every ``options.<component>`` has in CKE."""

    extra_args: list[str] = Field(default_factory=list)
    extra_env: dict[str, str] = Field(default_factory=dict)
    extra_binds: list[Mount] = Field(default_factory=list)


class EtcdParams(ServiceParams):
    """``options.etcd``: CKE's Docker volume for the data is inert here (see ETCD_DATA_DIR)."""

    volume_name: str = DEFAULT_ETCD_VOLUME_NAME


class APIServerParams(ServiceParams):
    """``options.kube-api``."""

    audit_log_enabled: bool = False
    audit_log_policy: str = ""
    audit_log_path: str = ""


ComponentConfig = dict[str, JsonValue]
"""A partial Kubernetes component configuration (``apiVersion``, ``kind``, fields)."""


class SchedulerParams(ServiceParams):
    """``options.kube-scheduler``: ``config`` is a partial KubeSchedulerConfiguration."""

    config: ComponentConfig | None = None


class ProxyParams(ServiceParams):
    """``options.kube-proxy``: ``config`` is a partial KubeProxyConfiguration."""

    disable: bool = False
    config: ComponentConfig | None = None


class CNIConfFile(_Model):
    name: str = ""
    content: str = ""


class KubeletParams(ServiceParams):
    """``options.kubelet``: ``config`` is a partial KubeletConfiguration."""

    boot_taints: list[Taint] = Field(default_factory=list)
    cni_conf_file: CNIConfFile = Field(default_factory=CNIConfFile)
    config: ComponentConfig | None = None
    cri_endpoint: str = DEFAULT_CRI_ENDPOINT
    in_place_update: bool = False


class Options(_Model):
    """Per-component extra parameters (``options`` in CKE)."""

    etcd: EtcdParams = Field(default_factory=EtcdParams)
    etcd_rivers: ServiceParams = Field(default_factory=ServiceParams, alias="etcd-rivers")
    rivers: ServiceParams = Field(default_factory=ServiceParams)
    kube_api: APIServerParams = Field(default_factory=APIServerParams, alias="kube-api")
    kube_controller_manager: ServiceParams = Field(
        default_factory=ServiceParams, alias="kube-controller-manager"
    )
    kube_scheduler: SchedulerParams = Field(default_factory=SchedulerParams, alias="kube-scheduler")
    kube_proxy: ProxyParams = Field(default_factory=ProxyParams, alias="kube-proxy")
    kubelet: KubeletParams = Field(default_factory=KubeletParams)

    def for_component(self, component: str) -> ServiceParams:
        """The parameters of a component by its ``options`` key (``"kube-api"``)."""
        if component not in COMPONENTS:
            raise KeyError(component)
        params: ServiceParams = getattr(self, component.replace("-", "_"))
        return params


class LabelSelectorRequirement(_Model):
    key: str
    operator: str
    values: list[str] = Field(default_factory=list)


class LabelSelector(_Model):
    """A Kubernetes label selector (``matchLabels``, ``matchExpressions``)."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, alias="matchExpressions"
    )


class Reboot(_Model):
    """CKE's reboot settings (``None``: CKE's default)."""

    reboot_command: list[str] = Field(default_factory=list)
    boot_check_command: list[str] = Field(default_factory=list)
    max_concurrent_reboots: int | None = Field(default=None, gt=0)
    eviction_timeout_seconds: int | None = Field(default=None, gt=0)
    command_timeout_seconds: int | None = Field(default=None, ge=0)
    command_retries: int | None = Field(default=None, ge=0)
    command_interval: int | None = Field(default=None, ge=0)
    evict_retries: int | None = Field(default=None, ge=0)
    evict_interval: int | None = Field(default=None, ge=0)
    protected_namespaces: LabelSelector | None = None
    protected_job_pods: LabelSelector | None = None


class RepairStep(_Model):
    repair_command: list[str] = Field(default_factory=list)
    command_timeout_seconds: int | None = None
    command_retries: int | None = None
    command_interval: int | None = None
    need_drain: bool = False
    watch_seconds: int | None = None


class RepairOperation(_Model):
    operation: str = ""
    repair_steps: list[RepairStep] = Field(default_factory=list)
    health_check_command: list[str] = Field(default_factory=list)
    command_timeout_seconds: int | None = None
    success_command: list[str] = Field(default_factory=list)
    success_command_timeout: int | None = None


class RepairProcedure(_Model):
    machine_types: list[str] = Field(default_factory=list)
    repair_operations: list[RepairOperation] = Field(default_factory=list)


class Repair(_Model):
    """CKE's repair settings (``None``: CKE's default)."""

    repair_procedures: list[RepairProcedure] = Field(default_factory=list)
    max_concurrent_repairs: int | None = Field(default=None, gt=0)
    protected_namespaces: LabelSelector | None = None
    evict_retries: int | None = Field(default=None, ge=0)
    evict_interval: int | None = Field(default=None, ge=0)
    eviction_timeout_seconds: int | None = Field(default=None, gt=0)
    protected_job_pods: LabelSelector | None = None


class Sabakan(_Model):
    spare_node_taint_key: str = ""


class TrustedRESTMapping(_Model):
    group: str = ""
    version: str = ""
    kind: str = ""
    resource: str = ""
    namespaced: bool = False


class Binaries(_Model):
    """Where each program lives on the nodes (absolute paths).

    ``etcd-rivers`` runs the ``rivers`` program.
    """

    etcd: str = "/usr/local/bin/etcd"
    etcdctl: str = "/usr/local/bin/etcdctl"
    etcdutl: str = "/usr/local/bin/etcdutl"  # restores a snapshot (ckecli etcd restore)
    rivers: str = "/usr/local/bin/rivers"
    kube_apiserver: str = Field(default="/usr/local/bin/kube-apiserver", alias="kube-apiserver")
    kube_controller_manager: str = Field(
        default="/usr/local/bin/kube-controller-manager", alias="kube-controller-manager"
    )
    kube_scheduler: str = Field(default="/usr/local/bin/kube-scheduler", alias="kube-scheduler")
    kube_proxy: str = Field(default="/usr/local/bin/kube-proxy", alias="kube-proxy")
    kubelet: str = "/usr/local/bin/kubelet"

    def path_of(self, program: str) -> str:
        """The path of a program by its YAML key (``"kube-apiserver"``)."""
        if program.replace("_", "-") != program or program not in _BINARY_NAMES:
            raise KeyError(program)
        path: str = getattr(self, program.replace("-", "_"))
        return path


_BINARY_NAMES = tuple(f.alias or name for name, f in Binaries.model_fields.items())


class Node(_Model):
    address: str
    hostname: str = ""
    user: str
    port: int = Field(default=22, ge=1, le=65535)
    host_key: str | None = None
    control_plane: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)

    @property
    def name(self) -> str:
        """The Kubernetes node name: ``hostname``, or the address when that is empty."""
        return self.hostname or self.address


class Cluster(_Model):
    name: str
    nodes: list[Node]
    taint_control_plane: bool = False
    control_plane_tolerations: list[str] = Field(default_factory=list)
    service_subnet: str
    dns_servers: list[str] = Field(default_factory=list)
    dns_service: str = ""
    reboot: Reboot = Field(default_factory=Reboot)
    repair: Repair = Field(default_factory=Repair)
    sabakan: Sabakan = Field(default_factory=Sabakan)
    trusted_rest_mappings: list[TrustedRESTMapping] = Field(default_factory=list)
    runtime: Literal["systemd", "process"] = "systemd"
    binaries: Binaries = Field(default_factory=Binaries)
    options: Options = Field(default_factory=Options)

    @property
    def control_planes(self) -> list[Node]:
        return [n for n in self.nodes if n.control_plane]

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if not n.control_plane]


class Constraints(BaseModel):
    """CKE's cluster constraints; JSON/CLI names are hyphenated."""

    model_config = _MODEL_CONFIG

    control_plane_count: int = Field(default=1, ge=1, alias="control-plane-count")
    minimum_workers_rate: int = Field(default=80, ge=0, le=100, alias="minimum-workers-rate")
    maximum_unreachable_nodes_for_reboot: int = Field(
        default=0, ge=0, alias="maximum-unreachable-nodes-for-reboot"
    )
    maximum_repair_queue_entries: int = Field(default=0, ge=0, alias="maximum-repair-queue-entries")
    wait_seconds_to_repair_rebooting: int = Field(
        default=0, ge=0, alias="wait-seconds-to-repair-rebooting"
    )


CONSTRAINT_NAMES: tuple[str, ...] = tuple(
    f.alias or name for name, f in Constraints.model_fields.items()
)


# ---------------------------------------------------------------------------
# Syntax helpers (Kubernetes rules).
# ---------------------------------------------------------------------------

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN_RE = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_QUALIFIED_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_KEY_TYPE_RE = re.compile(r"[a-z0-9][-a-z0-9@.]*")


_MAX_NAME_LENGTH = 253
_MAX_USER_LENGTH = 255
# An RSA key of 16384 bits is about 2,800 characters in OpenSSH form.
_MAX_HOST_KEY_LENGTH = 8192
# etcd refuses requests over 1.5 MiB by default (--max-request-bytes); the cluster is
# written in one transaction with the constraints, so it must stay well below that.
MAX_CLUSTER_BYTES = 1024 * 1024


def _quote(key: str, limit: int = 40) -> str:
    """A map key for a path, JSON-quoted and cut short."""
    if len(key) > limit:
        key = key[:limit] + "..."
    return json.dumps(key)


def dns_subdomain_problem(value: str) -> str | None:
    """Why ``value`` is not an RFC 1123 DNS subdomain (lower case, <= 253), or None."""
    if not value:
        return "must not be empty"
    if len(value) > 253:
        return "must be at most 253 characters"
    if not _DNS_SUBDOMAIN_RE.fullmatch(value):
        return (
            "must be an RFC 1123 DNS name: lower-case letters, digits, '-' and '.', "
            "each part starting and ending with a letter or digit"
        )
    if any(len(part) > 63 for part in value.split(".")):
        return "each dot-separated part must be at most 63 characters"
    return None


def qualified_name_problem(key: str) -> str | None:
    """Why ``key`` is not a Kubernetes qualified name (``[prefix/]name``), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return "prefix before '/' must not be empty"
        if "/" in prefix:
            return "must contain at most one '/'"
        problem = dns_subdomain_problem(prefix)
        if problem is not None:
            return f"prefix {problem}"
    if not name:
        return "name must not be empty"
    if len(name) > 63:
        return "name must be at most 63 characters"
    if not _QUALIFIED_NAME_RE.fullmatch(name):
        return (
            "name must consist of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid Kubernetes label value, or None."""
    if len(value) > 63:
        return "value must be at most 63 characters"
    if not _LABEL_VALUE_RE.fullmatch(value):
        return (
            "value must be empty or consist of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def reserved_key_problem(key: str) -> str | None:
    """Keys CKE keeps for itself: containing cke.cybozu.com/ or under node-role.kubernetes.io/."""
    if RESERVED_KEY_INFIX in key:
        return f"keys containing {RESERVED_KEY_INFIX!r} are reserved for CKE"
    if key.startswith(RESERVED_KEY_PREFIX):
        return f"keys starting with {RESERVED_KEY_PREFIX!r} are reserved for CKE"
    return None


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# The checks.  Each returns its problems, with full paths, in document order.
# ---------------------------------------------------------------------------


def check_name(cluster: Cluster) -> list[Problem]:
    if not cluster.name:
        return [("name", "must not be empty")]
    if len(cluster.name) > _MAX_NAME_LENGTH:
        return [("name", f"must be at most {_MAX_NAME_LENGTH} characters")]
    if CONTROL_RE.search(cluster.name):
        return [("name", "must not contain control characters")]
    return []


def check_node_address(node: Node, path: str) -> list[Problem]:
    problem = node_address_problem(node.address)
    return [] if problem is None else [(f"{path}.address", problem)]


def check_node_hostname(node: Node, path: str) -> list[Problem]:
    if node.hostname:
        problem = dns_subdomain_problem(node.hostname)
        return [] if problem is None else [(f"{path}.hostname", problem)]
    ip = _ip(node.address)
    if ip is not None and ip.version == 6:
        # The node name would be the address, and ':' is not allowed in a node name.
        return [(f"{path}.hostname", "required when the address is IPv6")]
    return []


def check_node_user(node: Node, path: str) -> list[Problem]:
    if not node.user:
        return [(f"{path}.user", "must not be empty")]
    if len(node.user) > _MAX_USER_LENGTH:
        return [(f"{path}.user", f"must be at most {_MAX_USER_LENGTH} characters")]
    if any(c.isspace() for c in node.user) or CONTROL_RE.search(node.user):
        return [(f"{path}.user", "must not contain white space or control characters")]
    return []


def host_key_problem(key: str) -> str | None:
    """Why ``key`` is not an OpenSSH one-line public key (``type base64 [comment]``), or None."""
    if len(key) > _MAX_HOST_KEY_LENGTH:
        return f"must be at most {_MAX_HOST_KEY_LENGTH} characters"
    if "\n" in key or "\r" in key or "\x00" in key:
        return "must be a single line"
    fields = key.split(None, 2)
    if len(fields) < 2:
        return "must be an OpenSSH public key: 'type base64 [comment]'"
    key_type, blob_text = fields[0], fields[1]
    if not _KEY_TYPE_RE.fullmatch(key_type):
        return "key type is not a valid OpenSSH key type"
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        return "key data is not valid base64"
    # The blob starts with the key type as an SSH string: uint32 length, then the bytes.
    if len(blob) < 4:
        return "key data is too short"
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + length] != key_type.encode() or length != len(key_type):
        return "key data does not match the key type"
    if len(blob) == 4 + length:
        return "key data is too short"
    return None


def check_node_host_key(node: Node, path: str) -> list[Problem]:
    if node.host_key is None:
        return []
    problem = host_key_problem(node.host_key)
    return [] if problem is None else [(f"{path}.host_key", problem)]


def check_node_labels(node: Node, path: str) -> list[Problem]:
    problems: list[Problem] = []
    for key, value in node.labels.items():
        where = f"{path}.labels[{_quote(key)}]"
        for problem in (
            qualified_name_problem(key),
            reserved_key_problem(key),
            label_value_problem(value),
        ):
            if problem is not None:
                problems.append((where, problem))
    return problems


def check_node_annotations(node: Node, path: str) -> list[Problem]:
    problems: list[Problem] = []
    for key in node.annotations:
        where = f"{path}.annotations[{_quote(key)}]"
        # Like CKE (and Kubernetes), annotation keys are checked case-insensitively.
        for problem in (qualified_name_problem(key.lower()), reserved_key_problem(key)):
            if problem is not None:
                problems.append((where, problem))
    return problems


def taints_problems(taints: list[Taint], path: str, *, reserved: bool = True) -> list[Problem]:
    """Kubernetes taint rules for a list of taints at ``path``; ``reserved``: CKE's keys too."""
    problems: list[Problem] = []
    seen: dict[tuple[str, str], int] = {}
    for i, taint in enumerate(taints):
        where = f"{path}[{i}]"
        for field, problem in (
            ("key", qualified_name_problem(taint.key)),
            ("key", reserved_key_problem(taint.key) if reserved else None),
            ("value", label_value_problem(taint.value)),
        ):
            if problem is not None:
                problems.append((f"{where}.{field}", problem))
        if taint.effect not in TAINT_EFFECTS:
            problems.append((f"{where}.effect", f"must be one of {', '.join(TAINT_EFFECTS)}"))
        first = seen.setdefault((taint.key, taint.effect), i)
        if first != i:
            problems.append((where, f"duplicate key and effect of {path}[{first}]"))
    return problems


def check_node_taints(node: Node, path: str) -> list[Problem]:
    return taints_problems(node.taints, f"{path}.taints")


def check_node(node: Node, path: str) -> list[Problem]:
    """Every check of one node on its own."""
    problems: list[Problem] = []
    for check in _NODE_CHECKS:
        problems += check(node, path)
    return problems


_NODE_CHECKS: tuple[Callable[[Node, str], list[Problem]], ...] = (
    check_node_address,
    check_node_hostname,
    check_node_user,
    check_node_host_key,
    check_node_labels,
    check_node_annotations,
    check_node_taints,
)


def check_duplicates(nodes: list[Node]) -> list[Problem]:
    """Addresses (compared as IPs) and node names must be unique."""
    problems: list[Problem] = []
    by_address: dict[object, int] = {}
    by_name: dict[str, int] = {}
    by_host_key: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.host_key is not None:
            # One machine, one entry: two entries of one machine would be managed as two
            # nodes, and one's etcd data would look stale through the other.
            blob = node.host_key.split()[1] if len(node.host_key.split()) > 1 else node.host_key
            first = by_host_key.setdefault(blob, i)
            if first != i:
                problems.append(
                    (f"nodes[{i}].host_key", f"same host key as nodes[{first}]: one machine")
                )
        ip = _ip(node.address)
        address_key: object = ip if ip is not None else node.address
        first = by_address.setdefault(address_key, i)
        address_dup = first != i
        if address_dup:
            problems.append((f"nodes[{i}].address", f"duplicate of nodes[{first}]"))
        first = by_name.setdefault(node.name, i)
        if first != i and not (address_dup and not node.hostname):
            field = "hostname" if node.hostname else "address"
            problems.append((f"nodes[{i}].{field}", f"node name duplicate of nodes[{first}]"))
    return problems


def check_control_plane_present(nodes: list[Node]) -> list[Problem]:
    if not any(n.control_plane for n in nodes):
        return [("nodes", "at least one node must have control_plane: true")]
    return []


def check_service_subnet(cluster: Cluster) -> list[Problem]:
    try:
        ipaddress.ip_network(cluster.service_subnet, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            return [("service_subnet", "has host bits set")]
        return [("service_subnet", "must be a CIDR subnet such as 10.68.0.0/16")]
    if "/" not in cluster.service_subnet:
        return [("service_subnet", "must be a CIDR subnet such as 10.68.0.0/16")]
    return []


def check_dns_servers(cluster: Cluster) -> list[Problem]:
    problems: list[Problem] = []
    for i, server in enumerate(cluster.dns_servers):
        problem = node_address_problem(server)
        if problem is not None:
            problems.append((f"dns_servers[{i}]", problem))
    return problems


def check_service_params(params: ServiceParams, path: str) -> list[Problem]:
    problems: list[Problem] = []
    for i, arg in enumerate(params.extra_args):
        if "\x00" in arg:
            problems.append((f"{path}.extra_args[{i}]", "must not contain NUL characters"))
    for name, value in params.extra_env.items():
        where = f"{path}.extra_env[{_quote(name)}]"
        problem = env_name_problem(name)
        if problem is not None:
            problems.append((where, problem))
        if "\x00" in value:
            problems.append((where, "value must not contain NUL characters"))
    for i, mount in enumerate(params.extra_binds):
        for field in ("source", "destination"):
            problem = absolute_path_problem(getattr(mount, field))
            if problem is not None:
                problems.append((f"{path}.extra_binds[{i}].{field}", problem))
        problems += check_mount_options(mount, f"{path}.extra_binds[{i}]")
    return problems


def _one_of(values: tuple[str, ...]) -> str:
    return "must be one of " + ", ".join(repr(v) for v in values)


def check_mount_options(mount: Mount, path: str) -> list[Problem]:
    problems: list[Problem] = []
    if mount.propagation not in MOUNT_PROPAGATIONS:
        problems.append((f"{path}.propagation", _one_of(MOUNT_PROPAGATIONS)))
    if mount.selinux_label not in SELINUX_LABELS:
        problems.append((f"{path}.selinux_label", _one_of(SELINUX_LABELS)))
    return problems


def check_options(cluster: Cluster) -> list[Problem]:
    problems: list[Problem] = []
    for component in COMPONENTS:
        params = cluster.options.for_component(component)
        problems += check_service_params(params, f"options.{component}")
    problems += check_etcd_extra_args(cluster.options.etcd)
    problems += check_rivers_extra_args(cluster.options.rivers, "rivers")
    problems += check_rivers_extra_args(cluster.options.etcd_rivers, "etcd-rivers")
    problems += check_etcd_volume_name(cluster.options.etcd)
    problems += check_kube_api(cluster.options.kube_api)
    problems += check_component_config(
        cluster.options.kube_scheduler.config,
        "options.kube-scheduler.config",
        _SCHEDULER_API_VERSION,
        "KubeSchedulerConfiguration",
    )
    problems += check_kube_proxy(cluster.options.kube_proxy)
    problems += check_kubelet(cluster.options.kubelet)
    return problems


# Docker's rule for volume names.
_VOLUME_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]+", re.ASCII)


def check_etcd_volume_name(params: EtcdParams) -> list[Problem]:
    name = params.volume_name
    if name and (len(name) > 255 or not _VOLUME_NAME_RE.fullmatch(name)):
        return [
            (
                "options.etcd.volume_name",
                "must be a Docker volume name: at least 2 ASCII letters, digits, '_', '.' "
                "or '-', starting with a letter or digit (at most 255)",
            )
        ]
    return []


def check_kube_api(params: APIServerParams) -> list[Problem]:
    """The audit policy must be a YAML mapping, and is required when audit is enabled."""
    path = "options.kube-api"
    problems: list[Problem] = []
    if params.audit_log_policy:
        problem = _audit_policy_problem(params.audit_log_policy)
        if problem is not None:
            problems.append((f"{path}.audit_log_policy", problem))
    elif params.audit_log_enabled:
        problems.append((f"{path}.audit_log_policy", "required when audit_log_enabled is true"))
    if CONTROL_RE.search(params.audit_log_path):
        problems.append((f"{path}.audit_log_path", "must not contain control characters"))
    return problems


def _audit_policy_problem(text: str) -> str | None:
    try:
        policy = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except Exception:  # any YAML error, RecursionError, bad timestamps
        return "must be a YAML document"
    if policy is not None and not isinstance(policy, dict):
        return "must be a YAML mapping (an audit Policy)"
    return None


_SCHEDULER_API_VERSION = "kubescheduler.config.k8s.io/v1"
_PROXY_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
_KUBELET_API_VERSION = "kubelet.config.k8s.io/v1beta1"
PROXY_MODES = ("", "userspace", "iptables", "ipvs")


def check_component_config(
    config: ComponentConfig | None, path: str, api_version: str, kind: str
) -> list[Problem]:
    """A partial component configuration: CKE's one ``apiVersion`` and ``kind``, finite numbers."""
    if config is None:
        return []
    problems: list[Problem] = []
    if config.get("apiVersion") != api_version:
        problems.append((f"{path}.apiVersion", f"must be {api_version}"))
    if config.get("kind") != kind:
        problems.append((f"{path}.kind", f"must be {kind}"))
    for where in _non_finite_numbers(config, path):
        problems.append((where, "must be a finite number"))
    return problems


def _non_finite_numbers(value: JsonValue, path: str) -> list[str]:
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        found: list[str] = []
        for key, item in value.items():
            found += _non_finite_numbers(item, f"{path}[{_quote(key)}]")
        return found
    if isinstance(value, list):
        found = []
        for i, item in enumerate(value):
            found += _non_finite_numbers(item, f"{path}[{i}]")
        return found
    return []


def check_kube_proxy(params: ProxyParams) -> list[Problem]:
    path = "options.kube-proxy.config"
    problems = check_component_config(
        params.config, path, _PROXY_API_VERSION, "KubeProxyConfiguration"
    )
    if params.config is not None and params.config.get("mode", "") not in PROXY_MODES:
        problems.append((f"{path}.mode", _one_of(PROXY_MODES)))
    return problems


_CNI_FILE_NAME_RE = re.compile(r"[0-9A-Za-z_.-]+", re.ASCII)


def check_kubelet(params: KubeletParams) -> list[Problem]:
    path = "options.kubelet"
    problems = taints_problems(params.boot_taints, f"{path}.boot_taints", reserved=False)
    problems += check_cni_conf_file(params.cni_conf_file, f"{path}.cni_conf_file")
    problems += check_component_config(
        params.config, f"{path}.config", _KUBELET_API_VERSION, "KubeletConfiguration"
    )
    if params.config is not None:
        domain = params.config.get("clusterDomain", "")
        problem = dns_subdomain_problem(domain) if isinstance(domain, str) else "must be a string"
        if domain and problem is not None:
            problems.append((f"{path}.config.clusterDomain", problem))
    if not params.cri_endpoint:
        problems.append((f"{path}.cri_endpoint", "must not be empty"))
    elif CONTROL_RE.search(params.cri_endpoint):
        problems.append((f"{path}.cri_endpoint", "must not contain control characters"))
    return problems


def check_cni_conf_file(conf: CNIConfFile, path: str) -> list[Problem]:
    """The file CKE would put in /etc/cni/net.d: a plain name and a CNI JSON config."""
    if not conf.name:
        return [(f"{path}.name", "required when content is set")] if conf.content else []
    if len(conf.name) > 255 or not _CNI_FILE_NAME_RE.fullmatch(conf.name):
        return [(f"{path}.name", "must be a file name of ASCII letters, digits, '_', '.', '-'")]
    try:
        data = json.loads(conf.content)
    except (ValueError, RecursionError):
        return [(f"{path}.content", "must be a JSON CNI configuration")]
    if conf.name.endswith(".conflist"):
        plugins = data.get("plugins") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return [(f"{path}.content", "a .conflist must be a JSON object with a 'name'")]
        if not isinstance(plugins, list) or not plugins:
            return [(f"{path}.content", "a .conflist must have a non-empty 'plugins' list")]
        configs = plugins
    else:
        configs = [data]
    if not all(
        isinstance(c, dict) and isinstance(c.get("type"), str) and c["type"] for c in configs
    ):
        return [(f"{path}.content", "each CNI configuration must be an object with a 'type'")]
    return []


def check_control_plane_tolerations(cluster: Cluster) -> list[Problem]:
    problems: list[Problem] = []
    for i, key in enumerate(cluster.control_plane_tolerations):
        problem = qualified_name_problem(key)
        if problem is not None:
            problems.append((f"control_plane_tolerations[{i}]", problem))
    return problems


_DNS_LABEL_RE = re.compile(_DNS_LABEL)


def check_dns_service(cluster: Cluster) -> list[Problem]:
    """``namespace/service``: two Kubernetes names."""
    if not cluster.dns_service:
        return []
    parts = cluster.dns_service.split("/")
    if len(parts) != 2 or not all(
        len(p) <= 63 and _DNS_LABEL_RE.fullmatch(p) is not None for p in parts
    ):
        return [("dns_service", "must be namespace/service (two RFC 1123 DNS labels)")]
    return []


def label_selector_problems(selector: LabelSelector | None, path: str) -> list[Problem]:
    """A Kubernetes label selector: valid keys and values, operators with fitting values."""
    if selector is None:
        return []
    problems: list[Problem] = []
    for key, value in selector.match_labels.items():
        where = f"{path}.matchLabels[{_quote(key)}]"
        for problem in (qualified_name_problem(key), label_value_problem(value)):
            if problem is not None:
                problems.append((where, problem))
    for i, req in enumerate(selector.match_expressions):
        where = f"{path}.matchExpressions[{i}]"
        problem = qualified_name_problem(req.key)
        if problem is not None:
            problems.append((f"{where}.key", problem))
        if req.operator in ("In", "NotIn"):
            if not req.values:
                problems.append((f"{where}.values", f"must not be empty for {req.operator}"))
        elif req.operator in ("Exists", "DoesNotExist"):
            if req.values:
                problems.append((f"{where}.values", f"must be empty for {req.operator}"))
        else:
            problems.append((f"{where}.operator", _one_of(_SELECTOR_OPERATORS)))
        for j, value in enumerate(req.values):
            problem = label_value_problem(value)
            if problem is not None:
                problems.append((f"{where}.values[{j}]", problem))
    return problems


_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def check_reboot(cluster: Cluster) -> list[Problem]:
    reboot = cluster.reboot
    return label_selector_problems(
        reboot.protected_namespaces, "reboot.protected_namespaces"
    ) + label_selector_problems(reboot.protected_job_pods, "reboot.protected_job_pods")


def check_repair(cluster: Cluster) -> list[Problem]:
    repair = cluster.repair
    return label_selector_problems(
        repair.protected_namespaces, "repair.protected_namespaces"
    ) + label_selector_problems(repair.protected_job_pods, "repair.protected_job_pods")


def check_sabakan(cluster: Cluster) -> list[Problem]:
    key = cluster.sabakan.spare_node_taint_key
    problem = qualified_name_problem(key) if key else None
    return [] if problem is None else [("sabakan.spare_node_taint_key", problem)]


def check_trusted_rest_mappings(cluster: Cluster) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, m in enumerate(cluster.trusted_rest_mappings):
        where = f"trusted_rest_mappings[{i}]"
        for field in ("version", "kind", "resource"):
            if not getattr(m, field):
                problems.append((f"{where}.{field}", "must not be empty"))
        first = seen.setdefault((m.group, m.version, m.kind), i)
        if first != i:
            problems.append(
                (where, f"duplicate group/version/kind of trusted_rest_mappings[{first}]")
            )
    return problems


def check_etcd_extra_args(params: ServiceParams) -> list[Problem]:
    """``options.etcd.extra_args`` must not set a flag cke sets itself.

    cke knows where a member keeps its data (``--data-dir``, ``--wal-dir``), which
    address it is (``--name``, the URLs) and how it is secured; an extra argument that
    moved any of it would make the status lie (data elsewhere looks like no data, which
    invites a new bootstrap) or let the cluster be re-formed (``--force-new-cluster``).
    """
    problems: list[Problem] = []
    for i, arg in enumerate(params.extra_args):
        if not arg.startswith("-"):
            continue
        flag = arg.lstrip("-").split("=", 1)[0]
        if flag in ETCD_FLAGS_SET_BY_CKE:
            problems.append(
                (f"options.etcd.extra_args[{i}]", f"--{flag} is set by cke and cannot be changed")
            )
    return problems


RIVERS_FLAGS_SET_BY_CKE = frozenset({"listen", "upstreams"})


def check_rivers_extra_args(params: ServiceParams, component: str) -> list[Problem]:
    """``options.rivers``/``options.etcd-rivers`` ``extra_args`` must not set the listen
    address or the upstreams: cke derives them from the control planes."""
    problems: list[Problem] = []
    for i, arg in enumerate(params.extra_args):
        flag = arg.lstrip("-").split("=", 1)[0] if arg.startswith("-") else ""
        if flag in RIVERS_FLAGS_SET_BY_CKE:
            problems.append(
                (
                    f"options.{component}.extra_args[{i}]",
                    f"--{flag} is set by cke and cannot be changed",
                )
            )
    return problems


def check_binaries(cluster: Cluster) -> list[Problem]:
    problems: list[Problem] = []
    for program in _BINARY_NAMES:
        problem = binary_path_problem(cluster.binaries.path_of(program))
        if problem is not None:
            problems.append((f"binaries.{program}", problem))
    return problems


def check_control_plane_count(cluster: Cluster, constraints: Constraints) -> list[Problem]:
    """CKE: the number of control planes must equal ``control-plane-count``."""
    count = len(cluster.control_planes)
    if count != constraints.control_plane_count:
        return [
            (
                "nodes",
                f"{count} control plane(s), but constraint control-plane-count is "
                f"{constraints.control_plane_count}",
            )
        ]
    return []


def cluster_problems(cluster: Cluster) -> list[Problem]:
    """All problems that do not depend on the constraints, in document order."""
    problems = check_name(cluster)
    for i, node in enumerate(cluster.nodes):
        problems += check_node(node, f"nodes[{i}]")
    problems += check_duplicates(cluster.nodes)
    problems += check_control_plane_present(cluster.nodes)
    problems += check_control_plane_tolerations(cluster)
    problems += check_service_subnet(cluster)
    problems += check_dns_servers(cluster)
    problems += check_dns_service(cluster)
    problems += check_reboot(cluster)
    problems += check_repair(cluster)
    problems += check_sabakan(cluster)
    problems += check_trusted_rest_mappings(cluster)
    problems += check_binaries(cluster)
    problems += check_options(cluster)
    return problems


# What cke stores and checks but does not act on: no Kubernetes runs here (no kube-*
# components, kubelet, cluster DNS, node taints of control planes, the drain settings
# of reboots, repairs or REST mappings; the sabakan generator has no Kubernetes taints
# to look at), no Docker (bind mounts, volumes).  The arguments and environment of ``options.etcd``,
# ``options.rivers`` and ``options.etcd-rivers``, the etcd and rivers binaries, the nodes
# and ``runtime`` drive what cke does.
_INERT_TOP = (
    "taint_control_plane",
    "control_plane_tolerations",
    "dns_service",
    "sabakan",
    "trusted_rest_mappings",
)
_INERT_BINARIES = tuple(
    b for b in _BINARY_NAMES if b not in ("etcd", "etcdctl", "etcdutl", "rivers")
)
_INERT_COMPONENTS = tuple(c for c in COMPONENTS if c not in ("etcd", "rivers", "etcd-rivers"))
_INERT_RIVERS = ("extra_binds",)
_INERT_ETCD = ("extra_binds", "volume_name")
# The reboot queue uses the commands, their timeout and retries and the concurrency;
# these drain Kubernetes nodes.
_INERT_REBOOT = (
    "eviction_timeout_seconds",
    "evict_retries",
    "evict_interval",
    "protected_namespaces",
    "protected_job_pods",
)


# The repair queue uses the procedures and the concurrency; these drain Kubernetes nodes
# (as each step's ``need_drain``, which is accepted and has no effect).
_INERT_REPAIR = (
    "protected_namespaces",
    "evict_retries",
    "evict_interval",
    "eviction_timeout_seconds",
    "protected_job_pods",
)


def _set_fields(model: BaseModel, keys: Iterable[str] | None, prefix: str) -> list[str]:
    """``prefix + key`` of the fields of ``model`` (``keys``, or all) not at their default."""
    wanted = None if keys is None else frozenset(keys)
    found: list[str] = []
    for name, info in type(model).model_fields.items():
        key = info.alias or name
        if wanted is not None and key not in wanted:
            continue
        if getattr(model, name) != info.get_default(call_default_factory=True):
            found.append(prefix + key)
    return found


def inert_fields(cluster: Cluster) -> list[str]:
    """The paths of the fields set (not at their default) that cke does not act on."""
    found = _set_fields(cluster, _INERT_TOP, "")
    found += _set_fields(cluster.reboot, _INERT_REBOOT, "reboot.")
    found += _set_fields(cluster.repair, _INERT_REPAIR, "repair.")
    found += _set_fields(cluster.binaries, _INERT_BINARIES, "binaries.")
    found += _set_fields(cluster.options.etcd, _INERT_ETCD, "options.etcd.")
    for rivers in ("rivers", "etcd-rivers"):
        found += _set_fields(
            cluster.options.for_component(rivers), _INERT_RIVERS, f"options.{rivers}."
        )
    for component in _INERT_COMPONENTS:
        found += _set_fields(
            cluster.options.for_component(component), None, f"options.{component}."
        )
    return found


def check_cluster(cluster: Cluster) -> None:
    """Raise ClusterError with every constraint-independent problem."""
    problems = cluster_problems(cluster)
    if problems:
        raise ClusterError.from_problems(problems)


def check_size(cluster: Cluster) -> list[Problem]:
    size = len(cluster_to_json(cluster).encode())
    if size > MAX_CLUSTER_BYTES:
        return [
            (
                "(top)",
                f"the cluster is {size} bytes as stored, more than the limit of "
                f"{MAX_CLUSTER_BYTES} (etcd refuses requests over 1.5 MiB)",
            )
        ]
    return []


def validate_cluster(cluster: Cluster, constraints: Constraints) -> None:
    """Every check, including the constraints; must pass before a cluster is stored."""
    problems = cluster_problems(cluster) + check_size(cluster)
    if not any(path == "nodes" for path, _ in problems):
        problems += check_control_plane_count(cluster, constraints)
    if problems:
        raise ClusterError.from_problems(problems)


# ---------------------------------------------------------------------------
# Parsing and serialising.
# ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and aliases (no alias amplification)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.MarkedYAMLError(None, None, "YAML aliases (*name) are not supported", mark)
        return super().compose_node(parent, index)

    def construct_strict_mapping(self, node: yaml.MappingNode) -> dict[Any, Any]:
        self.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in result
            except TypeError:
                raise yaml.MarkedYAMLError(
                    None, None, "mapping keys must be scalars", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.MarkedYAMLError(None, None, "duplicate mapping key", key_node.start_mark)
            result[key] = self.construct_object(value_node, deep=True)
        return result


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_strict_mapping
)


def load_yaml_document(text: str) -> Any:
    """YAML (or JSON) text -> data, with the strict loader; ClusterError on bad syntax."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        raise ClusterError(
            f"(yaml): {exc.problem or 'syntax error'}{yaml_error_position(exc, text)}"
        ) from None
    except RecursionError:
        raise ClusterError("(yaml): nested too deeply") from None
    except Exception as exc:  # YAMLError, bad timestamps (ValueError), ...
        raise ClusterError(f"(yaml): cannot parse ({type(exc).__name__})") from None


def _cluster_from_data(data: Any) -> Cluster:
    if not isinstance(data, dict):
        raise ClusterError(f"(top): want a mapping of cluster fields, got {_kind(data)}")
    try:
        cluster = Cluster.model_validate(data)
    except ValidationError as exc:
        raise ClusterError(format_validation_error(exc)) from None
    except RecursionError:
        raise ClusterError("(top): nested too deeply") from None
    check_cluster(cluster)
    return cluster


def _kind(data: Any) -> str:
    if data is None:
        return "an empty document"
    if isinstance(data, list):
        return "a list"
    if isinstance(data, str):
        return "a string"
    return type(data).__name__


def parse_cluster(text: str) -> Cluster:
    """YAML (or JSON) text -> a Cluster that passes ``check_cluster``; else ClusterError."""
    return _cluster_from_data(load_yaml_document(text))


class _NoAliasDumper(yaml.SafeDumper):
    """Never writes anchors/aliases, which ``parse_cluster`` refuses."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def cluster_to_yaml(cluster: Cluster) -> str:
    """The cluster as YAML, defaults left out; ``parse_cluster`` reads it back."""
    data = cluster.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    text = _dump_yaml(data, allow_unicode=True)
    # PyYAML writes some line-break characters (U+0085, ...) raw and reads them back folded;
    # escaping all non-ASCII characters is always exact.
    if yaml.load(text, Loader=_StrictLoader) != data:
        text = _dump_yaml(data, allow_unicode=False)
    return text


def _dump_yaml(data: Any, *, allow_unicode: bool) -> str:
    return yaml.dump(
        data,
        Dumper=_NoAliasDumper,
        sort_keys=False,
        allow_unicode=allow_unicode,
        default_flow_style=False,
    )


def cluster_to_json(cluster: Cluster) -> str:
    """The storage form: every field, defaults included."""
    return cluster.model_dump_json(by_alias=True)


def cluster_from_json(text: str) -> Cluster:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ClusterError("(json): not valid JSON") from None
    return _cluster_from_data(data)


def constraints_from_json(text: str | None) -> Constraints:
    """Stored constraints; None (nothing stored) gives the defaults; missing keys default."""
    if text is None:
        return Constraints()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ClusterError("(json): not valid JSON") from None
    return _constraints_from_data(data)


def _constraints_from_data(data: Any) -> Constraints:
    if not isinstance(data, dict):
        raise ClusterError(f"(top): want a mapping of constraints, got {_kind(data)}")
    try:
        return Constraints.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise ClusterError(format_validation_error(exc)) from None


def constraints_to_json(c: Constraints) -> str:
    return c.model_dump_json(by_alias=True)


_INT_RE = re.compile(r"-?[0-9]+")


def set_constraint(c: Constraints, name: str, value: str) -> Constraints:
    """A copy of ``c`` with one constraint (hyphenated name) set from a command-line string."""
    if name not in CONSTRAINT_NAMES:
        raise ClusterError(
            f"{_quote(name)}: unknown constraint (want one of {', '.join(CONSTRAINT_NAMES)})"
        )
    text = value.strip()
    if not _INT_RE.fullmatch(text) or len(text) > 18:
        raise ClusterError(f"{name}: must be an integer")
    data: Mapping[str, Any] = {**c.model_dump(by_alias=True), name: int(text)}
    return _constraints_from_data(dict(data))
