"""Certificates that never expire under a running cluster (issue 12), on real sshd nodes,
real etcd members and a real OpenBao.

One bed and one deployment for the module, with 60 s leaf lifetimes (90 s from their
not-before, which Vault sets 30 s back) renewed with half of that left, so that renewal
runs every 15 s; the tests run in order and each leaves the cluster healthy:

1. canary writes while every member's certificates renew in place three times;
2. Vault stopped while certificates are due, then started again;
3. the etcd peer and client CAs rotated under canary writes, the leader killed and
   Vault stopped mid-way;
4. the server CA rotated under canary writes;
5. Vault tidy kept up with all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from etcd3aio import Etcd3Client, prefix_range_end

from cke.certinfo import CertInfo, bundle_key_ids, parse_certificate
from cke.devenv import BedConfig, TestBed
from cke.devenv.deploy import Deployment
from cke.devenv.nodes import Node as BedNode
from cke.etcdadmin import endpoint

pytestmark = pytest.mark.e2e

LEAF_TTL = 60.0  # --cert-ttl of the deployment
# --cert-renew-fraction of the deployment: renewed 15 s after issue (45 s of 90 left).
RENEW_FRACTION = 0.5
INTERVAL = 2.0  # --interval of the deployment
GC_INTERVAL = 10.0  # --certs-gc-interval of the deployment
WRITE_PERIOD = 0.05  # the canary writes every 50 ms
# "No write fails for longer than a few seconds": a restart under the quorum rules
# (leadership moved first) costs one election at most; a renewal costs nothing.
MAX_OUTAGE = 5.0
# Test 1 writes and probes until every port served 3 renewals, for at most this long.
RENEWAL_RUN = 240.0
# Vault tidy keeps up: nothing in a mount expired longer ago than the safety buffer (the
# leaf lifetime) plus one gc interval and a margin.
TIDY_MARGIN = LEAF_TTL + GC_INTERVAL + 30

# The peer certificate of each node right after bootstrap (test 5).
_BOOTSTRAP_PEERS: dict[str, CertInfo] = {}


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[TestBed]:
    testbed = TestBed(BedConfig(etcd_members=1, nodes=3))
    await testbed.start()
    try:
        yield testbed
    finally:
        await testbed.stop()


@pytest.fixture(scope="module")
async def deployment(bed: TestBed) -> AsyncIterator[Deployment]:
    d = Deployment(
        bed,
        replicas=2,
        interval=f"{INTERVAL:.0f}s",
        certs_gc_interval=f"{GC_INTERVAL:.0f}s",
        extra=(
            "--cert-ttl",
            f"{LEAF_TTL:.0f}s",
            "--cert-renew-fraction",
            str(RENEW_FRACTION),
            "--ca-rotation-grace",
            "15s",
        ),
    )
    await d.bootstrap(bed.nodes)
    _BOOTSTRAP_PEERS.update({n.address: _node_leaf(n, "peer") for n in bed.nodes})
    try:
        yield d
    finally:
        await d.stop()


# -- what the tests look at --------------------------------------------------------------


def _node_file(node: BedNode, name: str) -> bytes:
    return (node.private_dir("/etc/cke") / "etcd" / name).read_bytes()


def _node_leaf(node: BedNode, name: str) -> CertInfo:
    return parse_certificate(_node_file(node, f"{name}.crt"))


def _etcd_pid(node: BedNode) -> int:
    pidfile = node.private_dir("/var/lib/cke") / "run" / "etcd.pid"
    return int(pidfile.read_text().split()[0])  # PID, start time, boot id


async def _probe_contexts(bed: TestBed, d: Deployment) -> dict[int, ssl.SSLContext]:
    """TLS contexts that present a client certificate each port accepts: a root client
    certificate for 2379, a peer certificate (issued with Vault's root token) for 2380."""
    assert bed.vault is not None
    issued = json.loads((await d.ckecli("etcd", "root-issue")).stdout)
    vault = bed.vault.client()

    def peer() -> dict[str, str]:
        data = vault.secrets.pki.generate_certificate(
            name="system", common_name="probe", mount_point="cke/ca-etcd-peer"
        )["data"]
        return {"certificate": data["certificate"], "private_key": data["private_key"]}

    contexts = {}
    for port, cert in ((2379, issued), (2380, await asyncio.to_thread(peer))):
        crt, key = d.dir / f"probe-{port}.crt", d.dir / f"probe-{port}.key"
        crt.write_text(cert["certificate"])
        key.touch(mode=0o600)
        key.write_text(cert["private_key"])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the probe records what is served, valid or not
        context.load_cert_chain(crt, key)
        contexts[port] = context
    return contexts


async def _served(address: str, port: int, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a member serves to a new connection right now."""
    _, writer = await asyncio.wait_for(asyncio.open_connection(address, port, ssl=context), 3)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _history(d: Deployment) -> list[dict[str, object]]:
    result = await d.ckecli("history", "-n", "1000", "-o", "json")
    records = json.loads(result.stdout)
    assert isinstance(records, list)
    return records


async def _leader_metrics(d: Deployment) -> str:
    leader = str((await d.status())["leader"])
    replica = next(r for r in d.replicas if r.name == leader)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"http://127.0.0.1:{replica.http_port}/metrics") as resp,
    ):
        return await resp.text()


@dataclass
class CanaryReport:
    acked: list[str] = field(default_factory=list)
    attempts: int = 0
    failures: int = 0
    longest_outage: float = 0.0


class Canary:
    """Writes one key every 50 ms to the managed etcd, as a client of it would: with a
    ``ckecli etcd root-issue`` certificate that it fetches again every ``refresh`` seconds
    (a client's certificates are short-lived), retrying a failed write until it lands."""

    def __init__(self, d: Deployment, addresses: list[str], prefix: str) -> None:
        self.d = d
        self.addresses = addresses
        self.prefix = prefix
        self.cert: dict[str, str] | None = None  # the last one issued
        self.server_ca = ""

    async def connect(self, reissue: bool = True) -> Etcd3Client:
        """A client; with ``reissue`` (or none yet) on a newly issued certificate."""
        if reissue or self.cert is None:
            issued = await self.d.ckecli("etcd", "root-issue")
            assert issued.returncode == 0, issued.stderr
            self.cert = json.loads(issued.stdout)
            self.server_ca = (await self.d.ckecli("ca", "get", "server")).stdout
        cert = self.cert
        client = Etcd3Client(
            [endpoint(a) for a in self.addresses],
            ca_cert=self.server_ca.encode(),
            cert_key=cert["private_key"].encode(),
            cert_chain=cert["certificate"].encode(),
            tls_server_name="localhost",
        )
        await client.connect()
        return client

    async def run(
        self, seconds: float, refresh: float = 10.0, stop: asyncio.Event | None = None
    ) -> CanaryReport:
        loop = asyncio.get_running_loop()
        report = CanaryReport()
        client = await self.connect(reissue=False)
        pending: asyncio.Task[Etcd3Client] | None = None
        refreshed = loop.time()
        outage_since: float | None = None
        deadline = loop.time() + seconds
        index = 0
        try:
            # Bounded in count as well as in time.
            while (
                loop.time() < deadline
                and report.attempts < seconds / WRITE_PERIOD + 100
                and not (stop is not None and stop.is_set())
            ):
                report.attempts += 1
                key = f"{self.prefix}{index:08d}"
                try:
                    assert client.kv is not None
                    await client.kv.put(key, b"canary", timeout=2)
                except Exception:
                    report.failures += 1
                    if outage_since is None:
                        outage_since = loop.time()
                    # A client reconnects when its connection breaks.
                    if pending is None and loop.time() - refreshed > 1.0:
                        pending = asyncio.create_task(self.connect())
                else:
                    report.acked.append(key)
                    index += 1
                    if outage_since is not None:
                        report.longest_outage = max(
                            report.longest_outage, loop.time() - outage_since
                        )
                        outage_since = None
                if pending is None and loop.time() - refreshed > refresh:
                    pending = asyncio.create_task(self.connect())
                if pending is not None and pending.done():
                    try:
                        fresh = pending.result()
                    except Exception:  # Vault away: keep the client, try again in 1 s
                        refreshed = loop.time() - refresh + 1.0
                    else:
                        old, client = client, fresh
                        refreshed = loop.time()
                        await old.close()
                    pending = None
                await asyncio.sleep(WRITE_PERIOD)
            if outage_since is not None:
                report.longest_outage = max(report.longest_outage, loop.time() - outage_since)
        finally:
            if pending is not None:
                with contextlib.suppress(Exception):
                    await (await pending).close()
            await client.close()
        return report

    async def stored(self) -> set[str]:
        client = await self.connect()
        try:
            assert client.kv is not None
            start = self.prefix.encode()
            resp = await client.kv.get(start, range_end=prefix_range_end(start), timeout=10)
            return {kv.key.decode() for kv in resp.kvs}
        finally:
            await client.close()


@dataclass
class ServedLog:
    serials: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    expired: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    probes: int = 0


async def _watch_served(
    addresses: list[str],
    contexts: dict[int, ssl.SSLContext],
    stop: asyncio.Event,
    log: ServedLog,
    enough: tuple[int, asyncio.Event] | None = None,
) -> None:
    """Every second, a new TLS connection to each member's client and peer port: which
    certificate is served, and whether it is inside its validity. With ``enough``
    (count, event): set the event once every port has served that many certificates."""
    while not stop.is_set():
        for address in addresses:
            for port in (2379, 2380):
                try:
                    cert = await _served(address, port, contexts[port])
                except (OSError, TimeoutError, ssl.SSLError) as exc:
                    log.errors.append(f"{address}:{port} {type(exc).__name__}: {exc}")
                    continue  # a member restarting; the canary measures availability
                log.probes += 1
                now = time.time()
                serial = format(cert.serial_number, "x")
                seen = log.serials.setdefault((address, port), [])
                if not seen or seen[-1] != serial:
                    seen.append(serial)
                if not cert.not_valid_before_utc.timestamp() - 1 <= now:
                    log.expired.append(f"{address}:{port} {serial} not yet valid")
                if cert.not_valid_after_utc.timestamp() <= now:
                    log.expired.append(f"{address}:{port} {serial} expired")
        if enough is not None and all(
            len(log.serials.get((a, p), [])) >= enough[0] for a in addresses for p in (2379, 2380)
        ):
            enough[1].set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _finish_rotation(
    d: Deployment,
    canary: Canary,
    writes: asyncio.Task[CanaryReport],
    stop_writes: asyncio.Event,
    timeout: float,
) -> CanaryReport:
    """Wait until no rotation is in progress and the cluster is settled; let the canary
    write on the final trust for a few seconds, then check its writes: 0 lost (every
    acknowledged write is there) and none failed for longer than a few seconds
    (members restart one at a time, leadership moved first)."""
    deadline = time.monotonic() + timeout
    rotations = ""
    while time.monotonic() < deadline:
        rotations = (await d.ckecli("ca", "rotations")).stdout
        if "no CA rotation in progress" in rotations:
            break
        await asyncio.sleep(1.0)
    assert "no CA rotation in progress" in rotations, rotations
    await d.wait_for("completed", timeout=60, voters=3)
    await asyncio.sleep(5)
    stop_writes.set()
    report = await writes
    assert len(report.acked) > 100, report.attempts
    assert set(report.acked) <= await canary.stored()
    assert report.longest_outage < MAX_OUTAGE, report.longest_outage
    return report


# -- 1. renewal in place --------------------------------------------------------------------


async def test_certificates_renew_in_place_under_canary_writes(
    bed: TestBed, deployment: Deployment
) -> None:
    addresses = [n.address for n in bed.nodes]
    pids = {n.address: _etcd_pid(n) for n in bed.nodes}
    first_record = len(await _history(deployment))
    started = time.time()
    stop = asyncio.Event()
    served = ServedLog()
    contexts = await _probe_contexts(bed, deployment)
    # Writes and probes go on until every port served 4 certificates (3 renewals), for
    # at most RENEWAL_RUN seconds.
    renewed = asyncio.Event()
    watcher = asyncio.create_task(_watch_served(addresses, contexts, stop, served, (4, renewed)))
    canary = Canary(deployment, addresses, "/canary-renew/")
    began = time.monotonic()
    try:
        report = await canary.run(RENEWAL_RUN, stop=renewed)
    finally:
        stop.set()
        await watcher
    seconds = time.monotonic() - began

    # Every member's server and peer certificate changed at least 3 times...
    for address in addresses:
        for port in (2379, 2380):
            seen = served.serials.get((address, port), [])
            assert len(seen) >= 4, f"{address}:{port} served only {seen}; {served.errors[:5]}"
    # ... and no certificate ever served was outside its validity (probed all along:
    # more than 1,000 probes per 240 s, of 6 a second).
    assert served.probes > 1000 / 240 * seconds, (served.probes, seconds)
    assert served.expired == []
    # In place: the members kept their processes (etcd reloads the files itself).
    assert {n.address: _etcd_pid(n) for n in bed.nodes} == pids
    # No write failed for longer than a few seconds, and none was lost.
    assert report.longest_outage < MAX_OUTAGE, report
    assert len(report.acked) > 0.8 * seconds / WRITE_PERIOD / 2, (report.attempts, seconds)
    assert set(report.acked) <= await canary.stored()
    # The records say what happened: renewals, and nothing restarted.
    records = (await _history(deployment))[: -first_record or None]
    renewals = [r for r in records if r["operation"] == "etcd-renew-certificates"]
    assert len(renewals) >= 3, [r["operation"] for r in records]
    changes = {f"{a}:{p}": len(v) - 1 for (a, p), v in sorted(served.serials.items())}
    print(
        f"renewal under writes: {len(renewals)} renewals, serial changes {changes}, "
        f"{served.probes} TLS probes, {len(report.acked)}/{report.attempts} writes acked, "
        f"longest write outage {report.longest_outage:.2f}s"
    )
    assert all(r["status"] == "completed" for r in renewals), renewals
    assert not [r for r in records if r["operation"] in ("etcd-restart", "etcd-start")]
    detail = json.dumps(renewals[-1]["commands"])
    assert "renewal window" in detail, detail
    # Visible: ckecli status names each node's first expiry; /metrics has every expiry.
    status = await deployment.status()
    certificates = status["certificates"]
    assert isinstance(certificates, dict) and sorted(certificates) == sorted(addresses)
    metrics = await _leader_metrics(deployment)
    for address in addresses:
        for name in ("server", "peer"):
            line = next(
                (
                    line
                    for line in metrics.splitlines()
                    if line.startswith("cke_certificate_expiry_timestamp_seconds{")
                    and f'node="{address}"' in line
                    and f'certificate="{name}"' in line
                ),
                None,
            )
            assert line is not None, f"no expiry metric for {address} {name}"
            assert float(line.split()[-1]) > started


# -- 2. Vault away while certificates are due -----------------------------------------------


async def test_vault_down_keeps_current_certificates_and_resumes(
    bed: TestBed, deployment: Deployment
) -> None:
    assert bed.vault is not None
    addresses = [n.address for n in bed.nodes]
    await deployment.wait_for("completed", timeout=60, voters=3)
    before = {n.address: _node_leaf(n, "peer").serial for n in bed.nodes}
    # A client of the cluster holds its certificate; it does not need Vault to write.
    canary = Canary(deployment, addresses, "/canary-vault/")
    await (await canary.connect()).close()
    await bed.vault.stop()
    vault_stopped = time.monotonic()
    try:
        # Status warns once a certificate is inside its renewal window.
        warned: dict[str, object] = {}
        blocked: list[dict[str, str]] = []
        while time.monotonic() - vault_stopped < LEAF_TTL:
            warned = await deployment.status()
            blocked = list(warned.get("blocked") or [])  # type: ignore[call-overload]
            if "certificates-renewed" in [b["rule"] for b in blocked]:
                break
            await asyncio.sleep(0.5)
        assert "certificates-renewed" in [b["rule"] for b in blocked], warned
        assert "vault-available" in [b["rule"] for b in blocked], warned
        message = next(b["message"] for b in blocked if b["rule"] == "certificates-renewed")
        assert "keep working until they expire" in message
        # The current certificates keep working: the cluster still takes writes...
        report = await canary.run(3.0, refresh=60)
        assert report.failures == 0, report
        # ... no file on any node is half written: each certificate matches its key...
        for node in bed.nodes:
            for name in ("server", "peer"):
                cert = x509.load_pem_x509_certificate(_node_file(node, f"{name}.crt"))
                key = load_pem_private_key(_node_file(node, f"{name}.key"), None)
                assert cert.public_key() == key.public_key(), f"{node.address} {name}"
        # ... and nothing was renewed without Vault.
        assert {n.address: _node_leaf(n, "peer").serial for n in bed.nodes} == before
    finally:
        await bed.vault.start()
    vault_back = time.monotonic()
    # Renewal resumes within one interval after Vault is back: cke's Vault session
    # retries every min(5 s, --interval) and wakes the leader when it logs in; the
    # margin is for the operation itself (issue, then write over SSH).
    while time.monotonic() - vault_back < 30:
        now = {n.address: _node_leaf(n, "peer").serial for n in bed.nodes}
        if all(now[a] != before[a] for a in now):
            break
        await asyncio.sleep(0.2)
    resumed_after = time.monotonic() - vault_back
    assert all(_node_leaf(n, "peer").serial != before[n.address] for n in bed.nodes)
    assert resumed_after < INTERVAL + 3.0, resumed_after
    print(f"renewal resumed {resumed_after:.1f}s after Vault answered again")
    await deployment.wait_for("completed", timeout=60, voters=3)


# -- 3. CA rotation ---------------------------------------------------------------------


async def test_ca_rotation_of_peer_and_client_cas_under_canary_writes(
    bed: TestBed, deployment: Deployment
) -> None:
    addresses = [n.address for n in bed.nodes]
    old = {
        name: (await deployment.ckecli("ca", "get", name)).stdout
        for name in ("etcd-peer", "etcd-client")
    }
    # A client certificate from the old client CA, kept for the end.
    issued = await deployment.ckecli("etcd", "root-issue")
    old_client = json.loads(issued.stdout)
    canary = Canary(deployment, addresses, "/canary-rotate/")
    stop_writes = asyncio.Event()
    writes = asyncio.create_task(canary.run(600.0, refresh=5.0, stop=stop_writes))
    for name in ("etcd-peer", "etcd-client"):
        result = await deployment.ckecli("ca", "rotate", name)
        assert result.returncode == 0, result.stderr
    again = await deployment.ckecli("ca", "rotate", "etcd-peer")
    assert again.returncode != 0 and "being rotated already" in again.stderr
    # The leader dies while a member restarts for the new trust; the next one goes on.
    kill = await deployment.kill_leader_during("etcd-restart")
    try:
        await kill.done(timeout=120)
    finally:
        kill.cancel()
    # Vault goes away in the middle of the rotation, and comes back.
    assert bed.vault is not None
    await bed.vault.stop()
    try:
        await asyncio.sleep(5)
        during = (await deployment.ckecli("ca", "rotations")).stdout
        assert "no CA rotation in progress" not in during, during
    finally:
        await bed.vault.start()
    report = await _finish_rotation(deployment, canary, writes, stop_writes, 300)
    new = {
        name: bundle_key_ids((await deployment.ckecli("ca", "get", name)).stdout) for name in old
    }
    for name in ("etcd-peer", "etcd-client"):
        assert new[name] != bundle_key_ids(old[name]), name
    # At the end no node trusts the old CAs.
    new_peer, new_client = new["etcd-peer"], new["etcd-client"]
    for node in bed.nodes:
        assert bundle_key_ids(_node_file(node, "ca-peer.crt")) == new_peer, node.address
        assert bundle_key_ids(_node_file(node, "ca-client.crt")) == new_client, node.address
        assert _node_leaf(node, "peer").issuer_key_id == new_peer[0]
    # A client with a certificate from the old client CA is refused.
    server_ca = (await deployment.ckecli("ca", "get", "server")).stdout
    refused = Etcd3Client(
        [endpoint(addresses[0])],
        ca_cert=server_ca.encode(),
        cert_key=old_client["private_key"].encode(),
        cert_chain=old_client["certificate"].encode(),
    )
    try:
        await refused.connect()
        assert refused.kv is not None
        with pytest.raises(Exception):  # noqa: B017 - refused at the TLS layer, any shape
            await refused.kv.put("/canary-rotate/old-client", b"x", timeout=3)
    finally:
        await refused.close()
    records = await _history(deployment)
    stages = [r for r in records if r["operation"] == "ca-rotation"]
    restarts = [r for r in records if r["operation"] == "etcd-restart"]
    print(
        f"CA rotation under writes: {len(stages)} stage steps, {len(restarts)} restarts, "
        f"{len(report.acked)}/{report.attempts} writes acked, "
        f"longest write outage {report.longest_outage:.2f}s"
    )
    assert len(stages) >= 8, [r["operation"] for r in records[:40]]


async def test_server_ca_rotation_keeps_clients_connected(
    bed: TestBed, deployment: Deployment
) -> None:
    addresses = [n.address for n in bed.nodes]
    await deployment.wait_for("completed", timeout=60, voters=3)
    old = (await deployment.ckecli("ca", "get", "server")).stdout
    old_ids = bundle_key_ids(old)
    contexts = await _probe_contexts(bed, deployment)
    canary = Canary(deployment, addresses, "/canary-server-ca/")
    stop_writes = asyncio.Event()
    writes = asyncio.create_task(canary.run(300.0, refresh=5.0, stop=stop_writes))
    result = await deployment.ckecli("ca", "rotate", "server")
    assert result.returncode == 0, result.stderr
    # While clients are given time, ``ckecli ca get server`` hands out old + new.
    deadline = time.monotonic() + 60
    both: tuple[str, ...] = ()
    while time.monotonic() < deadline:
        rotations = (await deployment.ckecli("ca", "rotations")).stdout
        if "server: trust-both" in rotations:
            both = bundle_key_ids((await deployment.ckecli("ca", "get", "server")).stdout)
            break
        await asyncio.sleep(0.5)
    assert len(both) == 2 and both[0] == old_ids[0], both
    report = await _finish_rotation(deployment, canary, writes, stop_writes, 120)
    new_ids = bundle_key_ids((await deployment.ckecli("ca", "get", "server")).stdout)
    assert new_ids == (both[1],), (new_ids, both)
    # Every member serves a certificate from the new CA...
    for address in addresses:
        served = parse_certificate(
            (await _served(address, 2379, contexts[2379])).public_bytes(Encoding.PEM)
        )
        assert served.issuer_key_id == new_ids[0], address
    # ... which a client that trusts only the old CA refuses.
    issued = json.loads((await deployment.ckecli("etcd", "root-issue")).stdout)
    stale = Etcd3Client(
        [endpoint(addresses[0])],
        ca_cert=old.encode(),
        cert_key=issued["private_key"].encode(),
        cert_chain=issued["certificate"].encode(),
    )
    try:
        await stale.connect()
        assert stale.kv is not None
        with pytest.raises(Exception):  # noqa: B017 - refused at the TLS layer, any shape
            await stale.kv.put("/canary-server-ca/stale", b"x", timeout=3)
    finally:
        await stale.close()
    print(
        f"server CA rotation under writes: {len(report.acked)}/{report.attempts} writes "
        f"acked, longest write outage {report.longest_outage:.2f}s"
    )


# -- 5. Vault tidy ----------------------------------------------------------------------


async def test_vault_tidy_keeps_up_with_renewals(bed: TestBed, deployment: Deployment) -> None:
    """Vault tidy keeps up with the renewals: nothing in the peer mount expired longer
    ago than the safety buffer (the leaf lifetime) plus one gc interval and a margin.

    Last in the module, when the peer certificates issued at bootstrap expired that long
    ago (leaves are renewed every 15 s throughout tests 1 to 4), so that they are among
    those that must be gone; run alone, it waits until then."""
    assert bed.vault is not None and _BOOTSTRAP_PEERS
    vault = bed.vault.client()
    old_enough = max(c.not_after for c in _BOOTSTRAP_PEERS.values()) + TIDY_MARGIN
    await asyncio.sleep(max(0.0, old_enough - time.time()))

    def peer_mount() -> list[CertInfo]:
        listed = vault.secrets.pki.list_certificates(mount_point="cke/ca-etcd-peer")
        certs = []
        for serial in listed["data"]["keys"]:
            pem = vault.secrets.pki.read_certificate(serial, mount_point="cke/ca-etcd-peer")
            certs.append(parse_certificate(pem["data"]["certificate"]))
        return certs

    current = {_node_leaf(n, "peer").serial for n in bed.nodes}
    in_mount = await asyncio.to_thread(peer_mount)
    oldest_allowed = time.time() - TIDY_MARGIN
    assert [c.not_after for c in in_mount if c.not_after < oldest_allowed] == []
    # Tidied indeed: the bootstrap peer certificates are gone; the current ones are there.
    serials = {c.serial for c in in_mount}
    assert not serials & {c.serial for c in _BOOTSTRAP_PEERS.values()}, _BOOTSTRAP_PEERS
    assert current <= serials, (current, serials)
