"""Connection settings for etcd, as cybozu-go/etcdutil reads them, and the client factory.

The same YAML keys serve ``cke --config``, ``ckecli --config`` and sabakan's etcd flags:
``endpoints``, ``prefix``, ``timeout``, ``username``, ``password``, ``tls-ca``,
``tls-cert``, ``tls-key``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from etcd3aio import Etcd3Client
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cke.common.durations import parse_duration
from cke.common.yamlfile import YAMLFileError, load_yaml


class ConfigError(ValueError):
    """A configuration file or flag is invalid; the message names the field."""


def endpoint_host_port(url: str) -> tuple[str, int]:
    """``https://10.0.0.1:2379`` (or ``10.0.0.1:2379``) -> ("10.0.0.1", 2379)."""
    parsed = urlsplit(url if "://" in url else f"http://{url}")
    if not parsed.hostname:
        raise ValueError(f"no host in endpoint {url!r}")
    return parsed.hostname, parsed.port or 2379


class EtcdSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    endpoints: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:2379"], min_length=1)
    prefix: str = "/cke/"
    timeout: float = 2.0
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    tls_ca: str | None = Field(default=None, alias="tls-ca")
    tls_cert: str | None = Field(default=None, alias="tls-cert")
    tls_key: str | None = Field(default=None, alias="tls-key")

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float:
        if isinstance(value, str):
            return parse_duration(value)
        if isinstance(value, (int, float)):
            return float(value)
        raise ValueError("want a duration such as 2s")

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for url in value:
            endpoint_host_port(url)
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value if value.endswith("/") else value + "/"

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None or any(e.startswith("https://") for e in self.endpoints)


def load_etcd_settings(path: str | Path) -> EtcdSettings:
    """Read an etcdutil-style YAML file; errors name the file and the field."""
    try:
        raw = load_yaml(str(path)) or {}
    except YAMLFileError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: want a mapping of etcd settings")
    try:
        return EtcdSettings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc)}") from exc


def format_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as ``field.path: message`` lines, inputs never echoed."""
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{loc or '(top)'}: {msg}")
    return "; ".join(lines)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def make_client(settings: EtcdSettings) -> Etcd3Client:
    """An unconnected etcd3aio client for ``settings``; ``await client.connect()`` it."""
    targets = [endpoint_host_port(u) for u in settings.endpoints]
    # gRPC checks every member's certificate against one name when it balances over
    # several addresses. Member certificates carry ``localhost`` (CKE issues them so,
    # and the README asks it of the operator's own etcd); one endpoint needs no override.
    tls_server_name = "localhost" if settings.uses_tls and len(targets) > 1 else None
    endpoints = [f"{h}:{p}" for h, p in targets]
    if not settings.uses_tls:
        return Etcd3Client(endpoints)
    if settings.tls_ca is None:
        raise ConfigError("tls-ca: required for https endpoints")
    return Etcd3Client(
        endpoints,
        tls_server_name=tls_server_name,
        ca_cert=_read(settings.tls_ca),
        cert_key=_read(settings.tls_key),
        cert_chain=_read(settings.tls_cert),
    )
