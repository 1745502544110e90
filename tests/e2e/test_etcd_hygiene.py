"""etcd hygiene on the managed etcd: defragmentation one member at a time, and recovery
from the NOSPACE alarm.

One bed and one 3-member etcd bootstrapped by cke with a small quota
(``options.etcd.extra_args: --quota-backend-bytes``) and lowered defragmentation
thresholds (``--etcd-defrag-min-db-size 1MiB``), so that a few MiB are enough.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import pytest
import yaml
from etcd3aio import Etcd3Client, EtcdError

from cke.common.etcd import make_client
from cke.devenv import TestBed
from cke.devenv.deploy import Deployment
from tests.e2e.test_etcd_managed import _history, _last_id, _ops_since, bed

__all__ = ["bed"]  # the module-scoped bed of test_etcd_managed (5 systemd nodes)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
QUOTA = 12 * MiB
DB_FILE = "/var/lib/cke/etcd/member/snap/db"


@pytest.fixture(scope="module")
async def deployment(bed: TestBed) -> AsyncIterator[Deployment]:
    d = Deployment(bed, replicas=1, extra=("--etcd-defrag-min-db-size", "1MiB"))
    await d.setup()
    doc = yaml.safe_load(d.cluster_yaml(bed.nodes[:3], bed.nodes[3:]))
    doc["options"] = {"etcd": {"extra_args": [f"--quota-backend-bytes={QUOTA}"]}}
    text = yaml.safe_dump(doc, sort_keys=False).encode()
    try:
        stored = await d.ckecli("cluster", "set", "--control-plane-count", "3", "-", stdin=text)
        assert stored.returncode == 0, stored.stderr
        await d.wait_for("completed", timeout=120, voters=3)
        yield d
    finally:
        await d.stop()


def _addresses(bed: TestBed) -> list[str]:
    return [n.address for n in bed.nodes[:3]]


async def _db_files(bed: TestBed) -> dict[str, int]:
    """The size of each member's database file on disk."""
    sizes = {}
    for node in bed.nodes[:3]:
        sizes[node.address] = int((await bed.run(node, f"stat -c %s {DB_FILE}")).stdout)
    return sizes


async def _leader(client: Etcd3Client) -> str:
    """The address of the member that leads."""
    assert client.maintenance is not None and client.cluster is not None
    leader = (await client.maintenance.status(timeout=5)).leader
    members = (await client.cluster.member_list(timeout=5)).members
    return next(str(m.peerURLs[0]).split("//")[1].split(":")[0] for m in members if leader == m.ID)


class Canary:
    """Writes one key every 50 ms; the longest time without a successful write."""

    def __init__(self, client: Etcd3Client) -> None:
        self.client = client
        self.writes = 0
        self.failures = 0
        self.longest_gap = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        assert self.client.kv is not None
        last_ok = time.monotonic()
        while True:
            try:
                await self.client.kv.put("/canary/hygiene", str(self.writes), timeout=2)
                self.writes += 1
                last_ok = time.monotonic()
            except Exception:  # any refusal or timeout counts; the writes go on
                self.failures += 1
            self.longest_gap = max(self.longest_gap, time.monotonic() - last_ok)
            await asyncio.sleep(0.05)

    def __enter__(self) -> Canary:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_fragmented_members_are_defragmented_one_at_a_time(
    bed: TestBed, deployment: Deployment
) -> None:
    addresses = _addresses(bed)
    client = await deployment.root_client(addresses)
    try:
        assert client.kv is not None
        # 6 MiB of keys, then 90% deleted and the history compacted (as kube-apiserver
        # compacts every 5 minutes): the free pages stay in the file until a defrag.
        value = b"x" * (96 * 1024)
        for i in range(64):
            await client.kv.put(f"/bulk/{i:03d}", value, timeout=10)
        deleted = await client.kv.delete("/bulk/000", range_end="/bulk/058", timeout=10)
        assert deleted.deleted == 58
        revision = deleted.header.revision
        leader = await _leader(client)
        start = await _last_id(deployment)
        before = await _db_files(bed)
        with Canary(client) as canary:
            await client.kv.compact(revision, physical=True, timeout=30)
            deadline = time.monotonic() + 30
            defrags: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                records = _ops_since(await _history(deployment), start)
                defrags = [r for r in records if r["operation"] == "etcd-defrag"]
                if len(defrags) == 3 and all(r["status"] == "completed" for r in defrags):
                    break
                await asyncio.sleep(0.3)
            after = await _db_files(bed)
    finally:
        await client.close()
    for r in defrags:
        print(f"{r['operation']} {r['targets']} {r['start-at']} .. {r['end-at']}")
    print(f"db file sizes before: {before}, after: {after}")
    print(
        f"canary: {canary.writes} writes, {canary.failures} failed, "
        f"longest gap {canary.longest_gap:.2f}s"
    )
    # One member per operation, each once, the leader last, never two at once.
    targets = _one_each(defrags)
    assert [r["targets"] for r in defrags] == [[a] for a in targets], defrags
    assert sorted(targets) == addresses and targets[-1] == leader, (targets, leader)
    assert all(r["status"] == "completed" and not r["error"] for r in defrags), defrags
    ends = [str(r["end-at"]) for r in defrags]
    assert all(ends[i] <= str(defrags[i + 1]["start-at"]) for i in range(2)), defrags
    for a in addresses:
        assert after[a] < before[a] / 2, (a, before[a], after[a])
    assert canary.writes > 0 and canary.longest_gap < 3.0


def _one_each(records: list[dict[str, object]]) -> list[str]:
    return [str(t) for r in records for t in r["targets"]]  # type: ignore[attr-defined]


async def test_nospace_is_recovered(bed: TestBed, deployment: Deployment) -> None:
    addresses = _addresses(bed)
    settings = bed.etcd.settings(deployment.prefix)
    own = make_client(settings)
    await own.connect()
    client = await deployment.root_client(addresses)
    try:
        assert own.kv is not None and own.watch is not None and client.kv is not None
        status_key = f"{deployment.prefix}status".encode()
        since = (await own.kv.get(status_key)).header.revision + 1
        start = await _last_id(deployment)
        # Overwrite one key until the history fills the quota and etcd refuses writes.
        value = b"y" * (512 * 1024)
        refused = None
        for i in range(2 * QUOTA // len(value)):
            try:
                await client.kv.put("/fill", value, timeout=10)
            except (EtcdError, grpc.aio.AioRpcError) as exc:  # RESOURCE_EXHAUSTED comes raw
                refused = (i, str(exc))
                break
        assert refused is not None and "space exceeded" in refused[1], refused
        # cke reports it, recovers, and the cluster takes writes again.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                await client.kv.put("/after-nospace", "ok", timeout=2)
                break
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError):
                await asyncio.sleep(0.2)
        recovered_in = time.monotonic() - (deadline - 40)
        assert (await client.kv.get("/after-nospace", timeout=5)).kvs[0].value == b"ok"
        reports = await _statuses_since(own, status_key, since)
    finally:
        await client.close()
        await own.close()
    print(f"NOSPACE after {refused[0]} writes of 512KiB; writes accepted {recovered_in:.1f}s later")
    nospace = [b for s in reports for b in s["blocked"] if b["rule"] == "etcd-nospace"]
    assert nospace and "refuses writes" in nospace[0]["message"], reports
    records = _ops_since(await _history(deployment), start)
    recovery = [r for r in records if r["operation"] == "etcd-nospace-recovery"]
    assert recovery and recovery[0]["status"] == "completed", records
    commands = [c["name"] for c in recovery[0]["commands"]]  # type: ignore[attr-defined]
    assert commands[0] == "etcd-compact" and commands[-1] == "etcd-alarm-disarm", commands
    assert commands.count("etcd-defragment") == 3, commands
    final = await deployment.wait_for("completed", timeout=30, voters=3)
    blocked: list[dict[str, Any]] = final.get("blocked") or []  # type: ignore[assignment]
    assert not [b for b in blocked if b["rule"] == "etcd-nospace"], blocked


async def _statuses_since(client: Etcd3Client, key: bytes, revision: int) -> list[dict[str, Any]]:
    """Every status cke wrote since ``revision`` (from the watch history)."""
    assert client.watch is not None and client.kv is not None
    last = (await client.kv.get(key)).kvs[0].mod_revision
    seen: list[dict[str, Any]] = []

    async def collect() -> None:
        assert client.watch is not None
        async for resp in client.watch.watch(key, start_revision=revision):
            for event in resp.events:
                seen.append(json.loads(event.kv.value))
                if event.kv.mod_revision >= last:
                    return

    await asyncio.wait_for(collect(), 10)
    return seen
