"""The reboot queue on systemd nodes: ``ckecli rq add`` queues 3 control planes and 2
workers; the leader reboots each (``systemctl reboot`` inside the node, run by the
cluster's ``reboot_command`` over SSH), workers first and together, then the control
planes one at a time, while a client keeps writing to the managed etcd."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import yaml
from etcd3aio import EtcdError, prefix_range_end

from cke.common.etcd import make_client
from cke.devenv import BedConfig, TestBed
from cke.devenv.deploy import Deployment
from cke.devenv.nodes import SystemdNode
from cke.rebootqueue import IN_PROGRESS, RebootEntry
from cke.storage import Storage

pytestmark = pytest.mark.e2e

CANARY = "/reboot-canary/"
# Reboot one second later, detached: the SSH command returns before the node goes down.
REBOOT_COMMAND = ["sh", "-c", "systemd-run --on-active=1 systemctl reboot", "reboot"]
# Arguments: the node's address and the reboot's Unix time; ``true`` once PID 1 (the
# node's systemd) started after it.
BOOT_CHECK_COMMAND = [
    "sh",
    "-c",
    'test "$(( $(date +%s) - $(ps -o etimes= -p 1) ))" -gt "$2" && echo true',
    "boot-check",
]


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[TestBed]:
    testbed = TestBed(BedConfig(etcd_members=1, nodes=5, node_kind="systemd"))
    await testbed.start()
    try:
        yield testbed
    finally:
        await testbed.stop()


@pytest.fixture(scope="module")
async def deployment(bed: TestBed) -> AsyncIterator[Deployment]:
    d = Deployment(bed, replicas=1, interval="1s")
    await d.setup()
    try:
        yield d
    finally:
        await d.stop()


@pytest.fixture(scope="module")
async def storage(bed: TestBed, deployment: Deployment) -> AsyncIterator[Storage]:
    """cke's etcd, read directly: polling through ckecli costs a process start each time."""
    client = make_client(bed.etcd.settings(deployment.prefix))
    await client.connect()
    try:
        yield Storage(client, deployment.prefix)
    finally:
        await client.close()


async def _listed(d: Deployment) -> list[RebootEntry]:
    result = await d.ckecli("rq", "list")
    assert result.returncode == 0, result.stderr
    return [RebootEntry.from_json(json.dumps(e)) for e in json.loads(result.stdout)]


async def _queue(storage: Storage) -> list[RebootEntry]:
    return [e for e, _ in await storage.get_reboot_entries()]


async def test_queued_nodes_reboot_control_planes_one_at_a_time(
    bed: TestBed, deployment: Deployment, storage: Storage
) -> None:
    cps, workers = bed.nodes[:3], bed.nodes[3:5]
    doc = yaml.safe_load(deployment.cluster_yaml(cps, workers))
    doc["reboot"] = {
        "reboot_command": REBOOT_COMMAND,
        "boot_check_command": BOOT_CHECK_COMMAND,
        "max_concurrent_reboots": 2,
        "command_timeout_seconds": 20,
    }
    stored = await deployment.ckecli(
        "cluster", "set", "--control-plane-count", "3", "-", stdin=yaml.safe_dump(doc).encode()
    )
    assert stored.returncode == 0, stored.stderr
    await deployment.wait_for("completed", timeout=120, voters=3)

    # Bad input changes nothing: one line naming the argument.
    bad = await deployment.ckecli("rq", "add", "-", stdin=f"{cps[0].address} 10.9.9.9".encode())
    assert bad.returncode == 1 and "10.9.9.9" in bad.stderr and bad.stderr.count("\n") == 1
    assert await _listed(deployment) == []
    nothing = await deployment.ckecli("rq", "cancel", "x")
    assert nothing.returncode == 1 and "INDEX" in nothing.stderr

    addresses = [n.address for n in cps]
    creds = await deployment.root_credentials()
    client = await deployment.root_client(addresses, creds)
    acked: list[str] = []
    stop = asyncio.Event()

    async def write() -> None:
        assert client.kv is not None
        i = 0
        while not stop.is_set():
            key = f"{CANARY}{i:06d}"
            try:
                await client.kv.put(key, str(i), timeout=5)
            except (EtcdError, TimeoutError):
                await asyncio.sleep(0.1)
                continue  # not acknowledged: written again (a put is idempotent)
            acked.append(key)
            i += 1
            await asyncio.sleep(0.02)

    # Every 0.2 s, which nodes are rebooting: never two control planes, never a control
    # plane with another node.
    seen: list[frozenset[str]] = []

    async def watch() -> None:
        while not stop.is_set():
            entries = await _queue(storage)
            busy = frozenset(e.node for e in entries if e.status in IN_PROGRESS)
            if busy and (not seen or seen[-1] != busy):
                seen.append(busy)
            await asyncio.sleep(0.2)

    boots = {n.name: len(n.boots) for n in bed.nodes if isinstance(n, SystemdNode)}
    writer = asyncio.create_task(write())
    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    try:
        # Control planes first in the file, one by hostname: workers still go first.
        names = [cps[0].address, cps[1].name, cps[2].address, workers[0].address]
        text = "\n".join([*names, workers[1].address, cps[0].address]) + "\n"
        added = await deployment.ckecli("reboot-queue", "add", "-", stdin=text.encode())
        assert added.returncode == 0, added.stderr
        # (The leader may already be rebooting the workers: the records say the order.)
        enabled = await deployment.ckecli("rq", "is-enabled")
        assert enabled.stdout == "true\n"
        deadline = time.monotonic() + 150
        while await _queue(storage):
            assert time.monotonic() < deadline, f"queue not empty: {await _queue(storage)}"
            await asyncio.sleep(0.5)
        took = time.monotonic() - started
        await deployment.wait_for("completed", timeout=60, voters=3)
    finally:
        stop.set()
        await asyncio.gather(writer, watcher, return_exceptions=True)
    try:
        assert client.kv is not None
        resp = await client.kv.get(
            CANARY, range_end=prefix_range_end(CANARY.encode()), keys_only=True, timeout=10
        )
        stored_keys = {kv.key.decode() for kv in resp.kvs}
    finally:
        await client.close()
    print(f"5 nodes rebooted in {took:.1f}s; {len(acked)} writes; in progress: {seen}")
    print(f"boots: { {n: node.boots for n, node in _systemd(bed).items()} }")

    # Every node booted exactly once more.
    assert {n: len(node.boots) - boots[n] for n, node in _systemd(bed).items()} == {
        n: 1 for n in boots
    }
    # 0 lost writes.
    assert len(acked) > 0 and set(acked) <= stored_keys
    # Never two control planes, never a control plane with anything else.
    cp_set = set(addresses)
    for busy in seen:
        assert len(busy & cp_set) == 0 or len(busy) == 1, seen
    # The records: workers first, then each control plane rebooted and dequeued before
    # the next one started.
    history = await deployment.ckecli("history", "-o", "json")
    records = sorted(json.loads(history.stdout), key=lambda r: int(r["id"]))
    mine = [r for r in records if r["operation"] in ("reboot", "reboot-dequeue")]
    assert [r["error"] for r in mine] == [""] * len(mine), mine
    order = [(r["operation"], r["targets"][0]) for r in mine]
    reboots = [t for op, t in order if op == "reboot"]
    assert sorted(reboots[:2]) == sorted(w.address for w in workers), order
    assert reboots[2:] == addresses, order  # in queue order
    cp_events = [(op, t) for op, t in order if t in cp_set]
    for i in range(0, len(cp_events), 2):
        assert cp_events[i][0] == "reboot" and cp_events[i + 1] == (
            "reboot-dequeue",
            cp_events[i][1],
        )


def _systemd(bed: TestBed) -> dict[str, SystemdNode]:
    return {n.name: n for n in bed.nodes if isinstance(n, SystemdNode)}


async def test_a_failing_reboot_backs_off_and_cancel_removes_it(
    bed: TestBed, deployment: Deployment, storage: Storage
) -> None:
    cps, workers = bed.nodes[:3], bed.nodes[3:5]
    doc = yaml.safe_load(deployment.cluster_yaml(cps, workers))
    doc["reboot"] = {"reboot_command": ["false"], "boot_check_command": BOOT_CHECK_COMMAND}
    stored = await deployment.ckecli(
        "cluster", "set", "--control-plane-count", "3", "-", stdin=yaml.safe_dump(doc).encode()
    )
    assert stored.returncode == 0, stored.stderr
    victim = workers[0]
    assert isinstance(victim, SystemdNode)
    boots = len(victim.boots)
    added = await deployment.ckecli("rq", "add", "-", stdin=victim.name.encode())
    assert added.returncode == 0, added.stderr
    deadline = time.monotonic() + 30
    entries = await _queue(storage)
    while not (entries and entries[0].drain_backoff_count == 1):
        assert time.monotonic() < deadline, entries
        await asyncio.sleep(0.3)
        entries = await _queue(storage)
    (e,) = entries
    assert e.node == victim.address and e.status == "queued"
    assert e.last_transition_time is not None and e.drain_backoff_expire is not None
    waited = (e.drain_backoff_expire - e.last_transition_time).total_seconds()
    assert 300 <= waited < 600, e
    # Disabled: the leader leaves it alone; reset-backoff clears the backoff.
    for args in (("rq", "disable"), ("rq", "reset-backoff")):
        result = await deployment.ckecli(*args)
        assert result.returncode == 0, result.stderr
    assert not await storage.reboot_queue_enabled()
    (e,) = await _queue(storage)
    assert e.drain_backoff_count == 0 and e.drain_backoff_expire is None
    # Cancelled entries are removed by the leader, even while the queue is disabled.
    assert (await deployment.ckecli("rq", "cancel-all")).returncode == 0
    deadline = time.monotonic() + 15
    while await _queue(storage):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.3)
    assert (await deployment.ckecli("rq", "enable")).returncode == 0
    assert await storage.reboot_queue_enabled()
    assert len(victim.boots) == boots
    assert "reboot-cancel" in [r.operation for r in await storage.get_records(20)]
