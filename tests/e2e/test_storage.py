"""The storage layer's transactions against real etcd."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from cke.common.etcd import make_client
from cke.devenv import TestBed
from cke.records import Record
from cke.storage import Conflict, LeaderKey, NotLeader, Storage


@pytest.fixture
async def storage(bed: TestBed) -> AsyncIterator[Storage]:
    client = make_client(bed.etcd.settings())
    await client.connect()
    try:
        yield Storage(client, f"/storage-{uuid.uuid4().hex[:8]}/")
    finally:
        await client.close()


async def _become_leader(storage: Storage, name: str = "me") -> LeaderKey:
    assert storage.client.lease is not None
    lease = await storage.client.lease.grant(ttl=30)
    key = storage.key(f"leader/{int(lease.ID):016x}")
    put = await storage.kv.put(key, name, lease=int(lease.ID))
    return LeaderKey(key, put.header.revision, int(lease.ID), name)


async def test_fenced_write_needs_the_leader_key(storage: Storage) -> None:
    leader = await _become_leader(storage)
    assert await storage.fenced(leader, [storage.kv.txn_op_put(storage.key("x"), "1")])
    await storage.kv.delete(leader.key)
    with pytest.raises(NotLeader):
        await storage.fenced(leader, [storage.kv.txn_op_put(storage.key("x"), "2")])
    assert (await storage.get("x")).value == b"1"


async def test_fenced_write_refuses_a_recreated_leader_key(storage: Storage) -> None:
    leader = await _become_leader(storage)
    await storage.kv.delete(leader.key)
    await storage.kv.put(leader.key, "someone-else")  # same key, new create revision
    with pytest.raises(NotLeader):
        await storage.fenced(leader, [storage.kv.txn_op_put(storage.key("y"), "1")])
    assert (await storage.get("y")).value is None


async def test_records_get_increasing_ids_and_are_trimmed(storage: Storage) -> None:
    leader = await _become_leader(storage)
    storage.record_limit = 3
    ids = []
    for i in range(5):
        record = await storage.register_record(leader, Record(f"op{i}"))
        ids.append(record.id)
    assert ids == [1, 2, 3, 4, 5]
    kept = await storage.get_records()
    assert [r.id for r in kept] == [5, 4, 3]
    assert [r.operation for r in await storage.get_records(2)] == ["op4", "op3"]


async def test_record_updates_are_fenced(storage: Storage) -> None:
    leader = await _become_leader(storage)
    record = await storage.register_record(leader, Record("op"))
    await storage.kv.delete(leader.key)
    record.finish()
    with pytest.raises(NotLeader):
        await storage.update_record(leader, record)
    assert (await storage.get_records(1))[0].status == "new"


async def test_cluster_write_loses_against_a_concurrent_constraint_change(
    storage: Storage,
) -> None:
    cluster = await storage.get_cluster()
    constraints = await storage.get_constraints()
    await storage.compare_and_put("constraints", '{"control-plane-count": 3}', 0)
    with pytest.raises(Conflict):
        await storage.put_cluster_and_constraints(
            '{"name": "x"}', cluster.mod_revision, None, constraints.mod_revision
        )
    assert (await storage.get_cluster()).value is None
    with pytest.raises(Conflict):
        await storage.compare_and_put("constraints", "{}", 0)
