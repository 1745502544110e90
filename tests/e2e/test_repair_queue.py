"""The repair queue on process nodes: ``ckecli repair-queue add`` queues a repair; the
leader runs its procedure over SSH on the node once (the repair command appends a line to
a marker file in the node's private /root, the health check then says ``true``, the
success command appends another), and the entry ends ``succeeded``; a procedure whose
repair command fails ends ``failed``; ``delete-finished`` removes both."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import yaml

from cke.common.etcd import make_client
from cke.devenv import BedConfig, TestBed
from cke.devenv.deploy import Deployment
from cke.repairqueue import RepairEntry
from cke.storage import Storage

pytestmark = pytest.mark.e2e

MARKER = "/root/repair-marker"
REPAIR = {
    "repair_procedures": [
        {
            "machine_types": ["qemu"],
            "repair_operations": [
                {
                    "operation": "unhealthy",
                    "repair_steps": [
                        {
                            "repair_command": [
                                "sh",
                                "-c",
                                f'echo "repaired $1" >> {MARKER}',
                                "repair",
                            ],
                            "watch_seconds": 30,
                        }
                    ],
                    "health_check_command": [
                        "sh",
                        "-c",
                        f"grep -q repaired {MARKER} 2>/dev/null && echo true || echo false",
                        "check",
                    ],
                    "success_command": ["sh", "-c", f'echo "success $1" >> {MARKER}', "ok"],
                },
                {
                    "operation": "broken",
                    "repair_steps": [{"repair_command": ["sh", "-c", "exit 3", "fail"]}],
                    "health_check_command": ["sh", "-c", "echo false", "check"],
                },
            ],
        }
    ],
}


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[TestBed]:
    testbed = TestBed(BedConfig(etcd_members=1, nodes=2))
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
    client = make_client(bed.etcd.settings(deployment.prefix))
    await client.connect()
    try:
        yield Storage(client, deployment.prefix)
    finally:
        await client.close()


async def _entries(storage: Storage) -> list[RepairEntry]:
    return [e for e, _ in await storage.get_repair_entries()]


async def _wait_finished(storage: Storage, index: int, timeout: float) -> RepairEntry:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry, _ = await storage.get_repair_entry(index)
        if entry is not None and entry.finished:
            return entry
        await asyncio.sleep(0.3)
    raise AssertionError(f"entry {index} did not finish: {await _entries(storage)}")


async def test_repair_procedures_run_once_and_finish(
    bed: TestBed, deployment: Deployment, storage: Storage
) -> None:
    cp, worker = bed.nodes[0], bed.nodes[1]
    doc = yaml.safe_load(deployment.cluster_yaml([cp], [worker]))
    doc["repair"] = REPAIR
    stored = await deployment.ckecli(
        "cluster", "set", "--control-plane-count", "1", "-", stdin=yaml.safe_dump(doc).encode()
    )
    assert stored.returncode == 0, stored.stderr
    await deployment.wait_for("completed", timeout=60, voters=1)

    # Bad input changes nothing: one line naming the argument.
    for args, word in (
        (("unhealthy", "arm", worker.address), "MACHINE_TYPE"),
        (("nope", "qemu", worker.address), "OPERATION"),
        (("unhealthy", "qemu", "10.9.9.9"), "ADDRESS"),
    ):
        bad = await deployment.ckecli("repair-queue", "add", *args)
        assert bad.returncode == 1 and word in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1
    assert await _entries(storage) == []

    added = await deployment.ckecli("repair-queue", "add", "unhealthy", "qemu", worker.name, "SN1")
    assert added.returncode == 0, added.stderr
    done = await _wait_finished(storage, 0, timeout=30)
    assert done.status == "succeeded", done
    assert (done.address, done.serial, done.nodename) == (worker.address, "SN1", worker.name)
    marker = worker.private_dir("/root") / "repair-marker"
    assert marker.read_text().splitlines() == [
        f"repaired {worker.address}",
        f"success {worker.address}",
    ]
    assert not (cp.private_dir("/root") / "repair-marker").exists()

    added = await deployment.ckecli("repair-queue", "add", "broken", "qemu", worker.address)
    assert added.returncode == 0, added.stderr
    failed = await _wait_finished(storage, 1, timeout=30)
    assert failed.status == "failed", failed
    # Finished entries stay (as upstream), the first one did not run again.
    assert len(marker.read_text().splitlines()) == 2
    listed = await deployment.ckecli("repair-queue", "list")
    assert listed.returncode == 0, listed.stderr
    assert [e["status"] for e in json.loads(listed.stdout)] == ["succeeded", "failed"]
    assert json.loads(listed.stdout)[0]["index"] == "0"

    # Finished entries still count for ``wait``, as upstream.
    once = await deployment.ckecli("repair-queue", "wait", "--timeout-seconds", "0")
    assert once.returncode == 1 and once.stderr == "ckecli: repair queue is not empty\n"
    bad = await deployment.ckecli("repair-queue", "wait", "--interval-seconds", "0")
    assert bad.returncode == 2 and "--interval-seconds" in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1

    deleted = await deployment.ckecli("repair-queue", "delete-finished")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.split() == ["0", "1"]
    # The leader removes them within a round or two.
    waited = await deployment.ckecli("repair-queue", "wait", "--timeout-seconds", "20")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.splitlines()[-1] == "repair queue is empty"
    assert await _entries(storage) == []
    await deployment.wait_for("completed", timeout=20)
