"""``ckecli vault init``: make Vault ready for cke, idempotently (CKE's ``docs/vault.md``).

Every step first looks at what is there and changes only what is missing, so a
second run changes nothing and says so. What goes to etcd (CA certificates and
the AppRole login) is written in one transaction at the end.
"""

from __future__ import annotations

import hvac
import hvac.exceptions
from pydantic import ValidationError

from cke.common.durations import parse_duration
from cke.common.etcd import format_validation_error
from cke.pki import (
    APPROLE_NAME,
    CAS,
    POLICY,
    POLICY_NAME,
    ROOT_TTL,
    SECRETS_MOUNT,
    CASpec,
)
from cke.storage import KEY_CA_PREFIX, KEY_VAULT, Storage
from cke.vault import (
    INSECURE_HTTP,
    InsecureEndpoint,
    Vault,
    VaultConfig,
    VaultConfigError,
    VaultError,
    parse_vault_config,
)


def _mounts(client: hvac.Client) -> set[str]:
    data = client.sys.list_mounted_secrets_engines()
    mounts = data.get("data", data)
    return {m.rstrip("/") for m in mounts}


def _setup_ca(client: hvac.Client, ca: CASpec, mounted: bool) -> tuple[list[str], str]:
    changes = []
    if not mounted:
        client.sys.enable_secrets_engine(
            "pki",
            path=ca.mount,
            config={"max_lease_ttl": ROOT_TTL},
            description=ca.common_name,
        )
        changes.append(f"mounted PKI {ca.mount}")
    pem = client.secrets.pki.read_ca_certificate(mount_point=ca.mount) or ""
    if "BEGIN CERTIFICATE" not in pem:
        resp = client.secrets.pki.generate_root(
            "internal",
            ca.common_name,
            mount_point=ca.mount,
            extra_params={"ttl": ROOT_TTL, "key_type": "ec", "key_bits": 256},
        )
        pem = resp["data"]["certificate"]
        changes.append(f"generated the root CA of {ca.mount}")
    for role in ca.roles:
        try:
            current = client.secrets.pki.read_role(role.name, mount_point=ca.mount)["data"]
        except hvac.exceptions.InvalidPath:
            current = None
        wanted = role.params()
        if current is None or any(
            _normalise(k, current.get(k)) != _normalise(k, v) for k, v in wanted.items()
        ):
            client.secrets.pki.create_or_update_role(role.name, wanted, mount_point=ca.mount)
            changes.append(f"wrote role {ca.mount}/{role.name}")
    return changes, pem.strip() + "\n"


def _normalise(key: str, value: object) -> object:
    """Vault answers TTLs in seconds and lists as lists; we write ``8760h`` and lists."""
    if key in ("ttl", "max_ttl"):
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError:
                return value
        return float(value) if isinstance(value, int | float) else value
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def _vault_steps(client: hvac.Client) -> tuple[list[str], dict[str, str], str]:
    """Everything on the Vault side; returns changes, CA PEMs by name, and the role-id."""
    changes: list[str] = []
    auth = client.sys.list_auth_methods()
    if "approle/" not in auth.get("data", auth):
        client.sys.enable_auth_method("approle")
        changes.append("enabled the approle auth method")
    mounted = _mounts(client)
    pems: dict[str, str] = {}
    for ca in CAS:
        ca_changes, pem = _setup_ca(client, ca, ca.mount in mounted)
        changes += ca_changes
        pems[ca.name] = pem
    if SECRETS_MOUNT not in mounted:
        client.sys.enable_secrets_engine("kv", path=SECRETS_MOUNT, options={"version": "1"})
        changes.append(f"mounted KV v1 {SECRETS_MOUNT}")
    try:
        policy = client.sys.read_policy(POLICY_NAME)["data"].get("rules", "")
    except hvac.exceptions.InvalidPath:
        policy = ""
    if policy.strip() != POLICY.strip():
        client.sys.create_or_update_policy(POLICY_NAME, POLICY)
        changes.append(f"wrote policy {POLICY_NAME}")
    try:
        role_id = client.auth.approle.read_role_id(APPROLE_NAME)["data"]["role_id"]
    except hvac.exceptions.InvalidPath:
        client.auth.approle.create_or_update_approle(
            APPROLE_NAME, token_policies=[POLICY_NAME], token_period="1h"
        )
        role_id = client.auth.approle.read_role_id(APPROLE_NAME)["data"]["role_id"]
        changes.append(f"created AppRole {APPROLE_NAME}")
    return changes, pems, role_id


async def _stored_login_works(storage: Storage, role_id: str, endpoint: str) -> bool:
    stored = await storage.get_vault_config()
    if stored.value is None:
        return False
    try:
        config = parse_vault_config(stored.value)
    except VaultError:
        return False
    if config.role_id != role_id or config.endpoint != endpoint.rstrip("/"):
        return False
    probe = Vault(config.endpoint, config.ca_cert)
    try:
        await probe.login_approle(config.role_id, config.secret_id)
    except VaultError:
        return False
    finally:
        probe.close()
    return True


async def init_vault(
    admin: Vault,
    storage: Storage,
    endpoint: str,
    ca_cert: str | None,
    allow_insecure_http: bool = False,
) -> list[str]:
    """Set Vault up for cke; return what changed (empty: nothing to do).

    ``allow_insecure_http`` records the operator's opt-in to an ``http://``
    endpoint in the stored login; without it such an endpoint is refused.
    """
    if endpoint.startswith("http://") and not allow_insecure_http:
        raise InsecureEndpoint(f"endpoint: {INSECURE_HTTP}")
    changes, pems, role_id = await admin.call(_vault_steps)
    etcd_values: dict[str, str] = {}
    for name, pem in pems.items():
        if await storage.get_ca(name) != pem:
            etcd_values[KEY_CA_PREFIX + name] = pem
            changes.append(f"stored CA certificate ca/{name} in etcd")
    if not await _stored_login_works(storage, role_id, endpoint):

        def new_secret_id(client: hvac.Client) -> str:
            resp = client.auth.approle.generate_secret_id(APPROLE_NAME)
            return str(resp["data"]["secret_id"])

        secret_id = await admin.call(new_secret_id)
        doc: dict[str, object] = {
            "endpoint": endpoint,
            "role-id": role_id,
            "secret-id": secret_id,
            "ca-cert": ca_cert,
        }
        if allow_insecure_http and endpoint.startswith("http://"):
            doc["allow-insecure-http"] = True
        try:
            config = VaultConfig.model_validate(doc)
        except ValidationError as exc:
            raise VaultConfigError(format_validation_error(exc)) from None
        etcd_values[KEY_VAULT] = config.to_json()
        changes.append("stored the AppRole login for cke in etcd")
    await storage.put_many(etcd_values)
    return changes
