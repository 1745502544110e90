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
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from cke.common.election import LeaseFence
from cke.common.etcd import format_validation_error
from cke.common.logs import get_logger

log = get_logger("cke.vault")

T = TypeVar("T")
# Seconds one Vault request may take (hvac's timeout).
REQUEST_TIMEOUT = 10.0


class VaultError(Exception):
    pass


class VaultUnavailable(VaultError):
    """Vault cannot be reached or is sealed; the caller waits and retries."""


class VaultRefused(VaultError):
    """Vault refused the request (credentials, permissions, bad request)."""


class VaultConfigError(VaultRefused):
    """The ``vault`` configuration is malformed; the message names the field, never a value."""


class InsecureEndpoint(VaultConfigError):
    """An ``http://`` endpoint without the explicit opt-in ``allow-insecure-http``."""


INSECURE_HTTP = "http:// would send the secret-id in clear; want https://"


class VaultConfig(BaseModel):
    """The ``vault`` key in etcd (CKE's schema): how cke logs in to Vault.

    One addition to CKE's schema: ``allow-insecure-http`` (default false), the
    operator's explicit opt-in to a plain-HTTP endpoint, for labs only. Without it
    an ``http://`` endpoint is invalid, so neither ckecli nor cke sends the
    secret-id in clear.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    # Declared first: the endpoint's validator reads it.
    allow_insecure_http: bool = Field(default=False, alias="allow-insecure-http", strict=True)
    endpoint: str
    role_id: str = Field(alias="role-id", min_length=1)
    secret_id: str = Field(alias="secret-id", min_length=1, repr=False)
    ca_cert: str | None = Field(default=None, alias="ca-cert")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str, info: ValidationInfo) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("want an https:// URL")
        if value.startswith("http://") and not info.data.get("allow_insecure_http"):
            raise ValueError(INSECURE_HTTP)
        return value.rstrip("/")

    @field_validator("ca_cert")
    @classmethod
    def _ca_cert(cls, value: str | None) -> str | None:
        if value is not None and "-----BEGIN CERTIFICATE-----" not in value:
            raise ValueError("want a PEM certificate")
        return value

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_defaults=True))


def parse_vault_config(text: str | bytes, allow_insecure_http: bool = False) -> VaultConfig:
    """Parse the JSON form; errors name the field and never echo a value.

    ``allow_insecure_http`` is ckecli's ``--allow-insecure-http``: it records the
    opt-in in the configuration when the endpoint is ``http://``.
    Raises ``InsecureEndpoint`` for an ``http://`` endpoint without the opt-in and
    ``VaultConfigError`` for anything else wrong.
    """
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise VaultConfigError(f"invalid JSON: {msg}{where}") from None
    if not isinstance(doc, dict):
        raise VaultConfigError("want a JSON object with endpoint, role-id, secret-id")
    endpoint = doc.get("endpoint")
    if isinstance(endpoint, str) and endpoint.startswith("http://"):
        if allow_insecure_http:
            doc["allow-insecure-http"] = True
        elif doc.get("allow-insecure-http") is not True:
            raise InsecureEndpoint(f"endpoint: {INSECURE_HTTP}")
    try:
        return VaultConfig.model_validate(doc)
    except ValidationError as exc:
        raise VaultConfigError(format_validation_error(exc)) from None


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a Vault or transport error."""
    if isinstance(exc, hvac.exceptions.VaultError):
        errors = getattr(exc, "errors", None) or [str(exc).split(", on ")[0]]
        text = "; ".join(str(e) for e in errors)[:300]
        return f"{type(exc).__name__}: {text}"
    return type(exc).__name__


def _remove_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class Vault:
    """A logged-in (or token-bearing) client. Use ``call`` for every request.

    A ``ca_cert`` PEM goes to a private temporary file (0600; requests verifies
    with a path), removed by ``close()``, or when the object is collected, or at
    interpreter exit, whichever comes first.
    """

    def __init__(self, endpoint: str, ca_cert: str | None = None, token: str | None = None):
        self.endpoint = endpoint
        self._ca_file: str | None = None
        self._cleanup: weakref.finalize[[str], Vault] | None = None
        verify: bool | str = True
        if ca_cert:
            fd, path = tempfile.mkstemp(prefix="cke-vault-ca-", suffix=".pem")
            self._cleanup = weakref.finalize(self, _remove_file, path)
            with os.fdopen(fd, "w") as f:
                f.write(ca_cert)
            self._ca_file = path
            verify = path
        elif os.environ.get("VAULT_CACERT"):
            verify = os.environ["VAULT_CACERT"]
        self.hvac = hvac.Client(url=endpoint, token=token, verify=verify, timeout=REQUEST_TIMEOUT)  # type: ignore[no-untyped-call]
        # cke's leader sets it (through VaultSession): writes need a valid lease.
        self.fence: LeaseFence | None = None

    @property
    def ca_file(self) -> str | None:
        """The temporary CA file, while this client is open."""
        return self._ca_file

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
        self._ca_file = None

    async def call(self, fn: Callable[[hvac.Client], T], *, write: bool = False) -> T:
        """Run ``fn(hvac_client)`` in a thread, mapping errors to VaultUnavailable/Refused.

        ``write=True`` marks a request that changes Vault (issuing, tidying, issuers): it
        is refused (NotLeader) when a fence is set and the leader's lease is not known
        valid for the request's timeout.
        """
        if write and self.fence is not None:
            self.fence.check(REQUEST_TIMEOUT, f"write to Vault at {self.endpoint}")
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
    It re-reads the ``vault`` key every ``check_interval``: a changed key means a
    new login, and a malformed one is reported (one log line, and ``state``
    ``invalid config: ...``) and retried until it is fixed, without a restart.
    ``client()`` waits (bounded) for a usable client.
    """

    def __init__(
        self,
        load_config: Callable[[], Awaitable[VaultConfig | None]],
        check_interval: float = 5.0,
    ) -> None:
        self._load_config = load_config
        self.check_interval = check_interval
        self._vault: Vault | None = None
        self._ready = asyncio.Event()
        # Called each time a login succeeds (the leader decides again at once: work
        # held back for Vault, such as due certificates, goes on without waiting).
        self.ready_listeners: list[Callable[[], None]] = []
        self.state = "not configured"
        self.renewals = 0
        self.logins = 0
        # Given to every client: cke's leader fences its Vault writes with its lease.
        self.fence: LeaseFence | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def client(self, timeout: float = 30.0) -> Vault:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise VaultUnavailable(f"Vault is not usable: {self.state}") from None
        vault = self._vault
        if vault is None:  # dropped between the wake-up and now
            raise VaultUnavailable(f"Vault is not usable: {self.state}")
        return vault

    def _set_state(self, state: str) -> None:
        if state != self.state:
            if state == "ok":
                log.info("vault state changed", state=state)
            elif state.startswith("invalid config"):
                log.error(
                    "vault state changed; the vault key in etcd is invalid, "
                    "fix it with 'ckecli vault config' (retrying)",
                    state=state,
                )
            else:
                log.warning("vault state changed", state=state)
        self.state = state

    def _drop(self) -> None:
        self._ready.clear()
        if self._vault is not None:
            self._vault.close()
            self._vault = None

    def close(self) -> None:
        """Forget the client and remove its files; ``run()`` does it when cancelled."""
        self._drop()

    async def _read_config(self) -> VaultConfig | None:
        """The stored config, or None with ``state`` saying why there is none usable."""
        try:
            config = await self._load_config()
        except VaultConfigError as exc:
            self._set_state(f"invalid config: {exc}")
            return None
        except Exception as exc:  # etcd unreachable, timeouts: report and retry
            self._set_state(f"cannot read the vault key: {type(exc).__name__}")
            return None
        if config is None:
            self._set_state("not configured")
        return config

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._drop()

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            config = await self._read_config()
            if config is None:
                self._drop()
                await asyncio.sleep(self.check_interval)
                continue
            vault = Vault(config.endpoint, config.ca_cert)
            vault.fence = self.fence
            try:
                lease = await vault.login_approle(config.role_id, config.secret_id)
            except VaultError as exc:
                vault.close()
                self._ready.clear()
                self._set_state(f"unavailable: {exc}")
                # At most one check interval: certificates may be due, so a Vault
                # that is back must be used again soon.
                await asyncio.sleep(min(backoff, self.check_interval))
                backoff = min(backoff * 2, 30.0)
                continue
            except BaseException:
                vault.close()
                raise
            backoff = 1.0
            self.logins += 1
            if self._vault is not None:
                self._vault.close()
            self._vault = vault
            self._ready.set()
            self._set_state("ok")
            for listener in self.ready_listeners:
                listener()
            await self._renew_until_failure(vault, lease, config)
            self._ready.clear()

    async def _config_changed(self, current: VaultConfig) -> bool:
        """True when the stored key is now different (or invalid); etcd errors are not."""
        try:
            stored = await self._load_config()
        except VaultConfigError:
            return True
        except Exception:
            return False  # cannot tell now; keep the working login
        return stored != current

    async def _renew_until_failure(self, vault: Vault, lease: float, config: VaultConfig) -> None:
        """Renew at two thirds of the lease; between renewals, check Vault and the key."""
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + lease * 2 / 3 if lease > 0 else float("inf")
        while True:
            await asyncio.sleep(max(min(self.check_interval, renew_at - loop.time()), 0.2))
            if await self._config_changed(config):
                log.info("the vault key in etcd changed; logging in again")
                return
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
