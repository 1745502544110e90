"""rivers and etcd-rivers deployed and healed by cke on real sshd nodes (issue 14).

One bed (5 nodes: 3 control planes, a worker, a spare) and one deployment; the tests
run in order. No kube-apiserver exists here, so the apiserver-facing rivers is checked
for its deployment and upstream lists only; the traffic path is proved with
etcd-rivers, whose upstreams are the real etcd members.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from etcd3aio import Etcd3Client, prefix_range_end

from cke.devenv import BedConfig, TestBed
from cke.devenv.deploy import Deployment
from cke.devenv.nodes import Node as BedNode
from cke.op.rivers import ETCD_RIVERS_KIND, RIVERS_KIND, RiversKind

pytestmark = pytest.mark.e2e

INTERVAL = 2.0
WRITE_PERIOD = 0.05
MAX_CONCURRENT_UPDATES = 2
# The longest a client through a node's etcd-rivers waits between acknowledged writes:
# its proxy killed is started again within one interval (plus the start itself), and
# gRPC's reconnection backoff adds up to two more seconds.
MAX_GAP = INTERVAL + 4.0


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[TestBed]:
    testbed = TestBed(BedConfig(etcd_members=1, nodes=5))
    await testbed.start()
    try:
        yield testbed
    finally:
        await testbed.stop()


@pytest.fixture(scope="module")
async def deployment(bed: TestBed) -> AsyncIterator[Deployment]:
    d = Deployment(
        bed,
        replicas=1,
        interval=f"{INTERVAL:.0f}s",
        extra=("--max-concurrent-updates", str(MAX_CONCURRENT_UPDATES)),
    )
    await d.bootstrap(bed.nodes[:3], bed.nodes[3:])
    try:
        yield d
    finally:
        await d.stop()


def _spec(node: BedNode, service: str) -> dict[str, object] | None:
    path = node.private_dir("/var/lib/cke") / "specs" / f"{service}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _upstreams(node: BedNode, service: str) -> list[str]:
    spec = _spec(node, service)
    assert spec is not None, f"no {service} on {node.address}"
    args = spec["args"]
    assert isinstance(args, list)
    value = next(a for a in args if a.startswith("--upstreams="))
    return sorted(value.split("=", 1)[1].split(","))


def _pid(node: BedNode, service: str) -> int | None:
    path = node.private_dir("/var/lib/cke") / "run" / f"{service}.pid"
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def _expected(addresses: list[str], kind: RiversKind) -> list[str]:
    return sorted(f"{a}:{kind.upstream_port}" for a in addresses)


async def _history(d: Deployment) -> list[dict[str, object]]:
    records = json.loads((await d.ckecli("history", "-n", "1000", "-o", "json")).stdout)
    return sorted(records, key=lambda r: int(r["id"]))


async def _client_via(d: Deployment, node: BedNode) -> Etcd3Client:
    """An etcd client that talks to the node's etcd-rivers only; TLS goes end to end
    (the members' certificates name ``localhost``; rivers does not terminate TLS)."""
    issued = json.loads((await d.ckecli("etcd", "root-issue")).stdout)
    server_ca = (await d.ckecli("ca", "get", "server")).stdout
    client = Etcd3Client(
        [f"{node.address}:{ETCD_RIVERS_KIND.listen_port}"],
        ca_cert=server_ca.encode(),
        cert_key=issued["private_key"].encode(),
        cert_chain=issued["certificate"].encode(),
        tls_server_name="localhost",
    )
    await client.connect()
    return client


@dataclass
class Writes:
    acked: list[str] = field(default_factory=list)
    failures: int = 0
    longest_gap: float = 0.0


async def _write_steadily(client: Etcd3Client, prefix: str, stop: asyncio.Event) -> Writes:
    """A write every 50 ms until ``stop`` (at most 10 minutes), retrying a failed key."""
    loop = asyncio.get_running_loop()
    report = Writes()
    last_ok = loop.time()
    index = 0
    deadline = loop.time() + 600
    assert client.kv is not None
    while not stop.is_set() and loop.time() < deadline:
        key = f"{prefix}{index:08d}"
        try:
            await client.kv.put(key, b"via-rivers", timeout=2)
        except Exception:
            report.failures += 1
        else:
            now = loop.time()
            report.longest_gap = max(report.longest_gap, now - last_ok)
            last_ok = now
            report.acked.append(key)
            index += 1
        await asyncio.sleep(WRITE_PERIOD)
    return report


async def _wait_running(node: BedNode, service: str, other_than: int | None, limit: float) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        pid = _pid(node, service)
        if pid is not None and pid != other_than:
            return pid
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{service} not running again on {node.address} in {limit}s")


async def test_every_node_runs_rivers_and_control_planes_run_etcd_rivers(
    bed: TestBed, deployment: Deployment
) -> None:
    cps = [n.address for n in bed.nodes[:3]]
    for node in bed.nodes:
        assert _upstreams(node, "rivers") == _expected(cps, RIVERS_KIND), node.address
        pid = _pid(node, "rivers")
        assert pid is not None, node.address
        # The app cke shipped runs on the node's own python3, not the project's venv.
        assert os.readlink(f"/proc/{pid}/exe").startswith("/usr/bin/python3"), node.address
        if node.address in cps:
            assert _upstreams(node, "etcd-rivers") == _expected(cps, ETCD_RIVERS_KIND)
            assert _pid(node, "etcd-rivers") is not None
        else:
            assert _pid(node, "etcd-rivers") is None
    status = await deployment.status()
    rivers = status["rivers"]
    assert isinstance(rivers, dict)
    for node in bed.nodes:
        wanted = {"rivers": "current"}
        if node.address in cps:
            wanted["etcd-rivers"] = "current"
        assert rivers[node.address] == wanted, rivers
    # Each proxy serves /health and /metrics next to its listener (loopback).
    for node in bed.nodes:
        kinds = [RIVERS_KIND, ETCD_RIVERS_KIND] if node.address in cps else [RIVERS_KIND]
        for kind in kinds:
            base = f"http://{node.address}:{kind.metrics_port}"
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            ):
                async with session.get(f"{base}/health") as resp:
                    # etcd-rivers has healthy upstreams; rivers' apiservers do not exist
                    # here, and its /health says so.
                    wanted = 200 if kind is ETCD_RIVERS_KIND else 503
                    assert resp.status == wanted, (node.address, kind.service)
                async with session.get(f"{base}/metrics") as resp:
                    assert "rivers_upstream_healthy" in await resp.text()
    text = (await deployment.ckecli("status")).stdout
    assert f"{bed.nodes[0].address}: etcd-rivers current, rivers current" in text
    # Real traffic through etcd-rivers, TLS from the client to the member.
    client = await _client_via(deployment, bed.nodes[0])
    try:
        assert client.kv is not None
        await client.kv.put("/via-rivers/hello", b"world", timeout=5)
        got = await client.kv.get("/via-rivers/hello", timeout=5)
        assert got.kvs[0].value == b"world"
    finally:
        await client.close()


async def test_killed_rivers_is_restarted_within_one_interval(
    bed: TestBed, deployment: Deployment
) -> None:
    worker = bed.nodes[3]
    pid = _pid(worker, "rivers")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    await _wait_running(worker, "rivers", pid, INTERVAL + 10)
    back = time.monotonic() - killed
    print(f"rivers killed on {worker.address}: running again after {back:.1f}s")
    # One interval until the next status, plus the start itself.
    assert back < INTERVAL + 3.0, back
    await deployment.wait_for("completed", timeout=60, voters=3)


async def test_client_through_etcd_rivers_while_members_die_and_are_replaced(
    bed: TestBed, deployment: Deployment
) -> None:
    n1, n2, n3, n4, n5 = bed.nodes
    client = await _client_via(deployment, n1)
    stop = asyncio.Event()
    writes = asyncio.create_task(_write_steadily(client, "/via-rivers/steady/", stop))
    first_record = len(await _history(deployment))
    try:
        # A member killed: cke starts it again; the proxy dials the others meanwhile.
        etcd_pid = _pid(n2, "etcd")
        assert etcd_pid is not None
        os.kill(etcd_pid, signal.SIGKILL)
        await _wait_running(n2, "etcd", etcd_pid, 60)
        # The leader noticed the dropped connection itself, without waiting an interval.
        noticed = [
            line
            for line in deployment.replicas[0].log().splitlines()
            if "etcd member connection dropped; deciding now" in line
        ]
        assert any(f"member={n2.address}" in line for line in noticed), noticed
        await deployment.wait_for("completed", timeout=60, voters=3)
        # A control plane replaced: n5 in, n3 out (it stays a worker).
        result = await deployment.set_cluster([n1, n2, n5], [n3, n4])
        assert result.returncode == 0, result.stderr
        await deployment.wait_for("completed", timeout=180, voters=3)
        # The proxy the client uses is killed: cke starts it again.
        proxy_pid = _pid(n1, "etcd-rivers")
        assert proxy_pid is not None
        os.kill(proxy_pid, signal.SIGKILL)
        await _wait_running(n1, "etcd-rivers", proxy_pid, INTERVAL + 10)
        await deployment.wait_for("completed", timeout=60, voters=3)
        await asyncio.sleep(2)
    finally:
        stop.set()
        report = await writes
        await client.close()
    print(
        f"through etcd-rivers: {len(report.acked)} writes acked, {report.failures} failed "
        f"attempts, longest gap between acknowledged writes {report.longest_gap:.2f}s"
    )
    # Every acknowledged write is readable.
    reader = await _client_via(deployment, n2)
    try:
        assert reader.kv is not None
        start = b"/via-rivers/steady/"
        resp = await reader.kv.get(start, range_end=prefix_range_end(start), timeout=10)
        stored = {kv.key.decode() for kv in resp.kvs}
    finally:
        await reader.close()
    assert len(report.acked) > 100
    assert set(report.acked) <= stored
    assert report.longest_gap < MAX_GAP, report
    # The proxies follow the new control planes; n3 no longer runs etcd-rivers.
    cps = [n1.address, n2.address, n5.address]
    for node in bed.nodes:
        assert _upstreams(node, "rivers") == _expected(cps, RIVERS_KIND), node.address
    for node in (n1, n2, n5):
        assert _upstreams(node, "etcd-rivers") == _expected(cps, ETCD_RIVERS_KIND)
    assert _pid(n3, "etcd-rivers") is None
    # In the order of the rules: n5 enters the lists only after its member was promoted;
    # n3 leaves every list before its member is removed.
    records = (await _history(deployment))[first_record:]
    names = [(r["operation"], r["targets"]) for r in records]

    def index_of(operation: str, target: str) -> int:
        return next(
            i
            for i, r in enumerate(records)
            if r["operation"] == operation and target in r["targets"]  # type: ignore[operator]
        )

    # Updates roll a bounded number of nodes at a time.
    for r in records:
        if "rivers" in str(r["operation"]):
            assert len(r["targets"]) <= MAX_CONCURRENT_UPDATES, r  # type: ignore[arg-type]
    promoted = index_of("etcd-promote-member", n5.address)
    removed = index_of("etcd-remove-member", n3.address)
    for i, r in enumerate(records):
        if not str(r["operation"]).endswith(("rivers-restart", "rivers-bootstrap")):
            continue
        for command in r["commands"]:  # type: ignore[attr-defined]
            if n5.address in command["detail"]:
                assert i > promoted, names
    # One command starts rivers on all of an operation's nodes at once: its target lists them.
    updated_before_removal = {
        (str(r["operation"]).split("-restart")[0], target)
        for r in records[:removed]
        if str(r["operation"]).endswith("rivers-restart")
        for command in r["commands"]  # type: ignore[attr-defined]
        if n3.address not in command["detail"]
        for target in command["target"].split(",")
    }
    for node in bed.nodes:
        assert ("rivers", node.address) in updated_before_removal, names
    for node in (n1, n2):
        assert ("etcd-rivers", node.address) in updated_before_removal, names
