"""The process runtime on real sshd nodes: start, status, restart, stop, over SSH.

Tests on the shared ``bed`` use service names of their own and stop what they start;
the one that stops sshd uses a bed of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from cke.devenv import TestBed
from cke.devenv.nodes import Node
from cke.devenv.procs import pid_alive
from cke.nodes.runtime import (
    DEFAULT_PATH,
    NodeFile,
    ProcessRuntime,
    ServiceSpec,
    ServiceState,
    run_script,
)
from cke.nodes.ssh import NodeConnection
from tests.conftest import BedFactory

RT = ProcessRuntime()
KEY = b"-----BEGIN PRIVATE KEY-----\nnot really a key\n-----END PRIVATE KEY-----\n"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def conn(bed: TestBed) -> AsyncIterator[NodeConnection]:
    connection = bed.nodes[0].connect(bed.ssh_private_key)
    try:
        yield connection
    finally:
        await connection.close()


async def status(conn: NodeConnection, name: str) -> ServiceState:
    result = await run_script(conn, RT.status_script([name]))
    return RT.parse_status(result.stdout, [name])[name]


async def sh(conn: NodeConnection, command: str) -> str:
    result = await conn.run(command)
    assert result.ok, result.stderr
    return result.stdout.decode()


def sleeper(name: str, seconds: int = 1000, **kwargs: object) -> ServiceSpec:
    return ServiceSpec(name, "/usr/bin/sleep", (str(seconds),), **kwargs)  # type: ignore[arg-type]


async def test_start_writes_files_and_runs_with_exactly_the_spec_env(
    bed: TestBed, conn: NodeConnection
) -> None:
    name = unique("rt-start")
    env = (("CKE_A", "x y"), ("CKE_B", "$HOME'\"\\ %s"))
    files = (
        NodeFile(f"/etc/cke/{name}/server.key", KEY, 0o600),
        NodeFile(f"/etc/cke/{name}/server.crt", b"certificate\n"),
    )
    spec = sleeper(name, env=env, files=files)
    await run_script(conn, RT.start_script(spec))

    state = await status(conn, name)
    assert state.running and state.digest == spec.digest() and not state.outdated(spec)
    assert state.pid is not None
    # $! was the service itself, not a setsid or shell that went on to fork it.
    assert (await sh(conn, f"readlink /proc/{state.pid}/exe")).strip() == "/usr/bin/sleep"
    assert (await sh(conn, f"head -n 1 {RT.pidfile(name)}")).strip() == str(state.pid)
    environ = await sh(conn, f"cat /proc/{state.pid}/environ")
    assert sorted(environ.split("\0")[:-1]) == sorted(
        [f"{k}={v}" for k, v in env] + [f"PATH={DEFAULT_PATH}"]
    )
    # Its own session, so nothing of the SSH session (or sshd) takes it along.
    sid = (await sh(conn, f"ps -o sid= -p {state.pid}")).strip()
    assert sid == str(state.pid)

    listing = await sh(conn, f"stat -c '%a %n' /etc/cke/{name}/* && cat /etc/cke/{name}/server.key")
    assert listing.startswith(f"644 /etc/cke/{name}/server.crt\n600 /etc/cke/{name}/server.key\n")
    assert listing.endswith(KEY.decode())
    assert await sh(conn, f"ls -A /etc/cke/{name} | grep -c cke-tmp || true") == "0\n"
    record = await sh(
        conn, f"stat -c %a /var/lib/cke/specs/{name}.json; cat /var/lib/cke/specs/{name}.json"
    )
    assert record.startswith("600\n") and "not really a key" not in record
    # The files exist on that node only.
    other = await bed.run(bed.nodes[1], f"test -e /etc/cke/{name}; echo $?")
    assert other.stdout == b"1\n"

    # Starting again with the same spec leaves the running service alone.
    await run_script(conn, RT.start_script(spec))
    assert (await status(conn, name)).pid == state.pid

    await run_script(conn, RT.stop_script(name))
    assert not pid_alive(state.pid)
    stopped = await status(conn, name)
    assert stopped == ServiceState(name, running=False, digest=spec.digest(), pid=None)
    await run_script(conn, RT.stop_script(name))  # stopping a stopped service succeeds
    await sh(conn, f"rm -rf /etc/cke/{name}")


async def test_status_of_unknown_services_and_stop_of_one(conn: NodeConnection) -> None:
    names = [unique("rt-never"), unique("rt-never")]
    result = await run_script(conn, RT.status_script(names))
    states = RT.parse_status(result.stdout, names)
    assert states == {n: ServiceState(n, running=False, digest=None) for n in names}
    await run_script(conn, RT.stop_script(names[0]))


async def test_changed_spec_is_outdated_and_start_restarts_it(conn: NodeConnection) -> None:
    name = unique("rt-restart")
    first, second = sleeper(name, 1000), sleeper(name, 1001)
    await run_script(conn, RT.start_script(first))
    before = await status(conn, name)
    assert before.running and before.outdated(second) and not before.outdated(first)

    await run_script(conn, RT.start_script(second))
    after = await status(conn, name)
    assert after.running and after.digest == second.digest() and not after.outdated(second)
    assert before.pid is not None and after.pid is not None and after.pid != before.pid
    assert not pid_alive(before.pid)
    assert (await sh(conn, f"cat /proc/{after.pid}/cmdline")).split("\0")[1] == "1001"
    await run_script(conn, RT.stop_script(name))


async def test_killed_service_shows_not_running_and_start_brings_it_back(
    conn: NodeConnection,
) -> None:
    name = unique("rt-kill")
    spec = sleeper(name)
    await run_script(conn, RT.start_script(spec))
    killed = await status(conn, name)
    assert killed.pid is not None
    await sh(conn, f"kill -9 {killed.pid}")
    for _ in range(50):  # the reaper may take a moment; a zombie already counts as dead
        state = await status(conn, name)
        if not state.running:
            break
        await asyncio.sleep(0.05)
    assert state == ServiceState(name, running=False, digest=spec.digest(), pid=None)
    assert not state.outdated(spec)  # not running: for the caller to start, not restart

    await run_script(conn, RT.start_script(spec))
    again = await status(conn, name)
    assert again.running and again.pid != killed.pid
    await run_script(conn, RT.stop_script(name))


async def test_a_wrapper_that_execs_another_binary_counts_as_running(
    conn: NodeConnection,
) -> None:
    # Like the venv's etcd: a script that execs the real program, so /proc/PID/exe is not
    # the spec's binary. The wrapper is itself one of the spec's files (written first).
    name = unique("rt-wrapper")
    wrapper = f"/opt/cke/{name}/run"
    spec = ServiceSpec(
        name,
        wrapper,
        ("1000",),
        files=(NodeFile(wrapper, b'#!/bin/sh\nexec /usr/bin/sleep "$@"\n', 0o755),),
    )
    await run_script(conn, RT.start_script(spec))
    state = await status(conn, name)
    assert state.running and state.digest == spec.digest() and state.pid is not None
    assert (await sh(conn, f"readlink /proc/{state.pid}/exe")).strip() == "/usr/bin/sleep"
    await run_script(conn, RT.stop_script(name))
    assert not pid_alive(state.pid)
    await sh(conn, f"rm -rf /opt/cke/{name}")


async def test_start_of_a_binary_that_exits_at_once_fails_with_its_log(
    bed: TestBed, conn: NodeConnection
) -> None:
    name = unique("rt-fail")
    spec = ServiceSpec(name, "/bin/sh", ("-c", "echo 'boom: no config' >&2; exit 3"))
    with pytest.raises(RuntimeError) as failed:
        await run_script(conn, RT.start_script(spec))
    message = str(failed.value)
    assert message.splitlines()[0] == (
        f"{bed.nodes[0].address}: cke: {name} (/bin/sh) exited right after start; log:"
    )
    assert "boom: no config" in message
    assert (await status(conn, name)).running is False

    missing = ServiceSpec(unique("rt-missing"), "/nonexistent/bin/service")
    with pytest.raises(RuntimeError, match="exited right after start"):
        await run_script(conn, RT.start_script(missing))


async def test_stop_kills_a_service_that_ignores_sigterm(conn: NodeConnection) -> None:
    name = unique("rt-stubborn")
    # A shell that ignores SIGTERM, with a child in its process group.
    spec = ServiceSpec(name, "/bin/sh", ("-c", "trap '' TERM; sleep 1000 & wait; sleep 1000"))
    await run_script(conn, RT.start_script(spec))
    state = await status(conn, name)
    assert state.running and state.pid is not None
    group = (await sh(conn, f"pgrep -g {state.pid}")).split()
    assert len(group) == 2
    result = await run_script(conn, RT.stop_script(name, timeout=0.5))
    assert b"sending SIGKILL" in result.stderr
    assert [p for p in group if pid_alive(int(p))] == []
    assert not (await status(conn, name)).running


async def test_remove_path_removes_a_data_dir_and_not_through_a_symlink(
    conn: NodeConnection,
) -> None:
    name = unique("rt-data")
    data = f"/var/lib/cke/{name}"
    await sh(conn, f"mkdir -p {data}/member/snap && echo x > {data}/member/snap/db")
    await run_script(conn, RT.remove_path_script(data))
    assert await sh(conn, f"test -e {data}; echo $?") == "1\n"
    await run_script(conn, RT.remove_path_script(data))  # already gone: fine

    # A symlink under /var/lib/cke must not lead the removal elsewhere.
    await sh(conn, f"mkdir -p /etc/cke/{name}/keep && ln -s /etc/cke/{name} {data}")
    with pytest.raises(RuntimeError, match="outside"):
        await run_script(conn, RT.remove_path_script(f"{data}/keep"))
    assert await sh(conn, f"test -d /etc/cke/{name}/keep; echo $?") == "0\n"
    await sh(conn, f"rm -rf {data} /etc/cke/{name}")


async def test_service_survives_ssh_session_end_and_sshd_stop(bed_factory: BedFactory) -> None:
    bed = await bed_factory(nodes=1, vault=False)
    node: Node = bed.nodes[0]
    name = unique("rt-survive")
    spec = sleeper(name)
    conn = node.connect(bed.ssh_private_key)
    await run_script(conn, RT.start_script(spec))
    await conn.close()

    conn = node.connect(bed.ssh_private_key)
    first = await status(conn, name)
    await conn.close()
    assert first.running and first.pid is not None

    await node.stop_sshd()
    await asyncio.sleep(0.3)
    assert pid_alive(first.pid) and first.pid in node.processes()
    await node.start_sshd()

    conn = node.connect(bed.ssh_private_key)
    try:
        after = await status(conn, name)
        assert after == first
        await run_script(conn, RT.stop_script(name))
        assert not pid_alive(first.pid)
    finally:
        await conn.close()
