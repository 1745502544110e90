"""Processes the test bed starts: spawning, stopping, and a ledger of every PID.

The ledger lets a test suite prove that nothing the bed started outlives it.
A PID is remembered with its kernel start time so that a recycled PID is never
mistaken for ours, and never killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after the last ')' are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True while the process runs and is not a zombie (and is the same process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


def namespace_of(pid: int, kind: str = "mnt") -> str | None:
    """The process's namespace of ``kind`` as the kernel names it (``mnt:[N]``, ``pid:[N]``)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def mount_namespace(pid: int) -> str | None:
    return namespace_of(pid, "mnt")


def pids_in_namespace(namespace: str) -> list[int]:
    """Every live process in ``namespace`` (``mnt:[N]`` or ``pid:[N]``, as ``namespace_of``)."""
    kind = namespace.split(":", 1)[0]
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and namespace_of(int(entry), kind) == namespace:
            pid = int(entry)
            if pid_alive(pid):
                found.append(pid)
    return found


@dataclass(frozen=True)
class LedgerEntry:
    pid: int
    start_time: int | None
    name: str


class ProcessLedger:
    """Everything the bed started in this Python process: PIDs and node namespaces."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []
        self.namespaces: dict[str, str] = {}

    def record(self, pid: int, name: str) -> None:
        self.entries.append(LedgerEntry(pid, proc_start_time(pid), name))

    def record_namespace(self, namespace: str, name: str) -> None:
        self.namespaces[namespace] = name

    def leftovers(self) -> list[str]:
        """Descriptions of recorded processes still alive, and of processes in node namespaces."""
        alive = [f"{e.name} (pid {e.pid})" for e in self.entries if pid_alive(e.pid, e.start_time)]
        for namespace, name in self.namespaces.items():
            alive += [f"{name}: pid {p} in {namespace}" for p in pids_in_namespace(namespace)]
        return alive


LEDGER = ProcessLedger()


class ManagedProcess:
    """One long-running child process whose output goes to a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A new session: Ctrl-C in the terminal reaches the bed's owner only,
            # which then stops every child in order.
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        LEDGER.record(self.proc.pid, self.name)

    async def send_signal(self, sig: int) -> None:
        if self.running and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the process, wait up to ``timeout``, then SIGKILL it. Returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            await self.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await self.send_signal(signal.SIGKILL)
                await self.proc.wait()
        return self.proc.returncode

    async def kill(self) -> None:
        await self.stop(timeout=5.0, sig=signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_for_tcp(host: str, port: int, timeout: float, what: str) -> None:
    """Wait until something accepts TCP connections on host:port."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        except (OSError, TimeoutError) as exc:
            if loop.time() > deadline:
                raise TimeoutError(f"{what} did not listen on {host}:{port}: {exc}") from exc
            await asyncio.sleep(0.05)
