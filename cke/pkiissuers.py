"""CA rotation on OpenBao's multi-issuer PKI mounts: a second root beside the first.

A PKI mount holds several issuers (each a CA certificate and its key); the roles
issue with the mount's default issuer. Rotating a CA is: add a new root issuer
(``ensure_issuer``: the default stays as it is, so nothing is issued by the new CA
before the nodes trust it), hand its certificate out, then ``set_default_issuer``.

Listing issuers and reading their certificates are unauthenticated in OpenBao's PKI;
adding a root and reading or setting the default need ``issuer_policy`` (granted to
the cke token for the CAs in ``cke.pki.ROTATABLE_CAS``). Issuers are told apart
by id, and CA certificates by key identifier (``cke.certinfo.subject_key_id``);
OpenBao's own ``key_id`` is the id of its stored key, another thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import hvac
import hvac.exceptions
from cryptography.hazmat.primitives.serialization import Encoding

from cke.certinfo import CertificateError, load_pem_certificates, subject_key_id
from cke.common.logs import get_logger
from cke.pki import KEY_BITS, KEY_TYPE, ROOT_TTL, issuer_policy
from cke.vault import Vault, VaultRefused

__all__ = [
    "Issuer",
    "default_issuer",
    "ensure_issuer",
    "issuer_policy",
    "list_issuers",
    "set_default_issuer",
]

log = get_logger("cke.pkiissuers")

_NAME_IN_USE = "issuer name already in use"


@dataclass(frozen=True)
class Issuer:
    id: str  # OpenBao's issuer_id
    name: str  # issuer_name ("" if unnamed)
    certificate: str  # PEM of the issuer's CA certificate (one certificate, newline-ended)
    key_id: str  # cke.certinfo.subject_key_id of that certificate (hex)


# -- answers: every field checked, a bad answer is VaultRefused --------------------------------


def _data(resp: object, what: str) -> Mapping[str, Any]:
    data = resp.get("data") if isinstance(resp, Mapping) else None
    if not isinstance(data, Mapping):
        raise VaultRefused(f"{what}: Vault's answer has no data")
    return data


def _field(data: Mapping[str, Any], key: str, what: str, *, empty: bool = False) -> str:
    value = data.get(key)
    if not isinstance(value, str) or (not value and not empty):
        raise VaultRefused(f"{what}: Vault's answer has no {key}")
    return value


def _issuer(data: Mapping[str, Any], what: str) -> Issuer:
    issuer_id = _field(data, "issuer_id", what)
    name = data.get("issuer_name")
    if name is None:
        name = ""
    if not isinstance(name, str):
        raise VaultRefused(f"{what}: Vault's answer has no issuer_name")
    try:
        certs = load_pem_certificates(_field(data, "certificate", what))
    except CertificateError:
        raise VaultRefused(f"{what}: the certificate in Vault's answer is not PEM") from None
    if len(certs) != 1:
        raise VaultRefused(f"{what}: want one certificate in Vault's answer, got {len(certs)}")
    pem = certs[0].public_bytes(Encoding.PEM).decode()
    return Issuer(issuer_id, name, pem, subject_key_id(certs[0]))


# -- requests (run inside Vault.call's thread) -------------------------------------------------


def _issuer_infos(client: hvac.Client, mount: str) -> list[tuple[str, Mapping[str, Any]]]:
    """(issuer_id, key_info) of every issuer in the mount, in OpenBao's order."""
    what = f"{mount}: list issuers"
    try:
        resp = client.adapter.list(f"/v1/{mount}/issuers")
    except hvac.exceptions.InvalidPath as exc:
        if not exc.errors:  # a PKI mount with no issuer yet; an unknown mount says so
            return []
        raise
    data = _data(resp, what)
    keys, infos = data.get("keys"), data.get("key_info")
    if not isinstance(keys, list) or not isinstance(infos, Mapping):
        raise VaultRefused(f"{what}: Vault's answer has no keys or key_info")
    result = []
    for key in keys:
        info = infos.get(key) if isinstance(key, str) and key else None
        if not isinstance(info, Mapping):
            raise VaultRefused(f"{what}: Vault's answer has no key_info for an issuer")
        result.append((key, info))
    return result


def _read_issuer(client: hvac.Client, mount: str, issuer_id: str) -> Issuer:
    what = f"{mount}: read issuer {issuer_id}"
    issuer = _issuer(_data(client.adapter.get(f"/v1/{mount}/issuer/{issuer_id}/json"), what), what)
    if issuer.id != issuer_id:
        raise VaultRefused(f"{what}: Vault answered with another issuer")
    return issuer


def _default_id(client: hvac.Client, mount: str) -> tuple[str, bool]:
    """The default issuer's id ("" when none) and ``default_follows_latest_issuer``."""
    what = f"{mount}: read config/issuers"
    data = _data(client.adapter.get(f"/v1/{mount}/config/issuers"), what)
    follows = data.get("default_follows_latest_issuer", False)
    if not isinstance(follows, bool):
        raise VaultRefused(f"{what}: Vault's answer has no default_follows_latest_issuer")
    return _field(data, "default", what, empty=True), follows


def _write_default(client: hvac.Client, mount: str, issuer_id: str) -> None:
    what = f"{mount}: set the default issuer"
    resp = client.adapter.post(f"/v1/{mount}/config/issuers", json={"default": issuer_id})
    if isinstance(resp, Mapping) and _field(_data(resp, what), "default", what) != issuer_id:
        raise VaultRefused(f"{what}: Vault kept another default issuer")


def _find_named(client: hvac.Client, mount: str, name: str) -> Issuer | None:
    for issuer_id, info in _issuer_infos(client, mount):
        if info.get("issuer_name") == name:
            return _read_issuer(client, mount, issuer_id)
    return None


# -- the API -----------------------------------------------------------------------------------


async def list_issuers(vault: Vault, mount: str) -> list[Issuer]:
    """Every issuer of the PKI mount, in OpenBao's order (by id); [] for a mount with none."""

    def read(client: hvac.Client) -> list[Issuer]:
        return [_read_issuer(client, mount, i) for i, _ in _issuer_infos(client, mount)]

    return await vault.call(read)


async def default_issuer(vault: Vault, mount: str) -> Issuer:
    """The issuer the mount's roles issue with; VaultRefused when the mount has none."""

    def read(client: hvac.Client) -> Issuer:
        defaults = [i for i, info in _issuer_infos(client, mount) if info.get("is_default") is True]
        if len(defaults) != 1:
            raise VaultRefused(f"{mount}: want one default issuer, Vault lists {len(defaults)}")
        return _read_issuer(client, mount, defaults[0])

    return await vault.call(read)


async def ensure_issuer(
    vault: Vault, mount: str, issuer_name: str, common_name: str, ttl: str = ROOT_TTL
) -> Issuer:
    """The issuer named ``issuer_name``, made a new internal root if there is none.

    An existing issuer of that name is returned as it is (its common name and TTL
    are not compared). A new one never becomes the default, unless the mount had
    no issuer at all (OpenBao makes the first issuer the default): a mount set to
    ``default_follows_latest_issuer`` is refused rather than changed, and a default
    moved by someone else meanwhile is put back.
    """
    if not issuer_name or issuer_name == "default":
        raise ValueError("issuer_name must be a name other than 'default'")

    def ensure(client: hvac.Client) -> Issuer:
        found = _find_named(client, mount, issuer_name)
        if found is not None:
            return found
        before, follows = _default_id(client, mount)
        if follows:
            raise VaultRefused(
                f"{mount}: default_follows_latest_issuer is on, so a new root would become "
                "the default issuer; turn it off first"
            )
        what = f"{mount}: generate root issuer {issuer_name}"
        try:
            resp = client.adapter.post(
                f"/v1/{mount}/root/generate/internal",
                json={
                    "issuer_name": issuer_name,
                    "common_name": common_name,
                    "ttl": ttl,
                    "key_type": KEY_TYPE,
                    # A string: the ACL (issuer_policy) compares parameter values by type.
                    "key_bits": str(KEY_BITS),
                },
            )
        except hvac.exceptions.InvalidRequest as exc:
            if not any(_NAME_IN_USE in str(e) for e in exc.errors or ()):
                raise
            found = _find_named(client, mount, issuer_name)  # made meanwhile by another call
            if found is None:
                raise
            return found
        created = _issuer(_data(resp, what), what)
        after, _ = _default_id(client, mount)
        if before and after != before:
            log.warning(
                "the default issuer moved while adding a root; putting it back",
                mount=mount,
                issuer=issuer_name,
            )
            _write_default(client, mount, before)
        return created

    return await vault.call(ensure, write=True)


async def set_default_issuer(vault: Vault, mount: str, issuer_id: str) -> None:
    """Make ``issuer_id`` the issuer the mount's roles issue with (no write if it already is)."""
    if not issuer_id or issuer_id == "default":
        raise ValueError("issuer_id must be an issuer's id")

    def set_default(client: hvac.Client) -> None:
        current, _ = _default_id(client, mount)
        if current != issuer_id:
            _write_default(client, mount, issuer_id)

    await vault.call(set_default, write=True)
