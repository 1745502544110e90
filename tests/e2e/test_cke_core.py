"""cke replicas on a 3-member etcd: election, fencing, records, ckecli."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from etcd3aio import Etcd3Client, prefix_range_end

from cke.common.etcd import make_client
from cke.devenv import BedConfig, TestBed
from cke.devenv.replicas import CkeReplica, ckecli, write_cke_config
from cke.records import Record
from cke.storage import KEY_RECORDS, KEY_RECORDS_PREFIX, KEY_STATUS, record_key_suffix

# Loopback addresses that nobody serves: no traffic ever leaves this machine.
GOOD_CLUSTER = """
name: test
nodes:
  - address: 127.254.0.1
    hostname: cp1
    user: root
    control_plane: true
  - address: 127.254.0.2
    hostname: w1
    user: root
service_subnet: 10.68.0.0/16
"""


@pytest.fixture(scope="module")
async def etcd3() -> AsyncIterator[TestBed]:
    bed = TestBed(BedConfig(etcd_members=3, nodes=0, vault=False))
    await bed.start()
    try:
        yield bed
    finally:
        await bed.stop()


class Deployment:
    """Three cke replicas sharing one prefix on the bed's etcd."""

    def __init__(self, bed: TestBed, ttl: str = "3s") -> None:
        self.bed = bed
        self.prefix = f"/cke-{uuid.uuid4().hex[:8]}/"
        self.dir = bed.base_dir / self.prefix.strip("/")
        self.config = write_cke_config(bed.etcd.settings(self.prefix), self.dir / "config.yml")
        self.replicas = [
            CkeReplica(f"cke{i}", self.config, self.dir, session_ttl=ttl) for i in range(3)
        ]
        self.client: Etcd3Client = make_client(bed.etcd.settings(self.prefix))

    async def __aenter__(self) -> Deployment:
        await self.client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for r in self.replicas:
            await r.resume()
            await r.stop()
        await self.client.close()

    async def start(self) -> None:
        for r in self.replicas:
            await r.start()

    def replica(self, name: str) -> CkeReplica:
        return next(r for r in self.replicas if r.name == name)

    async def status(self) -> dict[str, str]:
        assert self.client.kv is not None
        got = await self.client.kv.get(self.prefix + KEY_STATUS, timeout=5)
        return json.loads(got.kvs[0].value) if got.kvs else {}

    async def wait_status(
        self, predicate: str | None = None, timeout: float = 20.0, not_leader: str = ""
    ) -> dict[str, str]:
        """Wait for a status written after now by a leader (other than ``not_leader``)."""
        deadline = time.monotonic() + timeout
        started = time.time()
        while time.monotonic() < deadline:
            st = await self.status()
            if st and st["leader"] and st["leader"] != not_leader:
                written = time.mktime(time.strptime(st["timestamp"], "%Y-%m-%dT%H:%M:%SZ"))
                written -= time.timezone
                if written >= int(started) and (predicate is None or st["phase"] == predicate):
                    return st
            await asyncio.sleep(0.1)
        raise AssertionError(f"no fresh status in {timeout}s; last: {await self.status()}")

    async def leader(self) -> str:
        result = await ckecli(self.config, "leader")
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


async def test_exactly_one_leader_over_a_bounded_run(etcd3: TestBed) -> None:
    async with Deployment(etcd3) as d:
        await d.start()
        first = await d.wait_status()
        leader_name = first["leader"]
        for _ in range(20):
            flags = [await r.metric("cke_leader") for r in d.replicas]
            assert flags.count(1.0) == 1, flags
            assert d.replicas[flags.index(1.0)].name == leader_name
            await asyncio.sleep(0.2)
        assert await d.leader() == leader_name
        # As upstream, only the leader exports the cke_* metrics besides cke_leader.
        for r in d.replicas:
            phase_time = await r.metric("cke_operation_phase_timestamp_seconds")
            assert (phase_time is not None) == (r.name == leader_name), r.name
            assert (await r.metric("process_open_fds") or 0) > 0, r.name


async def test_killed_leader_is_replaced_within_ttl(etcd3: TestBed) -> None:
    async with Deployment(etcd3, ttl="3s") as d:
        await d.start()
        old = (await d.wait_status())["leader"]
        killed_at = time.monotonic()
        await d.replica(old).kill()
        new = await d.wait_status(not_leader=old, timeout=10)
        took = time.monotonic() - killed_at
        assert new["leader"] != old
        assert took <= 3 + 2 + 1, f"new leader acted after {took:.1f}s"  # +1: status granularity


async def test_sigterm_leader_resigns_at_once(etcd3: TestBed) -> None:
    async with Deployment(etcd3, ttl="10s") as d:
        await d.start()
        old = (await d.wait_status())["leader"]
        stopped_at = time.monotonic()
        code = await d.replica(old).stop()
        assert code == 0
        new = await d.wait_status(not_leader=old, timeout=10)
        took = time.monotonic() - stopped_at
        assert new["leader"] != old
        assert took <= 2 + 1, f"successor acted after {took:.1f}s"  # +1: status granularity
        assert "resigned leadership" in d.replica(old).log()


async def test_paused_leader_writes_nothing_after_losing_its_lease(etcd3: TestBed) -> None:
    async with Deployment(etcd3, ttl="2s") as d:
        await d.start()
        old = (await d.wait_status())["leader"]
        paused = d.replica(old)
        await paused.pause()
        new = (await d.wait_status(not_leader=old, timeout=15))["leader"]
        assert d.client.kv is not None and d.client.watch is not None
        revision = (await d.client.kv.get(d.prefix + KEY_STATUS)).header.revision
        writers: list[str] = []

        async def collect() -> None:
            assert d.client.watch is not None
            start = d.prefix.encode()
            async for resp in d.client.watch.watch(
                start, range_end=prefix_range_end(start), start_revision=revision + 1
            ):
                for event in resp.events:
                    if event.kv.key == (d.prefix + KEY_STATUS).encode():
                        writers.append(json.loads(event.kv.value)["leader"])

        watcher = asyncio.create_task(collect())
        await paused.resume()
        await asyncio.sleep(4)
        watcher.cancel()
        assert writers, "the new leader kept writing its status"
        assert set(writers) == {new}, f"status written by {set(writers)} after the pause"
        assert await paused.metric("cke_leader") == 0.0
        log = paused.log()
        assert "lost leadership" in log or "stepping down" in log


async def test_unfinished_record_is_cancelled_by_the_next_leader(etcd3: TestBed) -> None:
    async with Deployment(etcd3) as d:
        assert d.client.kv is not None
        stale = Record("etcd-add-member", ["127.254.0.3"], id=7, status="running")
        stale.start_command("add-member", "127.254.0.3", "")
        await d.client.kv.put(d.prefix + KEY_RECORDS, "8")
        await d.client.kv.put(d.prefix + KEY_RECORDS_PREFIX + record_key_suffix(7), stale.to_json())
        await d.start()
        leader = (await d.wait_status())["leader"]
        history = await ckecli(d.config, "history", "-o", "json")
        assert history.returncode == 0, history.stderr
        records = json.loads(history.stdout)
        assert records[0]["id"] == "7"
        assert records[0]["status"] == "cancelled"
        assert leader in records[0]["error"]
        assert records[0]["end-at"]


async def test_everything_works_with_one_etcd_member_down(etcd3: TestBed) -> None:
    async with Deployment(etcd3) as d:
        await d.start()
        await d.wait_status()
        await etcd3.etcd.stop_member("etcd2", kill=True)
        try:
            path = d.dir / "cluster.yml"
            path.write_text(GOOD_CLUSTER)
            stored = await ckecli(d.config, "cluster", "set", str(path))
            assert stored.returncode == 0, stored.stderr
            # No Vault is configured here: the leader says it waits for it, and why.
            st = await d.wait_status("etcd-wait", timeout=15)
            assert st["leader"] in {r.name for r in d.replicas}
            assert [b["rule"] for b in st["blocked"]] == ["vault-available"]  # type: ignore[index]
            got = await ckecli(d.config, "cluster", "get", "-o", "json")
            assert json.loads(got.stdout)["nodes"][0]["address"] == "127.254.0.1"
        finally:
            await etcd3.etcd.start_member("etcd2")


async def _snapshot(client: Etcd3Client, prefix: str) -> list[tuple[bytes, int]]:
    assert client.kv is not None
    resp = await client.kv.get(prefix, range_end=prefix_range_end(prefix.encode()))
    return [(kv.key, kv.mod_revision) for kv in resp.kvs]


async def test_ckecli_cluster_set_refuses_a_bad_file_and_changes_nothing(
    etcd3: TestBed, tmp_path: Path
) -> None:
    async with Deployment(etcd3) as d:
        good = tmp_path / "good.yml"
        good.write_text(GOOD_CLUSTER)
        assert (await ckecli(d.config, "cluster", "set", str(good))).returncode == 0
        before = await _snapshot(d.client, d.prefix)
        bad = tmp_path / "bad.yml"
        bad.write_text(GOOD_CLUSTER.replace("127.254.0.2", "127.254.0.1"))
        result = await ckecli(d.config, "cluster", "set", str(bad))
        assert result.returncode == 1
        assert "nodes[1].address" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert await _snapshot(d.client, d.prefix) == before


async def test_ckecli_cluster_and_constraints_round_trip(etcd3: TestBed, tmp_path: Path) -> None:
    async with Deployment(etcd3) as d:
        path = tmp_path / "c.yml"
        path.write_text(GOOD_CLUSTER)
        first = await ckecli(d.config, "cluster", "set", str(path))
        assert first.returncode == 0 and "+- address: 127.254.0.1" in first.stdout
        again = await ckecli(d.config, "cluster", "set", str(path))
        assert again.stdout.strip() == "cluster unchanged"
        yaml_out = await ckecli(d.config, "cluster", "get")
        assert "127.254.0.2" in yaml_out.stdout
        # Two control planes would contradict control-plane-count 1 ...
        two = await ckecli(d.config, "constraints", "set", "control-plane-count", "2")
        assert two.returncode == 1 and "control-plane-count" in two.stderr
        bad = await ckecli(d.config, "constraints", "set", "no-such-thing", "1")
        assert bad.returncode == 1 and "no-such-thing" in bad.stderr
        ok = await ckecli(d.config, "constraints", "set", "maximum-repair-queue-entries", "5")
        assert ok.returncode == 0, ok.stderr
        shown = await ckecli(d.config, "constraints", "show", "-o", "json")
        doc = json.loads(shown.stdout)
        assert doc["maximum-repair-queue-entries"] == 5
        assert doc["control-plane-count"] == 1
        # No cke has run on this prefix: no status, exit status 4 (as upstream).
        status = await ckecli(d.config, "status", "-o", "yaml")
        assert status.returncode == 4 and "no status" in status.stderr
        no_leader = await ckecli(d.config, "leader")
        assert no_leader.returncode == 1 and "no leader" in no_leader.stderr


async def test_hostile_stored_cluster_never_crashes_a_replica(etcd3: TestBed) -> None:
    """Issue 10: a stored value the runtime cannot use (written by an older ckecli, or by
    hand with etcdctl) made every replica die in decide() and crash-loop on restart. Now
    the leader says ``config-invalid`` with the field and keeps leading; a fix recovers."""
    from cke.cluster import cluster_to_json, parse_cluster
    from cke.storage import KEY_CLUSTER

    good = json.loads(cluster_to_json(parse_cluster(GOOD_CLUSTER)))
    hostile = {**good, "binaries": {**good["binaries"], "etcd": "/usr/bin/etcd;touch /tmp/x"}}
    async with Deployment(etcd3) as d:
        await d.start()
        await d.wait_status()
        assert d.client.kv is not None
        for value, field in [
            (json.dumps(hostile).encode(), "binaries.etcd"),
            (b'{"name": "\xff\xfe"}', "cluster: the stored value is not UTF-8"),
            (
                json.dumps(
                    {**good, "nodes": [{**good["nodes"][0], "address": "::ffff:127.0.1.3"}]}
                ).encode(),
                "nodes[0].address",
            ),
        ]:
            await d.client.kv.put(d.prefix + KEY_CLUSTER, value, timeout=5)
            deadline = time.monotonic() + 20
            while True:
                st = await d.status()
                messages = " ".join(b["message"] for b in st.get("blocked", []))
                if st.get("phase") == "config-invalid" and field in messages:
                    break
                assert time.monotonic() < deadline, st
                await asyncio.sleep(0.2)
            assert all(r.running for r in d.replicas), [r.log() for r in d.replicas]
        await d.client.kv.put(d.prefix + KEY_CLUSTER, json.dumps(good).encode(), timeout=5)
        deadline = time.monotonic() + 20
        while (await d.status()).get("phase") == "config-invalid":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert all(r.running for r in d.replicas)
        assert "Traceback" not in "".join(r.log() for r in d.replicas)


async def test_ckecli_hostile_inputs_give_one_line_errors_and_change_nothing(
    etcd3: TestBed, tmp_path: Path
) -> None:
    """Issue 10, item 8: non-UTF-8 files, clusters over etcd's request limit and absurd
    ``-n`` values: a one-line error before any diff, exit 1, nothing stored."""
    from cke.storage import KEY_CLUSTER

    async with Deployment(etcd3) as d:
        good = tmp_path / "good.yml"
        good.write_text(GOOD_CLUSTER)
        assert (await ckecli(d.config, "cluster", "set", str(good))).returncode == 0
        before = await _snapshot(d.client, d.prefix)
        latin1 = tmp_path / "latin1.yml"
        latin1.write_bytes(GOOD_CLUSTER.replace("cp1", "c\xe9").encode("latin-1"))
        huge = tmp_path / "huge.yml"
        labels = "".join(f"      k{i}: {'v' * 60}\n" for i in range(20000))
        huge.write_text(GOOD_CLUSTER.replace("    hostname: w1\n", f"    labels:\n{labels}"))
        for args, expected in [
            (("cluster", "set", str(latin1)), "not UTF-8 text"),
            (("cluster", "set", str(huge)), "more than the limit of 1048576"),
            (("history", "-n", "99999999999999999999"), "-n: must be between 0 and"),
            (("history", "-n", "-1"), "-n: must be between 0 and"),
        ]:
            result = await ckecli(d.config, *args)
            assert result.returncode == 1, (args, result)
            assert expected in result.stderr and result.stdout == "", (args, result)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert "Traceback" not in result.stderr
        assert await _snapshot(d.client, d.prefix) == before
        # A stored cluster that is not UTF-8 (written by hand): ckecli says so in one line.
        assert d.client.kv is not None
        await d.client.kv.put(d.prefix + KEY_CLUSTER, b"\xff\xfe", timeout=5)
        got = await ckecli(d.config, "cluster", "get")
        assert got.returncode == 1 and "not UTF-8" in got.stderr
        assert len(got.stderr.strip().splitlines()) == 1 and "Traceback" not in got.stderr


async def test_ckecli_status_exits_0_once_cke_wrote_a_status(etcd3: TestBed) -> None:
    """Issue 18: exit status 4 is only for "no status"; a running cke's status is 0."""
    async with Deployment(etcd3) as d:
        await d.start()
        leader = (await d.wait_status())["leader"]
        result = await ckecli(d.config, "status", "-o", "json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["leader"] == leader
