"""Test-bed nodes: each an OpenSSH server with private node directories.

A node is a mount namespace held open by a small holder process, in which the
paths a manager writes (``NODE_PRIVATE_PATHS``) are bind mounts of the node's own
directories. sshd runs inside that namespace, so every command that arrives over
SSH, and every process it starts, sees only that node's files. Everything else
(binaries, /usr, the venv) is shared with the host, as on identical machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cke.devenv.procs import (
    LEDGER,
    ManagedProcess,
    mount_namespace,
    namespace_of,
    pid_alive,
    pids_in_namespace,
    wait_for_tcp,
)
from cke.nodes.ssh import CommandResult, NodeAddress, NodeConnection

# /root too: a node's login shell must not read the host's rc files (which may run
# tools such as pyenv, whose locks a crashed node would leave behind on the host).
NODE_PRIVATE_PATHS = ("/etc/cke", "/var/lib/cke", "/var/log/cke", "/opt/cke", "/root")
SSHD = "/usr/sbin/sshd"


def _mount_dir_name(path: str) -> str:
    return path.strip("/").replace("/", "-")


def address_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def pick_node_subnet(count: int, port: int = 22, preferred: str | None = None) -> str:
    """A loopback /24 prefix (``127.X.Y``) whose first ``count`` addresses are free on ``port``.

    The demo prefers ``127.0.1``; tests pick a random block so that several beds
    (a developer's and CI's, say) never meet.
    """
    candidates = [preferred] if preferred else []
    rng = random.Random()
    candidates += [f"127.{rng.randint(10, 250)}.{rng.randint(1, 250)}" for _ in range(50)]
    for prefix in candidates:
        if prefix and all(address_free(f"{prefix}.{i}", port) for i in range(1, count + 1)):
            return prefix
    raise RuntimeError(f"no free loopback block with {count} addresses on port {port}")


async def run_local(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {out.decode(errors='replace').strip()}")


async def make_ssh_key(path: Path, comment: str) -> None:
    """An ed25519 key pair at ``path`` (and ``path.pub``) unless one is there already."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    await run_local("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))


class Node:
    """What every test-bed node has: an address served by its own sshd, and pinned keys.

    ``ProcessNode`` and ``SystemdNode`` add the life cycle (start, crash, stop, sshd).
    """

    kind = "node"

    def __init__(
        self, name: str, address: str, directory: Path, client_public_key: str, port: int = 22
    ) -> None:
        self.name = name
        self.address = address
        self.port = port
        self.directory = directory
        self.client_public_key = client_public_key
        self.host_key_path = directory / "ssh_host_ed25519_key"
        self.log_dir = directory / "log"

    def private_dir(self, node_path: str) -> Path:
        """The host directory that backs ``node_path`` on this node."""
        raise NotImplementedError

    @property
    def host_public_key(self) -> str:
        """The node's host key in OpenSSH one-line form, for pinning."""
        return Path(f"{self.host_key_path}.pub").read_text().strip()

    async def _make_host_key(self) -> None:
        await make_ssh_key(self.host_key_path, f"{self.name}-host")

    def sshd_config_text(self, host_key: str, authorized_keys: str, pid_file: str) -> str:
        return "\n".join(
            [
                f"ListenAddress {self.address}:{self.port}",
                f"HostKey {host_key}",
                f"PidFile {pid_file}",
                f"AuthorizedKeysFile {authorized_keys}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "MaxSessions 64",
                "MaxStartups 100:30:200",
                # VERBOSE: one "Starting session: command ... port N" line per command,
                # so a test can tell which client sent what.
                "LogLevel VERBOSE",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )

    async def start(self) -> None:
        raise NotImplementedError

    async def start_sshd(self) -> None:
        raise NotImplementedError

    async def stop_sshd(self) -> None:
        raise NotImplementedError

    async def crash(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def processes(self) -> list[int]:
        raise NotImplementedError

    @property
    def up(self) -> bool:
        raise NotImplementedError

    async def restart(self) -> None:
        """Crash the node and boot it again with its files intact."""
        await self.crash()
        await self.start()

    # -- access ---------------------------------------------------------------------------

    @property
    def ssh_target(self) -> NodeAddress:
        return NodeAddress(self.address, self.port, "root")

    def connect(self, private_key: str) -> NodeConnection:
        """An SSH connection exactly like the manager's: key login, pinned host key."""
        return NodeConnection(self.ssh_target, private_key, self.host_public_key)

    async def run(self, private_key: str, command: str, timeout: float = 60.0) -> CommandResult:
        """Run one command on the node over SSH (a new connection each call)."""
        conn = self.connect(private_key)
        try:
            return await conn.run(command, timeout=timeout)
        finally:
            await conn.close()


class ProcessNode(Node):
    """A node that is a mount namespace with its own sshd (no init): fast, no systemd."""

    kind = "process"

    def __init__(
        self, name: str, address: str, directory: Path, client_public_key: str, port: int = 22
    ) -> None:
        super().__init__(name, address, directory, client_public_key, port)
        self.sshd_config = directory / "sshd_config"
        self._holder: ManagedProcess | None = None
        self._sshd: ManagedProcess | None = None
        self.namespace: str | None = None

    # -- set-up ---------------------------------------------------------------------------

    def private_dir(self, node_path: str) -> Path:
        """The host directory that backs ``node_path`` on this node."""
        return self.directory / "root" / _mount_dir_name(node_path)

    async def prepare(self) -> None:
        """Create the node's directories, host key and sshd configuration (once)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        for path in NODE_PRIVATE_PATHS:
            self.private_dir(path).mkdir(parents=True, exist_ok=True)
            # The mount point must exist on the host; it stays empty there.
            Path(path).mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        await self._make_host_key()
        authorized = self.directory / "authorized_keys"
        authorized.write_text(self.client_public_key.strip() + "\n")
        authorized.chmod(0o600)
        self.sshd_config.write_text(
            self.sshd_config_text(
                str(self.host_key_path), str(authorized), str(self.directory / "sshd.pid")
            )
        )

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the namespace (if not running) and sshd; wait until sshd listens."""
        await self.prepare()
        if self._holder is None or not self._holder.running:
            await self._start_holder()
        await self.start_sshd()

    async def _start_holder(self) -> None:
        mounts = " && ".join(
            f"mount --bind {shlex.quote(str(self.private_dir(p)))} {shlex.quote(p)}"
            for p in NODE_PRIVATE_PATHS
        )
        self._holder = ManagedProcess(
            f"{self.name}/namespace",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                f"{mounts} && exec sleep infinity",
            ],
            self.log_dir / "namespace.log",
        )
        await self._holder.start()
        assert self._holder.pid is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        own = mount_namespace(os.getpid())
        while True:
            ns = mount_namespace(self._holder.pid)
            comm = (
                Path(f"/proc/{self._holder.pid}/comm").read_text().strip()
                if pid_alive(self._holder.pid)
                else ""
            )
            if ns and ns != own and comm == "sleep":
                self.namespace = ns
                LEDGER.record_namespace(ns, self.name)
                return
            if not self._holder.running or loop.time() > deadline:
                raise RuntimeError(
                    f"{self.name}: node namespace did not come up: {self._holder.log_tail()}"
                )
            await asyncio.sleep(0.02)

    async def start_sshd(self) -> None:
        if self._holder is None or not self._holder.running or self._holder.pid is None:
            raise RuntimeError(f"{self.name} is down; start() it first")
        if self._sshd is None or not self._sshd.running:
            self._sshd = ManagedProcess(
                f"{self.name}/sshd",
                [
                    "nsenter",
                    f"--target={self._holder.pid}",
                    "--mount",
                    "--",
                    SSHD,
                    "-D",
                    "-e",
                    "-f",
                    str(self.sshd_config),
                ],
                self.log_dir / "sshd.log",
            )
            await self._sshd.start()
        await wait_for_tcp(self.address, self.port, 15, f"{self.name} sshd")

    async def stop_sshd(self) -> None:
        """Stop sshd and cut its open sessions; services on the node keep running.

        Open connections are cut too, so that the node is unreachable over SSH as
        after a network cut, not merely closed to new logins.
        """
        if self._sshd is not None:
            await self._sshd.stop()
        for pid in self.processes():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "sshd" or comm.startswith("sshd-"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @property
    def sshd_running(self) -> bool:
        return self._sshd is not None and self._sshd.running

    @property
    def up(self) -> bool:
        return self._holder is not None and self._holder.running

    def _holding(self) -> int | None:
        """The PID of the process holding the node's namespace, while it still does.

        The namespace is this node's only while its holder lives in it: once the last
        process leaves, the kernel may give its number to a new namespace (another node's,
        another bed's), whose processes a scan by number would then find and kill.
        """
        holder = self._holder
        if self.namespace is None or holder is None or holder.pid is None:
            return None
        if not holder.running or mount_namespace(holder.pid) != self.namespace:
            return None
        return holder.pid

    def processes(self) -> list[int]:
        """PIDs of every process running in this node (none once its holder is gone)."""
        if self._holding() is None or self.namespace is None:
            return []
        return pids_in_namespace(self.namespace)

    async def crash(self) -> None:
        """Kill every process of the node at once, as a power loss would. Files stay.

        The holder goes last, so that the namespace stays this node's while it is swept.
        """
        holder = self._holding()
        if holder is not None:
            for _ in range(20):
                pids = [pid for pid in self.processes() if pid != holder]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                await asyncio.sleep(0.05)
        for proc in (self._sshd, self._holder):
            if proc is not None:
                await proc.kill()

    async def stop(self) -> None:
        """Shut the node down for good (teardown): stop sshd, then kill what is left."""
        await self.stop_sshd()
        await self.crash()


# -- systemd nodes ----------------------------------------------------------------------------

# systemd-nspawn's exit status when the container asked for a reboot (systemd-nspawn(1)).
NSPAWN_REBOOT_STATUS = 133
# Units a node boots besides systemd's own: sshd only. Everything the host enables (its
# databases, timers, gettys) is dropped from the copied /etc.
NODE_WANTS = {"multi-user.target.wants": ("ssh.service",)}
MASKED_UNITS = (
    "console-getty.service",
    "getty@.service",
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_reap.service",
)
# Top-level directories of a node's root that start empty (the node's own).
EMPTY_ROOT_DIRS = ("usr", "var", "tmp", "root", "run", "opt", "home", "srv", "mnt", "media")


@dataclass(frozen=True)
class Bind:
    """A bind mount of a host path into a systemd node (``target`` inside the node)."""

    source: str
    target: str
    read_only: bool = True

    def nspawn_flag(self) -> str:
        option = "--bind-ro" if self.read_only else "--bind"
        return f"{option}={self.source}:{self.target}"


def host_software_binds() -> list[Bind]:
    """The host paths a node needs to run this project's programs: venv, its Python, source.

    Bound read-only at the same paths, so a spec or unit naming the venv's etcd or Python
    works inside a node as it does on the host (as identical machines would have them).
    """
    paths = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    paths.add(Path(__file__).resolve().parents[2])  # the project source (editable install)
    paths = {p for p in paths if not (p == Path("/usr") or Path("/usr") in p.parents)}
    # A path inside another bound path needs no bind of its own.
    kept = sorted(p for p in paths if not any(q in p.parents for q in paths))
    return [Bind(str(p), str(p)) for p in kept]


def _write_private(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


class SystemdNode(Node):
    """A node whose root is a systemd-nspawn container booting systemd as PID 1.

    The container shares the host's network (the node listens on its own loopback
    address) and its ``/usr`` (read-only); ``/etc`` is a trimmed copy of the host's, and
    ``/var``, ``/root``, ``/tmp``, ``/run`` and ``/opt`` are the node's own, so they
    survive a reboot as on a disk. sshd and journald run as units. ``reboot`` (or a
    ``systemctl reboot`` inside) boots it again; ``crash`` kills PID 1, which takes every
    process of the container with it at once, as a power cut does.
    """

    kind = "systemd"

    def __init__(
        self,
        name: str,
        address: str,
        directory: Path,
        client_public_key: str,
        port: int = 22,
        binds: Sequence[Bind] = (),
    ) -> None:
        super().__init__(name, address, directory, client_public_key, port)
        self.root = directory / "root"
        self.host_key_path = self.root / "etc/ssh/ssh_host_ed25519_key"
        self.binds = [*host_software_binds(), *binds]
        # Unique among live beds: addresses are picked free.
        self.machine = "cke-" + address.replace(".", "-")
        self._nspawn: ManagedProcess | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._booted = asyncio.Event()
        self._wanted_up = False
        self.init_pid: int | None = None
        self.pid_namespace: str | None = None
        self.boots: list[float] = []  # seconds from nspawn start to sshd answering
        self.exits: list[int] = []  # systemd-nspawn's exit status of each past boot

    def private_dir(self, node_path: str) -> Path:
        return self.root / node_path.strip("/")

    # -- image ------------------------------------------------------------------------------

    def _make_image(self) -> None:
        """The node's root: empty dirs, symlinks into /usr, a trimmed copy of /etc (once)."""
        if (self.root / "etc/os-release").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for d in EMPTY_ROOT_DIRS:
            (self.root / d).mkdir(exist_ok=True)
        (self.root / "root").chmod(0o700)
        (self.root / "tmp").chmod(0o1777)
        for link in ("bin", "sbin", "lib", "lib64"):
            if Path(f"/usr/{link}").exists() and not (self.root / link).is_symlink():
                (self.root / link).symlink_to(f"usr/{link}")
        etc = self.root / "etc"
        shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
        # nspawn checks for os-release before /usr is mounted: a file, not the host's link.
        (etc / "os-release").unlink(missing_ok=True)
        shutil.copyfile("/usr/lib/os-release", etc / "os-release")
        # Never the host's SSH host keys, machine id or enabled services.
        for key in (etc / "ssh").glob("ssh_host_*"):
            key.unlink()
        units = etc / "systemd/system"
        for wants in units.glob("*.wants"):
            shutil.rmtree(wants)
        for target, names in NODE_WANTS.items():
            (units / target).mkdir(parents=True, exist_ok=True)
            for unit in names:
                (units / target / unit).symlink_to(f"/lib/systemd/system/{unit}")
        for unit in MASKED_UNITS:
            (units / unit).unlink(missing_ok=True)
            (units / unit).symlink_to("/dev/null")
        _write_private(etc / "machine-id", os.urandom(16).hex() + "\n", 0o444)
        _write_private(etc / "hostname", self.name + "\n", 0o644)
        _write_private(etc / "hosts", f"127.0.0.1 localhost\n{self.address} {self.name}\n", 0o644)

    async def prepare(self) -> None:
        """The image (once), the host key (again if removed), authorized key, sshd config."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._make_image)
        await self._make_host_key()
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        _write_private(ssh_dir / "authorized_keys", self.client_public_key.strip() + "\n", 0o600)
        _write_private(
            self.root / "etc/ssh/sshd_config",
            self.sshd_config_text(
                "/etc/ssh/ssh_host_ed25519_key", "/root/.ssh/authorized_keys", "/run/sshd.pid"
            ),
            0o644,
        )

    # -- life cycle -------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.init_pid is not None and pid_alive(self.init_pid)

    async def start(self) -> None:
        """Boot the node (power on) if it is off, start sshd if it is not; wait for sshd."""
        await self.prepare()
        if self._supervisor is None or self._supervisor.done():
            self._wanted_up = True
            self._booted.clear()
            self._supervisor = asyncio.create_task(self._supervise(), name=f"{self.name}/nspawn")
        await self._wait_booted(60)
        await self.start_sshd()

    async def _wait_booted(self, timeout: float) -> None:
        assert self._supervisor is not None
        booted = asyncio.create_task(self._booted.wait())
        done, _ = await asyncio.wait(
            {booted, self._supervisor}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        booted.cancel()
        if self._booted.is_set():
            return
        tail = self._nspawn.log_tail() if self._nspawn else ""
        if self._supervisor in done:
            self._supervisor.result()  # raises what stopped it
            raise RuntimeError(f"{self.name} powered off while booting:\n{tail}")
        raise TimeoutError(f"{self.name} did not boot within {timeout}s:\n{tail}")

    async def _supervise(self) -> None:
        """Run the container; boot it again when it exits asking for a reboot."""
        while self._wanted_up:
            started = asyncio.get_running_loop().time()
            cgroups = _own_cgroups(self.machine)
            # Enter the node's own cgroups, then become nspawn (same PID, in the ledger).
            enter = 'for cg in "$@"; do [ "$cg" = -- ] && break; echo $$ > "$cg/cgroup.procs"; done'
            self._nspawn = ManagedProcess(
                f"{self.name}/nspawn",
                [
                    "sh",
                    "-c",
                    f'{enter}; while [ "$1" != -- ]; do shift; done; shift; exec "$@"',
                    "sh",
                    *(str(cg) for cg in cgroups),
                    "--",
                    "systemd-nspawn",
                    "--quiet",
                    "--register=no",
                    "--keep-unit",
                    "--boot",
                    f"--directory={self.root}",
                    f"--machine={self.machine}",
                    "--console=read-only",
                    "--bind-ro=/usr",
                    *(b.nspawn_flag() for b in self.binds),
                ],
                self.log_dir / "console.log",
            )
            await self._nspawn.start()
            assert self._nspawn.proc is not None and self._nspawn.pid is not None
            try:
                await self._found_init(self._nspawn.pid)
                await wait_for_tcp(self.address, self.port, 60, f"{self.name} sshd")
                self.boots.append(asyncio.get_running_loop().time() - started)
                self._booted.set()
            except (RuntimeError, TimeoutError):
                await self._kill_init()
                await self._nspawn.kill()
                raise
            status = await self._nspawn.proc.wait()
            self.exits.append(status)
            self._booted.clear()
            self.init_pid = None
            _remove_cgroups(cgroups)
            if status != NSPAWN_REBOOT_STATUS:
                self._wanted_up = False

    async def _found_init(self, nspawn_pid: int) -> None:
        """Wait for the container's PID 1 (nspawn's child running systemd); note its pid ns."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        own = namespace_of(os.getpid(), "pid")
        while loop.time() < deadline:
            for pid in _children(nspawn_pid):
                ns = namespace_of(pid, "pid")
                if ns is not None and ns != own:
                    self.init_pid = pid
                    self.pid_namespace = ns
                    LEDGER.record_namespace(ns, self.name)
                    return
            if not pid_alive(nspawn_pid):
                break
            await asyncio.sleep(0.02)
        raise RuntimeError(f"{self.name}: the container's init did not appear")

    def processes(self) -> list[int]:
        """PIDs of every process of the node (its PID namespace), init included; none
        once init is gone (the kernel may give the namespace's number to a new one)."""
        init = self.init_pid
        if self.pid_namespace is None or init is None:
            return []
        if namespace_of(init, "pid") != self.pid_namespace:
            return []
        return pids_in_namespace(self.pid_namespace)

    async def exec(self, *argv: str, timeout: float = 60.0) -> CommandResult:
        """Run ``argv`` inside the node as root, without SSH (as on its console)."""
        if self.init_pid is None:
            raise RuntimeError(f"{self.name} is not running")
        proc = await asyncio.create_subprocess_exec(
            "nsenter",
            f"--target={self.init_pid}",
            "--mount",
            "--uts",
            "--ipc",
            "--pid",
            "--",
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
            raise
        assert proc.returncode is not None
        return CommandResult(proc.returncode, out, err)

    async def start_sshd(self) -> None:
        if not self.up:
            raise RuntimeError(f"{self.name} is down; start() it first")
        result = await self.exec("systemctl", "start", "ssh.service")
        if not result.ok:
            raise RuntimeError(f"{self.name}: cannot start sshd: {result.stderr.decode().strip()}")
        await wait_for_tcp(self.address, self.port, 15, f"{self.name} sshd")

    async def stop_sshd(self) -> None:
        """Stop sshd and cut its open sessions; the node and its services keep running."""
        if not self.up:
            return
        await self.exec("systemctl", "stop", "ssh.service")
        for pid in self.processes():
            comm = _comm(pid)
            if comm == "sshd" or comm.startswith("sshd-"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    @property
    def sshd_running(self) -> bool:
        return any(_comm(pid) == "sshd" for pid in self.processes())

    async def reboot(self, timeout: float = 60.0) -> None:
        """``systemctl reboot`` inside; returns when the node is back and sshd answers."""
        before = len(self.boots)
        result = await self.exec("systemctl", "reboot")
        if not result.ok:
            raise RuntimeError(f"{self.name}: reboot failed: {result.stderr.decode().strip()}")
        await self.wait_for_boot(before, timeout)

    async def wait_for_boot(self, boots_before: int, timeout: float = 60.0) -> None:
        """Wait until the node booted again after ``boots_before`` boots (a reboot from
        inside, by anyone) and its sshd answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.boots) <= boots_before or not self._booted.is_set():
            if self._supervisor is None or self._supervisor.done() or loop.time() > deadline:
                raise RuntimeError(f"{self.name} did not come back from a reboot")
            await asyncio.sleep(0.05)

    async def _kill_init(self) -> None:
        """SIGKILL PID 1 of the container: the kernel kills every process in it at once."""
        if self.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        for _ in range(500):  # 10 s
            if not self.processes():
                break
            await asyncio.sleep(0.02)

    async def crash(self) -> None:
        """Power cut: every process of the node dies at once, no shutdown. Files stay."""
        self._wanted_up = False
        await self._kill_init()
        await self._stopped(10)

    async def power_off(self, timeout: float = 60.0) -> None:
        """``systemctl poweroff`` inside: a clean shutdown; the node stays off."""
        self._wanted_up = False
        if self.up:
            await self.exec("systemctl", "poweroff")
        await self._stopped(timeout)

    async def stop(self) -> None:
        """Shut the node down for good (teardown): a clean halt, then a power cut if stuck."""
        self._wanted_up = False
        if self._nspawn is not None and self._nspawn.running:
            # SIGTERM makes systemd-nspawn ask the container's systemd to halt.
            await self._nspawn.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await self._stopped(30)
        await self.crash()
        # nspawn's (empty) mount-propagation directory on the host, left after a power cut.
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/systemd/nspawn/propagate/{self.machine}")

    async def _stopped(self, timeout: float) -> None:
        if self._supervisor is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._supervisor), timeout)
            except TimeoutError:
                raise
            except Exception:  # a boot that failed is stopped too; start() reported it
                pass
        if self._nspawn is not None and self._nspawn.running:
            await self._nspawn.kill()

    def memory(self) -> dict[str, int]:
        """Bytes the node's processes use: ``rss`` (summed) and ``pss`` (shared pages split)."""
        totals = {"rss": 0, "pss": 0}
        for pid in self.processes():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("Rss", "Pss"):
                        totals[key.lower()] += int(value.split()[0]) * 1024
        return totals


def _own_cgroups(machine: str) -> list[Path]:
    """A cgroup of the node's own in each hierarchy systemd uses (created, empty).

    systemd-nspawn with ``--keep-unit`` puts the container in ``payload/`` under the
    cgroup it was started in. Started side by side from one cgroup, containers would
    share it, and one container's systemd would remove the cgroups another one is
    starting a unit in ("Failed at step CGROUP": a unit fails at random, the node boots
    degraded). So each node starts from a cgroup of its own.
    """
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            root = Path("/sys/fs/cgroup/systemd")
        elif controllers == "":
            unified = Path("/sys/fs/cgroup/unified")
            root = unified if unified.is_dir() else Path("/sys/fs/cgroup")
        else:
            continue
        group = root / path.lstrip("/") / f"cke-node-{machine}"
        group.mkdir(parents=True, exist_ok=True)
        found.append(group)
    return found


def _remove_cgroups(groups: Sequence[Path]) -> None:
    """Remove the node's (now empty) cgroups, innermost first."""
    for group in groups:
        if not group.is_dir():
            continue
        for sub in sorted((d for d in group.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            group.rmdir()


def _comm(pid: int) -> str:
    """The process's command name ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
