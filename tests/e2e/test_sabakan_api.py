"""sabakan's REST API and sabactl against real sabakan processes and the bed's etcd."""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cke.devenv import TestBed
from cke.devenv.procs import free_port
from sabakan.model import TRANSITIONS, MachineState
from sabakan.testing import SabakanProcess

S = MachineState


def _prefix() -> str:
    return f"/sabakan-test-{uuid.uuid4().hex}/"


async def _call(
    method: str, url: str, body: Any = None, text: str | None = None, data: Any = None, **kw: Any
) -> tuple[int, Any]:
    """``(status, JSON or text)``; the body is ``data`` (bytes, a stream), ``text`` or
    ``body`` as JSON."""
    if data is None:
        data = text if text is not None else (json.dumps(body) if body is not None else None)
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, **kw) as resp,
    ):
        raw = await resp.text()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw


async def _logs(url: str, **kw: Any) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/api/v1/logs", **kw) as resp:
        assert resp.status == 200
        return [json.loads(line) for line in (await resp.text()).splitlines() if line]


async def _stored(url: str) -> list[Any]:
    """Every machine's spec, state and timestamp (not the ever-growing duration)."""
    _, machines = await _call("GET", f"{url}/api/v1/machines")
    return [(m["spec"], m["status"]["state"], m["status"]["timestamp"]) for m in machines]


@pytest.fixture
async def sabakan(bed: TestBed, tmp_path: Path) -> AsyncIterator[SabakanProcess]:
    proc = SabakanProcess(tmp_path / "sabakan", bed.etcd.settings(_prefix()))
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


def _path_to(state: MachineState) -> list[MachineState]:
    """The shortest chain of allowed transitions from uninitialized to ``state``."""
    queue = deque([[S.UNINITIALIZED]])
    while queue:
        path = queue.popleft()
        if path[-1] is state:
            return path[1:]
        queue.extend([*path, n] for n in TRANSITIONS[path[-1]] if n not in path)
    raise AssertionError(state)


async def test_every_transition_allowed_or_refused(sabakan: SabakanProcess) -> None:
    pairs = [(a, b) for a in S for b in S]
    specs = [{"serial": f"m{i}", "rack": i % 4, "role": "cs"} for i in range(len(pairs))]
    status, _ = await _call("POST", f"{sabakan.url}/api/v1/machines", specs)
    assert status == 201

    async def one(i: int, current: MachineState, target: MachineState) -> None:
        for step in _path_to(current):
            st, _ = await _call("PUT", f"{sabakan.url}/api/v1/state/m{i}", text=step.value)
            assert st == 200
        st, body = await _call("PUT", f"{sabakan.url}/api/v1/state/m{i}", text=target.value)
        # Upstream: the state a machine already has is a 200 no-op.
        if target is current or target in TRANSITIONS[current]:
            assert st == 200, body
            assert body["status"]["state"] == target.value
        else:
            assert st == 409
            assert current.value in body["error"] and target.value in body["error"]
        _, state = await _call("GET", f"{sabakan.url}/api/v1/state/m{i}")
        assert state == (target if target in TRANSITIONS[current] else current).value

    await asyncio.gather(*(one(i, a, b) for i, (a, b) in enumerate(pairs)))
    # One audit record per change: none for a refused change or a same-state no-op.
    changes = len([r for r in await _logs(sabakan.url) if r["action"] == "state"])
    steps = sum(len(_path_to(a)) + (b in TRANSITIONS[a]) for a, b in pairs)
    assert changes == steps

    # Only a retired machine may be deleted.
    st, body = await _call("DELETE", f"{sabakan.url}/api/v1/machines/m0")
    assert st == 409 and "retired" in body["error"]
    retired = pairs.index((S.RETIRING, S.RETIRED))
    assert (await _call("DELETE", f"{sabakan.url}/api/v1/machines/m{retired}"))[0] == 200
    assert (await _call("GET", f"{sabakan.url}/api/v1/state/m{retired}"))[0] == 404


async def test_register_query_labels_retire_date(sabakan: SabakanProcess) -> None:
    url = sabakan.url
    specs = [
        {"serial": "a1", "rack": 1, "role": "cs", "ipv4": ["10.1.0.1"], "labels": {"p": "x"}},
        {"serial": "a2", "rack": 1, "role": "ss", "ipv4": ["10.1.0.2"], "labels": {"p": "y"}},
        {"serial": "a3", "rack": 2, "role": "cs", "ipv4": ["10.1.0.3"], "bmc": {"type": "IPMI"}},
    ]
    status, created = await _call("POST", f"{url}/api/v1/machines", specs)
    assert status == 201
    assert [m["spec"]["index-in-rack"] for m in created] == [1, 2, 1]
    assert all(m["status"]["state"] == "uninitialized" for m in created)

    async def serials(query: str) -> list[str]:
        st, body = await _call("GET", f"{url}/api/v1/machines?{query}")
        assert st == 200, body
        return [m["spec"]["serial"] for m in body]

    assert await serials("rack=1") == ["a1", "a2"]
    assert await serials("role=cs") == ["a1", "a3"]
    assert await serials("labels=p=y") == ["a2"]
    assert await serials("ipv4=10.1.0.3") == ["a3"]
    assert await serials("without-role=cs") == ["a2"]
    assert await serials("serial=a1,a3") == ["a1", "a3"]
    assert await serials("bmc-type=IPMI") == ["a3"]
    await _call("PUT", f"{url}/api/v1/state/a1", text="healthy")
    assert await serials("state=healthy") == ["a1"]
    assert await serials("without-state=healthy") == ["a2", "a3"]
    assert (await _call("GET", f"{url}/api/v1/machines?state=fine"))[0] == 400
    assert (await _call("GET", f"{url}/api/v1/machines?colour=red"))[0] == 400

    st, body = await _call("PUT", f"{url}/api/v1/labels/a3", {"p": "z", "q": "1"})
    assert st == 200 and body["spec"]["labels"] == {"p": "z", "q": "1"}
    assert (await _call("DELETE", f"{url}/api/v1/labels/a3/q"))[0] == 200
    assert (await _call("DELETE", f"{url}/api/v1/labels/a3/q"))[0] == 404
    st, body = await _call("PUT", f"{url}/api/v1/retire-date/a3", "2031-02-03T04:05:06Z")
    assert st == 200 and body["spec"]["retire-date"] == "2031-02-03T04:05:06Z"
    assert (await _call("DELETE", f"{url}/api/v1/retire-date/a3"))[1]["spec"]["retire-date"] == ""
    assert (await _call("PUT", f"{url}/api/v1/state/nope", text="healthy"))[0] == 404

    actions = [(r["action"], r["instance"]) for r in await _logs(url)]
    assert actions == [
        ("register", "a1,a2,a3"),
        ("state", "a1"),
        ("labels", "a3"),
        ("labels", "a3"),
        ("retire-date", "a3"),
        ("retire-date", "a3"),
    ]
    st, text = await _call("GET", f"{url}/api/v1/logs?since=20000101&until=20000102")
    assert st == 200 and text == ""
    st, metrics = await _call("GET", f"{url}/metrics")
    machine = 'address="10.1.0.1",machine_type="",rack="1",role="cs",serial="a1"'
    assert f'sabakan_machine_status{{{machine},status="healthy"}} 1.0' in metrics
    assert f'sabakan_machine_status{{{machine},status="retired"}} 0.0' in metrics


BAD_BATCHES: list[tuple[Any, int, str]] = [
    ([{"serial": "n1", "colour": "red"}], 400, "[0].colour"),
    ([{"serial": "n1", "rack": "one"}], 400, "[0].rack"),
    ([{"serial": "n1", "ipv4": ["10.9.0.256"]}], 400, "[0].ipv4"),
    ([{"serial": "n1", "retire-date": "yesterday"}], 400, "[0].retire-date"),
    ([{"serial": "n1"}, {"serial": "n1"}], 400, "[1].serial"),
    (
        [{"serial": "n1", "ipv4": ["10.9.0.1"]}, {"serial": "n2", "ipv4": ["10.9.0.1"]}],
        400,
        "[1].ipv4",
    ),
    ([{"serial": "n1"}, {"serial": "dup"}], 409, "[1].serial"),
    ([{"serial": "n1"}, {"serial": "n2", "ipv4": ["10.9.9.9"]}], 409, "[1].ipv4"),
    ({"serial": "n1"}, 400, "(top)"),
]


async def test_bad_input_writes_nothing(sabakan: SabakanProcess) -> None:
    url = sabakan.url
    existing = [{"serial": "dup", "ipv4": ["10.9.9.9"]}]
    assert (await _call("POST", f"{url}/api/v1/machines", existing))[0] == 201
    before = await _stored(url)
    logs_before = await _logs(url)
    for body, status, field in BAD_BATCHES:
        st, resp = await _call("POST", f"{url}/api/v1/machines", body)
        assert st == status, (body, resp)
        assert resp["error"].startswith(field), resp
    for path, text, field in [
        ("state/dup", "fine", "state"),
        ("retire-date/dup", '"2030-01-01"', "retire-date"),
        ("retire-date/dup", "not json", "retire-date"),
        ("labels/dup", '{"k": 1}', "labels"),
        ("labels/dup", '["k"]', "labels"),
    ]:
        st, resp = await _call("PUT", f"{url}/api/v1/{path}", text=text)
        assert st == 400 and resp["error"].startswith(field), resp
    st, resp = await _call("POST", f"{url}/api/v1/machines", text="[{")
    assert st == 400
    assert (await _call("GET", f"{url}/api/v1/logs?since=last-week"))[0] == 400
    assert await _stored(url) == before
    assert await _logs(url) == logs_before


async def test_concurrent_updates_from_two_replicas(bed: TestBed, tmp_path: Path) -> None:
    settings = bed.etcd.settings(_prefix())
    a = SabakanProcess(tmp_path, settings, name="replica-a")
    b = SabakanProcess(tmp_path, settings, name="replica-b")
    await asyncio.gather(a.start(), b.start())
    try:
        assert (await _call("POST", f"{a.url}/api/v1/machines", [{"serial": "c1"}]))[0] == 201
        st, first = await _call("PUT", f"{b.url}/api/v1/state/c1", text="healthy")
        assert st == 200
        rng = random.Random(4)
        choices = ["healthy", "unhealthy", "unreachable"]
        targets = [rng.choice(choices) for _ in range(50)]
        results = await asyncio.gather(
            *(
                _call("PUT", f"{(a, b)[i % 2].url}/api/v1/state/c1", text=t)
                for i, t in enumerate(targets)
            )
        )
        assert all(st in (200, 409) for st, _ in results)
        # A 200 is a change or a no-op (the state it already had: nothing written, the
        # machine returned as stored); a change has a timestamp of its own.
        acked = {(b["status"]["timestamp"], b["status"]["state"]) for st, b in results if st == 200}
        acked.discard((first["status"]["timestamp"], "healthy"))
        assert len(acked) >= 2
        changes = [r for r in await _logs(a.url) if r["action"] == "state"]
        changes = changes[1:]  # the first one set it healthy before the race
        assert len(changes) == len(acked)  # every acknowledged change is in the log, once
        assert sorted(r["after"] for r in changes) == sorted(state for _, state in acked)
        previous = "healthy"
        for record in changes:
            assert record["before"] == previous  # a chain: no update was overwritten
            previous = record["after"]
        assert (await _call("GET", f"{b.url}/api/v1/state/c1"))[1] == previous
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_data_survives_restart(bed: TestBed, tmp_path: Path) -> None:
    settings = bed.etcd.settings(_prefix())
    first = SabakanProcess(tmp_path, settings, name="first")
    await first.start()
    try:
        specs = [{"serial": f"r{i}", "rack": 3, "ipv4": [f"10.3.0.{i}"]} for i in range(1, 6)]
        assert (await _call("POST", f"{first.url}/api/v1/machines", specs))[0] == 201
        await _call("PUT", f"{first.url}/api/v1/state/r2", text="retiring")
        before = [m["spec"] for m in (await _call("GET", f"{first.url}/api/v1/machines"))[1]]
        logs = await _logs(first.url)
    finally:
        await first.stop()
    second = SabakanProcess(tmp_path, settings, name="second")
    await second.start()
    try:
        after = (await _call("GET", f"{second.url}/api/v1/machines"))[1]
        assert [m["spec"] for m in after] == before
        assert (await _call("GET", f"{second.url}/api/v1/state/r2"))[1] == "retiring"
        assert await _logs(second.url) == logs
        # the IPv4 registry survived too
        st, _ = await _call(
            "POST", f"{second.url}/api/v1/machines", [{"serial": "x", "ipv4": ["10.3.0.4"]}]
        )
        assert st == 409
    finally:
        await second.stop()


async def test_mutations_need_an_allowed_address_or_a_client_cert(
    bed: TestBed, tmp_path: Path
) -> None:
    server = bed.ca.issue("sabakan-server", "sabakan", client=False)
    alice = bed.ca.issue("sabakan-alice", "alice", server=False)
    https_port = free_port()
    proc = SabakanProcess(
        tmp_path,
        bed.etcd.settings(_prefix()),
        extra={
            "allow-ips": ["192.0.2.1/32"],
            "https": f"127.0.0.1:{https_port}",
            "server-cert": str(server.cert),
            "server-key": str(server.key),
            "client-ca": str(bed.ca.ca_path),
        },
    )
    await proc.start()
    https = f"https://127.0.0.1:{https_port}"
    try:
        spec = [{"serial": "z1"}]
        st, body = await _call("POST", f"{proc.url}/api/v1/machines", spec)
        assert st == 401 and "error" in body
        anon = ssl.create_default_context(cafile=str(bed.ca.ca_path))
        assert (await _call("POST", f"{https}/api/v1/machines", spec, ssl=anon))[0] == 401
        assert (await _call("GET", f"{proc.url}/api/v1/machines"))[1] == []
        # the audit log needs the same credentials as a mutation
        for url, kw in ((proc.url, {}), (https, {"ssl": anon})):
            st, body = await _call("GET", f"{url}/api/v1/logs", **kw)
            assert st == 401 and "audit log" in body["error"]
            assert (await _call("HEAD", f"{url}/api/v1/logs", **kw))[0] == 401

        signed = ssl.create_default_context(cafile=str(bed.ca.ca_path))
        signed.load_cert_chain(str(alice.cert), str(alice.key))
        assert await _logs(https, ssl=signed) == []
        assert (await _call("POST", f"{https}/api/v1/machines", spec, ssl=signed))[0] == 201
        assert (await _call("PUT", f"{proc.url}/api/v1/state/z1", text="healthy"))[0] == 401
        [record] = await _logs(https, ssl=signed)
        assert record["user"] == "alice" and record["action"] == "register"

        # sabactl: credentials from a config file; errors give a non-zero exit
        conf = tmp_path / "sabactl.yml"
        conf.write_text(
            f"server: {https}\ntls-ca: {bed.ca.ca_path}\n"
            f"tls-cert: {alice.cert}\ntls-key: {alice.key}\n"
        )
        code, _out, err = await _sabactl(
            "--config-file", str(conf), "machines", "set-state", "z1", "healthy"
        )
        assert code == 0, err
        code, _, err = await _sabactl(
            "--server", proc.url, "machines", "set-state", "z1", "updating"
        )
        assert code != 0 and "401" in err
        code, out, err = await _sabactl("--config-file", str(conf), "logs")
        assert code == 0 and [json.loads(x)["action"] for x in out.splitlines()] == [
            "register",
            "state",
        ]
        code, _, err = await _sabactl("--server", proc.url, "logs")
        assert code != 0 and "401" in err
    finally:
        await proc.stop()


async def _sabactl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sabakan.sabactl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_sabactl_worked_example(sabakan: SabakanProcess, tmp_path: Path) -> None:
    srv = ("--server", sabakan.url)
    machines = tmp_path / "machines.json"
    machines.write_text(
        json.dumps(
            [
                {"serial": "1234abcd", "rack": 0, "role": "cs", "ipv4": ["10.69.0.4"]},
                {"serial": "5678efgh", "rack": 0, "role": "ss", "ipv4": ["10.69.0.5"]},
            ]
        )
    )
    assert (await _sabactl(*srv, "machines", "create", "-f", str(machines)))[0] == 0
    code, out, err = await _sabactl(*srv, "machines", "create", "-f", str(machines))
    assert code != 0 and "409" in err and "already exists" in err
    code, out, _ = await _sabactl(*srv, "machines", "get", "--role", "cs")
    assert code == 0 and [m["spec"]["serial"] for m in json.loads(out)] == ["1234abcd"]
    code, out, _ = await _sabactl(*srv, "machines", "get", "-o", "table")
    assert code == 0 and out.splitlines()[0].split()[0] == "SERIAL" and "5678efgh" in out
    assert (await _sabactl(*srv, "machines", "set-state", "1234abcd", "retiring"))[0] == 0
    code, _, err = await _sabactl(*srv, "machines", "set-state", "1234abcd", "healthy")
    assert code != 0 and "retiring to healthy" in err
    assert (await _sabactl(*srv, "machines", "set-state", "1234abcd", "retired"))[0] == 0
    assert (await _sabactl(*srv, "machines", "set-retire-date", "5678efgh", "2030-04-01"))[0] == 0
    assert (await _sabactl(*srv, "machines", "set-label", "5678efgh", "datacenter", "dc1"))[0] == 0
    code, out, _ = await _sabactl(*srv, "machines", "get", "--labels", "datacenter=dc1")
    [m] = json.loads(out)
    assert m["spec"]["retire-date"] == "2030-04-01T00:00:00Z"
    assert (await _sabactl(*srv, "machines", "remove-label", "5678efgh", "datacenter"))[0] == 0
    assert (await _sabactl(*srv, "machines", "remove", "1234abcd"))[0] == 0
    code, _, err = await _sabactl(*srv, "machines", "remove", "5678efgh")
    assert code != 0 and "only a retired machine" in err
    code, out, _ = await _sabactl(*srv, "logs")
    actions = [json.loads(line)["action"] for line in out.splitlines()]
    assert actions == ["register", "state", "state", "retire-date", "labels", "labels", "delete"]
