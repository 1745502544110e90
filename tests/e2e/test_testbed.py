"""The test bed itself: nodes are separate machines, etcd and OpenBao are real."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from etcd3aio import Etcd3Client, EtcdError

from cke.common.etcd import make_client
from cke.devenv import TestBed
from cke.devenv.procs import LEDGER, pid_alive
from cke.nodes.ssh import HostKeyMismatch, NodeConnection, SSHError
from tests.conftest import BedFactory


async def test_node_files_are_private(bed: TestBed) -> None:
    node1, node2 = bed.nodes[0], bed.nodes[1]
    wrote = await bed.run(node1, "echo node1 > /var/lib/cke/owner && cat /var/lib/cke/owner")
    assert wrote.ok and wrote.stdout == b"node1\n"
    other = await bed.run(node2, "test -e /var/lib/cke/owner; echo $?")
    assert other.stdout == b"1\n"
    # The host's own /var/lib/cke is untouched too.
    assert not (bed.nodes[0].private_dir("/var/lib/cke").parent / "owner").exists()
    assert (node1.private_dir("/var/lib/cke") / "owner").read_text() == "node1\n"
    await bed.run(node1, "rm /var/lib/cke/owner")


async def test_ssh_refuses_a_wrong_host_key(bed: TestBed) -> None:
    node1, node2 = bed.nodes[0], bed.nodes[1]
    impostor = NodeConnection(node1.ssh_target, bed.ssh_private_key, node2.host_public_key)
    with pytest.raises(HostKeyMismatch):
        await impostor.run("true")
    await impostor.close()


async def test_crash_kills_every_process_and_restart_keeps_files(
    bed_factory: BedFactory,
) -> None:
    bed = await bed_factory(nodes=1, vault=False)
    node = bed.nodes[0]
    started = await bed.run(
        node,
        "echo kept > /etc/cke/marker; "
        "setsid sleep 1000 >/dev/null 2>&1 < /dev/null & "
        "setsid sh -c 'sleep 1001' >/dev/null 2>&1 < /dev/null & echo started",
    )
    assert started.ok
    await asyncio.sleep(0.2)
    before = node.processes()
    # holder, sshd and the two detached sleeps (plus the sh around one of them)
    assert len(before) >= 4
    await node.crash()
    assert node.processes() == []
    assert all(not pid_alive(p) for p in before)
    with pytest.raises(SSHError):
        await bed.run(node, "true", timeout=5)
    await node.start()
    kept = await bed.run(node, "cat /etc/cke/marker; pgrep -c -x sleep || true")
    assert kept.ok
    lines = kept.stdout.decode().split()
    assert lines[0] == "kept"


async def test_stopped_sshd_keeps_services_running(bed_factory: BedFactory) -> None:
    bed = await bed_factory(nodes=1, vault=False)
    node = bed.nodes[0]
    await bed.run(node, "setsid sleep 1002 >/dev/null 2>&1 < /dev/null &")
    await asyncio.sleep(0.2)
    await node.stop_sshd()
    with pytest.raises(SSHError):
        await bed.run(node, "true", timeout=5)
    assert len(node.processes()) >= 2  # the holder and the service survive
    await node.start_sshd()
    again = await bed.run(node, "pgrep -f 'sleep 1002' >/dev/null && echo alive")
    assert again.stdout == b"alive\n"


async def test_etcd_with_client_certificate(bed: TestBed) -> None:
    client = make_client(bed.etcd.settings())
    await client.connect()
    try:
        await client.kv.put("/bed-test/key", "value")
        got = await client.kv.get("/bed-test/key")
        assert got.kvs[0].value == b"value"
        await client.kv.delete("/bed-test/key")
    finally:
        await client.close()


async def test_etcd_refuses_a_client_without_certificate(bed: TestBed) -> None:
    host_port = bed.etcd.endpoints[0].removeprefix("https://")
    client = Etcd3Client([host_port], ca_cert=bed.ca.ca_pem, rpc_max_attempts=1)
    await client.connect()
    try:
        with pytest.raises((EtcdError, TimeoutError)):
            await client.kv.get("/bed-test/key", timeout=3)
    finally:
        await client.close()


async def test_three_member_etcd_survives_losing_one(bed_factory: BedFactory) -> None:
    bed = await bed_factory(etcd_members=3, nodes=0, vault=False)
    client = make_client(bed.etcd.settings())
    await client.connect()
    try:
        await client.kv.put("/survive", "before")
        await bed.etcd.stop_member("etcd1", kill=True)
        await client.kv.put("/survive", "after", timeout=10)
        got = await client.kv.get("/survive", timeout=10)
        assert got.kvs[0].value == b"after"
        assert await bed.etcd.member_healthy("etcd0")
        await bed.etcd.start_member("etcd1")
        assert await bed.etcd.member_healthy("etcd1")
    finally:
        await client.close()


async def test_openbao_pki_issues_a_verifiable_certificate(bed: TestBed) -> None:
    assert bed.vault is not None
    vault = bed.vault

    def issue() -> tuple[str, str]:
        client = vault.client()
        mounts = client.sys.list_mounted_secrets_engines()["data"]
        if "bed-pki/" not in mounts:
            client.sys.enable_secrets_engine("pki", path="bed-pki", config={"max_lease_ttl": "24h"})
        root = client.secrets.pki.generate_root(
            "internal", "bed test CA", mount_point="bed-pki", extra_params={"ttl": "24h"}
        )
        client.secrets.pki.create_or_update_role(
            "node", {"allow_any_name": True, "max_ttl": "1h"}, mount_point="bed-pki"
        )
        leaf = client.secrets.pki.generate_certificate(
            "node",
            "node1.example",
            extra_params={"ip_sans": "127.0.1.1", "ttl": "30m"},
            mount_point="bed-pki",
        )
        return root["data"]["certificate"], leaf["data"]["certificate"]

    ca_pem, leaf_pem = await asyncio.to_thread(issue)
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node1.example" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.1.1") in sans.get_values_for_type(x509.IPAddress)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= dt.timedelta(minutes=31)
    assert isinstance(ca.public_key(), (ec.EllipticCurvePublicKey, object))


async def test_openbao_keeps_secrets_across_restart(bed_factory: BedFactory) -> None:
    bed = await bed_factory(nodes=0)
    assert bed.vault is not None
    vault = bed.vault

    def write() -> None:
        client = vault.client()
        client.sys.enable_secrets_engine("kv", path="bed-kv", options={"version": "1"})
        client.secrets.kv.v1.create_or_update_secret("s", {"v": "1"}, mount_point="bed-kv")

    def read() -> str:
        data = vault.client().secrets.kv.v1.read_secret("s", mount_point="bed-kv")
        return str(data["data"]["v"])

    await asyncio.to_thread(write)
    await vault.stop()
    await vault.start()
    assert await asyncio.to_thread(read) == "1"


async def test_stopped_bed_leaves_no_process(bed_factory: BedFactory) -> None:
    before = len(LEDGER.entries)
    bed = await bed_factory(etcd_members=3, nodes=2)
    await bed.run(bed.nodes[0], "setsid sleep 1003 >/dev/null 2>&1 < /dev/null &")
    mine = LEDGER.entries[before:]
    assert {e.name for e in mine} >= {"etcd/etcd0", "openbao", "node1/sshd", "node2/sshd"}
    namespaces = [n.namespace for n in bed.nodes]
    await bed.stop()
    assert [e for e in mine if pid_alive(e.pid, e.start_time)] == []
    for ns, node in zip(namespaces, bed.nodes, strict=True):
        assert ns is not None
        assert node.processes() == []
