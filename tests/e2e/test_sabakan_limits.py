"""sabakan's limits: request bodies, per-machine caps, and no etcd key that grows with
the number of machines (on an etcd of its own with a small --max-request-bytes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from etcd3aio import prefix_range_end

from cke.common.etcd import make_client
from cke.devenv import TestBed
from cke.devenv.etcd import EtcdCluster, EtcdMember
from cke.devenv.pki import DevCA
from sabakan.model import (
    MAX_ADDRESSES,
    MAX_BODY_BYTES,
    MAX_LABELS,
    Machine,
    MachineSpec,
    MachineState,
    MachineStatus,
    now,
)
from sabakan.storage import INDEX_MARKER
from sabakan.testing import SabakanProcess
from tests.e2e.test_sabakan_api import _call, _prefix


@pytest.fixture
async def sabakan(bed: TestBed, tmp_path: Path) -> AsyncIterator[SabakanProcess]:
    proc = SabakanProcess(tmp_path / "sabakan", bed.etcd.settings(_prefix()))
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


async def _chunks(data: bytes, size: int = 16384) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_oversized_bodies_get_413_json_on_every_endpoint(sabakan: SabakanProcess) -> None:
    url = sabakan.url
    assert (await _call("POST", f"{url}/api/v1/machines", [{"serial": "big"}]))[0] == 201
    one = {"serial": "x", "labels": {f"k{i}": "v" * 200 for i in range(MAX_LABELS)}}
    big = json.dumps([one] * 60).encode()  # well-formed, just too large
    assert len(big) > MAX_BODY_BYTES
    requests = [
        ("POST", "machines"),
        ("PUT", "state/big"),
        ("PUT", "labels/big"),
        ("PUT", "retire-date/big"),
        ("DELETE", "retire-date/big"),
        ("DELETE", "machines/big"),
        ("DELETE", "labels/big/k"),
    ]
    for method, path in requests:
        # with a Content-Length, and chunked (no length known in advance)
        for data in (big, _chunks(big)):
            st, body = await _call(method, f"{url}/api/v1/{path}", data=data)
            assert st == 413, (method, path, st, body)
            assert str(MAX_BODY_BYTES) in body["error"], body
    _, machines = await _call("GET", f"{url}/api/v1/machines")
    assert [m["spec"]["serial"] for m in machines] == ["big"]
    assert machines[0]["spec"]["labels"] == {} and machines[0]["status"]["state"] == "uninitialized"
    # a body just under the limit is read and judged on its fields
    st, body = await _call("PUT", f"{url}/api/v1/state/big", data=b" " * (MAX_BODY_BYTES - 1))
    assert st == 400 and body["error"].startswith("state:")


def _labels(n: int) -> dict[str, str]:
    return {f"label{i}": "v" for i in range(n)}


def _v4(n: int) -> list[str]:
    return [f"10.77.{i // 250}.{i % 250 + 1}" for i in range(n)]


def _v6(n: int) -> list[str]:
    return [f"fd00::{i + 1:x}" for i in range(n)]


CAPPED: list[tuple[dict[str, Any], str, str]] = [
    ({"labels": _labels(MAX_LABELS + 1)}, "[0].labels", f"at most {MAX_LABELS} labels"),
    ({"ipv4": _v4(MAX_ADDRESSES + 1)}, "[0].ipv4", f"at most {MAX_ADDRESSES} addresses"),
    ({"ipv6": _v6(MAX_ADDRESSES + 1)}, "[0].ipv6", f"at most {MAX_ADDRESSES} addresses"),
    ({"ipv6": ["fd00::1", "fd00::0:1"]}, "[0].ipv6", "duplicate"),
    ({"labels": {"k" * 129: "v"}}, "[0].labels", "at most 128 characters"),
    ({"labels": {"k": "v" * 257}}, "[0].labels", "at most 256 characters"),
    ({"bmc": {"type": "t" * 65}}, "[0].bmc", "at most 64 characters"),
    ({"serial": "s" * 129}, "[0].serial", "max 128"),
    ({"role": "r" * 129}, "[0].role", "max 128"),
]


async def test_caps_per_machine_give_400_naming_the_field(sabakan: SabakanProcess) -> None:
    url = sabakan.url
    ok = {"serial": "full", "labels": _labels(MAX_LABELS), "ipv4": _v4(MAX_ADDRESSES)}
    ok["ipv6"] = _v6(MAX_ADDRESSES)
    assert (await _call("POST", f"{url}/api/v1/machines", [ok]))[0] == 201
    for over, field, words in CAPPED:
        spec = {"serial": "capped", **over}
        st, body = await _call("POST", f"{url}/api/v1/machines", [spec])
        assert st == 400, (over, body)
        assert body["error"].startswith(field) and words in body["error"], body
        assert len(body["error"]) < 600  # the offending value is never echoed whole

    # PUT merges: 64 labels are allowed, the 65th is not; replacing one is.
    st, body = await _call("PUT", f"{url}/api/v1/labels/full", {"label0": "new"})
    assert st == 200 and body["spec"]["labels"]["label0"] == "new"
    st, body = await _call("PUT", f"{url}/api/v1/labels/full", {"one-more": "v"})
    assert st == 400 and body["error"].startswith("labels:") and str(MAX_LABELS) in body["error"]
    st, body = await _call("PUT", f"{url}/api/v1/labels/full", _labels(MAX_LABELS + 1))
    assert st == 400 and body["error"].startswith("labels:")
    _, machine = await _call("GET", f"{url}/api/v1/machines?serial=full")
    assert len(machine[0]["spec"]["labels"]) == MAX_LABELS


MALFORMED: list[tuple[str, str, bytes, str]] = [
    ("POST", "machines", b"[" * 5000 + b"]" * 5000, "(top)"),
    ("POST", "machines", b'[{"serial": "\xff\xfe"}]', "(top)"),
    ("POST", "machines", b'[{"serial": "a", "rack": 1e400}]', "[0].rack"),
    ("POST", "machines", b'[{"serial": "a", "rack": 99999999999999999999999}]', "[0].rack"),
    ("POST", "machines", json.dumps([{"serial": "a", "ipv4": ["1" * 5000]}]).encode(), "[0].ipv4"),
    ("PUT", "state/m1", b"\xff\xfe", "state"),
    ("PUT", "state/m1", b"x" * 100_000, "state"),
    ("PUT", "labels/m1", b'{"k": "v", "k2": {"deep": [1]}}', "labels"),
    ("PUT", "labels/m1", b"[" * 5000, "labels"),
    ("PUT", "retire-date/m1", b'"' + b"9" * 100_000 + b'"', "retire-date"),
]


async def test_malformed_fields_are_400_never_500(sabakan: SabakanProcess) -> None:
    url = sabakan.url
    assert (await _call("POST", f"{url}/api/v1/machines", [{"serial": "m1"}]))[0] == 201
    headers = {"Content-Type": "text/plain; charset=no-such-charset"}
    for method, path, data, field in MALFORMED:
        st, body = await _call(method, f"{url}/api/v1/{path}", data=data, headers=headers)
        assert st == 400, (path, data[:40], st, body)
        assert isinstance(body, dict) and body["error"].startswith(field), body
        assert len(body["error"]) < 600, body
    st, body = await _call("GET", f"{url}/api/v1/machines?labels=" + "x" * 4000)
    assert st == 400 and len(body["error"]) < 600


class _SmallEtcd(EtcdCluster):
    """A plain-HTTP etcd whose request limit is small enough to hit in a test."""

    def __init__(self, directory: Path, limit: int) -> None:
        super().__init__(directory, DevCA(directory / "pki"), members=1, tls=False)
        self.limit = limit

    def _argv(self, m: EtcdMember) -> list[str]:
        return [*super()._argv(m), f"--max-request-bytes={self.limit}"]


@pytest.fixture
async def small_etcd(tmp_path: Path) -> AsyncIterator[_SmallEtcd]:
    etcd = _SmallEtcd(tmp_path / "etcd", limit=32 * 1024)
    try:
        await etcd.start()
        yield etcd
    finally:
        await etcd.stop()


async def _value_sizes(etcd: EtcdCluster, prefix: str) -> dict[str, int]:
    client = make_client(etcd.settings(prefix))
    await client.connect()
    try:
        assert client.kv is not None
        resp = await client.kv.get(prefix, range_end=prefix_range_end(prefix.encode()))
        return {kv.key.decode()[len(prefix) :]: len(kv.value) for kv in resp.kvs}
    finally:
        await client.close()


async def test_no_key_grows_with_the_machines(small_etcd: _SmallEtcd, tmp_path: Path) -> None:
    """Layout 1 kept every serial, address and slot in one ``index`` key: with 300
    machines of 100-character serials it is ~55 KB, past this etcd's 32 KiB request
    limit, and every registration and deletion failed from about the 190th machine."""
    prefix = _prefix()
    proc = SabakanProcess(tmp_path / "sabakan", small_etcd.settings(prefix))
    await proc.start()
    url = proc.url
    try:
        largest: list[int] = []
        for batch in range(30):
            specs = [
                {
                    "serial": f"{batch * 10 + i:04d}-" + "s" * 95,
                    "rack": batch % 3,
                    "ipv4": [f"10.{batch}.0.{i + 1}"],
                }
                for i in range(10)
            ]
            st, body = await _call("POST", f"{url}/api/v1/machines", specs)
            assert st == 201, (batch, body)
            if batch in (4, 29):
                sizes = await _value_sizes(small_etcd, prefix)
                largest.append(max(v for k, v in sizes.items() if not k.startswith("audit/")))
        # 50 machines or 300: the largest record is one machine's (a few digits longer
        # at most), the index a marker
        assert max(largest) < 1024 and abs(largest[0] - largest[1]) < 16, largest
        sizes = await _value_sizes(small_etcd, prefix)
        assert sizes["index"] == len(INDEX_MARKER)
        assert max(sizes.values()) < 8 * 1024  # audit records hold at most one batch

        # every kind of write still works, and reads page through all machines
        serial = "0299-" + "s" * 95
        for state in ("retiring", "retired"):
            assert (await _call("PUT", f"{url}/api/v1/state/{serial}", data=state))[0] == 200
        assert (await _call("DELETE", f"{url}/api/v1/machines/{serial}"))[0] == 200
        st, body = await _call("POST", f"{url}/api/v1/machines", [{"serial": "late"}])
        assert st == 201 and body[0]["spec"]["index-in-rack"] == 101  # rack 0: 100 before
        st, body = await _call(
            "POST", f"{url}/api/v1/machines", [{"serial": "dup", "ipv4": ["10.3.0.4"]}]
        )
        assert st == 409 and "0033-" in body["error"]
        _, machines = await _call("GET", f"{url}/api/v1/machines")
        assert len(machines) == 300

        # a batch this etcd cannot take in one request: a JSON 413, not a 500
        heavy = [
            {"serial": f"heavy{i}", "labels": {f"k{j}": "v" * 200 for j in range(10)}}
            for i in range(20)
        ]
        st, body = await _call("POST", f"{url}/api/v1/machines", heavy)
        assert st == 413 and "max-request-bytes" in body["error"], body
        assert (await _call("GET", f"{url}/api/v1/machines?serial=heavy0"))[1] == []
    finally:
        await proc.stop()


async def test_layout1_data_is_migrated_on_start(bed: TestBed, tmp_path: Path) -> None:
    """Records written by the old layout (machines plus one ``index`` registry) are
    served as they are; the registry is replaced by the fixed-size marker on start."""
    prefix = _prefix()
    settings = bed.etcd.settings(prefix)
    when = now()
    old: dict[str, Any] = {"machines": {}}
    client = make_client(settings)
    await client.connect()
    try:
        assert client.kv is not None
        for i in range(1, 4):
            spec = MachineSpec.model_validate(
                {
                    "serial": f"old{i}",
                    "rack": 7,
                    "index-in-rack": i,
                    "ipv4": [f"10.7.0.{i}"],
                    "register-date": when,
                    "labels": {"from": "layout1"},
                }
            )
            state = MachineState.RETIRED if i == 3 else MachineState.HEALTHY
            machine = Machine(spec=spec, status=MachineStatus(state=state, timestamp=when))
            await client.kv.put(f"{prefix}machines/old{i}", machine.dump())
            old["machines"][f"old{i}"] = {"rack": 7, "index": i, "ipv4": [f"10.7.0.{i}"]}
        await client.kv.put(f"{prefix}index", json.dumps(old))

        proc = SabakanProcess(tmp_path / "sabakan", settings)
        await proc.start()
        try:
            assert (await client.kv.get(f"{prefix}index")).kvs[0].value.decode() == INDEX_MARKER
            url = proc.url
            _, machines = await _call("GET", f"{url}/api/v1/machines")
            assert [m["spec"]["serial"] for m in machines] == ["old1", "old2", "old3"]
            assert machines[0]["spec"]["labels"] == {"from": "layout1"}
            st, body = await _call("POST", f"{url}/api/v1/machines", [{"serial": "old2"}])
            assert st == 409 and "already exists" in body["error"]
            st, body = await _call(
                "POST", f"{url}/api/v1/machines", [{"serial": "n", "ipv4": ["10.7.0.1"]}]
            )
            assert st == 409 and "old1" in body["error"]
            assert (await _call("DELETE", f"{url}/api/v1/machines/old3"))[0] == 200
            st, body = await _call("POST", f"{url}/api/v1/machines", [{"serial": "n", "rack": 7}])
            assert st == 201 and body[0]["spec"]["index-in-rack"] == 3  # old3's slot is free
        finally:
            await proc.stop()
    finally:
        await client.close()


async def test_concurrent_registrations_never_share_an_address_or_slot(
    bed: TestBed, tmp_path: Path
) -> None:
    """The guard on ``index`` replaces the old registry's compare-and-swap: racing
    registrations on two replicas never both take an address or a rack slot."""
    settings = bed.etcd.settings(_prefix())
    a = SabakanProcess(tmp_path, settings, name="replica-a")
    b = SabakanProcess(tmp_path, settings, name="replica-b")
    await asyncio.gather(a.start(), b.start())
    try:
        specs = [
            [{"serial": f"c{i}", "rack": 5, "ipv4": [f"10.5.0.{i % 6 + 1}"]}] for i in range(24)
        ]
        results = await asyncio.gather(
            *(
                _call("POST", f"{(a, b)[i % 2].url}/api/v1/machines", spec)
                for i, spec in enumerate(specs)
            )
        )
        assert all(st in (201, 409) for st, _ in results), results
        created = [body[0]["spec"] for st, body in results if st == 201]
        assert len(created) == 6  # one per address
        _, stored = await _call("GET", f"{a.url}/api/v1/machines")
        assert sorted(m["spec"]["serial"] for m in stored) == sorted(s["serial"] for s in created)
        assert sorted(m["spec"]["index-in-rack"] for m in stored) == [1, 2, 3, 4, 5, 6]
        assert len({m["spec"]["ipv4"][0] for m in stored}) == 6
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_a_damaged_machine_record_does_not_hide_the_others(
    sabakan: SabakanProcess,
) -> None:
    """A record written by hand (or a bug) that cannot be read is left out of listings
    (and so of the state setter's rounds), with a log line; the others stay visible."""
    url = sabakan.url
    st, _ = await _call("POST", f"{url}/api/v1/machines", [{"serial": "good1"}])
    assert st == 201
    client = make_client(sabakan.settings)
    await client.connect()
    try:
        assert client.kv is not None
        await client.kv.put(f"{sabakan.settings.prefix}machines/broken", b"{not json")
    finally:
        await client.close()
    st, machines = await _call("GET", f"{url}/api/v1/machines")
    assert st == 200 and [m["spec"]["serial"] for m in machines] == ["good1"]
