"""Vault (a real OpenBao): ckecli vault init/config, certificates, tokens, outages."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from etcd3aio import prefix_range_end

from cke.common.etcd import make_client
from cke.devenv import BedConfig, TestBed
from cke.devenv.replicas import CkeReplica, ckecli, write_cke_config
from cke.pki import CAS, CertIssuer, IssuedCert
from cke.storage import Storage
from cke.vault import Vault, VaultConfig, VaultSession, parse_vault_config
from tests.conftest import BedFactory


class VaultDeployment:
    def __init__(self, bed: TestBed) -> None:
        assert bed.vault is not None
        self.bed = bed
        self.vault = bed.vault
        self.prefix = f"/cke-vault-{uuid.uuid4().hex[:8]}/"
        self.config = write_cke_config(
            bed.etcd.settings(self.prefix), bed.base_dir / self.prefix.strip("/") / "config.yml"
        )

    async def ckecli(
        self, *args: str, stdin: bytes | None = None, **kw: Path
    ) -> tuple[int, str, str]:
        result = await ckecli(self.config, *args, stdin=stdin, env=self.vault.admin_env(), **kw)
        return result.returncode, result.stdout, result.stderr

    async def storage(self) -> Storage:
        client = make_client(self.bed.etcd.settings(self.prefix))
        await client.connect()
        return Storage(client, self.prefix)

    async def stored_vault_config(self) -> VaultConfig:
        storage = await self.storage()
        try:
            got = await storage.get_vault_config()
        finally:
            await storage.client.close()
        assert got.value is not None
        return parse_vault_config(got.value)

    async def issuer(self) -> tuple[Vault, CertIssuer]:
        config = await self.stored_vault_config()
        vault = Vault(config.endpoint, config.ca_cert)
        await vault.login_approle(config.role_id, config.secret_id)
        return vault, CertIssuer(vault)


@pytest.fixture(scope="module")
async def vault_bed() -> AsyncIterator[TestBed]:
    bed = TestBed(BedConfig(etcd_members=1, nodes=0))
    await bed.start()
    try:
        yield bed
    finally:
        await bed.stop()


@pytest.fixture(scope="module")
async def deployed(vault_bed: TestBed) -> VaultDeployment:
    d = VaultDeployment(vault_bed)
    code, _, err = await d.ckecli("vault", "init")
    assert code == 0, err
    return d


async def test_vault_init_is_idempotent(deployed: VaultDeployment) -> None:
    # ``deployed`` ran the first init; every change was reported then.
    code, out, err = await deployed.ckecli("vault", "init")
    assert code == 0, err
    assert out.strip() == "vault init: nothing to do; Vault is already set up for cke"
    storage = await deployed.storage()
    try:
        for ca in CAS:
            pem = await storage.get_ca(ca.name)
            assert pem is not None and "BEGIN CERTIFICATE" in pem, ca.name
    finally:
        await storage.client.close()
    config = await deployed.stored_vault_config()
    assert config.endpoint == deployed.vault.address


async def test_first_init_reports_every_step(vault_bed: TestBed) -> None:
    d = VaultDeployment(vault_bed)  # Vault already set up; a new prefix has nothing
    code, out, _ = await d.ckecli("vault", "init")
    assert code == 0
    lines = out.strip().splitlines()
    assert sum("stored CA certificate" in line for line in lines) == len(CAS)
    assert any("AppRole login" in line for line in lines)


def _load(cert: IssuedCert) -> tuple[x509.Certificate, x509.Certificate]:
    leaf = x509.load_pem_x509_certificate(cert.certificate.encode())
    ca = x509.load_pem_x509_certificate(cert.ca_certificate.encode())
    leaf.verify_directly_issued_by(ca)
    return leaf, ca


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        set(ext.get_values_for_type(x509.DNSName)),
        {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)},
    )


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _lifetime(cert: x509.Certificate) -> dt.timedelta:
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC)


async def test_certificates_of_every_kind(deployed: VaultDeployment) -> None:
    vault, issuer = await deployed.issuer()
    storage = await deployed.storage()
    try:
        server = await issuer.etcd_server("10.0.0.1", "cp1")
        leaf, _ = _load(server)
        assert (await storage.get_ca("server") or "").strip() == server.ca_certificate.strip()
        assert _sans(leaf) == ({"cp1", "localhost"}, {"10.0.0.1", "127.0.0.1"})
        assert _usages(leaf) == {ExtendedKeyUsageOID.SERVER_AUTH}
        assert dt.timedelta(days=364) < _lifetime(leaf) <= dt.timedelta(days=366)

        peer, _ = _load(await issuer.etcd_peer("10.0.0.1", "cp1"))
        assert _usages(peer) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert _sans(peer)[1] == {"10.0.0.1", "127.0.0.1"}

        for user in ("root", "cke", "kube-apiserver"):
            client, _ = _load(await issuer.etcd_client(user))
            assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == user
            assert _usages(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
        root, _ = _load(await issuer.etcd_client("root"))
        assert _lifetime(root) <= dt.timedelta(hours=2)

        api, _ = _load(await issuer.kube_apiserver("10.0.0.1", "cp1", "10.68.0.0/16"))
        dns, ips = _sans(api)
        assert {"kubernetes", "kubernetes.default.svc.cluster.local", "cp1"} <= dns
        assert ips == {"10.68.0.1", "10.0.0.1", "127.0.0.1"}
        assert ipaddress.ip_address("10.68.0.1") in ipaddress.ip_network("10.68.0.0/16")

        sched, _ = _load(await issuer.kube_component("kube-scheduler"))
        assert sched.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
            "system:kube-scheduler"
        )
        kubelet, _ = _load(await issuer.kubelet("10.0.0.4", "w1"))
        assert kubelet.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
            "system:nodes"
        )
        admin, _ = _load(await issuer.kube_admin())
        assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
            "system:masters"
        )
        short = CertIssuer(vault, {"server": "1h"})
        brief, _ = _load(await short.etcd_server("10.0.0.1"))
        assert _lifetime(brief) <= dt.timedelta(hours=1)
        assert "private_key" not in repr(server) and server.private_key not in repr(server)
    finally:
        vault.close()
        await storage.client.close()


async def test_ckecli_etcd_certificates(deployed: VaultDeployment, tmp_path: Path) -> None:
    code, out, err = await deployed.ckecli("etcd", "root-issue")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"ca_certificate", "certificate", "private_key"}
    root = x509.load_pem_x509_certificate(doc["certificate"].encode())
    _, client_ca, _ = await deployed.ckecli("ca", "get", "etcd-client")
    root.verify_directly_issued_by(x509.load_pem_x509_certificate(client_ca.encode()))
    # As CKE: ca_certificate is the CA of the etcd servers, for the client to verify them.
    _, server_ca, _ = await deployed.ckecli("ca", "get", "server")
    assert doc["ca_certificate"].strip() == server_ca.strip()
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "root"
    assert _lifetime(root) <= dt.timedelta(hours=2)

    code, out, err = await deployed.ckecli(
        "etcd", "issue", "--ttl", "1h", "--output", "file", "app", cwd=tmp_path
    )
    assert code == 0, err
    assert (tmp_path / "etcd-app.key").stat().st_mode & 0o777 == 0o600
    app = x509.load_pem_x509_certificate((tmp_path / "etcd-app.crt").read_bytes())
    assert _lifetime(app) <= dt.timedelta(hours=1)
    code, _, err = await deployed.ckecli("etcd", "issue", "--ttl", "soon", "app")
    assert code == 1 and "--ttl" in err


async def test_ckecli_ca_get_and_set(deployed: VaultDeployment, tmp_path: Path) -> None:
    code, out, _ = await deployed.ckecli("ca", "get", "etcd-client")
    assert code == 0 and out.startswith("-----BEGIN CERTIFICATE-----")
    code, _, err = await deployed.ckecli("ca", "get", "nope")
    assert code == 1 and "NAME" in err
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    code, _, err = await deployed.ckecli("ca", "set", "server", str(junk))
    assert code == 1 and "not a PEM certificate" in err
    code, again, _ = await deployed.ckecli("ca", "get", "etcd-client")
    assert again == out


async def test_vault_config_refuses_a_wrong_secret_id(deployed: VaultDeployment) -> None:
    good = await deployed.stored_vault_config()
    wrong = "00000000-dead-beef-0000-" + uuid.uuid4().hex[:12]
    doc = good.model_dump(by_alias=True, exclude_none=True) | {"secret-id": wrong}
    code, out, err = await deployed.ckecli("vault", "config", "-", stdin=json.dumps(doc).encode())
    assert code == 1
    assert "AppRole login failed, nothing stored" in err
    assert wrong not in err and wrong not in out
    assert await deployed.stored_vault_config() == good
    code, _, err = await deployed.ckecli(
        "vault", "config", "-", stdin=b'{"endpoint": "ftp://x", "role-id": "r"}'
    )
    assert code == 1 and "endpoint" in err and "secret-id" in err
    code, out, err = await deployed.ckecli("vault", "config", "-", stdin=good.to_json().encode())
    assert code == 0, err


async def test_ssh_keys_and_encryption_key(deployed: VaultDeployment) -> None:
    key = deployed.bed.base_dir / "ssh-test-key"
    proc = await asyncio.create_subprocess_exec(
        "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)
    )
    assert await proc.wait() == 0
    code, _, err = await deployed.ckecli("vault", "ssh-privkey", str(key))
    assert code == 0, err
    code, _, err = await deployed.ckecli("vault", "ssh-privkey", "--host", "10.0.0.9", str(key))
    assert code == 0, err
    code, _, err = await deployed.ckecli("vault", "ssh-privkey", f"{key}.pub")
    assert code == 1 and "private key" in err
    stored = await asyncio.to_thread(
        lambda: deployed.vault.client().secrets.kv.v1.read_secret("ssh", mount_point="cke/secrets")
    )
    assert set(stored["data"]) == {"", "10.0.0.9"}
    assert stored["data"][""] == key.read_text()
    # enckey rotates, as upstream: a new key first, the current one kept, older ones dropped.
    code, out, _ = await deployed.ckecli("vault", "enckey")
    assert code == 0 and out.strip() == "succeeded"
    first = await _aescbc_keys(deployed)
    assert len(first) == 1
    code, out, _ = await deployed.ckecli("vault", "enckey")
    assert code == 0 and out.strip() == "succeeded"
    second = await _aescbc_keys(deployed)
    assert len(second) == 2 and second[1] == first[0] and second[0] != first[0]
    code, _, _ = await deployed.ckecli("vault", "enckey")
    third = await _aescbc_keys(deployed)
    assert len(third) == 2 and third[1] == second[0] and first[0] not in third


async def _aescbc_keys(deployed: VaultDeployment) -> list[dict[str, str]]:
    """The keys of upstream's ``aescbc`` value (a Kubernetes AESConfiguration as JSON)."""
    stored = await asyncio.to_thread(
        lambda: deployed.vault.client().secrets.kv.v1.read_secret("k8s", mount_point="cke/secrets")
    )
    keys: list[dict[str, str]] = json.loads(stored["data"]["aescbc"])["keys"]
    for key in keys:
        assert set(key) == {"name", "secret"}
        assert len(base64.b64decode(key["secret"])) == 32
        dt.datetime.strptime(key["name"], "%Y-%m-%dT%H:%M:%SZ")  # RFC 3339, UTC
    return keys


async def test_vault_init_takes_upstream_endpoint_and_cacert_flags(vault_bed: TestBed) -> None:
    """``vault init --endpoint URL --cacert FILE``, with VAULT_ADDR and VAULT_CACERT unset."""
    d = VaultDeployment(vault_bed)
    env = {"VAULT_TOKEN": d.vault.root_token, "VAULT_ADDR": "", "VAULT_CACERT": ""}
    missing = await ckecli(d.config, "vault", "init", env=env)
    assert missing.returncode == 1 and "--endpoint" in missing.stderr
    result = await ckecli(
        d.config,
        "vault",
        "init",
        "--endpoint",
        d.vault.address,
        "--cacert",
        d.vault.ca_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    stored = await d.stored_vault_config()
    assert stored.endpoint == d.vault.address
    assert stored.ca_cert == Path(d.vault.ca_path).read_text()
    # The flag wins over the environment.
    again = await ckecli(
        d.config,
        "vault",
        "init",
        "--endpoint",
        d.vault.address,
        env={**d.vault.admin_env(), "VAULT_ADDR": "https://127.0.0.1:9"},
    )
    assert again.returncode == 0, again.stderr


async def test_token_is_renewed_and_login_repeated(deployed: VaultDeployment) -> None:
    """A short token TTL: the session renews, then logs in again at the max TTL."""
    admin = deployed.vault.client()

    def short_role() -> tuple[str, str]:
        admin.auth.approle.create_or_update_approle(
            "cke-short", token_policies=["cke"], token_ttl="2s", token_max_ttl="7s"
        )
        role_id = admin.auth.approle.read_role_id("cke-short")["data"]["role_id"]
        secret_id = admin.auth.approle.generate_secret_id("cke-short")["data"]["secret_id"]
        return role_id, secret_id

    role_id, secret_id = await asyncio.to_thread(short_role)
    config = VaultConfig.model_validate(
        {
            "endpoint": deployed.vault.address,
            "role-id": role_id,
            "secret-id": secret_id,
            "ca-cert": Path(deployed.vault.ca_path).read_text(),
        }
    )

    async def load() -> VaultConfig:
        return config

    session = VaultSession(load)
    runner = asyncio.create_task(session.run())
    try:
        failures = 0
        for _ in range(24):  # 12 s: several TTLs and past the max TTL
            vault = await session.client(timeout=5)
            try:
                await vault.call(lambda c: c.auth.token.lookup_self())
            except Exception:
                failures += 1
            await asyncio.sleep(0.5)
        assert session.renewals >= 2
        assert session.logins >= 2
        assert failures <= 1  # a request may race the swap of tokens, never more
    finally:
        runner.cancel()


async def test_cke_rides_out_a_vault_outage_and_leaks_no_secret(
    bed_factory: BedFactory,
) -> None:
    bed = await bed_factory(nodes=0)
    assert bed.vault is not None
    d = VaultDeployment(bed)
    code, _, err = await d.ckecli("vault", "init")
    assert code == 0, err
    replica = CkeReplica("cke0", d.config, bed.base_dir, certs_gc_interval="1s")
    await replica.start()
    try:
        await _wait_vault_state(d, "ok")
        await bed.vault.stop()
        await _wait_vault_state(d, "unavailable")
        await bed.vault.start()
        await _wait_vault_state(d, "ok", timeout=40)
        history = await ckecli(d.config, "history", "-o", "json")
        assert json.loads(history.stdout) == []  # nothing was started, so nothing half done
    finally:
        await replica.stop()
    log = replica.log()
    assert "vault state changed" in log and "tidied certificates" in log
    await _assert_no_secret_leaked(d, bed, log)


async def _wait_vault_state(d: VaultDeployment, prefix: str, timeout: float = 20) -> None:
    last = ""
    for _ in range(int(timeout * 5)):
        result = await ckecli(d.config, "status", "-o", "json")
        if result.returncode == 0:
            last = json.loads(result.stdout)["vault"]
            if last.startswith(prefix):
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"vault state never became {prefix!r}; last {last!r}")


async def _assert_no_secret_leaked(d: VaultDeployment, bed: TestBed, cke_log: str) -> None:
    assert bed.vault is not None
    config = await d.stored_vault_config()
    secrets = [bed.vault.root_token, config.secret_id, "PRIVATE KEY"]
    storage = await d.storage()
    try:
        start = d.prefix.encode()
        resp = await storage.kv.get(start, range_end=prefix_range_end(start))
        for kv in resp.kvs:
            if kv.key == (d.prefix + "vault").encode():
                continue  # the AppRole login itself lives here, as in CKE
            for secret in secrets:
                assert secret.encode() not in kv.value, kv.key
    finally:
        await storage.client.close()
    texts = [cke_log] + [p.read_text(errors="replace") for p in bed.base_dir.rglob("*.log")]
    for text in texts:
        for secret in secrets:
            assert secret not in text
