"""One machine under two node entries never loses its etcd data (issue 10, item 1).

A worker entry whose address reaches the only control plane's sshd (a second NIC; here
a loopback forwarder to its port 22) made cke wipe that control plane's data through
the alias, again and again.  With one control plane that is the only copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
import yaml

from cke.devenv import TestBed
from cke.devenv.deploy import Deployment
from cke.devenv.nodes import address_free
from tests.conftest import BedFactory

pytestmark = pytest.mark.e2e


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def start_forwarder(listen: str, target: str, port: int = 22) -> asyncio.Server:
    """A TCP forwarder ``listen:port`` -> ``target:port`` in this process (loopback only)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(target, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_forward(reader, up_writer), _forward(up_reader, writer))

    return await asyncio.start_server(handle, listen, port)


async def test_alias_of_the_only_control_plane_keeps_its_data(bed_factory: BedFactory) -> None:
    bed: TestBed = await bed_factory(etcd_members=1, nodes=2)
    d = Deployment(bed, replicas=1, interval="1s")
    await d.setup()
    forwarder: asyncio.Server | None = None
    try:
        cp, spare = bed.nodes
        assert (await d.set_cluster([cp], [spare])).returncode == 0
        await d.wait_for("completed", timeout=120, voters=1)
        client = await d.root_client([cp.address])
        try:
            assert client.kv is not None
            await client.kv.put("/canary", "alive", timeout=5)
        finally:
            await client.close()
        db = "/var/lib/cke/etcd/member/snap/db"
        assert (await bed.run(cp, f"test -f {db} && echo yes")).stdout == b"yes\n"

        prefix = cp.address.rsplit(".", 1)[0]
        alias = next(f"{prefix}.{i}" for i in range(200, 250) if address_free(f"{prefix}.{i}", 22))
        forwarder = await start_forwarder(alias, cp.address)
        doc = yaml.safe_load(d.cluster_yaml([cp], [spare]))
        doc["nodes"].append({"address": alias, "hostname": "alias", "user": "root"})
        before = {r["id"] for r in json.loads((await d.ckecli("history", "-o", "json")).stdout)}
        stored = await d.ckecli("cluster", "set", "-", stdin=yaml.safe_dump(doc).encode())
        assert stored.returncode == 0, stored.stderr

        # The leader names both entries under one-entry-per-machine ...
        deadline = time.monotonic() + 30
        blocked: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            blocked = (await d.status()).get("blocked") or []  # type: ignore[assignment]
            if any(b["rule"] == "one-entry-per-machine" for b in blocked):
                break
            await asyncio.sleep(0.5)
        rule = next(b for b in blocked if b["rule"] == "one-entry-per-machine")
        assert sorted(rule["nodes"]) == sorted([cp.address, alias])  # type: ignore[arg-type]
        # ... and over several more rounds touches nothing: no record, the data stays.
        await asyncio.sleep(6)
        records = json.loads((await d.ckecli("history", "-o", "json")).stdout)
        assert [r["operation"] for r in records if r["id"] not in before] == []
        assert (await bed.run(cp, f"test -f {db} && echo yes")).stdout == b"yes\n"
        client = await d.root_client([cp.address])
        try:
            assert client.kv is not None
            assert (await client.kv.get("/canary", timeout=5)).kvs[0].value == b"alive"
        finally:
            await client.close()
        text = (await d.ckecli("status")).stdout
        assert "one-entry-per-machine" in text and alias in text
    finally:
        if forwarder is not None:
            forwarder.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(forwarder.wait_closed(), 5)
        await d.stop()
