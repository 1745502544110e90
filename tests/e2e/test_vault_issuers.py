"""CA rotation on a real OpenBao: a second root issuer per PKI mount, then the switch.

Everything the cke code does here runs with the cke AppRole token of a freshly
``ckecli vault init``-ed OpenBao, never the root token (that one only sets traps and
looks behind the scenes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hvac
import hvac.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cke.certinfo import load_pem_certificates, parse_certificate
from cke.devenv import BedConfig, TestBed
from cke.pki import CA_BY_NAME, CAS, ROTATABLE_CAS, CertIssuer, IssuedCert
from cke.pkiissuers import (
    Issuer,
    default_issuer,
    ensure_issuer,
    issuer_policy,
    list_issuers,
    set_default_issuer,
)
from cke.vault import Vault, VaultRefused
from tests.e2e.test_vault import VaultDeployment

# A root the cke policy allows on a rotatable mount (key_bits a string: see issuer_policy).
EC_ROOT = {"issuer_name": "n", "common_name": "n", "key_type": "ec", "key_bits": "256"}
ISSUE: dict[str, Callable[[CertIssuer], Awaitable[IssuedCert]]] = {
    "server": lambda i: i.etcd_server("10.0.0.1", "cp1"),
    "etcd-peer": lambda i: i.etcd_peer("10.0.0.1", "cp1"),
    "etcd-client": lambda i: i.etcd_client("cke"),
}


@pytest.fixture(scope="module")
async def issuers_bed() -> AsyncIterator[TestBed]:
    bed = TestBed(BedConfig(etcd_members=1, nodes=0))
    await bed.start()
    try:
        yield bed
    finally:
        await bed.stop()


@pytest.fixture(scope="module")
async def deployed(issuers_bed: TestBed) -> VaultDeployment:
    d = VaultDeployment(issuers_bed)
    code, _, err = await d.ckecli("vault", "init")
    assert code == 0, err
    return d


@pytest.fixture
async def cke(deployed: VaultDeployment) -> AsyncIterator[tuple[Vault, CertIssuer]]:
    """A client logged in with the cke AppRole, as cke is."""
    vault, issuer = await deployed.issuer()
    try:
        yield vault, issuer
    finally:
        vault.close()


def _admin_config(d: VaultDeployment, mount: str) -> dict[str, Any]:
    data: dict[str, Any] = d.vault.client().adapter.get(f"/v1/{mount}/config/issuers")["data"]
    return data


def _check_root(issuer: Issuer) -> x509.Certificate:
    certs = load_pem_certificates(issuer.certificate)
    assert len(certs) == 1 and issuer.certificate.endswith("-----END CERTIFICATE-----\n")
    info = parse_certificate(issuer.certificate)
    assert info.key_id == issuer.key_id and info.issuer_key_id in ("", issuer.key_id)
    certs[0].verify_directly_issued_by(certs[0])  # self-signed: a root
    return certs[0]


@pytest.mark.parametrize("ca_name", ROTATABLE_CAS)
async def test_rotate_a_ca_with_a_second_issuer(
    deployed: VaultDeployment, cke: tuple[Vault, CertIssuer], ca_name: str
) -> None:
    vault, cert_issuer = cke
    ca = CA_BY_NAME[ca_name]
    first = await default_issuer(vault, ca.mount)
    assert first.name == ""  # vault init's root is unnamed
    stored = await deployed.storage()
    try:
        assert (await stored.get_ca(ca_name) or "").strip() == first.certificate.strip()
    finally:
        await stored.client.close()
    assert [i.id for i in await list_issuers(vault, ca.mount)] == [first.id]

    new = await ensure_issuer(vault, ca.mount, "next", f"{ca.common_name} 2")
    assert new.name == "next" and new.id != first.id
    assert new.key_id != first.key_id
    root = _check_root(new)
    _check_root(first)
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    # Idempotent, and the default did not move: leaves still come from the old CA.
    assert await ensure_issuer(vault, ca.mount, "next", "another name", "1h") == new
    assert await default_issuer(vault, ca.mount) == first
    assert _admin_config(deployed, ca.mount)["default"] == first.id
    assert {i.id for i in await list_issuers(vault, ca.mount)} == {first.id, new.id}
    old_leaf = await ISSUE[ca_name](cert_issuer)
    assert parse_certificate(old_leaf.certificate).issuer_key_id == first.key_id

    await set_default_issuer(vault, ca.mount, new.id)
    await set_default_issuer(vault, ca.mount, new.id)  # idempotent
    assert await default_issuer(vault, ca.mount) == new
    leaf = await ISSUE[ca_name](cert_issuer)
    assert parse_certificate(leaf.certificate).issuer_key_id == new.key_id
    assert leaf.ca_certificate.strip() == new.certificate.strip()
    x509.load_pem_x509_certificate(leaf.certificate.encode()).verify_directly_issued_by(root)
    # And back: both roots stay usable until the old one is dropped.
    await set_default_issuer(vault, ca.mount, first.id)
    back = await ISSUE[ca_name](cert_issuer)
    assert parse_certificate(back.certificate).issuer_key_id == first.key_id


async def test_cke_token_cannot_rotate_other_cas(
    deployed: VaultDeployment, cke: tuple[Vault, CertIssuer]
) -> None:
    vault, _ = cke
    others = [ca for ca in CAS if ca.name not in ROTATABLE_CAS]
    assert others[0].mount == "cke/ca-kubernetes"
    for ca in others:
        current = await default_issuer(vault, ca.mount)  # public, as ca/pem is
        with pytest.raises(VaultRefused, match="permission denied"):
            await ensure_issuer(vault, ca.mount, "next", "evil CA")
        with pytest.raises(VaultRefused, match="permission denied"):
            await set_default_issuer(vault, ca.mount, current.id)

        def generate(c: hvac.Client, path: str = f"{ca.mount}/root/generate/internal") -> object:
            return c.write_data(path, data=EC_ROOT)

        with pytest.raises(VaultRefused, match="permission denied"):
            await vault.call(generate)
        assert [i.id for i in await list_issuers(vault, ca.mount)] == [current.id]
    admin = deployed.vault.client()
    listed = await asyncio.to_thread(admin.list, "cke/ca-kubernetes/issuers")
    assert len(listed["data"]["keys"]) == 1


async def test_rotation_grants_are_narrow(
    deployed: VaultDeployment, cke: tuple[Vault, CertIssuer]
) -> None:
    """On a rotatable mount the token adds named internal EC roots and sets the default only."""
    vault, _ = cke
    mount = CA_BY_NAME["etcd-peer"].mount
    current = await default_issuer(vault, mount)
    ec_root = EC_ROOT | {"issuer_name": "x"}
    forbidden: dict[str, Callable[[hvac.Client], object]] = {
        "an unnamed root": lambda c: c.secrets.pki.generate_root(
            "internal", "evil", mount_point=mount
        ),
        "an exported root (its key)": lambda c: c.write_data(
            f"{mount}/root/generate/exported", data=ec_root
        ),
        "an RSA root": lambda c: c.write_data(
            f"{mount}/root/generate/internal",
            data=ec_root | {"key_type": "rsa", "key_bits": "2048"},
        ),
        "a root on an existing key": lambda c: c.write_data(
            f"{mount}/root/generate/internal", data=ec_root | {"key_ref": "default"}
        ),
        "a root through issuers/generate": lambda c: c.write_data(
            f"{mount}/issuers/generate/root/internal", data=ec_root
        ),
        "an intermediate": lambda c: c.write_data(
            f"{mount}/intermediate/generate/internal", data=ec_root
        ),
        "default_follows_latest_issuer": lambda c: c.write_data(
            f"{mount}/config/issuers",
            data={"default": current.id, "default_follows_latest_issuer": True},
        ),
        "rename an issuer": lambda c: c.write_data(
            f"{mount}/issuer/{current.id}", data={"issuer_name": "renamed"}
        ),
        "delete an issuer": lambda c: c.adapter.delete(f"/v1/{mount}/issuer/{current.id}"),
        "import a CA": lambda c: c.write_data(
            f"{mount}/config/ca", data={"pem_bundle": current.certificate}
        ),
    }
    for what, fn in forbidden.items():
        with pytest.raises(VaultRefused, match="permission denied"):
            await vault.call(fn)
            pytest.fail(f"the cke token could make {what}")
    names = {i.name for i in await list_issuers(vault, mount)}
    assert not names & {"x", "evil", "renamed"}
    assert await default_issuer(vault, mount) == current


async def test_ensure_issuer_refuses_a_mount_whose_default_follows_the_latest(
    deployed: VaultDeployment, cke: tuple[Vault, CertIssuer]
) -> None:
    vault, _ = cke
    mount = CA_BY_NAME["server"].mount
    admin = deployed.vault.client()
    current = await default_issuer(vault, mount)
    before = [i.id for i in await list_issuers(vault, mount)]
    await asyncio.to_thread(
        admin.write_data,
        f"{mount}/config/issuers",
        data={"default": current.id, "default_follows_latest_issuer": True},
    )
    try:
        with pytest.raises(VaultRefused, match="default_follows_latest_issuer"):
            await ensure_issuer(vault, mount, "follows", "cke server CA 3")
        assert [i.id for i in await list_issuers(vault, mount)] == before
    finally:
        await asyncio.to_thread(
            admin.write_data,
            f"{mount}/config/issuers",
            data={"default": current.id, "default_follows_latest_issuer": False},
        )
    assert await default_issuer(vault, mount) == current
    for bad in ("", "default"):
        with pytest.raises(ValueError, match="issuer_name"):
            await ensure_issuer(vault, mount, bad, "x")
    with pytest.raises(VaultRefused, match="invalid characters"):
        await ensure_issuer(vault, mount, "a b", "x")
    # An unknown mount is no route, which the cke token is not allowed either.
    with pytest.raises(VaultRefused, match="permission denied"):
        await list_issuers(vault, "cke/no-such-mount")


async def test_issuer_policy_is_in_the_cke_policy(deployed: VaultDeployment) -> None:
    rules = deployed.vault.client().sys.read_policy("cke")["data"]["rules"]
    for ca in CAS:
        assert (issuer_policy(ca.mount) in rules) == (ca.name in ROTATABLE_CAS), ca.name


# -- answers Vault should not give: VaultRefused, never KeyError/TypeError ---------------------


class _Answers(list[object]):
    """Successive answers to the same request."""


class _FakeAdapter:
    def __init__(self, answers: dict[str, object]) -> None:
        self.answers = answers
        self.posts: list[tuple[str, object]] = []

    def _answer(self, url: str) -> object:
        suffixes = [s for s in self.answers if url.endswith(s)]
        if not suffixes:
            raise AssertionError(f"unexpected request {url}")
        answer = self.answers[max(suffixes, key=len)]
        if isinstance(answer, _Answers):
            answer = answer.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def list(self, url: str, **kw: object) -> object:
        return self._answer(url)

    def get(self, url: str, **kw: object) -> object:
        return self._answer(url)

    def post(self, url: str, **kw: object) -> object:
        self.posts.append((url, kw.get("json")))
        return self._answer(url)


class _FakeClient:
    def __init__(self, answers: dict[str, object]) -> None:
        self.adapter = _FakeAdapter(answers)


def _fake_vault(answers: dict[str, object]) -> Vault:
    vault = Vault("https://127.0.0.1:9")
    vault.hvac = _FakeClient(answers)  # type: ignore[assignment]
    return vault


PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBljCCAT2gAwIBAgIUdGBiZSnfeWG1YBKVyR71aghiKggwCgYIKoZIzj0EAwIw\n"
    "GDEWMBQGA1UEAxMNY2tlIHNlcnZlciBDQTAgFw0yNjEyMDIwOTE2MDhaGA8yMTI2\n"
    "MTEwODA5MTYzOFowGDEWMBQGA1UEAxMNY2tlIHNlcnZlciBDQTBZMBMGByqGSM49\n"
    "AgEGCCqGSM49AwEHA0IABGGE61N6i9DWuzL9rCvvHtjqwgq4Cd6ca8Xc5+NPc6QP\n"
    "Aw/yb8Neqn55uSsnxlCRLVHYAsdgW7JsqGnxcoKP85ujYzBhMA4GA1UdDwEB/wQE\n"
    "AwIBBjAPBgNVHRMBAf8EBTADAQH/MB0GA1UdDgQWBBSp7CHe9KlHCMHgLBwo8UB8\n"
    "EBs1ejAfBgNVHSMEGDAWgBSp7CHe9KlHCMHgLBwo8UB8EBs1ejAKBggqhkjOPQQD\n"
    "AgNHADBEAiBQq3zSOR8H4tByD7Sp1LFgvpunMSFgnNp2XPultgKTDAIgMWUT+vYX\n"
    "6s4BhC+coQlV1AXgzbZQDJ5AsgaCZIMnFfQ=\n"
    "-----END CERTIFICATE-----"
)
LISTED = {"data": {"keys": ["i1"], "key_info": {"i1": {"is_default": True, "issuer_name": ""}}}}
ISSUER_JSON = {"data": {"issuer_id": "i1", "issuer_name": "", "certificate": PEM}}


async def test_well_formed_fake_answers_parse() -> None:
    vault = _fake_vault({"/issuers": LISTED, "/issuer/i1/json": ISSUER_JSON})
    (issuer,) = await list_issuers(vault, "m")
    assert issuer == await default_issuer(vault, "m")
    assert issuer.id == "i1" and issuer.certificate == PEM + "\n"
    assert issuer.key_id == "a9ec21def4a94708c1e02c1c28f1407c101b357a"


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"/issuers": {"data": None}}, "no data"),
        ({"/issuers": {"data": {"keys": ["i1"]}}}, "no keys or key_info"),
        ({"/issuers": {"data": {"keys": ["i1"], "key_info": {}}}}, "no key_info"),
        ({"/issuers": {"data": {"keys": [7], "key_info": {}}}}, "no key_info"),
        ({"/issuers": ["not", "a", "dict"]}, "no data"),
        ({"/issuers": LISTED, "/issuer/i1/json": {"data": {}}}, "no issuer_id"),
        (
            {"/issuers": LISTED, "/issuer/i1/json": {"data": {"issuer_id": "i1"}}},
            "no certificate",
        ),
        (
            {
                "/issuers": LISTED,
                "/issuer/i1/json": {"data": {"issuer_id": "i1", "certificate": "junk"}},
            },
            "not PEM",
        ),
        (
            {
                "/issuers": LISTED,
                "/issuer/i1/json": {"data": {"issuer_id": "i1", "certificate": PEM + PEM}},
            },
            "want one certificate",
        ),
        (
            {
                "/issuers": LISTED,
                "/issuer/i1/json": {"data": ISSUER_JSON["data"] | {"issuer_id": "i2"}},
            },
            "another issuer",
        ),
        (
            {
                "/issuers": LISTED,
                "/issuer/i1/json": {"data": ISSUER_JSON["data"] | {"issuer_name": 3}},
            },
            "no issuer_name",
        ),
    ],
)
async def test_malformed_answers_are_refusals(answers: dict[str, object], message: str) -> None:
    with pytest.raises(VaultRefused, match=message):
        await list_issuers(_fake_vault(answers), "m")


async def test_malformed_answers_to_writes_are_refusals() -> None:
    none_default = {"data": {"keys": ["i1"], "key_info": {"i1": {"is_default": False}}}}
    with pytest.raises(VaultRefused, match="want one default issuer"):
        await default_issuer(_fake_vault({"/issuers": none_default}), "m")
    empty = hvac.exceptions.InvalidPath(errors=None)  # type: ignore[no-untyped-call]
    with pytest.raises(VaultRefused, match="no default_follows_latest_issuer"):
        await ensure_issuer(
            _fake_vault(
                {
                    "/issuers": empty,
                    "/config/issuers": {
                        "data": {"default": "", "default_follows_latest_issuer": "no"}
                    },
                }
            ),
            "m",
            "next",
            "cn",
        )
    config = {"data": {"default": "i1", "default_follows_latest_issuer": False}}
    with pytest.raises(VaultRefused, match="no issuer_id"):
        await ensure_issuer(
            _fake_vault(
                {
                    "/issuers": LISTED,
                    "/config/issuers": config,
                    "/root/generate/internal": {"data": {}},
                }
            ),
            "m",
            "next",
            "cn",
        )
    with pytest.raises(VaultRefused, match="no default"):
        await set_default_issuer(_fake_vault({"/config/issuers": {"data": {}}}), "m", "i2")


async def test_a_default_moved_while_adding_a_root_is_put_back() -> None:
    def config(default: str) -> dict[str, object]:
        return {"data": {"default": default, "default_follows_latest_issuer": False}}

    created = {"data": ISSUER_JSON["data"] | {"issuer_id": "i2", "issuer_name": "next"}}
    vault = _fake_vault(
        {
            "/issuers": LISTED,
            "/config/issuers": _Answers([config("i1"), config("i2"), config("i1")]),
            "/root/generate/internal": created,
        }
    )
    issuer = await ensure_issuer(vault, "m", "next", "cn")
    assert (issuer.id, issuer.name) == ("i2", "next")
    adapter = vault.hvac.adapter
    assert isinstance(adapter, _FakeAdapter)
    assert adapter.posts[-1] == ("/v1/m/config/issuers", {"default": "i1"})
    assert adapter.posts[0][1] == {
        "issuer_name": "next",
        "common_name": "cn",
        "ttl": "876000h",
        "key_type": "ec",
        "key_bits": "256",
    }
