"""Requests shaped as in upstream sabakan's docs/api.md (curl examples) and its metrics
doc, against a real sabakan process and the bed's etcd."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cke.devenv import TestBed
from sabakan.model import MachineState
from sabakan.testing import SabakanProcess
from tests.e2e.test_sabakan_api import _call, _logs

# What ``curl -d`` sends with its data.
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def sabakan(bed: TestBed, tmp_path: Path) -> AsyncIterator[SabakanProcess]:
    proc = SabakanProcess(tmp_path / "sabakan", bed.etcd.settings(f"/up-{uuid.uuid4().hex}/"))
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


async def _machine(url: str, serial: str) -> dict[str, Any]:
    st, body = await _call("GET", f"{url}/api/v1/machines?serial={serial}")
    assert st == 200, body
    [machine] = body
    return dict(machine)


async def test_put_one_label_raw_value(sabakan: SabakanProcess) -> None:
    url = sabakan.url
    spec = [{"serial": "1234abcd", "labels": {"product": "R630"}}]
    assert (await _call("POST", f"{url}/api/v1/machines", spec))[0] == 201

    # $ curl -s -XPUT localhost:10080/api/v1/labels/1234abcd/os-release -d '1855.4.0'
    put = f"{url}/api/v1/labels/1234abcd/os-release"
    st, _ = await _call("PUT", put, data=b"1855.4.0", headers=FORM)
    assert st == 200
    labels = (await _machine(url, "1234abcd"))["spec"]["labels"]
    assert labels == {"product": "R630", "os-release": "1855.4.0"}
    # The same value again: 200 (upstream writes its audit record every time, as here).
    assert (await _call("PUT", put, data=b"1855.4.0", headers=FORM))[0] == 200
    # A new value replaces the old one; an empty body is an empty value.
    assert (await _call("PUT", put, data=b"1855.5.0", headers=FORM))[0] == 200
    assert (await _call("PUT", f"{url}/api/v1/labels/1234abcd/empty", data=b""))[0] == 200
    labels = (await _machine(url, "1234abcd"))["spec"]["labels"]
    assert labels == {"product": "R630", "os-release": "1855.5.0", "empty": ""}
    # A Kubernetes-style prefixed name: both PUT and DELETE reach it.
    prefixed = f"{url}/api/v1/labels/1234abcd/example.com/rack-type"
    assert (await _call("PUT", prefixed, data=b"a"))[0] == 200
    assert (await _machine(url, "1234abcd"))["spec"]["labels"]["example.com/rack-type"] == "a"
    assert (await _call("DELETE", prefixed))[0] == 200

    # Upstream's failures: an invalid name or value is 400, an unknown machine 404.
    st, body = await _call("PUT", f"{url}/api/v1/labels/1234abcd/-bad", data=b"v")
    assert st == 400 and body["error"].startswith("labels:"), body
    st, body = await _call("PUT", put, data=b"two\nlines")
    assert st == 400 and body["error"].startswith("labels:"), body
    st, body = await _call("PUT", put, data=b"\xff")
    assert st == 400 and body["error"].startswith("labels:"), body
    assert (await _call("PUT", f"{url}/api/v1/labels/nope/os-release", data=b"1"))[0] == 404

    # The older JSON form still merges several labels at once.
    st, body = await _call("PUT", f"{url}/api/v1/labels/1234abcd", {"a": "1", "b": "2"})
    assert st == 200 and body["spec"]["labels"]["a"] == "1" and body["spec"]["labels"]["b"] == "2"

    actions = [r["action"] for r in await _logs(url)]
    assert actions == ["register"] + ["labels"] * 7


async def test_put_retire_date_raw_rfc3339(sabakan: SabakanProcess) -> None:
    url = sabakan.url
    assert (await _call("POST", f"{url}/api/v1/machines", [{"serial": "1234abcd"}]))[0] == 201

    # $ curl -s -XPUT localhost:10080/api/v1/retire-date/1234abcd -d '2018-11-21T01:23:45Z'
    put = f"{url}/api/v1/retire-date/1234abcd"
    assert (await _call("PUT", put, data=b"2018-11-21T01:23:45Z", headers=FORM))[0] == 200
    assert (await _machine(url, "1234abcd"))["spec"]["retire-date"] == "2018-11-21T01:23:45Z"
    # With an offset, fractions and a trailing newline (upstream trims white space).
    st, _ = await _call("PUT", put, data=b"2030-04-01T09:00:00.5+09:00\n", headers=FORM)
    assert st == 200
    assert (await _machine(url, "1234abcd"))["spec"]["retire-date"] == "2030-04-01T00:00:00.500000Z"
    # The older form, a JSON string, still works.
    assert (await _call("PUT", put, "2031-02-03T04:05:06Z"))[0] == 200
    assert (await _machine(url, "1234abcd"))["spec"]["retire-date"] == "2031-02-03T04:05:06Z"

    for bad in (b"2018-11-21", b"2018-11-21T01:23:45", b"2018-11-21 01:23:45Z", b"", b"soon"):
        st, body = await _call("PUT", put, data=bad, headers=FORM)
        assert st == 400 and body["error"].startswith("retire-date:"), (bad, body)
    st, _ = await _call("PUT", f"{url}/api/v1/retire-date/nope", data=b"2018-11-21T01:23:45Z")
    assert st == 404
    actions = [r["action"] for r in await _logs(url)]
    assert actions == ["register", "retire-date", "retire-date", "retire-date"]


@pytest.mark.parametrize("state", list(MachineState))
async def test_same_state_again_is_a_no_op(sabakan: SabakanProcess, state: MachineState) -> None:
    url = sabakan.url
    assert (await _call("POST", f"{url}/api/v1/machines", [{"serial": "m1"}]))[0] == 201
    path = {
        MachineState.UNINITIALIZED: [],
        MachineState.HEALTHY: ["healthy"],
        MachineState.UNHEALTHY: ["healthy", "unhealthy"],
        MachineState.UNREACHABLE: ["healthy", "unreachable"],
        MachineState.UPDATING: ["healthy", "updating"],
        MachineState.RETIRING: ["retiring"],
        MachineState.RETIRED: ["retiring", "retired"],
    }[state]
    for step in path:
        assert (await _call("PUT", f"{url}/api/v1/state/m1", text=step))[0] == 200
    before = await _machine(url, "m1")
    logs = await _logs(url)

    # $ curl -s -XPUT -d'<state>' localhost:10080/api/v1/state/m1, the state it has
    st, body = await _call("PUT", f"{url}/api/v1/state/m1", data=state.value, headers=FORM)
    assert st == 200, body
    assert body["status"]["state"] == state.value
    assert body["status"]["timestamp"] == before["status"]["timestamp"]
    after = await _machine(url, "m1")
    assert after["status"]["timestamp"] == before["status"]["timestamp"]
    assert await _logs(url) == logs  # nothing written: no audit record either
    # A forbidden change is still refused.
    target = "healthy" if state in (MachineState.RETIRING, MachineState.RETIRED) else "retired"
    assert (await _call("PUT", f"{url}/api/v1/state/m1", text=target))[0] == 409


async def test_version(sabakan: SabakanProcess) -> None:
    # $ curl -s -XGET localhost:10080/version  ->  {"version":"0.18"}
    st, body = await _call("GET", f"{sabakan.url}/version")
    assert st == 200
    assert isinstance(body, dict) and list(body) == ["version"]
    assert isinstance(body["version"], str) and body["version"]
    st, _ = await _call("HEAD", f"{sabakan.url}/version")
    assert st == 200


async def test_upstream_metric_names(sabakan: SabakanProcess) -> None:
    url = sabakan.url
    specs = [
        {
            "serial": "s1",
            "rack": 3,
            "role": "cs",
            "ipv4": ["10.0.0.1", "10.0.0.2"],
            "labels": {"machine-type": "qemu"},
        },
        {"serial": "s2", "role": "ss"},  # no address (upstream could not expose any machine)
    ]
    assert (await _call("POST", f"{url}/api/v1/machines", specs))[0] == 201
    assert (await _call("PUT", f"{url}/api/v1/state/s1", text="healthy"))[0] == 200
    for _ in range(2):
        assert (await _call("GET", f"{url}/api/v1/machines"))[0] == 200
    assert (await _call("GET", f"{url}/api/v1/state/nope"))[0] == 404

    st, text = await _call("GET", f"{url}/metrics")
    assert st == 200
    s1 = 'address="10.0.0.1",machine_type="qemu",rack="3",role="cs",serial="s1"'
    s2 = 'address="",machine_type="",rack="0",role="ss",serial="s2"'
    for state in MachineState:
        one = state is MachineState.HEALTHY
        assert f'sabakan_machine_status{{{s1},status="{state.value}"}} {float(one)}' in text
        one = state is MachineState.UNINITIALIZED
        assert f'sabakan_machine_status{{{s2},status="{state.value}"}} {float(one)}' in text
    assert "# TYPE sabakan_api_request_count counter\n" in text
    lines = text.splitlines()
    assert 'sabakan_api_request_count{code="200",path="/api/v1/machines",verb="GET"} 2' in lines
    assert 'sabakan_api_request_count{code="201",path="/api/v1/machines",verb="POST"} 1' in lines
    assert (
        'sabakan_api_request_count{code="404",path="/api/v1/state/{serial}",verb="GET"} 1' in lines
    )
    # The names these two replaced are gone; the latency histogram and the leader
    # gauge (no upstream counterpart) stay.
    assert "sabakan_machines{" not in text and "sabakan_http_requests" not in text
    assert "sabakan_http_request_duration_seconds_bucket{" in text
    assert "sabakan_leader " in text

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["sabakan_machine_status"].type == "gauge"
    assert len(families["sabakan_machine_status"].samples) == 2 * len(MachineState)
    counts = [f for f in families.values() if f.name.startswith("sabakan_api_request_count")]
    assert [f.type for f in counts] == ["counter"]
