"""VaultSession and VaultConfig without a Vault: bad keys, plain HTTP, temporary CA files.

Issue 10, items 4 (a malformed ``vault`` key must be reported and retried, not kill
the session), 10 (no ``cke-vault-ca-*.pem`` left behind) and 12 (no secret-id over
plain HTTP unless explicitly allowed).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cke.vault import (
    InsecureEndpoint,
    Vault,
    VaultConfig,
    VaultConfigError,
    VaultSession,
    parse_vault_config,
)

SECRET = "5ec2e7-5ec2e7-do-not-print"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "endpoint": "https://127.0.0.1:1",
        "role-id": "role",
        "secret-id": SECRET,
        "ca-cert": PEM,
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


# -- VaultConfig: plain HTTP (item 12) ---------------------------------------------------------


def test_http_endpoint_is_refused_without_the_opt_in() -> None:
    text = json.dumps(_doc(endpoint="http://vault.example:8200"))
    with pytest.raises(InsecureEndpoint) as raised:
        parse_vault_config(text)
    message = str(raised.value)
    assert message.startswith("endpoint: ") and "https://" in message
    assert SECRET not in message and "\n" not in message
    # The model itself refuses it too (vault init builds the config directly).
    with pytest.raises(ValidationError, match="in clear"):
        VaultConfig.model_validate(_doc(endpoint="http://vault.example:8200"))


def test_http_endpoint_with_the_opt_in_is_kept_and_recorded() -> None:
    text = json.dumps(_doc(endpoint="http://vault.example:8200/"))
    config = parse_vault_config(text, allow_insecure_http=True)
    assert config.endpoint == "http://vault.example:8200"
    stored = json.loads(config.to_json())
    assert stored["allow-insecure-http"] is True
    # What is stored reads back as the same configuration: cke honours the opt-in.
    assert parse_vault_config(config.to_json()) == config


def test_https_config_is_stored_in_ckes_schema() -> None:
    config = parse_vault_config(json.dumps(_doc()), allow_insecure_http=True)
    assert set(json.loads(config.to_json())) == {"endpoint", "role-id", "secret-id", "ca-cert"}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (json.dumps(_doc(**{"secret-id": None})), "secret-id"),
        (json.dumps(_doc(endpoint="ftp://x")), "endpoint"),
        (json.dumps(_doc(**{"ca-cert": "junk " + SECRET})), "ca-cert"),
        (json.dumps(_doc(**{"allow-insecure-http": "yes"})), "allow-insecure-http"),
        ('{"endpoint": ', "invalid JSON"),
        (b"\xff\xfe", "invalid JSON"),
        ("[1]", "JSON object"),
    ],
)
def test_malformed_config_names_the_field_never_a_value(text: str | bytes, field: str) -> None:
    with pytest.raises(VaultConfigError) as raised:
        parse_vault_config(text)
    assert field in str(raised.value)
    assert SECRET not in str(raised.value)


# -- VaultSession: a malformed key is reported and retried (item 4) ----------------------------


Loader = Callable[[], Awaitable[VaultConfig | None]]


def _loader(texts: list[str | None]) -> Loader:
    """A loader that parses ``texts[0]`` as cke's does (the test changes it)."""

    async def load() -> VaultConfig | None:
        return parse_vault_config(texts[0]) if texts[0] is not None else None

    return load


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_malformed_key_is_reported_once_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    texts: list[str | None] = [json.dumps(_doc(**{"secret-id": None, "role-id": SECRET}))]
    session = VaultSession(_loader(texts), check_interval=0.05)
    caplog.set_level(logging.INFO, logger="cke.vault")
    runner = asyncio.create_task(session.run())
    try:
        await _until(lambda: session.state.startswith("invalid config"))
        assert session.state == "invalid config: secret-id: Field required"
        assert not session.ready
        await asyncio.sleep(0.3)  # several retries: still alive, still one line
        assert not runner.done()
        lines = [r for r in caplog.records if r.name == "cke.vault"]
        assert len(lines) == 1
        assert lines[0].levelno == logging.ERROR
        assert "ckecli vault config" in lines[0].getMessage()
        assert "secret-id" in str(lines[0].fields)  # type: ignore[attr-defined]
        assert SECRET not in caplog.text
        # Fixing the key in etcd is picked up without a restart.
        texts[0] = None
        await _until(lambda: session.state == "not configured")
        texts[0] = json.dumps(_doc(endpoint="https://127.0.0.1:1/x"))
        await _until(lambda: session.state.startswith("unavailable"))
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_unreadable_key_is_reported_and_retried() -> None:
    calls = 0

    async def load() -> VaultConfig | None:
        nonlocal calls
        calls += 1
        raise TimeoutError("etcd did not answer")

    session = VaultSession(load, check_interval=0.05)
    runner = asyncio.create_task(session.run())
    try:
        await _until(lambda: calls >= 3)
        assert session.state == "cannot read the vault key: TimeoutError"
        assert not runner.done()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_stored_http_endpoint_is_not_logged_in_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored http:// endpoint without the opt-in: no login, and the state says why."""
    attempts = 0

    async def login(self: Vault, role_id: str, secret_id: str) -> float:
        nonlocal attempts
        attempts += 1
        return 3600.0

    monkeypatch.setattr(Vault, "login_approle", login)
    texts: list[str | None] = [json.dumps(_doc(endpoint="http://127.0.0.1:1"))]
    session = VaultSession(_loader(texts), check_interval=0.05)
    runner = asyncio.create_task(session.run())
    try:
        await _until(lambda: session.state.startswith("invalid config"))
        assert session.state.startswith("invalid config: endpoint: http://")
        await asyncio.sleep(0.2)
        assert attempts == 0 and not session.ready
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_key_broken_while_logged_in_is_reported_then_recovered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def login(self: Vault, role_id: str, secret_id: str) -> float:
        return 3600.0

    async def call(self: Vault, fn: Callable[[Any], Any]) -> Any:
        return {}

    monkeypatch.setattr(Vault, "login_approle", login)
    monkeypatch.setattr(Vault, "call", call)
    good = json.dumps(_doc())
    texts: list[str | None] = [good]
    session = VaultSession(_loader(texts), check_interval=0.05)
    runner = asyncio.create_task(session.run())
    try:
        await _until(lambda: session.state == "ok")
        first = await session.client(timeout=1)
        texts[0] = "{not json"
        await _until(lambda: session.state.startswith("invalid config: invalid JSON"))
        assert not session.ready
        assert first.ca_file is None  # the dropped client's CA file is gone
        texts[0] = good
        await _until(lambda: session.state == "ok")
        assert session.logins == 2
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


# -- the temporary CA file (item 10) -----------------------------------------------------------


def test_ca_file_is_private_and_removed_on_close() -> None:
    vault = Vault("https://127.0.0.1:1", PEM)
    path = vault.ca_file
    assert path is not None and Path(path).read_text() == PEM
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    vault.close()
    assert not Path(path).exists() and vault.ca_file is None
    vault.close()  # twice is fine


def test_ca_file_is_removed_when_a_client_is_dropped_unclosed() -> None:
    vault = Vault("https://127.0.0.1:1", PEM)
    path = vault.ca_file
    assert path is not None and Path(path).exists()
    del vault
    gc.collect()
    assert not Path(path).exists()


async def test_cancelled_session_leaves_no_ca_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """cke cancels the session at exit: its client's CA file must go with it."""

    async def login(self: Vault, role_id: str, secret_id: str) -> float:
        return 3600.0

    async def call(self: Vault, fn: Callable[[Any], Any]) -> Any:
        return {}

    monkeypatch.setattr(Vault, "login_approle", login)
    monkeypatch.setattr(Vault, "call", call)
    session = VaultSession(_loader([json.dumps(_doc())]), check_interval=0.05)
    runner = asyncio.create_task(session.run())
    vault = await session.client(timeout=5)
    path = vault.ca_file
    assert path is not None and Path(path).exists()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert not Path(path).exists()
    assert not session.ready
