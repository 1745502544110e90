"""The one interface to Vault (or OpenBao): AppRole login, token upkeep, and calls.

hvac is synchronous, so every call runs in a worker thread; the event loop never
blocks on Vault. Errors are mapped to two kinds: ``VaultUnavailable`` (cannot
reach or use Vault now: wait and retry) and ``VaultRefused`` (Vault said no:
wrong credentials or permissions). Neither message ever carries a token, a
secret-id or a private key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cke.common.etcd import format_validation_error
from cke.common.logs import get_logger

log = get_logger("cke.vault")

T = TypeVar("T")


class VaultError(Exception):
    pass


class VaultUnavailable(VaultError):
    """Vault cannot be reached or is sealed; the caller waits and retries."""


class VaultRefused(VaultError):
    """Vault refused the request (credentials, permissions, bad request)."""


class VaultConfig(BaseModel):
    """The ``vault`` key in etcd (CKE's schema): how cke logs in to Vault."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    endpoint: str
    role_id: str = Field(alias="role-id", min_length=1)
    secret_id: str = Field(alias="secret-id", min_length=1, repr=False)
    ca_cert: str | None = Field(default=None, alias="ca-cert")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("want an http(s):// URL")
        return value.rstrip("/")

    @field_validator("ca_cert")
    @classmethod
    def _ca_cert(cls, value: str | None) -> str | None:
        if value is not None and "-----BEGIN CERTIFICATE-----" not in value:
            raise ValueError("want a PEM certificate")
        return value

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_none=True))


def parse_vault_config(text: str | bytes) -> VaultConfig:
    """Parse the JSON form; errors name the field and never echo a value."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VaultRefused(f"invalid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(doc, dict):
        raise VaultRefused("want a JSON object with endpoint, role-id, secret-id")
    try:
        return VaultConfig.model_validate(doc)
    except ValidationError as exc:
        raise VaultRefused(format_validation_error(exc)) from None


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a Vault or transport error."""
    if isinstance(exc, hvac.exceptions.VaultError):
        errors = getattr(exc, "errors", None) or [str(exc).split(", on ")[0]]
        text = "; ".join(str(e) for e in errors)[:300]
        return f"{type(exc).__name__}: {text}"
    return type(exc).__name__


class Vault:
    """A logged-in (or token-bearing) client. Use ``call`` for every request."""

    def __init__(self, endpoint: str, ca_cert: str | None = None, token: str | None = None):
        self.endpoint = endpoint
        self._ca_file: str | None = None
        verify: bool | str = True
        if ca_cert:
            fd, path = tempfile.mkstemp(prefix="cke-vault-ca-", suffix=".pem")
            with os.fdopen(fd, "w") as f:
                f.write(ca_cert)
            self._ca_file = path
            verify = path
        elif os.environ.get("VAULT_CACERT"):
            verify = os.environ["VAULT_CACERT"]
        self.hvac = hvac.Client(url=endpoint, token=token, verify=verify, timeout=10)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._ca_file:
            with contextlib.suppress(OSError):
                os.unlink(self._ca_file)
            self._ca_file = None

    async def call(self, fn: Callable[[hvac.Client], T]) -> T:
        """Run ``fn(hvac_client)`` in a thread, mapping errors to VaultUnavailable/Refused."""
        try:
            return await asyncio.to_thread(fn, self.hvac)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise VaultUnavailable(f"cannot reach Vault at {self.endpoint}") from exc
        except (
            hvac.exceptions.VaultDown,
            hvac.exceptions.InternalServerError,
            hvac.exceptions.BadGateway,
        ) as exc:
            raise VaultUnavailable(_describe(exc)) from exc
        except hvac.exceptions.VaultError as exc:
            raise VaultRefused(_describe(exc)) from exc

    async def login_approle(self, role_id: str, secret_id: str) -> float:
        """Log in; return the token's lease in seconds (0: does not expire)."""

        def login(client: hvac.Client) -> float:
            resp = client.auth.approle.login(role_id=role_id, secret_id=secret_id)
            return float(resp["auth"].get("lease_duration") or 0)

        return await self.call(login)

    async def renew_token(self) -> float:
        def renew(client: hvac.Client) -> float:
            resp = client.auth.token.renew_self()
            return float(resp["auth"].get("lease_duration") or 0)

        return await self.call(renew)

    async def read_kv(self, mount: str, path: str) -> dict[str, Any] | None:
        def read(client: hvac.Client) -> dict[str, Any] | None:
            try:
                resp = client.secrets.kv.v1.read_secret(path=path, mount_point=mount)
            except hvac.exceptions.InvalidPath:
                return None
            return dict(resp["data"])

        return await self.call(read)

    async def write_kv(self, mount: str, path: str, data: dict[str, Any]) -> None:
        await self.call(
            lambda c: c.secrets.kv.v1.create_or_update_secret(
                path=path, secret=data, mount_point=mount
            )
        )


class VaultSession:
    """Keeps a logged-in Vault client for a long-running cke.

    ``run()`` logs in with AppRole, renews the token at two thirds of its lease,
    logs in again when renewal fails, and backs off while Vault is unreachable.
    ``client()`` waits (bounded) for a usable client.
    """

    def __init__(self, load_config: Callable[[], Any], check_interval: float = 5.0) -> None:
        self._load_config = load_config
        self.check_interval = check_interval
        self._vault: Vault | None = None
        self._ready = asyncio.Event()
        self.state = "not configured"
        self.renewals = 0
        self.logins = 0

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def client(self, timeout: float = 30.0) -> Vault:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise VaultUnavailable(f"Vault is not usable: {self.state}") from None
        assert self._vault is not None
        return self._vault

    def _set_state(self, state: str) -> None:
        if state != self.state:
            level = log.info if state == "ok" else log.warning
            level("vault state changed", state=state)
        self.state = state

    async def run(self) -> None:
        backoff = 1.0
        while True:
            config: VaultConfig | None = await self._load_config()
            if config is None:
                self._ready.clear()
                self._set_state("not configured")
                await asyncio.sleep(5)
                continue
            vault = Vault(config.endpoint, config.ca_cert)
            try:
                lease = await vault.login_approle(config.role_id, config.secret_id)
            except VaultError as exc:
                vault.close()
                self._ready.clear()
                self._set_state(f"unavailable: {exc}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            self.logins += 1
            if self._vault is not None:
                self._vault.close()
            self._vault = vault
            self._ready.set()
            self._set_state("ok")
            await self._renew_until_failure(vault, lease)
            self._ready.clear()

    async def _renew_until_failure(self, vault: Vault, lease: float) -> None:
        """Renew at two thirds of the lease; between renewals, check Vault is still usable."""
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + lease * 2 / 3 if lease > 0 else float("inf")
        while True:
            await asyncio.sleep(max(min(self.check_interval, renew_at - loop.time()), 0.2))
            try:
                if loop.time() < renew_at:
                    await vault.call(lambda c: c.auth.token.lookup_self())
                    continue
                new_lease = await vault.renew_token()
            except VaultError as exc:
                log.warning("vault check failed; logging in again", error=str(exc))
                self._set_state(f"unavailable: {exc}")
                return
            self.renewals += 1
            # Renewal never extends past the token's max TTL: when the lease comes
            # back shorter than half of what it was, log in again instead.
            if new_lease < lease / 2:
                log.info("vault token near its max TTL; logging in again")
                return
            lease = new_lease
            renew_at = loop.time() + lease * 2 / 3
