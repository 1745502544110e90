"""cke/backup.py without etcd: names, retention, listing, member choice, flags, and the
leader's schedule surviving failures."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest

from cke.backup import (
    BackupError,
    BackupInfo,
    BackupName,
    BackupSchedule,
    BackupSettings,
    _place,
    _prune,
    add_backup_flags,
    backup_schedule,
    first_due,
    list_backups,
    parse_name,
    parse_snapshot_status,
    removals,
    resolve_etcdutl,
    run_scheduled,
    snapshot_sources,
)
from cke.etcdadmin import EtcdCredentials
from cke.server.clusterstatus import EtcdMember, EtcdStatus

WHEN = dt.datetime(2026, 12, 2, 15, 38, 7, tzinfo=dt.UTC)


def test_names_are_upstreams_and_parse_back() -> None:
    assert BackupName(WHEN).name == "etcd-20261202-153807.backup"
    assert BackupName(WHEN, 2).name == "etcd-20261202-153807-2.backup"
    assert parse_name("etcd-20261202-153807.backup") == BackupName(WHEN)
    assert parse_name("etcd-20261202-153807-2.backup") == BackupName(WHEN, 2)
    for other in (
        "etcd-20261202-153807.backup.json",
        ".etcd-backup-0a1b.tmp",
        "etcd-20261399-153807.backup",  # month 13
        "etcd-2026122-153807.backup",
        "notes.txt",
    ):
        assert parse_name(other) is None, other


def test_removals_keep_the_newest_by_time_then_sequence() -> None:
    names = [
        "etcd-20261202-153807.backup",
        "etcd-20261202-153807-1.backup",  # same second, later: sorts before "." as a string
        "etcd-20261201-000000.backup",
        "etcd-20261202-153807.backup.json",
        "README",
    ]
    assert removals(names, 2) == ["etcd-20261201-000000.backup"]
    assert removals(names, 1) == ["etcd-20261201-000000.backup", "etcd-20261202-153807.backup"]
    assert removals(names, 5) == []
    with pytest.raises(ValueError):
        removals(names, 0)


def test_snapshot_status_is_read_from_etcdutl_json() -> None:
    text = '{"hash":3687196420,"revision":2001,"totalKey":2006,"totalSize":376832}'
    status = parse_snapshot_status(text)
    assert (status.hash, status.revision, status.total_keys, status.total_size) == (
        3687196420,
        2001,
        2006,
        376832,
    )
    with pytest.raises(BackupError, match="unexpected output"):
        parse_snapshot_status("Error: bad file")


def _member(mid: int, address: str, **kw: object) -> EtcdMember:
    return EtcdMember(id=mid, name=f"m{mid}", address=address, healthy=True, **kw)  # type: ignore[arg-type]


def test_snapshot_sources_are_in_sync_voters_followers_first() -> None:
    status = EtcdStatus(
        reachable=True,
        members=(
            _member(1, "10.0.0.1", raft_index=5000, leader=True),
            _member(2, "10.0.0.3", raft_index=4990),
            _member(3, "10.0.0.2", raft_index=4999),
            _member(4, "10.0.0.4", raft_index=100),  # lags
            EtcdMember(id=5, name="m5", address="10.0.0.5"),  # down
            _member(6, "10.0.0.6", raft_index=5000, learner=True),
        ),
        leader_id=1,
    )
    assert snapshot_sources(status) == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]
    no_leader = EtcdStatus(reachable=True, members=(_member(2, "10.0.0.3"),))
    assert snapshot_sources(no_leader) == []


def test_first_due_follows_the_newest_backup() -> None:
    now = WHEN.timestamp()
    assert first_due(None, now, 60) == now + 60
    assert first_due(WHEN - dt.timedelta(seconds=20), now, 60) == now + 40
    assert first_due(WHEN - dt.timedelta(hours=2), now, 60) == now


def _touch(path: Path, data: bytes = b"x") -> None:
    path.write_bytes(data)


def test_place_never_replaces_a_backup(tmp_path: Path) -> None:
    _touch(tmp_path / "etcd-20261202-153807.backup", b"old")
    tmp = tmp_path / ".etcd-backup-1.tmp"
    _touch(tmp, b"new")
    assert _place(tmp, tmp_path, BackupName(WHEN)) == "etcd-20261202-153807-1.backup"
    assert (tmp_path / "etcd-20261202-153807.backup").read_bytes() == b"old"
    assert (tmp_path / "etcd-20261202-153807-1.backup").read_bytes() == b"new"
    assert not tmp.exists()


def test_prune_removes_old_backups_orphans_and_stale_temporaries(tmp_path: Path) -> None:
    for minute in range(4):
        name = BackupName(WHEN + dt.timedelta(minutes=minute)).name
        _touch(tmp_path / name)
        _touch(tmp_path / f"{name}.json", b"{}")
    _touch(tmp_path / "etcd-20200101-000000.backup.json", b"{}")  # its backup is gone
    stale, fresh = tmp_path / ".etcd-backup-old.tmp", tmp_path / ".etcd-backup-new.tmp"
    _touch(stale)
    _touch(fresh)
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    _touch(tmp_path / "keep-me.txt")
    removed = _prune(tmp_path, 2)
    assert removed == ["etcd-20261202-153807.backup", "etcd-20261202-153907.backup"]
    assert sorted(os.listdir(tmp_path)) == [
        ".etcd-backup-new.tmp",
        "etcd-20261202-154007.backup",
        "etcd-20261202-154007.backup.json",
        "etcd-20261202-154107.backup",
        "etcd-20261202-154107.backup.json",
        "keep-me.txt",
    ]


async def test_list_reads_the_json_beside_each_backup(tmp_path: Path) -> None:
    good = BackupInfo(
        name="etcd-20261202-153807.backup",
        time="2026-12-02T15:38:07Z",
        size=5,
        revision=42,
        total_keys=7,
        member="10.0.0.2",
    )
    _touch(tmp_path / good.name, b"12345")
    (tmp_path / f"{good.name}.json").write_text(json.dumps(good.to_dict()))
    _touch(tmp_path / "etcd-20261202-153700.backup", b"upstream's, no .json")
    stale = BackupInfo(name="etcd-20261202-153900.backup", time="", size=1, revision=9)
    _touch(tmp_path / stale.name, b"not one byte")  # the .json's size differs: not trusted
    (tmp_path / f"{stale.name}.json").write_text(json.dumps(stale.to_dict()))
    infos = await list_backups(tmp_path)
    assert [i.name for i in infos] == [
        "etcd-20261202-153700.backup",
        good.name,
        stale.name,
    ]
    assert infos[0].revision is None and infos[0].time == "2026-12-02T15:37:00Z"
    assert infos[1] == good
    assert infos[2].revision is None and infos[2].size == len(b"not one byte")
    with pytest.raises(BackupError, match="--dir"):
        await list_backups(tmp_path / "missing")


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_backup_flags(parser)
    return parser.parse_args(list(argv))


def test_backup_flags() -> None:
    assert backup_schedule(_flags()) is None  # off by default
    schedule = backup_schedule(
        _flags("--backup-interval", "1h", "--backup-dir", "/b", "--backup-copy-dir", "/c")
    )
    flags = ("--backup-dir", "--backup-copy-dir", "--backup-retention")
    settings = BackupSettings(Path("/b"), 10, Path("/c"), flags=flags)
    assert schedule == BackupSchedule(settings, 3600.0)
    for argv, flag in (
        (("--backup-interval", "soon"), "--backup-interval"),
        (("--backup-interval=-1s",), "--backup-interval"),
        (("--backup-retention", "0"), "--backup-retention"),
        (("--backup-dir", "/b", "--backup-copy-dir", "/b/"), "--backup-copy-dir"),
        (("--etcdutl", ""), "--etcdutl"),
    ):
        with pytest.raises(ValueError, match=rf"^{flag}: "):
            backup_schedule(_flags(*argv))


def test_etcdutl_is_resolved_or_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match=r"^--etcdutl: "):
        resolve_etcdutl("no-such-etcdutl-here")
    plain = tmp_path / "etcdutl"
    _touch(plain)
    with pytest.raises(BackupError, match="not an executable file"):
        resolve_etcdutl(str(plain))
    plain.chmod(0o755)
    assert resolve_etcdutl(str(plain)) == str(plain)


class _Counts:
    def __init__(self) -> None:
        self.good: list[BackupInfo] = []
        self.failed = 0

    def backup_succeeded(self, info: BackupInfo) -> None:
        self.good.append(info)

    def backup_failed(self) -> None:
        self.failed += 1


async def _no_credentials() -> EtcdCredentials:
    raise AssertionError("not reached: the backup fails before it asks")


@pytest.mark.parametrize("problem", ["etcdutl missing", "directory is a file"])
async def test_schedule_counts_failures_and_keeps_going(
    tmp_path: Path, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "backups"
    etcdutl = "/nonexistent/etcdutl"
    if problem == "directory is a file":
        _touch(directory)
        etcdutl = str(tmp_path / "etcdutl")
        _touch(Path(etcdutl))
        Path(etcdutl).chmod(0o755)
    schedule = backup_schedule(
        _flags("--backup-interval=50ms", f"--backup-dir={directory}", f"--etcdutl={etcdutl}")
    )
    assert schedule is not None
    counts = _Counts()
    task = asyncio.create_task(
        run_scheduled(schedule, _no_credentials, lambda: ["10.0.0.1"], counts)
    )
    await asyncio.sleep(0.4)
    assert not task.done()  # never crashes
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counts.failed >= 2 and not counts.good
    lines = [r for r in caplog.records if r.getMessage() == "etcd backup failed"]
    assert len(lines) == counts.failed
    error = str(getattr(lines[0], "fields", {}).get("error"))
    assert error.startswith(
        "BackupError: --etcdutl: "
        if problem == "etcdutl missing"
        else "BackupError: --backup-dir: "
    ), error


async def test_schedule_waits_while_there_is_no_cluster(tmp_path: Path) -> None:
    schedule = BackupSchedule(BackupSettings(tmp_path, etcdutl="/nonexistent/etcdutl"), 0.05)
    counts = _Counts()
    task = asyncio.create_task(run_scheduled(schedule, _no_credentials, list, counts))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counts.failed == 0 and not counts.good
