"""Sabakan-triggered repair end to end (CKE's ``docs/sabakan-triggered-repair.md``).

Real sabakan (HTTPS, client certificates) whose state setter runs a health command per
machine: a file ``broken`` in the node's /root makes the machine unhealthy. Real cke,
real etcd, real sshd nodes. cke reads sabakan's report and queues a repair entry; the
leader runs the procedure over SSH on the node (it removes ``broken`` and appends to a
marker file), the health check passes, the entry succeeds, sabakan sees the machine
healthy again, and the procedure ran exactly once. The limiters are checked on the way:
nothing is queued while ``maximum-repair-queue-entries`` is 0, no second entry while a
finished one stays, a new one once it is deleted, and nothing while auto-repair is
disabled.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cke.common.etcd import make_client
from cke.devenv import TestBed
from cke.devenv.deploy import Deployment
from cke.devenv.sabakan import Inventory, set_url_args, start_inventory
from cke.repairqueue import RepairEntry
from cke.storage import Storage
from tests.conftest import BedFactory

pytestmark = pytest.mark.e2e

MARKER = "/root/repair-marker"
BROKEN = "/root/broken"
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
                                f'rm -f {BROKEN} && echo "repaired $1" >> {MARKER}',
                                "repair",
                            ],
                            "watch_seconds": 30,
                        }
                    ],
                    "health_check_command": [
                        "sh",
                        "-c",
                        f"test -e {BROKEN} && echo false || echo true",
                        "check",
                    ],
                    "success_command": ["sh", "-c", f'echo "success $1" >> {MARKER}', "ok"],
                }
            ],
        }
    ],
}


async def _until(what: str, check: Callable[[], Awaitable[Any]], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.3)


async def test_a_machine_sabakan_reports_unhealthy_is_repaired_once(
    bed_factory: BedFactory, tmp_path: Path
) -> None:
    bed: TestBed = await bed_factory(etcd_members=1, nodes=2)
    cp, worker = bed.nodes
    # sabakan checks each machine through a link named after its serial to the node's /root.
    links = tmp_path / "roots"
    links.mkdir()
    for i, node in enumerate(bed.nodes):
        (links / f"m{i}").symlink_to(node.private_dir("/root"))
    check = ["test", "!", "-e", f"{links}/{{serial}}/broken"]
    inventory: Inventory = await start_inventory(
        bed, tmp_path / "sabakan", check=check, bmc_type="qemu"
    )
    d = Deployment(bed, replicas=1, interval="1s")
    client = None
    try:
        await d.setup()
        doc = yaml.safe_load(d.cluster_yaml([cp], [worker]))
        doc["repair"] = REPAIR
        stored = await d.ckecli(
            "cluster", "set", "--control-plane-count", "1", "-", stdin=yaml.safe_dump(doc).encode()
        )
        assert stored.returncode == 0, stored.stderr
        set_url = await d.ckecli(*set_url_args(d, inventory))
        assert set_url.returncode == 0, set_url.stderr
        await d.wait_for("completed", timeout=60, voters=1)
        client = make_client(bed.etcd.settings(d.prefix))
        await client.connect()
        storage = Storage(client, d.prefix)

        # ckecli auto-repair: on by default; bad variables change nothing.
        assert (await d.ckecli("auto-repair", "is-enabled")).stdout.strip() == "true"
        assert await d.replicas[0].metric("cke_auto_repair_enabled") == 1.0
        bad = tmp_path / "bad.json"
        bad.write_text('{"having": {"states": ["SICK"]}}')
        refused = await d.ckecli("auto-repair", "set-variables", str(bad))
        assert refused.returncode == 1 and "having.states" in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1
        default = json.loads((await d.ckecli("auto-repair", "get-variables")).stdout)
        assert default["having"]["states"] == ["UNHEALTHY", "UNREACHABLE"]

        async def auto_repair() -> dict[str, Any]:
            report = (await d.status()).get("auto-repair") or {}
            assert isinstance(report, dict)
            return report

        async def entries() -> list[RepairEntry]:
            return [e for e, _ in await storage.get_repair_entries()]

        async def sabakan_says(state: str) -> bool:
            return await inventory.state("m1") == state

        marker = worker.private_dir("/root") / "repair-marker"
        broken = worker.private_dir("/root") / "broken"

        # The worker breaks: sabakan reports it; the default maximum (0) queues nothing.
        broken.touch()
        await _until("sabakan: m1 unhealthy", lambda: sabakan_says("unhealthy"), 30)

        async def refused_by_maximum() -> bool:
            refusal = (await auto_repair()).get("refused") or {}
            return refusal.get("rule") == "maximum-repair-queue-entries"

        await _until("refused by maximum-repair-queue-entries", refused_by_maximum, 30)
        assert await entries() == []
        # cke --debug-sabakan says the same, and stores nothing.
        debug = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "cke.cli.cke_main", "--config", str(d.config)),
            *("--debug-sabakan", "--http", "127.0.0.1:0"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await debug.communicate()
        assert debug.returncode == 0, err.decode()
        shown = json.loads(out)
        assert shown["generation"] == "not enabled"
        assert shown["auto-repair"]["refused"]["rule"] == "maximum-repair-queue-entries"
        assert await entries() == []

        # The operator allows one entry: it is queued and the procedure runs once.
        allowed = await d.ckecli("constraints", "set", "maximum-repair-queue-entries", "1")
        assert allowed.returncode == 0, allowed.stderr

        async def succeeded() -> list[RepairEntry]:
            done = [e for e in await entries() if e.status == "succeeded"]
            return done

        first = (await _until("the repair succeeded", succeeded, 60))[0]
        assert (first.address, first.operation, first.machine_type, first.serial) == (
            worker.address,
            "unhealthy",
            "qemu",
            "m1",
        )
        assert first.nodename == worker.name
        assert not broken.exists()
        await _until("sabakan: m1 healthy again", lambda: sabakan_says("healthy"), 30)
        await asyncio.sleep(3)  # a few more leader rounds: nothing runs again
        assert marker.read_text().splitlines() == [
            f"repaired {worker.address}",
            f"success {worker.address}",
        ]
        assert [e.index for e in await entries()] == [first.index]
        assert not (cp.private_dir("/root") / "repair-marker").exists()

        # Broken again: the finished entry stays "recent", so no second entry...
        broken.touch()
        await _until("sabakan: m1 unhealthy again", lambda: sabakan_says("unhealthy"), 30)

        async def skipped_as_recent() -> bool:
            rules = [s["rule"] for s in (await auto_repair()).get("skipped", [])]
            return "one-repair-entry-per-machine" in rules

        await _until("skipped by one-repair-entry-per-machine", skipped_as_recent, 30)
        assert [e.index for e in await entries()] == [first.index]
        text = (await d.ckecli("status")).stdout
        assert "not queued: m1" in text and "one-repair-entry-per-machine" in text, text

        # ... until the operator deletes it: then the machine is repaired again.
        deleted = await d.ckecli("repair-queue", "delete-finished")
        assert deleted.returncode == 0, deleted.stderr

        async def second_succeeded() -> list[RepairEntry]:
            return [e for e in await succeeded() if e.index != first.index]

        await _until("the second repair succeeded", second_succeeded, 60)
        assert len(marker.read_text().splitlines()) == 4

        # Disabled: a broken machine gets no entry.
        assert (await d.ckecli("auto-repair", "disable")).returncode == 0
        assert (await d.ckecli("auto-repair", "is-enabled")).stdout.strip() == "false"

        async def metric_says_disabled() -> bool:
            return await d.replicas[0].metric("cke_auto_repair_enabled") == 0.0

        await _until("cke_auto_repair_enabled 0", metric_says_disabled, 10)
        assert (await d.ckecli("repair-queue", "delete-finished")).returncode == 0
        await _until("the queue emptied", lambda: _empty(storage), 30)
        broken.touch()
        await _until("sabakan: m1 unhealthy a third time", lambda: sabakan_says("unhealthy"), 30)
        await asyncio.sleep(3)
        assert await entries() == []
        assert await auto_repair() == {}
        assert len(marker.read_text().splitlines()) == 4
    finally:
        if client is not None:
            await client.close()
        await d.stop()
        await inventory.sabakan.stop()


async def _empty(storage: Storage) -> bool:
    return not await storage.get_repair_entries()
