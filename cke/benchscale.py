"""``make bench-scale``: what status collection costs cke as the cluster grows.

One bed of the largest size (default sizes 25, 50, 100, 200 sshd nodes; one /24 of
loopback addresses holds at most 254) and one real cke replica with OpenBao, as an
operator runs it (``Deployment``: ``--interval 2s``, ``runtime: process``). For each
size N the cluster grows to 1 control plane and N-1 workers; once it is complete
(etcd, rivers on every node) the benchmark measures, from cke's own log line
``status collected`` (``seconds=``, the time of ``collect()``: every node over SSH and
the etcd status; also the histogram ``cke_status_collection_seconds``) and from
``/proc/<cke pid>``:

- collection time per round: the first round after the cluster grew to N (the new
  nodes' host keys read and pinned), warm (connections kept; the median of several
  rounds) and cold (the first round of a restarted cke, as after a failover: new
  connections, host keys already pinned);
- cke's CPU seconds per round (collection, decision and the status write together),
  its RSS, its open file descriptors and its SSH connections;
- the size of the ``status`` value the leader writes to etcd every round.

The reference, measured in the same run while cke is stopped: a plain parallel
``ssh node true`` fan-out (the OpenSSH client, one process per node, at most 64 at a
time as cke's status reads), and asyncssh in one process as cke uses it: ``true`` on new
connections, ``true`` and cke's own node status script on the kept connections, and
that script on one node alone (its latency, for the model). Ratios are cke / reference.

From the per-node slopes it models 1,000 and 5,000 nodes and says which limit is
reached first: file descriptors (systemd's default soft limit is 1024), cke's one
core, RSS, or the ``status`` value against etcd's request limit (1.5 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cke.common.etcd import make_client
from cke.devenv import BedConfig, TestBed
from cke.devenv.deploy import Deployment
from cke.devenv.nodes import Node as BedNode
from cke.nodes.runtime import runtime_for
from cke.nodes.ssh import NodeConnection, SSHError
from cke.server.collect import node_status_script
from cke.storage import Status, Storage

SIZES = (25, 50, 100, 200)
MAX_NODES = 254  # one loopback /24: .1 to .254
INTERVAL = "2s"
SESSION_TTL = "10s"
WARM_ROUNDS = 5
# Rivers is started on every node before the steady rounds: 50 nodes per operation
# rather than 10 shortens the set-up; a steady round changes nothing either way.
SETUP_UPDATES = 50
FANOUT_PARALLEL = 64  # as NodePool's status_concurrency
MODEL_SIZES = (1000, 5000)
DEFAULT_INTERVAL = 60.0  # cke's --interval default (1m)
ETCD_REQUEST_LIMIT = int(1.5 * 1024 * 1024)  # etcd's --max-request-bytes default
ROUNDS_PER_DAY = 24 * 3600 / DEFAULT_INTERVAL
SYSTEMD_NOFILE = 1024  # systemd's default soft LimitNOFILE (cke.service sets none)
GOAL_WARM_100 = 3.0  # seconds per round, 100 nodes, warm connections
GOAL_RSS_1000 = 200 * 1024 * 1024  # bytes at 1,000 modelled nodes
GOAL_RATIO = 2.0  # cke's collection cost per node / the plain fan-out's
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

_COLLECTED = re.compile(
    r'msg="status collected" nodes=(\d+) reachable=(\d+) seconds=([0-9.]+) cpu=([0-9.]+)'
)
_DECIDED = re.compile(r"msg=decided phase=\S+ operations=(\d+)")


# -- /proc readings -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    """One look at a process (cke) and at the machine."""

    cpu: float  # the process's user + system CPU seconds
    machine_busy: float  # CPU seconds all cores spent not idle, since boot
    rss: int  # bytes
    fds: int
    ssh: int  # established TCP connections to port 22
    nofile: int  # the process's soft RLIMIT_NOFILE


def _machine_busy() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def _process_cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _ssh_connections(pid: int) -> tuple[int, int]:
    """(open fds, established TCP connections to port 22) of ``pid``."""
    inodes: set[str] = set()
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and f[2].endswith(":0016") and f[9] in inodes:
                count += 1
    return fds, count


def sample(pid: int) -> ProcSample:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    nofile = 0
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            nofile = int(line.split()[3])
    fds, ssh = _ssh_connections(pid)
    return ProcSample(_process_cpu(pid), _machine_busy(), rss, fds, ssh, nofile)


# -- cke's log ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    seconds: float  # collect() took
    nodes: int
    reachable: int
    cpu: float  # cke's CPU seconds meanwhile


class LogFollower:
    """Reads cke's log as it grows: ``status collected`` and ``decided`` lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.operations: list[int] = []  # ``operations=`` of each decided line read

    def skip(self) -> None:
        """Forget everything written so far."""
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.operations.clear()

    def _lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()

    async def next_round(self, timeout: float, nodes: int | None = None) -> Round:
        """The next ``status collected`` line (of ``nodes`` nodes, if given)."""
        deadline = time.monotonic() + timeout
        pending: list[str] = []
        while True:
            if not pending:
                pending = self._lines()
            while pending:
                line = pending.pop(0)
                if (d := _DECIDED.search(line)) is not None:
                    self.operations.append(int(d.group(1)))
                m = _COLLECTED.search(line)
                if m is not None and (nodes is None or int(m.group(1)) == nodes):
                    # Put the rest back: the file offset is past them already.
                    self._unread(pending)
                    return Round(
                        float(m.group(3)), int(m.group(1)), int(m.group(2)), float(m.group(4))
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no 'status collected' line in {self.path} within {timeout}s")
            await asyncio.sleep(0.02)

    def _unread(self, lines: list[str]) -> None:
        if lines:
            self.offset -= sum(len((line + "\n").encode()) for line in lines)


# -- the references -------------------------------------------------------------------------


@dataclass(frozen=True)
class FanOut:
    wall: float  # seconds for all N
    cpu: float  # client CPU seconds for all N (ssh processes, or this process)
    machine: float  # CPU seconds of the whole machine (clients, sshd, shells)
    failed: int


async def openssh_fanout(bed: TestBed, nodes: Sequence[BedNode]) -> FanOut:
    """``ssh node true`` to every node, one OpenSSH client process each, 64 at a time."""
    gate = asyncio.Semaphore(FANOUT_PARALLEL)
    failed = 0

    async def one(node: BedNode) -> None:
        nonlocal failed
        async with gate:
            proc = await asyncio.create_subprocess_exec(
                *bed.openssh_argv(node, "true"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await proc.wait() != 0:
                failed += 1

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = _machine_busy()
    t0 = time.monotonic()
    await asyncio.gather(*(one(n) for n in nodes))
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return FanOut(wall, cpu, _machine_busy() - busy, failed)


@dataclass(frozen=True)
class AsyncsshRefs:
    new: FanOut  # ``true``, a new connection per node
    kept: FanOut  # ``true`` again on the kept connections
    script: FanOut  # cke's node status script (``sh -s``) on the kept connections
    one_node: float  # seconds of that script on one node alone (the median of 5)


async def asyncssh_fanout(bed: TestBed, nodes: Sequence[BedNode]) -> AsyncsshRefs:
    """In this process, over asyncssh as cke: ``true`` on new connections, ``true`` and
    cke's status script on the kept ones, and that script on one node alone."""
    gate = asyncio.Semaphore(FANOUT_PARALLEL)
    key = bed.ssh_private_key
    conns = [n.connect(key) for n in nodes]
    script = node_status_script(runtime_for("process"))

    async def one(conn: NodeConnection, command: str, stdin: bytes | None) -> bool:
        async with gate:
            try:
                return (await conn.run(command, input=stdin, timeout=30)).ok
            except SSHError:
                return False

    async def fan_out(command: str, stdin: bytes | None = None) -> FanOut:
        cpu, busy, t0 = time.process_time(), _machine_busy(), time.monotonic()
        ok = await asyncio.gather(*(one(c, command, stdin) for c in conns))
        wall = time.monotonic() - t0
        return FanOut(wall, time.process_time() - cpu, _machine_busy() - busy, ok.count(False))

    try:
        new = await fan_out("true")
        kept = await fan_out("true")
        on_script = await fan_out("sh -s", script)
        alone = []
        for _ in range(5):
            t0 = time.monotonic()
            await conns[0].run("sh -s", input=script, timeout=30)
            alone.append(time.monotonic() - t0)
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return AsyncsshRefs(new, kept, on_script, statistics.median(alone))


# -- one size -------------------------------------------------------------------------------


@dataclass
class SizeResult:
    n: int
    settle: float = 0.0  # seconds from ``cluster set`` (grown to n) to ``completed``
    first_contact: float = 0.0  # collection seconds of the first round with the new nodes
    warm: list[float] = field(default_factory=list)  # collection seconds, steady rounds
    warm_cpu: list[float] = field(default_factory=list)  # cke CPU seconds while collecting
    round_period: float = 0.0  # seconds from one collection to the next, steady
    cpu_per_round: float = 0.0  # cke CPU seconds per steady round
    machine_per_round: float = 0.0  # the machine's busy CPU seconds per steady round
    at_rest: ProcSample | None = None  # cke after the steady rounds
    status_bytes: int = 0
    per_node_bytes: dict[str, int] = field(default_factory=dict)  # status fields by node
    cold: float = 0.0  # collection seconds of a restarted cke's first round
    openssh: FanOut | None = None
    asyncssh: AsyncsshRefs | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def warm_median(self) -> float:
        return statistics.median(self.warm) if self.warm else float("nan")


async def _wait_completed(storage: Storage, revision: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        st = await storage.get_status()
        if st is not None:
            last = st.phase
            if st.phase == "completed" and st.cluster_revision >= revision:
                return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the cluster did not complete within {timeout:.0f} s (phase {last!r})")


async def _status_size(storage: Storage) -> tuple[int, dict[str, int]]:
    """Bytes of the stored ``status`` value, and of its fields keyed by node."""
    got = await storage.get("status")
    if got.value is None:
        return 0, {}
    doc = json.loads(got.value)
    Status.from_json(got.value)  # it must stay readable
    per_node = {
        k: len(json.dumps(doc.get(k) or {})) for k in ("rivers", "certificates") if doc.get(k)
    }
    return len(got.value), per_node


@dataclass
class Run:
    """One bed of the largest size, one deployment; the cluster grows from size to size."""

    bed: TestBed
    deployment: Deployment
    storage: Storage
    follower: LogFollower


async def measure(run: Run, n: int, warm_rounds: int) -> SizeResult:
    """Grow the cluster to ``n`` nodes (1 control plane), wait until it is complete, then
    the steady rounds, the references (cke stopped) and a cold round (cke started)."""
    res = SizeResult(n)
    nodes = run.bed.nodes[:n]
    replica = run.deployment.replicas[0]
    follower, storage = run.follower, run.storage
    follower.skip()
    started = time.monotonic()
    result = await run.deployment.set_cluster(nodes[:1], nodes[1:])
    if result.returncode != 0:
        raise RuntimeError(f"ckecli cluster set: {result.stderr.strip()}")
    revision = (await storage.get_cluster()).mod_revision
    res.first_contact = (await follower.next_round(60 + n, nodes=n)).seconds
    await _wait_completed(storage, revision, 120 + 2 * n)
    res.settle = time.monotonic() - started

    # Steady rounds: nothing to do, connections kept.
    follower.skip()
    await follower.next_round(30 + n / 5, nodes=n)  # a round boundary
    follower.operations.clear()
    pid = replica.process.pid
    assert pid is not None
    before, t_before = sample(pid), time.monotonic()
    for _ in range(warm_rounds):
        r = await follower.next_round(30 + n / 5, nodes=n)
        res.warm.append(r.seconds)
        res.warm_cpu.append(r.cpu)
        if r.reachable < n:
            res.warnings.append(f"a steady round reached {r.reachable} of {n} nodes")
    after, t_after = sample(pid), time.monotonic()
    res.at_rest = after
    res.round_period = (t_after - t_before) / warm_rounds
    res.cpu_per_round = (after.cpu - before.cpu) / warm_rounds
    res.machine_per_round = (after.machine_busy - before.machine_busy) / warm_rounds
    if any(follower.operations):
        res.warnings.append("an operation ran during the steady rounds")
    res.status_bytes, res.per_node_bytes = await _status_size(storage)

    # The references, with cke stopped (its connections closed).
    await replica.stop()
    res.openssh = await openssh_fanout(run.bed, nodes)
    res.asyncssh = refs = await asyncssh_fanout(run.bed, nodes)
    for name, f in (
        ("ssh", res.openssh),
        ("asyncssh", refs.new),
        ("asyncssh kept", refs.kept),
        ("asyncssh status script", refs.script),
    ):
        if f.failed:
            res.warnings.append(f"{name} fan-out: {f.failed} of {n} failed")

    # Cold: the first round of a new cke process (host keys are pinned already).
    follower.skip()
    await replica.start()
    cold = await follower.next_round(60 + n, nodes=n)
    res.cold = cold.seconds
    if cold.reachable < n:
        res.warnings.append(f"the cold round reached {cold.reachable} of {n} nodes")
    return res


# -- the report -----------------------------------------------------------------------------


def _fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b * n``; (a, b). One point: through the origin."""
    if len(points) == 1:
        n, y = points[0]
        return 0.0, y / n
    ns = [p[0] for p in points]
    ys = [p[1] for p in points]
    mn, my = statistics.fmean(ns), statistics.fmean(ys)
    var = sum((x - mn) ** 2 for x in ns)
    b = sum((x - mn) * (y - my) for x, y in zip(ns, ys, strict=True)) / var
    return my - b * mn, b


def _reached_at(fit: tuple[float, float], limit: float) -> float:
    a, b = fit
    return (limit - a) / b if b > 0 else float("inf")


def _ms(seconds: float, n: int) -> str:
    return f"{seconds / n * 1000:.1f} ms/node"


def report_size(r: SizeResult) -> None:
    assert r.openssh and r.asyncssh and r.at_rest
    n = r.n
    print(f"N={n}: cluster set -> completed (rivers on every node) in {r.settle:.1f} s")
    print(
        f"  collection per round: first with the new nodes {r.first_contact:.2f} s, "
        f"cold {r.cold:.2f} s, "
        f"warm {r.warm_median:.2f} s (median of {len(r.warm)}, "
        f"{min(r.warm):.2f}-{max(r.warm):.2f}; {_ms(r.warm_median, n)}); "
        f"a round every {r.round_period:.2f} s"
    )
    s = r.at_rest
    collect_cpu = statistics.median(r.warm_cpu)
    print(
        f"  cke: {r.cpu_per_round:.3f} CPU s/round ({_ms(r.cpu_per_round, n)}; of which "
        f"collecting {collect_cpu:.3f} s, {_ms(collect_cpu, n)}), "
        f"RSS {s.rss / MIB:.1f} MiB, {s.fds} fds (soft limit {s.nofile}), "
        f"{s.ssh} SSH connections kept; the machine {r.machine_per_round:.2f} CPU s/round"
    )
    fields = ", ".join(f"{k} {v} B" for k, v in r.per_node_bytes.items())
    print(f"  status value: {r.status_bytes} B ({fields})")
    o, a = r.openssh, r.asyncssh
    print(
        f"  reference `ssh node true` x{n}, {FANOUT_PARALLEL} at a time: {o.wall:.2f} s "
        f"({_ms(o.wall, n)}; ssh clients {_ms(o.cpu, n)} CPU, machine {_ms(o.machine, n)} CPU)"
    )
    print(
        f"  reference asyncssh: `true` on new connections {a.new.wall:.2f} s "
        f"({_ms(a.new.cpu, n)} CPU), on kept ones {a.kept.wall:.2f} s ({_ms(a.kept.cpu, n)} "
        f"CPU); cke's status script on kept ones {a.script.wall:.2f} s "
        f"({_ms(a.script.cpu, n)} CPU), on one node alone {a.one_node * 1000:.0f} ms"
    )
    print(
        f"  ratios: cold/ssh {r.cold / o.wall:.2f}x, warm/ssh {r.warm_median / o.wall:.2f}x, "
        f"warm/asyncssh-script {r.warm_median / a.script.wall:.2f}x; cke CPU per node per "
        f"round / ssh client CPU {r.cpu_per_round / o.cpu:.2f}x; cke CPU collecting / "
        f"asyncssh script CPU {collect_cpu / a.script.cpu:.2f}x"
    )
    for w in r.warnings:
        print(f"  WARNING: {w}")
    sys.stdout.flush()


def report_all(results: list[SizeResult]) -> int:
    print()
    print(
        "    N  grown   cold   warm  conns  CPU/round     RSS   fds  status  ssh-true  "
        "cold/ssh  warm/ssh"
    )
    for r in results:
        assert r.openssh and r.at_rest
        print(
            f"{r.n:5d} {r.first_contact:5.2f}s {r.cold:5.2f}s {r.warm_median:5.2f}s "
            f"{r.at_rest.ssh:6d} {r.cpu_per_round:8.3f}s {r.at_rest.rss / MIB:6.1f}M "
            f"{r.at_rest.fds:5d} {r.status_bytes:6d}B {r.openssh.wall:8.2f}s "
            f"{r.cold / r.openssh.wall:8.2f}x {r.warm_median / r.openssh.wall:8.2f}x"
        )
    fits = {
        "warm": _fit([(r.n, r.warm_median) for r in results]),
        "cpu": _fit([(r.n, r.cpu_per_round) for r in results]),
        "rss": _fit([(r.n, r.at_rest.rss) for r in results if r.at_rest]),
        "fds": _fit([(r.n, r.at_rest.fds) for r in results if r.at_rest]),
        "status": _fit([(r.n, r.status_bytes) for r in results]),
        "cold": _fit([(r.n, r.cold) for r in results]),
    }
    one_node = statistics.median(r.asyncssh.one_node for r in results if r.asyncssh)
    # CPU of a new asyncssh connection (key exchange, login) plus one command, per node.
    connect_cpu = statistics.median(r.asyncssh.new.cpu / r.n for r in results if r.asyncssh)

    def at(name: str, n: float) -> float:
        a, b = fits[name]
        return a + b * n

    def real(n: float) -> float:
        """A warm round with every node on its own machine: cke's one core, or the
        script's latency times the waves of 64, whichever is longer."""
        return max(at("cpu", n), -(-n // FANOUT_PARALLEL) * one_node)

    print()
    print(
        f"model (least squares a + b*N over the sizes above): per node and round "
        f"{fits['warm'][1] * 1000:.2f} ms of collection on this bed, "
        f"{fits['cpu'][1] * 1000:.2f} ms of cke CPU, {fits['rss'][1] / 1024:.1f} KiB of RSS, "
        f"{fits['fds'][1]:.2f} fds, {fits['status'][1]:.1f} B of status; fixed: "
        f"RSS {fits['rss'][0] / MIB:.0f} MiB, {fits['fds'][0]:.0f} fds"
    )
    for m in MODEL_SIZES:
        print(
            f"  {m} nodes: warm round {at('warm', m):.1f} s on this bed (2 cores for cke and "
            f"every node), about {real(m):.1f} s with nodes on their own machines (cke CPU "
            f"{at('cpu', m):.1f} s/round = {at('cpu', m) / DEFAULT_INTERVAL:.0%} of a core at "
            f"--interval 1m; script {one_node * 1000:.0f} ms x {-(-m // FANOUT_PARALLEL)} "
            f"waves of {FANOUT_PARALLEL}); RSS {at('rss', m) / MIB:.0f} MiB; "
            f"{at('fds', m):.0f} fds; status {at('status', m) / 1024:.0f} KiB "
            f"({at('status', m) / ETCD_REQUEST_LIMIT:.1%} of etcd's 1.5 MiB; written every "
            f"round: {at('status', m) * ROUNDS_PER_DAY / MIB:.0f} MiB/day of etcd history at "
            f"--interval 1m until compacted); cold round "
            f"(after a failover) {at('cold', m):.0f} s on this bed, at least "
            f"{connect_cpu * m:.0f} s of cke CPU for the new connections"
        )
    limits = sorted(
        [
            (
                _reached_at(fits["fds"], SYSTEMD_NOFILE),
                f"file descriptors: systemd's default soft limit {SYSTEMD_NOFILE} "
                "(cke.service sets no LimitNOFILE; one fd per kept SSH connection)",
            ),
            (_reached_at(fits["rss"], GOAL_RSS_1000), "RSS reaches 200 MiB"),
            (
                _reached_at(fits["cpu"], DEFAULT_INTERVAL),
                "cke's one core: a round's CPU fills the 1m interval",
            ),
            (_reached_at(fits["status"], ETCD_REQUEST_LIMIT), "status value reaches 1.5 MiB"),
        ]
    )
    print("limits, in the order they are reached:")
    for n_at, what in limits:
        print(f"  ~{n_at:,.0f} nodes: {what}")

    by_n = {r.n: r for r in results}
    warm_100 = by_n[100].warm_median if 100 in by_n else at("warm", 100)
    rss_1000 = at("rss", 1000)
    ratio = max(r.cold / r.openssh.wall for r in results if r.openssh)
    ok = warm_100 <= GOAL_WARM_100 and rss_1000 <= GOAL_RSS_1000 and ratio <= GOAL_RATIO
    print(
        f"goals: 100 nodes warm <= {GOAL_WARM_100:.0f} s/round ({warm_100:.2f} s"
        f"{'' if 100 in by_n else ', modelled'}), RSS at 1,000 nodes <= 200 MiB "
        f"({rss_1000 / MIB:.0f} MiB, modelled), collection per node <= {GOAL_RATIO:.0f}x the "
        f"`ssh node true` fan-out (cold, worst size: {ratio:.2f}x): {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


def _raise_nofile(n: int) -> None:
    """The bed (sshd nodes, cke, references) needs a few fds per node."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 65536))
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 8 * n:
        raise SystemExit(f"RLIMIT_NOFILE {want} is too low for {n} nodes (ulimit -n)")


async def _bench(sizes: Sequence[int], warm_rounds: int) -> int:
    t0 = time.monotonic()
    bed = TestBed(BedConfig(etcd_members=1, nodes=max(sizes), vault=True))
    await bed.start()
    print(f"bed: {max(sizes)} sshd nodes up in {time.monotonic() - t0:.1f} s", flush=True)
    deployment = Deployment(
        bed,
        replicas=1,
        interval=INTERVAL,
        session_ttl=SESSION_TTL,
        extra=("--max-concurrent-updates", str(SETUP_UPDATES)),
    )
    client = make_client(bed.etcd.settings(deployment.prefix))
    results = []
    try:
        await deployment.setup()
        await client.connect()
        log = LogFollower(deployment.replicas[0].process.log_path)
        run = Run(bed, deployment, Storage(client, deployment.prefix), log)
        for n in sizes:
            res = await measure(run, n, warm_rounds)
            report_size(res)
            results.append(res)
    finally:
        await client.close()
        await deployment.stop()
        await bed.stop()
    return report_all(results)


def _sizes(text: str) -> list[int]:
    sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    if not sizes or sizes[0] < 2 or sizes[-1] > MAX_NODES:
        raise argparse.ArgumentTypeError(f"sizes between 2 and {MAX_NODES} (one /24 of loopback)")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cke.benchscale", description=__doc__)
    parser.add_argument("--sizes", type=_sizes, default=list(SIZES), help="node counts, 25,50")
    parser.add_argument("--warm-rounds", type=int, default=WARM_ROUNDS)
    args = parser.parse_args(argv)
    _raise_nofile(max(args.sizes))
    return asyncio.run(_bench(args.sizes, args.warm_rounds))


if __name__ == "__main__":
    sys.exit(main())
