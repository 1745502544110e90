"""ckecli's commands that talk to Vault or issue certificates: ``vault``, ``ca``,
``etcd root-issue|issue|user-add``.

Kept out of :mod:`cke.cli.ckecli` so that the commands that only read and write etcd
(``status``, ``cluster``, the queues...) start without loading the Vault client (hvac),
SSH and the CA-rotation machinery: ckecli resolves these functions by name after
parsing the command line (``VAULTCMD``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
from cryptography import x509
from etcd3aio import EtcdError

from cke.cli.ckecli import CLIError, _emit, _read_input, _stored_cluster_text
from cke.cluster import cluster_from_json
from cke.common.durations import parse_duration
from cke.common.logs import error_line
from cke.etcdadmin import EtcdAdmin, EtcdCredentials
from cke.pki import (
    CA_BY_NAME,
    ROTATABLE_CAS,
    SECRETS_MOUNT,
    USER_CLIENT_TTL,
    CertIssuer,
    IssuedCert,
    reserved_etcd_user_problem,
)
from cke.server.carotation import RotationError, new_request, parse_rotation, trusted_bundle
from cke.storage import KEY_CA_PREFIX, KEY_VAULT, Storage, now_rfc3339
from cke.vault import INSECURE_HTTP, InsecureEndpoint, Vault, VaultError, parse_vault_config
from cke.vaultsetup import init_vault


async def vault_from_etcd(storage: Storage) -> Vault:
    """Log in to Vault as cke does, with the AppRole stored by ``vault config``."""
    stored = await storage.get_vault_config()
    if stored.value is None:
        raise CLIError("Vault is not configured; run 'ckecli vault init' or 'vault config'")
    try:
        config = parse_vault_config(stored.value)
    except VaultError as exc:
        raise CLIError(
            f"the vault key in etcd is invalid: {exc}; fix it with 'vault config'"
        ) from exc
    vault = Vault(config.endpoint, config.ca_cert)
    try:
        await vault.login_approle(config.role_id, config.secret_id)
    except VaultError as exc:
        vault.close()
        raise CLIError(f"vault login: {exc}") from exc
    return vault


async def cmd_vault_init(storage: Storage, args: argparse.Namespace) -> None:
    # As upstream: --endpoint and --cacert, each falling back to VAULT_ADDR / VAULT_CACERT.
    endpoint_from = "--endpoint" if args.endpoint else "VAULT_ADDR"
    endpoint = args.endpoint or os.environ.get("VAULT_ADDR", "")
    cacert = args.cacert or os.environ.get("VAULT_CACERT", "")
    token = os.environ.get("VAULT_TOKEN", "")
    if not endpoint:
        raise CLIError("--endpoint (or VAULT_ADDR): required (the Vault URL)")
    if not token:
        raise CLIError("VAULT_TOKEN: required (a token allowed to set Vault up)")
    if endpoint.startswith("http://") and not args.allow_insecure_http:
        raise CLIError(
            f"{endpoint_from}: http:// would send the token and the secret-id in clear; "
            "want https:// (or --allow-insecure-http, for a lab)"
        )
    ca_cert = await _read_input(cacert) if cacert else None
    admin = Vault(endpoint, ca_cert, token=token)
    try:
        changes = await init_vault(admin, storage, endpoint, ca_cert, args.allow_insecure_http)
    except VaultError as exc:
        raise CLIError(f"vault init: {exc}") from exc
    finally:
        admin.close()
    if not changes:
        print("vault init: nothing to do; Vault is already set up for cke")
    for change in changes:
        print(f"vault init: {change}")


async def cmd_vault_config(storage: Storage, args: argparse.Namespace) -> None:
    text = await _read_input(args.file)
    try:
        config = parse_vault_config(text, allow_insecure_http=args.allow_insecure_http)
    except InsecureEndpoint as exc:
        raise CLIError(
            f"vault config: endpoint: {INSECURE_HTTP} (or --allow-insecure-http, for a lab)"
        ) from exc
    except VaultError as exc:
        raise CLIError(f"vault config: {exc}") from exc
    probe = Vault(config.endpoint, config.ca_cert)
    try:
        await probe.login_approle(config.role_id, config.secret_id)
    except VaultError as exc:
        raise CLIError(f"vault config: AppRole login failed, nothing stored: {exc}") from exc
    finally:
        probe.close()
    await storage.put_many({KEY_VAULT: config.to_json()})
    print("vault config stored")


async def cmd_vault_ssh_privkey(storage: Storage, args: argparse.Namespace) -> None:
    key_text = await _read_input(args.file)
    try:
        asyncssh.import_private_key(key_text)
    except (asyncssh.KeyImportError, ValueError):
        raise CLIError(f"{args.file}: not an unencrypted SSH private key") from None
    vault = await vault_from_etcd(storage)
    try:
        keys = await vault.read_kv(SECRETS_MOUNT, "ssh") or {}
        keys[args.host] = key_text
        await vault.write_kv(SECRETS_MOUNT, "ssh", keys)
    finally:
        vault.close()
    print(f"stored the SSH key for {args.host or 'every node (default)'}")


def rotate_aescbc(current: str | None, now: dt.datetime) -> str:
    """The ``aescbc`` value after a rotation, in upstream's shape.

    That is the JSON of Kubernetes' AESConfiguration, ``{"keys": [{"name", "secret"}]}``:
    a new 32-byte key (named by the UTC time, RFC 3339) first, then the key that was
    current, if any; older keys are dropped. A bare list of keys, as earlier versions
    of this project stored, is read too.
    """
    keys: list[Any] = []
    if current:
        try:
            doc = json.loads(current)
        except ValueError as exc:
            raise CLIError(f"the stored aescbc key is not JSON: {exc}") from None
        keys = doc if isinstance(doc, list) else (doc or {}).get("keys") or []
        if not isinstance(keys, list):
            raise CLIError("the stored aescbc key has no list of keys")
    new = {
        "name": now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "secret": base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    return json.dumps({"keys": [new, *keys[:1]]})


async def cmd_vault_enckey(storage: Storage, args: argparse.Namespace) -> None:
    vault = await vault_from_etcd(storage)
    try:
        data = await vault.read_kv(SECRETS_MOUNT, "k8s") or {}
        current = data.get("aescbc")
        data["aescbc"] = rotate_aescbc(
            current if isinstance(current, str) else None, dt.datetime.now(dt.UTC)
        )
        await vault.write_kv(SECRETS_MOUNT, "k8s", data)
    finally:
        vault.close()
    print("succeeded")


async def cmd_ca_set(storage: Storage, args: argparse.Namespace) -> None:
    if args.name not in CA_BY_NAME:
        raise CLIError(f"NAME: want one of {', '.join(CA_BY_NAME)}")
    if args.name in await storage.get_ca_rotations():
        raise CLIError(
            f"NAME: {args.name} is being rotated; wait until 'ckecli ca rotations' is empty"
        )
    pem = await _read_input(args.file)
    try:
        x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise CLIError(f"{args.file}: not a PEM certificate") from None
    await storage.put_many({KEY_CA_PREFIX + args.name: pem})


async def cmd_ca_rotate(storage: Storage, args: argparse.Namespace) -> None:
    """Ask the leader to rotate a CA (cke/server/carotation.py does it, step by step)."""
    if args.name not in ROTATABLE_CAS:
        raise CLIError(
            f"NAME: want one of {', '.join(ROTATABLE_CAS)} (nothing cke deploys uses the "
            "kubernetes CAs yet, so there is nothing to roll out for them)"
        )
    if await storage.get_ca(args.name) is None:
        raise CLIError(f"NAME: no ca/{args.name} in etcd; run 'ckecli vault init' first")
    now = dt.datetime.now(dt.UTC)
    request = new_request(f"cke-{now.strftime('%Y%m%dT%H%M%SZ')}", now_rfc3339(), now.timestamp())
    if not await storage.request_ca_rotation(args.name, request.to_json()):
        raise CLIError(f"NAME: {args.name} is being rotated already; see 'ckecli ca rotations'")
    print(f"requested the rotation of {args.name}; follow it with 'ckecli ca rotations'")


async def cmd_ca_rotations(storage: Storage, args: argparse.Namespace) -> None:
    """Rotations in progress: the stage stored and what the leader says it waits for."""
    status = await storage.get_status()
    progress = status.ca_rotations if status is not None else {}
    doc: dict[str, Any] = {}
    for name, stored in sorted((await storage.get_ca_rotations()).items()):
        stage: str
        try:
            stage = parse_rotation(name, stored.value).stage
        except RotationError as exc:
            stage = f"invalid ({exc})"
        doc[name] = {
            "stage": stage,
            "waiting-for": (progress.get(name) or {}).get("waiting-for", ""),
        }

    def text(d: dict[str, Any]) -> str:
        if not d:
            return "no CA rotation in progress"
        return "\n".join(
            f"{n}: {r['stage']}; {r['waiting-for'] or 'ready for the next step'}"
            for n, r in d.items()
        )

    _emit(doc, args.output, text)


async def cmd_ca_get(storage: Storage, args: argparse.Namespace) -> None:
    if args.name not in CA_BY_NAME:
        raise CLIError(f"NAME: want one of {', '.join(CA_BY_NAME)}")
    pem = await trusted_bundle(storage, args.name)
    if pem is None:
        raise CLIError(f"no CA certificate stored for {args.name}")
    print(pem, end="")


def _write_cert_files(prefix: str, cert: IssuedCert) -> None:
    # cert.ca_certificate is the server CA (see _issue_etcd): what etcdctl --cacert wants.
    Path("etcd-ca.crt").write_text(cert.ca_certificate)
    Path(f"{prefix}.crt").write_text(cert.certificate)
    fd = os.open(f"{prefix}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(cert.private_key)
    print(f"wrote etcd-ca.crt, {prefix}.crt and {prefix}.key (0600)")


async def _issue_etcd(storage: Storage, user: str, ttl: str | None, output: str) -> None:
    # As CKE: the CA in the output is the one that signed the etcd servers' certificates
    # (cke/ca-server), so that etcdctl --cacert verifies the server; not the client CA.
    server_ca = await trusted_bundle(storage, "server")
    if server_ca is None:
        raise CLIError("no CA certificate ca/server; run 'ckecli vault init'")
    vault = await vault_from_etcd(storage)
    try:
        issuer = CertIssuer(vault)
        issued = await (issuer.etcd_client(user) if user == "root" else issuer.etcd_user(user, ttl))
    except VaultError as exc:
        raise CLIError(f"issue: {exc}") from exc
    finally:
        vault.close()
    cert = IssuedCert(issued.certificate, issued.private_key, server_ca, issued.serial)
    if output == "file":
        await asyncio.to_thread(_write_cert_files, f"etcd-{user}", cert)
    else:
        print(json.dumps(cert.to_json_dict(), indent=2))


async def cmd_etcd_root_issue(storage: Storage, args: argparse.Namespace) -> None:
    await _issue_etcd(storage, "root", None, args.output)


async def managed_etcd(
    storage: Storage,
) -> tuple[list[str], Callable[[], Awaitable[EtcdCredentials]]]:
    """The control planes of the stored cluster and a 2-hour ``root`` client certificate
    for their etcd (from Vault, as cke's own), in the form EtcdAdmin and backups take."""
    current = await storage.get_cluster()
    if current.value is None:
        raise CLIError("no cluster configuration is stored yet")
    addresses = [
        n.address for n in cluster_from_json(_stored_cluster_text(current.value)).control_planes
    ]
    server_ca = await trusted_bundle(storage, "server")
    if server_ca is None:
        raise CLIError("no CA certificate ca/server; run 'ckecli vault init'")
    vault = await vault_from_etcd(storage)
    try:
        root = await CertIssuer(vault).etcd_client("root")
    except VaultError as exc:
        raise CLIError(f"issue: {exc}") from exc
    finally:
        vault.close()
    creds = EtcdCredentials(
        server_ca.encode(), root.certificate.encode(), root.private_key.encode()
    )

    async def credentials() -> EtcdCredentials:
        return creds

    return addresses, credentials


async def cmd_etcd_user_add(storage: Storage, args: argparse.Namespace) -> None:
    problem = reserved_etcd_user_problem(args.user)
    if problem is not None:
        raise CLIError(f"USER: {problem}")
    if not args.prefix.startswith("/"):
        raise CLIError("PREFIX: must start with /")
    addresses, credentials = await managed_etcd(storage)
    admin = EtcdAdmin(credentials)
    try:
        await admin.user_add(addresses, args.user, args.prefix)
    except EtcdError as exc:
        raise CLIError(f"etcd: {error_line(exc)}") from exc
    finally:
        await admin.close()
    print(f"user {args.user} may read and write keys under {args.prefix}")


async def cmd_etcd_issue(storage: Storage, args: argparse.Namespace) -> None:
    problem = reserved_etcd_user_problem(args.user)
    if problem is not None:
        hint = " (use root-issue for root)" if args.user == "root" else ""
        raise CLIError(f"USER: {problem}{hint}")
    try:
        seconds = parse_duration(args.ttl)
    except ValueError as exc:
        raise CLIError(f"--ttl: {exc}") from exc
    if seconds <= 0:
        raise CLIError(f"--ttl: must be positive, got {args.ttl!r}")
    if seconds > parse_duration(USER_CLIENT_TTL):
        raise CLIError(f"--ttl: at most {USER_CLIENT_TTL} (the cap of the user role)")
    await _issue_etcd(storage, args.user, args.ttl, args.output)
