"""What the leader needs to reach the world: SSH to nodes, Vault, and the managed etcd.

Built once per process; the leader key is set while this replica leads, so that
pinning a host key on first contact is a fenced write like every other.
"""

from __future__ import annotations

import datetime as dt
import time

from cryptography import x509

from cke.common.logs import get_logger
from cke.etcdadmin import EtcdAdmin, EtcdCredentials
from cke.nodes.pool import NodePool
from cke.nodes.runtime import Runtime
from cke.op.etcd import EtcdTools
from cke.pki import DEFAULT_CERT_TTL, SECRETS_MOUNT, CertIssuer
from cke.storage import KEY_HOSTKEYS_PREFIX, LeaderKey, NotLeader, Storage
from cke.vault import VaultError, VaultSession

log = get_logger("cke.infra")

SSH_KEYS_TTL = 30.0  # seconds a read of cke/secrets/ssh is reused
ROOT_CERT_MARGIN = dt.timedelta(minutes=30)


class Infrastructure:
    def __init__(
        self,
        storage: Storage,
        vault: VaultSession,
        max_concurrent_updates: int,
        cert_ttl: str = DEFAULT_CERT_TTL,
    ) -> None:
        self.storage = storage
        self.cert_ttl = cert_ttl
        self.vault = vault
        self.leader: LeaderKey | None = None
        self.pool = NodePool(self._ssh_keys, self, update_concurrency=max_concurrent_updates)
        self.admin = EtcdAdmin(self._etcd_credentials)
        self._keys: tuple[float, dict[str, str]] | None = None
        self._root: tuple[dt.datetime, EtcdCredentials] | None = None

    # -- SSH ------------------------------------------------------------------------------

    async def _ssh_keys(self) -> dict[str, str]:
        now = time.monotonic()
        if self._keys is not None and now - self._keys[0] < SSH_KEYS_TTL:
            return self._keys[1]
        vault = await self.vault.client(timeout=10)
        keys = await vault.read_kv(SECRETS_MOUNT, "ssh") or {}
        self._keys = (now, {str(k): str(v) for k, v in keys.items()})
        return self._keys[1]

    async def get(self, address: str) -> str | None:
        got = await self.storage.get(KEY_HOSTKEYS_PREFIX + address)
        return got.value.decode() if got.value is not None else None

    async def pin(self, address: str, key: str) -> None:
        if self.leader is None:
            raise NotLeader("only the leader pins host keys")
        await self.storage.fenced_put_if_absent(self.leader, KEY_HOSTKEYS_PREFIX + address, key)

    # -- Vault and etcd -------------------------------------------------------------------

    async def issuer(self) -> CertIssuer:
        ttls = {kind: self.cert_ttl for kind in ("server", "peer", "client", "kubernetes")}
        return CertIssuer(await self.vault.client(timeout=30), ttls)

    async def ca(self, name: str) -> str:
        pem = await self.storage.get_ca(name)
        if pem is None:
            raise VaultError(f"no CA certificate ca/{name} in etcd; run 'ckecli vault init'")
        return pem

    async def _etcd_credentials(self) -> EtcdCredentials:
        now = dt.datetime.now(dt.UTC)
        if self._root is not None and self._root[0] - now > ROOT_CERT_MARGIN:
            return self._root[1]
        issued = await (await self.issuer()).etcd_client("root")
        expires = x509.load_pem_x509_certificate(issued.certificate.encode()).not_valid_after_utc
        creds = EtcdCredentials(
            (await self.ca("server")).encode(),
            issued.certificate.encode(),
            issued.private_key.encode(),
        )
        self._root = (expires, creds)
        return creds

    def tools(self, runtime: Runtime) -> EtcdTools:
        return EtcdTools(self.pool, runtime, self.admin, self.issuer, self.ca)

    async def close(self) -> None:
        await self.pool.close()
        await self.admin.close()
