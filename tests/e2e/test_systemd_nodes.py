"""systemd nodes on the test bed: containers that boot systemd, reboot, crash and power off.

One module bed of two systemd nodes; the tests run in order on it and leave both
nodes up. The last test uses a bed of its own to check that nothing is left behind.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cke.devenv import BedConfig, TestBed
from cke.devenv.nodes import SystemdNode
from cke.devenv.procs import pid_alive
from cke.nodes.ssh import SSHError
from tests.conftest import BedFactory

pytestmark = pytest.mark.e2e

# A unit that records every clean shutdown of the node: systemd runs ExecStop when it
# stops the unit at shutdown, never on a power cut.
SHUTDOWN_RECORDER = """[Unit]
Description=records clean shutdowns

[Service]
Type=simple
ExecStart=/usr/bin/sleep infinity
ExecStop=/bin/sh -c 'echo clean >> /var/lib/shutdowns'

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[TestBed]:
    testbed = TestBed(BedConfig(etcd_members=1, nodes=2, vault=False, node_kind="systemd"))
    await testbed.start()
    try:
        yield testbed
    finally:
        await testbed.stop()


def systemd_node(bed: TestBed, index: int) -> SystemdNode:
    node = bed.nodes[index]
    assert isinstance(node, SystemdNode)
    return node


async def sh(bed: TestBed, node: SystemdNode, command: str) -> str:
    result = await bed.run(node, command, timeout=30)
    assert result.ok, result.stderr.decode()
    return result.stdout.decode()


async def shutdowns(bed: TestBed, node: SystemdNode) -> int:
    return len((await sh(bed, node, "cat /var/lib/shutdowns 2>/dev/null || true")).split())


async def test_each_node_boots_its_own_systemd_with_only_what_a_node_needs(bed: TestBed) -> None:
    for index in range(2):
        node = systemd_node(bed, index)
        out = await sh(
            bed,
            node,
            "hostname; cat /proc/1/comm; systemctl is-system-running --wait; "
            "systemctl list-units --type=service --state=running --no-legend --plain",
        )
        hostname, init, state, *units = out.splitlines()
        assert (hostname, init, state) == (node.name, "systemd", "running")
        running = {line.split()[0] for line in units}
        # sshd and systemd's own services: none of the host's (databases, proxies, timers).
        assert "ssh.service" in running and "systemd-journald.service" in running
        assert running <= {
            "ssh.service",
            "systemd-journald.service",
            "systemd-logind.service",
            "dbus.service",
        }, running
        memory = node.memory()
        print(
            f"{node.name}: booted in {node.boots[-1]:.2f}s, {len(node.processes())} processes, "
            f"PSS {memory['pss'] / 2**20:.1f} MiB, RSS {memory['rss'] / 2**20:.1f} MiB"
        )
    # Private files: /etc, /var and /root are each node's own.
    first, second = systemd_node(bed, 0), systemd_node(bed, 1)
    await sh(bed, first, "echo first > /var/lib/owner; echo first > /etc/owner")
    assert await sh(bed, second, "cat /var/lib/owner /etc/owner 2>/dev/null; echo end") == "end\n"
    assert (first.private_dir("/var/lib") / "owner").read_text() == "first\n"
    assert not Path("/var/lib/owner").exists() and not Path("/etc/owner").exists()
    # Never the host's SSH host keys.
    assert first.host_public_key != second.host_public_key
    for host_key in Path("/etc/ssh").glob("ssh_host_*_key.pub"):
        assert host_key.read_text().split()[1] != first.host_public_key.split()[1]


async def test_reboot_keeps_files_drops_processes_and_shuts_down_cleanly(bed: TestBed) -> None:
    node = systemd_node(bed, 0)
    (node.private_dir("/etc/systemd/system") / "recorder.service").write_text(SHUTDOWN_RECORDER)
    await sh(
        bed,
        node,
        "systemctl daemon-reload && systemctl enable --now --quiet recorder.service && "
        "echo kept > /root/kept && (setsid sleep 1006 >/dev/null 2>&1 </dev/null &)",
    )
    assert "sleep 1006" in await sh(bed, node, "pgrep -a sleep || true")
    before = await shutdowns(bed, node)
    init_before = node.init_pid
    await node.reboot()
    assert node.init_pid != init_before and node.exits[-1] == 133
    out = await sh(
        bed, node, "cat /root/kept; systemctl is-active recorder.service; pgrep -a sleep || true"
    )
    assert out.splitlines()[:2] == ["kept", "active"]
    assert "sleep 1006" not in out  # processes did not survive the reboot
    assert await shutdowns(bed, node) == before + 1  # ExecStop ran: a clean shutdown
    print(f"{node.name}: rebooted, back in {node.boots[-1]:.2f}s")


async def test_crash_is_a_power_cut(bed: TestBed) -> None:
    node = systemd_node(bed, 0)
    before = await shutdowns(bed, node)
    pids = node.processes()
    assert len(pids) >= 3
    await node.crash()
    assert node.processes() == [] and not any(pid_alive(p) for p in pids)
    assert not node.up
    with pytest.raises(SSHError):
        await bed.run(node, "true", timeout=5)
    await node.start()  # power on
    assert await shutdowns(bed, node) == before  # no shutdown ran
    out = await sh(bed, node, "cat /root/kept; systemctl is-active recorder.service")
    assert out.split() == ["kept", "active"]


async def test_power_off_and_on(bed: TestBed) -> None:
    node = systemd_node(bed, 0)
    before = await shutdowns(bed, node)
    await node.power_off()
    assert node.processes() == [] and node.exits[-1] == 0
    with pytest.raises(SSHError):
        await bed.run(node, "true", timeout=5)
    await node.start()
    assert await shutdowns(bed, node) == before + 1
    assert (await sh(bed, node, "cat /root/kept")).strip() == "kept"


async def test_stopped_sshd_keeps_the_node_running(bed: TestBed) -> None:
    node = systemd_node(bed, 1)
    await sh(bed, node, "true")
    await node.stop_sshd()
    with pytest.raises(SSHError):
        await bed.run(node, "true", timeout=5)
    assert node.up and not node.sshd_running
    journald = await node.exec("systemctl", "is-active", "systemd-journald.service")
    assert journald.stdout == b"active\n"
    await node.start_sshd()
    assert await sh(bed, node, "echo back") == "back\n"


async def test_nothing_of_a_node_is_left_after_the_bed_stops(bed_factory: BedFactory) -> None:
    own = await bed_factory(etcd_members=1, nodes=1, vault=False, node_kind="systemd")
    node = own.nodes[0]
    assert isinstance(node, SystemdNode)
    await own.run(node, "(setsid sleep 1007 >/dev/null 2>&1 </dev/null &)")
    pids = node.processes()
    assert len(pids) >= 3
    root = str(node.root)
    await own.stop()
    assert node.processes() == []
    assert not any(pid_alive(p) for p in pids)
    mounts = Path(f"/proc/{os.getpid()}/mountinfo").read_text()
    assert root not in mounts
    assert not Path(f"/run/systemd/nspawn/propagate/{node.machine}").exists()
