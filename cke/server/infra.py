"""What the leader needs to reach the world: SSH to nodes, Vault, and the managed etcd.

Built once per process; the leader key is set while this replica leads, so that
pinning a host key on first contact is a fenced write like every other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from cke.certinfo import CertInfo, parse_certificate
from cke.common.durations import parse_duration
from cke.common.logs import error_line, get_logger
from cke.etcdadmin import EtcdAdmin, EtcdCredentials
from cke.nodes.pool import NodePool
from cke.nodes.runtime import Runtime
from cke.op.etcd import EtcdTools
from cke.pki import DEFAULT_CERT_TTL, SECRETS_MOUNT, TIDY_SAFETY_BUFFER, CertIssuer
from cke.server.certrenewal import renewal_reason
from cke.server.clusterstatus import DefragPolicy, Trust
from cke.storage import KEY_HOSTKEYS_PREFIX, LeaderKey, NotLeader, Storage
from cke.vault import VaultError, VaultSession

log = get_logger("cke.infra")

SSH_KEYS_TTL = 30.0  # seconds a read of cke/secrets/ssh is reused
CERT_KINDS = ("server", "peer", "client", "kubernetes")


class Infrastructure:
    def __init__(
        self,
        storage: Storage,
        vault: VaultSession,
        max_concurrent_updates: int,
        cert_ttl: str = DEFAULT_CERT_TTL,
        ttls: Mapping[str, str] | None = None,
        renew_fraction: float = 1 / 3,
        rotation_grace: float = 0.0,
        defrag: DefragPolicy | None = None,
    ) -> None:
        self.storage = storage
        self.max_concurrent_updates = max_concurrent_updates
        # Lifetime per kind (server, peer, client, kubernetes); --cert-ttl for the rest.
        self.ttls = {kind: cert_ttl for kind in CERT_KINDS} | dict(ttls or {})
        self.renew_fraction = renew_fraction
        self.rotation_grace = rotation_grace  # seconds (cke's --ca-rotation-grace)
        # When a member is defragmented (--etcd-defrag-min-db-size, --etcd-defrag-in-use-ratio).
        self.defrag = defrag or DefragPolicy()
        self.vault = vault
        self.leader: LeaderKey | None = None
        # What the nodes and cke itself trust now (set by the leader at every step).
        self.trust: Trust | None = None
        self.pool = NodePool(self._ssh_keys, self, update_concurrency=max_concurrent_updates)
        self.admin = EtcdAdmin(self._etcd_credentials)
        self._keys: tuple[float, dict[str, str]] | None = None
        self._client: tuple[CertInfo, EtcdCredentials] | None = None
        # Every member's status asks at once: one of them renews, the others wait for it.
        self._client_lock = asyncio.Lock()

    # -- SSH ------------------------------------------------------------------------------

    @property
    def has_ssh_keys(self) -> bool:
        return self._keys is not None

    async def _ssh_keys(self) -> dict[str, str]:
        """The nodes' SSH keys from Vault, read again every SSH_KEYS_TTL seconds. While
        Vault is away the last keys read are kept: nodes stay reachable, so the status
        (certificate expiry included) stays true."""
        now = time.monotonic()
        if self._keys is not None and (now - self._keys[0] < SSH_KEYS_TTL or not self.vault.ready):
            return self._keys[1]
        try:
            vault = await self.vault.client(timeout=10)
            keys = await vault.read_kv(SECRETS_MOUNT, "ssh") or {}
        except VaultError:
            if self._keys is None:
                raise
            return self._keys[1]
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
        return CertIssuer(await self.vault.client(timeout=30), dict(self.ttls))

    def tidy_safety_buffer(self) -> str:
        """How long an expired certificate stays in Vault: the longest lifetime cke
        issues, between one minute and TIDY_SAFETY_BUFFER."""
        longest = max(parse_duration(ttl) for ttl in self.ttls.values())
        cap = parse_duration(TIDY_SAFETY_BUFFER)
        return f"{int(min(max(longest, 60.0), cap))}s"

    async def ca(self, name: str) -> str:
        """The trust bundle of CA ``name`` now (both CAs while it is rotated)."""
        if self.trust is not None and self.trust.bundles.get(name):
            return self.trust.bundles[name]
        pem = await self.storage.get_ca(name)
        if pem is None:
            raise VaultError(f"no CA certificate ca/{name} in etcd; run 'ckecli vault init'")
        return pem

    @property
    def client_certificate(self) -> CertInfo | None:
        """cke's own etcd client certificate (``root``), once it has one."""
        return self._client[0] if self._client is not None else None

    def _client_reason(self, server_ca: bytes) -> str | None:
        """Why cke's own client certificate must be replaced now (None: keep it)."""
        if self._client is None:
            return "none yet"
        cert, creds = self._client
        issuer = self.trust.issuers.get("etcd-client", "") if self.trust else ""
        reason = renewal_reason(cert, time.time(), self.renew_fraction, issuer)
        if reason is None and creds.server_ca != server_ca:
            reason = "the server CA bundle changed"
        return reason

    async def etcd_credentials(self) -> EtcdCredentials:
        """cke's ``root`` client certificate for the managed etcd (scheduled backups)."""
        return await self._etcd_credentials()

    async def _etcd_credentials(self) -> EtcdCredentials:
        async with self._client_lock:
            return await self._current_or_renewed()

    async def _current_or_renewed(self) -> EtcdCredentials:
        """cke's ``root`` client certificate, renewed as every certificate cke issues is:
        with ``renew_fraction`` of its lifetime left, or when a CA rotation needs it."""
        server_ca = (await self.ca("server")).encode()
        reason = self._client_reason(server_ca)
        if reason is None and self._client is not None:
            return self._client[1]
        if (
            not self.vault.ready
            and self._client is not None
            and self._client[0].not_after > time.time()
        ):
            return self._client[1]  # Vault is away: keep the current one until it expires
        try:
            issued = await (await self.issuer()).etcd_client("root", self.ttls["client"])
        except VaultError as exc:
            # Keep using the current certificate until it expires (Vault may come back).
            if self._client is not None and self._client[0].not_after > time.time():
                log.warning(
                    "cke's etcd client certificate is due and Vault cannot renew it",
                    reason=reason,
                    error=error_line(exc, 200),
                )
                return self._client[1]
            raise
        creds = EtcdCredentials(server_ca, issued.certificate.encode(), issued.private_key.encode())
        info = parse_certificate(issued.certificate)
        if self._client is not None:
            log.info("renewed cke's etcd client certificate", reason=reason, serial=info.serial)
        self._client = (info, creds)
        return creds

    def tools(self, runtime: Runtime) -> EtcdTools:
        return EtcdTools(self.pool, runtime, self.admin, self.issuer, self.ca)

    async def close(self) -> None:
        await self.pool.close()
        await self.admin.close()
