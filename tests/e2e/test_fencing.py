"""Fencing that reaches the nodes: a leader paused in the middle of an operation sends
nothing to any node when it resumes.

The leader (cke0) is held by a failpoint at the last moment before it sends its first
changing command to a joining control plane (stopping its etcd, before wiping its data),
as a SIGSTOP, a long GC pause or a VM freeze would hold it. Another replica takes over,
cancels the record and adds the member itself. Then cke0 resumes: its lease check refuses
the command, and the nodes' sshd logs (one "Starting session" line per command, with
the client's port) show that nothing more came from cke0's connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cke.devenv import BedConfig, TestBed
from cke.devenv.deploy import Deployment
from cke.devenv.nodes import ProcessNode
from cke.devenv.replicas import CkeReplica

pytestmark = pytest.mark.e2e

TTL = 3  # --session-ttl of the deployment (seconds)


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[TestBed]:
    testbed = TestBed(BedConfig(etcd_members=1, nodes=4))
    await testbed.start()
    try:
        yield testbed
    finally:
        await testbed.stop()


def process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[0]


def ssh_client_ports(pid: int) -> set[int]:
    """Local ports of the process's TCP connections to port 22 (its SSH connections)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and remote.endswith(":0016"):  # 22
            ports.add(int(local.split(":")[1], 16))
    return ports


def sessions_from(node: ProcessNode, ports: set[int]) -> int:
    """How many commands the node's sshd started for clients on ``ports``."""
    text = (node.log_dir / "sshd.log").read_text(errors="replace")
    found = re.findall(r"Starting session: command for \S+ from \S+ port (\d+)", text)
    return sum(1 for port in found if int(port) in ports)


async def test_a_paused_leader_sends_nothing_when_it_resumes(bed: TestBed) -> None:
    nodes = [n for n in bed.nodes if isinstance(n, ProcessNode)]
    assert len(nodes) == 4
    cps, joiner = nodes[:3], nodes[3]
    d = Deployment(bed, replicas=1, session_ttl=f"{TTL}s")
    paused = d.replicas[0]
    paused.process.env = {
        **(paused.process.env or os.environ),
        "CKE_FAILPOINT": f"stop-before-update:{joiner.address}",
    }
    try:
        # The joiner is not in the cluster yet: nothing changing goes to it before.
        await d.bootstrap(cps)
        # Two more replicas, to take over; cke0 leads (it campaigned first).
        for i in (1, 2):
            replica = CkeReplica(f"cke{i}", d.config, d.dir, interval="2s", session_ttl=f"{TTL}s")
            d.replicas.append(replica)
            await replica.start()
        assert (await d.status())["leader"] == "cke0"
        result = await d.set_cluster(nodes)
        assert result.returncode == 0, result.stderr

        pid = paused.process.pid
        assert pid is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while process_state(pid) != "T":
            assert loop.time() < deadline, "the failpoint did not stop cke0"
            await asyncio.sleep(0.05)
        ports = ssh_client_ports(pid)
        assert ports, "cke0 keeps SSH connections to the nodes"
        held_record = max(
            int(r["id"]) for r in json.loads((await d.ckecli("history", "-o", "json")).stdout)
        )

        # The others take over after the TTL and add the member themselves.
        await d.wait_for("completed", timeout=120, voters=4)
        status = await d.status()
        assert status["leader"] in ("cke1", "cke2")
        before = {n.name: sessions_from(n, ports) for n in nodes}
        assert before[joiner.name] >= 1  # cke0 did talk to the joiner before it stopped

        await paused.resume()
        # It finds out it no longer leads (by its lease clock or a refused write) and
        # steps down; whatever it was about to send has had every chance to leave by then.
        deadline = loop.time() + 30
        while "resigned leadership" not in paused.log():
            assert loop.time() < deadline, "cke0 resumed but did not step down"
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        after = {n.name: sessions_from(n, ports) for n in nodes}
        assert after == before, "a command from the paused leader reached a node"
        # And it was the lease check that stopped the command, at the last moment.
        refusal = f"refusing to send a command to {joiner.address}"
        line = next((x for x in paused.log().splitlines() if refusal in x), "")
        assert "logger=cke.fence" in line, paused.log()[-3000:]
        assert "leader lease is known valid for 0.0s more" in line

        records = {
            int(r["id"]): r for r in json.loads((await d.ckecli("history", "-o", "json")).stdout)
        }
        held = records[held_record]
        assert held["operation"] == "etcd-add-member" and held["status"] == "cancelled"
        assert "cancelled by the new leader" in str(held["error"])
        final = await d.wait_for("completed", timeout=60, voters=4)
        assert final["leader"] != "cke0"
    finally:
        await d.stop()
