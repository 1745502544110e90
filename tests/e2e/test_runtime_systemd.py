"""The systemd runtime on a real systemd node: units, status, restarts, reboots, over SSH.

One systemd-nspawn node (systemd as PID 1) for the module. Every test uses service names
of its own, and the ``services`` fixture stops what a test started, even when it fails.
The scripts run exactly as cke runs them: ``run_script`` over SSH.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from cke.devenv import BedConfig, TestBed
from cke.devenv.nodes import SystemdNode
from cke.nodes.runtime import (
    NodeFile,
    ServiceSpec,
    ServiceState,
    SystemdRuntime,
    run_script,
    spec_path,
)
from cke.nodes.ssh import NodeConnection

pytestmark = pytest.mark.e2e

RT = SystemdRuntime()
KEY = b"-----BEGIN PRIVATE KEY-----\nnot really a key\n-----END PRIVATE KEY-----\n"
PYTHON = "/usr/bin/python3"
# A service that runs until stopped and takes any further arguments without a look.
PY_SLEEP = ("-c", "import time; time.sleep(10**6)")
# Arguments that a careless quoting would split, join, expand or drop.
AWKWARD_ARGS = (
    "two words",
    'say "hi"',
    "$HOME",
    "${HOME}x",
    "100%",
    "%n",
    "back\\slash",
    ";",
    "",
    "it's",
    "tab\there",
    "line\nbreak",
    "ctl\x01\x7f",
    " lead and trail ",
    "end\\",
    "ünï©ødé",
)
# Slack on top of RestartSec for a loaded machine (2 cores, other test runs).
SLACK = 15.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[TestBed]:
    testbed = TestBed(BedConfig(etcd_members=1, nodes=1, vault=False, node_kind="systemd"))
    await testbed.start()
    try:
        yield testbed
    finally:
        await testbed.stop()


@pytest.fixture
async def conn(bed: TestBed) -> AsyncIterator[NodeConnection]:
    connection = bed.nodes[0].connect(bed.ssh_private_key)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def services(bed: TestBed) -> AsyncIterator[list[str]]:
    """Names a test starts; stopped (and their files removed) when the test ends."""
    names: list[str] = []
    yield names
    connection = bed.nodes[0].connect(bed.ssh_private_key)  # a fresh one: the node may
    try:  # have rebooted
        for name in names:
            await run_script(connection, RT.stop_script(name))
            await sh(connection, f"rm -rf /etc/cke/{name} /var/lib/cke/{name}")
    finally:
        await connection.close()


async def status(conn: NodeConnection, name: str) -> ServiceState:
    result = await run_script(conn, RT.status_script([name]))
    return RT.parse_status(result.stdout, [name])[name]


async def sh(conn: NodeConnection, command: str) -> str:
    result = await conn.run(command)
    assert result.ok, result.stderr
    return result.stdout.decode()


async def show(conn: NodeConnection, name: str, *properties: str) -> dict[str, str]:
    """``systemctl show`` of the service's unit: property -> value."""
    flags = " ".join(f"-p {p}" for p in properties)
    text = await sh(conn, f"systemctl show {flags} {RT.unit_name(name)}")
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value for key, value in pairs}


async def main_pid(conn: NodeConnection, name: str) -> int:
    return int((await show(conn, name, "MainPID"))["MainPID"])


async def alive(conn: NodeConnection, pid: int) -> bool:
    return await sh(conn, f"test -d /proc/{pid} && echo yes || echo no") == "yes\n"


async def wait_show(
    conn: NodeConnection,
    name: str,
    properties: tuple[str, ...],
    done: Callable[[dict[str, str]], bool],
    timeout: float,
    what: str,
) -> dict[str, str]:
    """Poll ``systemctl show`` until ``done``; AssertionError with the last values if not."""
    deadline = time.monotonic() + timeout
    while True:
        values = await show(conn, name, *properties)
        if done(values):
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.1f}s; last seen {values}")
        await asyncio.sleep(0.1)


async def restart_sec(conn: NodeConnection, name: str) -> float:
    """RestartSec= of the unit as written on the node, in seconds."""
    unit = await sh(conn, f"cat {RT.unit_path(name)}")
    match = re.search(r"^RestartSec=(\d+(?:\.\d+)?)(ms|s)?$", unit, re.MULTILINE)
    assert match is not None, unit
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def sleeper(name: str, *args: str, **kwargs: object) -> ServiceSpec:
    return ServiceSpec(name, PYTHON, (*PY_SLEEP, *args), **kwargs)  # type: ignore[arg-type]


async def test_start_writes_an_enabled_unit_running_the_exact_argv_and_env(
    conn: NodeConnection, services: list[str]
) -> None:
    name = unique("sd-start")
    services.append(name)
    env = (
        ("CKE_A", "x y"),
        ("CKE_B", "$HOME'\"\\ 100% %n ${X}"),
        ("CKE_EMPTY", ""),
        ("CKE_CTL", "a\tb\nc\x01"),
    )
    files = (
        NodeFile(f"/etc/cke/{name}/server.key", KEY, 0o600),
        NodeFile(f"/etc/cke/{name}/server.crt", b"certificate\n"),
    )
    spec = sleeper(
        name, *AWKWARD_ARGS, env=env, files=files, start_args=("--initial", "new cluster")
    )
    await run_script(conn, RT.start_script(spec))

    unit = RT.unit_path(name)
    assert await sh(conn, f"stat -c %a {unit}") == "644\n"
    assert await sh(conn, f"cat {unit}") == RT.unit_text(spec)
    assert await sh(conn, f"systemctl is-enabled {RT.unit_name(name)}") == "enabled\n"
    assert await sh(conn, f"systemctl is-active {RT.unit_name(name)}") == "active\n"

    pid = await main_pid(conn, name)
    assert pid > 0
    argv = (await sh(conn, f"cat /proc/{pid}/cmdline")).split("\0")[:-1]
    assert argv == [PYTHON, *PY_SLEEP, *AWKWARD_ARGS, "--initial", "new cluster"]
    environ = (await sh(conn, f"cat /proc/{pid}/environ")).split("\0")[:-1]
    values = dict(entry.split("=", 1) for entry in environ)
    assert {k: values.get(k) for k, _ in env} == dict(env)
    assert "SSH_CONNECTION" not in values  # systemd's environment, not the SSH session's

    listing = await sh(conn, f"stat -c '%a %n' /etc/cke/{name}/* && cat /etc/cke/{name}/server.key")
    assert listing == (
        f"644 /etc/cke/{name}/server.crt\n600 /etc/cke/{name}/server.key\n" + KEY.decode()
    )
    record = await sh(conn, f"stat -c %a {spec_path(name)}; cat {spec_path(name)}")
    assert record.startswith("600\n") and "not really a key" not in record

    await run_script(conn, RT.stop_script(name))


async def test_status_pid_digest_idempotent_start_and_outdated_restart(
    conn: NodeConnection, services: list[str]
) -> None:
    never = unique("sd-never")
    assert await status(conn, never) == ServiceState(never, running=False, digest=None)

    name = unique("sd-status")
    services.append(name)
    first, second = sleeper(name, "first"), sleeper(name, "second")
    await run_script(conn, RT.start_script(first))
    before = await status(conn, name)
    assert before == ServiceState(name, True, first.digest(), await main_pid(conn, name))
    assert not before.outdated(first) and before.outdated(second)

    # The same spec again: left alone.
    await run_script(conn, RT.start_script(first))
    assert await status(conn, name) == before

    # Another argument: outdated, and start restarts it.
    await run_script(conn, RT.start_script(second))
    after = await status(conn, name)
    assert after.running and after.digest == second.digest() and not after.outdated(second)
    assert after.pid is not None and before.pid is not None and after.pid != before.pid
    assert after.pid == await main_pid(conn, name)
    assert not await alive(conn, before.pid)
    assert (await sh(conn, f"cat /proc/{after.pid}/cmdline")).split("\0")[3] == "second"

    await run_script(conn, RT.stop_script(name))


async def test_systemd_restarts_a_killed_service_by_itself(
    conn: NodeConnection, services: list[str]
) -> None:
    name = unique("sd-kill")
    services.append(name)
    spec = sleeper(name)
    await run_script(conn, RT.start_script(spec))
    delay = await restart_sec(conn, name)
    before = await show(conn, name, "MainPID", "NRestarts")
    old_pid = int(before["MainPID"])
    assert old_pid > 0

    started = time.monotonic()
    await sh(conn, f"kill -9 {old_pid}")
    after = await wait_show(
        conn,
        name,
        ("MainPID", "NRestarts", "ActiveState"),
        lambda v: v["ActiveState"] == "active" and v["MainPID"] not in ("0", str(old_pid)),
        delay + SLACK,
        "systemd restarting the killed service",
    )
    took = time.monotonic() - started
    print(f"\nrestart after kill -9: {took:.2f}s (RestartSec={delay:g}s)")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    new = await status(conn, name)
    assert new == ServiceState(name, True, spec.digest(), int(after["MainPID"]))
    assert not await alive(conn, old_pid)

    await run_script(conn, RT.stop_script(name))


async def test_requires_path_gates_systemd_restarts_but_not_cke_starts(
    conn: NodeConnection, services: list[str]
) -> None:
    name = unique("sd-member")
    services.append(name)
    member = f"/var/lib/cke/{name}/member"
    spec = sleeper(name, requires_path=member)
    first_start = RT.first_start_path(name)

    # Missing path: cke's start still starts it (a start from nothing), once.
    await run_script(conn, RT.start_script(spec))
    state = await status(conn, name)
    assert state.running and state.pid is not None
    assert await sh(conn, f"test -e {first_start} && echo yes || echo no") == "no\n"
    delay = await restart_sec(conn, name)

    # With the path: systemd restarts it after a crash.
    await sh(conn, f"mkdir -p {member}")
    await sh(conn, f"kill -9 {state.pid}")
    restarted = await wait_show(
        conn,
        name,
        ("MainPID", "ActiveState"),
        lambda v: v["ActiveState"] == "active" and v["MainPID"] not in ("0", str(state.pid)),
        delay + SLACK,
        "restart with the required path present",
    )

    # Without it (data lost): systemd tries, the condition fails, the service stays down.
    await sh(conn, f"rm -rf {member}")
    killed = time.monotonic()
    await sh(conn, f"kill -9 {restarted['MainPID']}")
    props = ("ActiveState", "MainPID", "ConditionResult", "NRestarts")
    gated = await wait_show(
        conn,
        name,
        props,
        lambda v: v["ConditionResult"] == "no" and v["ActiveState"] != "active",
        delay + SLACK,
        "systemd's restart skipped on the missing required path",
    )
    assert gated["ActiveState"] in ("inactive", "failed") and gated["MainPID"] == "0", gated
    # And it stays down a while past RestartSec (no second try that gets through).
    window_end = max(killed + 2 * delay + 1, time.monotonic() + 1)
    while time.monotonic() < window_end:
        now = await show(conn, name, *props)
        assert now["ActiveState"] not in ("active", "activating"), now
        await asyncio.sleep(0.2)
    assert not (await status(conn, name)).running

    # cke's start brings it back (again with a one-time permission, removed after).
    await run_script(conn, RT.start_script(spec))
    back = await status(conn, name)
    assert back.running and back.pid not in (None, state.pid, int(restarted["MainPID"]))
    assert await sh(conn, f"test -e {first_start} && echo yes || echo no") == "no\n"

    await run_script(conn, RT.stop_script(name))


async def test_stop_leaves_the_unit_inactive_and_disabled(
    conn: NodeConnection, services: list[str]
) -> None:
    name = unique("sd-stop")
    services.append(name)
    spec = sleeper(name)
    await run_script(conn, RT.start_script(spec))
    pid = await main_pid(conn, name)

    await run_script(conn, RT.stop_script(name))
    unit = RT.unit_name(name)
    assert (await conn.run(f"systemctl is-active {unit}")).stdout == b"inactive\n"
    assert (await conn.run(f"systemctl is-enabled {unit}")).stdout == b"disabled\n"
    wants = f"/etc/systemd/system/multi-user.target.wants/{unit}"
    assert await sh(conn, f"test -e {wants} && echo yes || echo no") == "no\n"
    assert not await alive(conn, pid)
    assert await status(conn, name) == ServiceState(name, False, spec.digest(), None)

    await run_script(conn, RT.stop_script(name))  # a stopped service
    await run_script(conn, RT.stop_script(unique("sd-unknown")))  # a never-started one


async def test_start_of_a_binary_that_exits_at_once_fails_with_its_journal(
    bed: TestBed, conn: NodeConnection, services: list[str]
) -> None:
    name = unique("sd-fail")
    services.append(name)
    spec = ServiceSpec(name, "/bin/sh", ("-c", "echo 'boom: no config' >&2; exit 3"))
    with pytest.raises(RuntimeError) as failed:
        await run_script(conn, RT.start_script(spec))
    message = str(failed.value)
    first_line = message.splitlines()[0]
    assert re.fullmatch(
        rf"{re.escape(bed.nodes[0].address)}: cke: {re.escape(RT.unit_name(name))} is \S+"
        r" right after start; journal:",
        first_line,
    ), message
    assert "boom: no config" in message, message
    assert (await status(conn, name)).running is False

    await run_script(conn, RT.stop_script(name))


async def test_reboot_brings_back_started_services_and_not_stopped_ones(
    bed: TestBed, services: list[str]
) -> None:
    node = bed.nodes[0]
    assert isinstance(node, SystemdNode)
    kept, stopped = unique("sd-kept"), unique("sd-stopped")
    services.extend([kept, stopped])
    key = NodeFile(f"/etc/cke/{kept}/server.key", KEY, 0o600)
    kept_spec = sleeper(kept, files=(key,))
    conn = node.connect(bed.ssh_private_key)
    try:
        await run_script(conn, RT.start_script(kept_spec))
        await run_script(conn, RT.start_script(sleeper(stopped)))
        await run_script(conn, RT.stop_script(stopped))
        before = await status(conn, kept)
        invocation = (await show(conn, kept, "InvocationID"))["InvocationID"]
        assert before.running and before.pid is not None and invocation
    finally:
        await conn.close()

    started = time.monotonic()
    await node.reboot()
    print(
        f"\nreboot: {time.monotonic() - started:.2f}s until sshd answered; "
        f"boot {node.boots[-1]:.2f}s (nspawn start to sshd)"
    )

    conn = node.connect(bed.ssh_private_key)
    try:
        # Enabled units are started by the boot itself; sshd may answer a moment earlier.
        after = await wait_show(
            conn,
            kept,
            ("ActiveState", "MainPID", "InvocationID"),
            lambda v: v["ActiveState"] == "active",
            SLACK,
            "the enabled service after the reboot",
        )
        assert after["InvocationID"] != invocation  # started again, not a survivor
        assert await status(conn, kept) == ServiceState(
            kept, True, kept_spec.digest(), int(after["MainPID"])
        )
        assert int(after["MainPID"]) != before.pid
        listing = await sh(conn, f"stat -c '%a %n' {key.path} && cat {key.path}")
        assert listing == f"600 {key.path}\n" + KEY.decode()

        assert await status(conn, stopped) == ServiceState(
            stopped, False, sleeper(stopped).digest(), None
        )
        unit = RT.unit_name(stopped)
        assert (await conn.run(f"systemctl is-active {unit}")).stdout == b"inactive\n"
        assert (await conn.run(f"systemctl is-enabled {unit}")).stdout == b"disabled\n"

        await run_script(conn, RT.stop_script(kept))
    finally:
        await conn.close()
