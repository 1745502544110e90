"""Connection settings for etcd, as cybozu-go/etcdutil reads them, and the client factory.

The same YAML keys serve ``cke --config``, ``ckecli --config`` and sabakan's etcd flags:
``endpoints``, ``prefix``, ``timeout``, ``username``, ``password``, ``tls-ca-file``,
``tls-cert-file``, ``tls-key-file`` (paths) and ``tls-ca``, ``tls-cert``, ``tls-key``
(the PEM text itself). As in etcdutil, a ``-file`` key wins over its PEM-text twin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from etcd3aio import Etcd3Client
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
    tls_ca_file: str | None = Field(default=None, alias="tls-ca-file")
    tls_cert_file: str | None = Field(default=None, alias="tls-cert-file")
    tls_key_file: str | None = Field(default=None, alias="tls-key-file")
    tls_ca: str | None = Field(default=None, alias="tls-ca", repr=False)
    tls_cert: str | None = Field(default=None, alias="tls-cert", repr=False)
    tls_key: str | None = Field(default=None, alias="tls-key", repr=False)

    @field_validator("tls_ca", "tls_cert", "tls_key")
    @classmethod
    def _pem_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        # etcdutil's tls-ca/tls-cert/tls-key hold the PEM text; older configs of this
        # project put a path there. Say so instead of failing later on a bad certificate.
        if value is not None and not value.lstrip().startswith("-----BEGIN"):
            key = (info.field_name or "").replace("_", "-")
            raise ValueError(
                f"holds PEM text (-----BEGIN ...); for a file path use {key}-file instead"
            )
        return value

    @model_validator(mode="after")
    def _client_pair(self) -> EtcdSettings:
        has_cert = bool(self.tls_cert_file or self.tls_cert)
        has_key = bool(self.tls_key_file or self.tls_key)
        if has_cert != has_key:
            raise ValueError(
                "a client certificate needs its key: give tls-cert-file with tls-key-file "
                "(or tls-cert with tls-key)"
            )
        return self

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
        return (
            self.tls_ca_file is not None
            or self.tls_ca is not None
            or any(e.startswith("https://") for e in self.endpoints)
        )

    def ca_pem(self) -> bytes | None:
        """The CA bundle: from ``tls-ca-file`` if given, else ``tls-ca``'s text."""
        return _pem(self.tls_ca_file, self.tls_ca, "tls-ca-file")

    def client_pem(self) -> tuple[bytes | None, bytes | None]:
        """(certificate, key), each from its ``-file`` key if given, else its PEM text."""
        return (
            _pem(self.tls_cert_file, self.tls_cert, "tls-cert-file"),
            _pem(self.tls_key_file, self.tls_key, "tls-key-file"),
        )


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


def _pem(path: str | None, text: str | None, key: str) -> bytes | None:
    if path:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{key}: {path}: {exc.strerror}") from None
    return text.encode() if text else None


async def authenticate(client: Etcd3Client, settings: EtcdSettings) -> None:
    """Log ``client`` (connected) in with ``username``/``password``, when given."""
    if not settings.username:
        return
    assert client.auth is not None
    resp = await client.auth.authenticate(
        settings.username, settings.password or "", timeout=settings.timeout
    )
    client.set_token(resp.token)


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
    ca = settings.ca_pem()
    if ca is None:
        raise ConfigError("tls-ca-file (or tls-ca): required for https endpoints")
    cert, key = settings.client_pem()
    return Etcd3Client(
        endpoints,
        tls_server_name=tls_server_name,
        ca_cert=ca,
        cert_key=key,
        cert_chain=cert,
    )
