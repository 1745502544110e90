"""The sabakan integration's settings, as ``ckecli sabakan`` stores them: parsed and checked.

Pure: text in, values (or a :class:`SettingError` naming the setting) out.  The same
functions check what ``ckecli`` is given and what the leader reads back from etcd,
so a value stored by hand is refused by the leader in the same words.

Settings (keys under cke's prefix, as upstream CKE):

=============================  ==========================================================
``sabakan/url``                sabakan's base URL; ``https://`` only
``sabakan/template``           the cluster template (JSON of a cluster whose nodes are
                               node templates: one control plane, one or more workers)
``sabakan/query-variables``    which machines to use (JSON: ``having``, ``notHaving``)
``sabakan/disabled``           ``true`` while the integration is disabled
``sabakan/tls``                ours: the CA that signs sabakan's certificate, and the
                               client certificate and key cke presents (PEM)
=============================  ==========================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cke.cluster import Cluster, ClusterError, load_yaml_document
from cke.common.etcd import format_validation_error
from cke.sabakan.rules import valid_template
from sabakan.model import Machine, MachineState

__all__ = [
    "MachineParams",
    "QueryVariables",
    "SabakanTLS",
    "SettingError",
    "parse_auto_repair_variables",
    "parse_template",
    "parse_tls",
    "parse_url",
    "parse_variables",
    "select_machines",
    "template_to_json",
]


class SettingError(ValueError):
    """A sabakan setting that cannot be used; ``str()`` names it (``URL: ...``)."""


def parse_url(url: str) -> str:
    """sabakan's base URL, without a trailing ``/``; https only (the client certificate
    and the machine list must not travel in clear)."""
    if len(url) > 2048:
        raise SettingError("URL: longer than 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SettingError("URL: not a valid URL") from None
    if parts.scheme != "https":
        raise SettingError("URL: must start with https://")
    if not parts.hostname:
        raise SettingError("URL: has no host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise SettingError("URL: must not have user info, a query or a fragment")
    if port == 0:
        raise SettingError("URL: port 0")
    return url.rstrip("/")


def parse_template(text: str) -> Cluster:
    """A cluster template (YAML or JSON): nodes without addresses; one control-plane node
    template and one or more worker templates; every other field checked as in a cluster."""
    try:
        data = load_yaml_document(text)
    except ClusterError as exc:
        raise SettingError(f"template: {exc}") from None
    if not isinstance(data, dict):
        raise SettingError("template: want a mapping of cluster fields")
    nodes = data.get("nodes")
    if isinstance(nodes, list):
        data = {
            **data,
            "nodes": [
                {"address": "", **n} if isinstance(n, dict) and "address" not in n else n
                for n in nodes
            ],
        }
    try:
        template = Cluster.model_validate(data)
    except ValidationError as exc:
        raise SettingError(f"template: {format_validation_error(exc)}") from None
    except RecursionError:
        raise SettingError("template: nested too deeply") from None
    refusal = valid_template(template)
    if refusal is not None:
        raise SettingError(refusal.reason)
    return template


def template_to_json(template: Cluster) -> str:
    return template.model_dump_json(by_alias=True)


_STATES = {s.value.upper(): s for s in MachineState}


class _Label(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    value: str


class MachineParams(BaseModel):
    """Upstream's GraphQL ``MachineParams`` (the parts sabakan's REST data has)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    labels: list[_Label] = Field(default_factory=list)
    racks: list[int] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)
    states: list[str] = Field(default_factory=list)
    min_days_before_retire: int | None = Field(default=None, alias="minDaysBeforeRetire")

    def matches(self, machine: Machine) -> bool:
        """True when the machine has every property listed here (an empty list: any)."""
        spec = machine.spec
        if self.racks and spec.rack not in self.racks:
            return False
        if self.roles and spec.role not in self.roles:
            return False
        if self.states and machine.status.state.value.upper() not in self.states:
            return False
        return all(spec.labels.get(label.name) == label.value for label in self.labels)

    def matches_any(self, machine: Machine) -> bool:
        """For ``notHaving``: true when the machine has any property listed here."""
        spec = machine.spec
        return (
            spec.rack in self.racks
            or spec.role in self.roles
            or machine.status.state.value.upper() in self.states
            or any(spec.labels.get(label.name) == label.value for label in self.labels)
        )


def _default_not_having() -> MachineParams:
    # Upstream's query default: no boot servers, no retired machines.
    return MachineParams(roles=["boot"], states=["RETIRED"])


class QueryVariables(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    having: MachineParams | None = None
    not_having: MachineParams = Field(default_factory=_default_not_having, alias="notHaving")


def parse_variables(text: str | None, default: QueryVariables | None = None) -> QueryVariables:
    """The query variables (JSON); None (not set) gives ``default``, else the generator's
    defaults (upstream's)."""
    if text is None:
        return default if default is not None else QueryVariables()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise SettingError("variables: not valid JSON") from None
    if not isinstance(data, dict):
        raise SettingError("variables: want a JSON object with having and/or notHaving")
    try:
        variables = QueryVariables.model_validate(data)
    except ValidationError as exc:
        raise SettingError(f"variables: {format_validation_error(exc)}") from None
    for where, params in (("having", variables.having), ("notHaving", variables.not_having)):
        for state in params.states if params else []:
            if state not in _STATES:
                raise SettingError(
                    f"variables: {where}.states: unknown state (want {', '.join(_STATES)})"
                )
    return variables


# Upstream's default auto-repair query: unhealthy and unreachable machines, no boot servers.
DEFAULT_AUTO_REPAIR_VARIABLES: dict[str, Any] = {
    "having": {"states": ["UNHEALTHY", "UNREACHABLE"]},
    "notHaving": {"roles": ["boot"]},
}


def default_variables() -> QueryVariables:
    return QueryVariables.model_validate(DEFAULT_AUTO_REPAIR_VARIABLES)


def parse_auto_repair_variables(text: str | None) -> QueryVariables:
    """``ckecli auto-repair set-variables``' JSON: the generator's checks, auto-repair's
    default."""
    return parse_variables(text, default_variables())


def select_machines(machines: list[Machine], variables: QueryVariables) -> list[Machine]:
    """The machines the query selects (upstream's ``searchMachines(having, notHaving)``)."""
    chosen = []
    for m in machines:
        if variables.having is not None and not variables.having.matches(m):
            continue
        if variables.not_having.matches_any(m):
            continue
        chosen.append(m)
    return chosen


@dataclass(frozen=True)
class SabakanTLS:
    """How cke talks TLS to sabakan: the CA of sabakan's certificate (None: the system's),
    and the client certificate and key cke presents (None: none)."""

    ca: str | None = None
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)

    def to_json(self) -> str:
        return json.dumps({"ca": self.ca, "cert": self.cert, "key": self.key})


def _pem_certificate(text: str, what: str) -> str:
    try:
        x509.load_pem_x509_certificates(text.encode())
    except ValueError:
        raise SettingError(f"{what}: not a PEM certificate") from None
    return text


def parse_tls(ca: str | None, cert: str | None, key: str | None) -> SabakanTLS:
    """Check the PEM texts (never echoed: the key is a secret)."""
    if (cert is None) != (key is None):
        raise SettingError("--cert and --key: give both or neither")
    if ca is not None:
        _pem_certificate(ca, "--cacert")
    if cert is not None and key is not None:
        _pem_certificate(cert, "--cert")
        try:
            serialization.load_pem_private_key(key.encode(), password=None)
        except (ValueError, TypeError):
            raise SettingError("--key: not an unencrypted PEM private key") from None
    return SabakanTLS(ca, cert, key)


def tls_from_json(text: str | None) -> SabakanTLS:
    if text is None:
        return SabakanTLS()
    try:
        data: Any = json.loads(text)
    except ValueError:
        raise SettingError("tls: not valid JSON") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), (str, type(None))) for k in ("ca", "cert", "key")
    ):
        raise SettingError("tls: want {ca, cert, key} PEM texts")
    return parse_tls(data.get("ca"), data.get("cert"), data.get("key"))
