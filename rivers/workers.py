"""``--workers N``: more processes accepting from one listening socket.

The main process binds the listener (so a port in use is a flag error, exit 2), then
serves as worker 0 and starts N-1 more workers with ``python -m rivers.main`` (or,
when rivers runs as the zipapp, ``python rivers.pyz``; see ``worker_command``) and
the same flags. The listening sockets are passed to them as inherited descriptors,
so all processes accept from one queue: whichever worker is free takes the next
connection (measured to balance and to keep the tail latency lower than one
``SO_REUSEPORT`` socket per worker, where the kernel hashes each connection to a
worker whether or not it is busy). Each worker has its own event loop, forwarding
and health checks, exactly like a single rivers.

Each extra worker gets a socketpair to the main process:

- ``/metrics`` and ``/health`` ask every worker for its counters over it (one line
  in, one JSON line out) and serve the totals;
- EOF on it tells the main process the worker died (it is restarted after a second,
  its connections are lost), and tells a worker that the main process died (it exits
  at once). ``PR_SET_PDEATHSIG`` (SIGKILL) is set too, so even a SIGKILLed main
  process leaves no worker behind.

SIGTERM/SIGINT to the main process: it forwards SIGTERM to the workers, and every
process closes its listener at once and drains its own connections for up to
``--shutdown-timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import zipimport

from cke.common.logs import get_logger
from rivers.proxy import Listener, Proxy, Snapshot, merge_snapshots

log = get_logger("rivers")

# Set in the environment of a worker: "LISTEN_FD,...;CONTROL_FD;MAIN_PID;INDEX".
WORKER_ENV = "RIVERS_WORKER"
PR_SET_PDEATHSIG = 1
RESTART_DELAY = 1.0
SCRAPE_TIMEOUT = 2.0


def auto_workers() -> int:
    """CPUs this process may run on, at most 4 (each worker costs ~20 MB)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def worker_command() -> list[str]:
    """How to start a worker: this interpreter, with the flags that decide where it
    imports from (``-I``, ``-S``...), running rivers from where this process found it.

    From the zipapp (``python3 -I -S rivers.pyz``, as cke ships it), ``-m rivers.main``
    would find no rivers: the worker runs the archive itself, whose ``__main__`` is
    ``rivers.main.main``. Installed, it stays ``python -m rivers.main``.
    """
    flags = sys.flags
    if flags.isolated:
        options = ["-I"]  # implies -E, -s and -P
    else:
        options = [
            opt
            for opt, on in (
                ("-E", flags.ignore_environment),
                ("-s", flags.no_user_site),
                ("-P", flags.safe_path),
            )
            if on
        ]
    if flags.no_site:
        options.append("-S")
    loader = __spec__.loader if __spec__ is not None else None
    if isinstance(loader, zipimport.zipimporter):
        return [sys.executable, *options, os.path.abspath(loader.archive)]
    return [sys.executable, *options, "-m", "rivers.main"]


class WorkerHandle:
    """The main process's side of one extra worker."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    async def snapshot(self) -> Snapshot | None:
        if self.writer is None or self.reader is None:
            return None
        async with self.lock:
            try:
                self.writer.write(b"s\n")
                async with asyncio.timeout(SCRAPE_TIMEOUT):
                    line = await self.reader.readline()
            except (OSError, TimeoutError):
                return None
        if not line:
            return None
        snap: Snapshot = json.loads(line)
        return snap


class Supervisor:
    """Starts, watches and restarts the extra workers; merges their counters."""

    def __init__(self, proxy: Proxy, count: int, argv: list[str]) -> None:
        self.proxy = proxy
        self.argv = argv
        self.handles = [WorkerHandle(i) for i in range(1, count)]
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for handle in self.handles:
            self._tasks.append(asyncio.create_task(self._run(handle)))

    async def _spawn(self, handle: WorkerHandle) -> None:
        parent_end, child_end = socket.socketpair()
        fds = self.proxy.listen_fds()
        env = dict(os.environ)
        env[WORKER_ENV] = (
            f"{','.join(map(str, fds))};{child_end.fileno()};{os.getpid()};{handle.index}"
        )
        try:
            handle.proc = await asyncio.create_subprocess_exec(
                *worker_command(),
                *self.argv,
                env=env,
                pass_fds=(*fds, child_end.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child_end.close()
        handle.reader, handle.writer = await asyncio.open_connection(sock=parent_end)

    async def _run(self, handle: WorkerHandle) -> None:
        while not self.stopping:
            try:
                await self._spawn(handle)
            except OSError as exc:
                log.error("cannot start worker", worker=handle.index, error=str(exc))
                await asyncio.sleep(RESTART_DELAY)
                continue
            assert handle.proc is not None
            code = await handle.proc.wait()
            if handle.writer is not None:
                handle.writer.close()
            handle.reader = handle.writer = None
            if self.stopping:
                return
            log.error(
                "worker died, restarting", worker=handle.index, pid=handle.proc.pid, code=code
            )
            await asyncio.sleep(RESTART_DELAY)

    async def snapshot(self) -> Snapshot:
        snaps = [self.proxy.snapshot()]
        for snap in await asyncio.gather(*(h.snapshot() for h in self.handles)):
            if snap is not None:
                snaps.append(snap)
        return merge_snapshots(snaps)

    def signal_workers(self) -> None:
        self.stopping = True
        for handle in self.handles:
            if handle.proc is not None and handle.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    handle.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> bool:
        """Wait for every worker to exit; SIGKILL the ones still running after timeout."""
        clean = True
        for handle in self.handles:
            proc = handle.proc
            if proc is None:
                continue
            try:
                async with asyncio.timeout(timeout):
                    code = await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                code = await proc.wait()
            # A worker that dies of SIGTERM got it before it set its handler (once set, it
            # drains and exits 0): it was still starting and had nothing to drain. Under
            # systemd a stop right after a start does this (every process gets SIGTERM).
            clean &= code in (0, -signal.SIGTERM)
        for task in self._tasks:
            task.cancel()
        return clean


# --- the worker side ---------------------------------------------------------------------


def parse_worker_env(value: str) -> tuple[list[int], int, int, int]:
    listen, control, main_pid, index = value.split(";")
    return [int(fd) for fd in listen.split(",")], int(control), int(main_pid), int(index)


def die_with_parent(main_pid: int) -> None:
    """SIGKILL this process when the main process dies (and if it already has, exit)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != main_pid:
        os._exit(1)


async def serve_worker(proxy: Proxy, listen_fds: list[int], control_fd: int, index: int) -> int:
    sockets: list[socket.socket] = [Listener(fileno=fd) for fd in listen_fds]
    await proxy.start(sockets)
    stop = asyncio.Event()
    orphaned = False
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=control_fd))
    parent = os.getppid()

    async def answer() -> None:
        nonlocal orphaned
        with contextlib.suppress(OSError):
            while await reader.readline():
                writer.write(json.dumps(proxy.snapshot()).encode() + b"\n")
        # The channel also closes when a live main process shuts down (its SIGTERM to
        # us may still be on its way): only a main process that is gone means orphaned.
        if not stop.is_set():
            orphaned = os.getppid() != parent
            stop.set()

    control = asyncio.create_task(answer())
    await stop.wait()
    # One signal is enough. Under systemd (KillMode=control-group) and on a Ctrl-C, a
    # worker gets it twice: from the sender and forwarded by the main process. The
    # second must not kill the worker once it has drained and its loop has restored
    # SIG_DFL: it would exit by SIGTERM, and the main process report an unclean stop.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)
    if orphaned:
        log.error("main process gone, worker exiting", worker=index)
        return 1
    await proxy.shutdown()
    control.cancel()
    writer.close()
    return 0
