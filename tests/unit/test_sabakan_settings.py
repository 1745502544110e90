"""The sabakan integration's settings and sabakan's answers, parsed (issue 11)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from cke.devenv.pki import DevCA
from cke.sabakan.integration import (
    SabakanUnavailable,
    enabled_settings,
    machine_from_api,
    machines_from_answer,
)
from cke.sabakan.settings import (
    SettingError,
    parse_template,
    parse_tls,
    parse_url,
    parse_variables,
    select_machines,
    tls_from_json,
)
from sabakan.model import Machine, MachineSpec, MachineState, MachineStatus

pytestmark = pytest.mark.unit

TEMPLATE = """
name: c
service_subnet: 10.68.0.0/16
nodes:
  - user: root
    control_plane: true
  - user: root
"""


def machine(serial: str, *, role: str = "cs", rack: int = 0, state: str = "healthy") -> Machine:
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return Machine(
        spec=MachineSpec.model_validate(
            {"serial": serial, "role": role, "rack": rack, "register-date": when}
        ),
        status=MachineStatus(state=MachineState(state), timestamp=when),
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://sabakan:10080", "URL: must start with https://"),
        ("sabakan:10080", "URL: must start with https://"),
        ("https://", "URL: has no host"),
        ("https://u:p@sabakan", "URL: must not have user info"),
        ("https://sabakan/?x=1", "URL: must not have user info, a query or a fragment"),
        ("https://sabakan:99999", "URL: not a valid URL"),
        ("https://" + "a" * 3000, "URL: longer than 2048"),
    ],
)
def test_bad_urls_are_refused_naming_the_url(url: str, problem: str) -> None:
    with pytest.raises(SettingError, match=problem.replace("?", r"\?")):
        parse_url(url)


def test_good_url_loses_its_trailing_slash() -> None:
    assert parse_url("https://10.0.0.1:10443/") == "https://10.0.0.1:10443"


def test_template_nodes_need_no_address_and_keep_their_role_label() -> None:
    template = parse_template(
        TEMPLATE.replace(
            "  - user: root\n", "  - user: root\n    labels:\n      cke.cybozu.com/role: cs\n", 1
        )
    )
    assert [n.address for n in template.nodes] == ["", ""]
    assert template.nodes[0].labels == {"cke.cybozu.com/role": "cs"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: c\nservice_subnet: 10.68.0.0/16\nnodes:\n  - user: root\n", "want exactly one"),
        (
            TEMPLATE.replace(
                "  - user: root\n    control", "  - user: root\n    address: 10.0.0.1\n    control"
            ),
            "must be empty in a template",
        ),
        (TEMPLATE + "bogus: 1\n", "bogus"),
        ("[1, 2]", "want a mapping"),
        ("name: [", "template: (yaml)"),
        (TEMPLATE.replace("root", "ro ot"), "template.nodes[0].user"),
    ],
)
def test_bad_templates_are_refused_naming_the_field(text: str, problem: str) -> None:
    with pytest.raises(SettingError) as caught:
        parse_template(text)
    assert problem in str(caught.value)


def test_variables_default_to_upstreams_query() -> None:
    variables = parse_variables(None)
    chosen = select_machines(
        [machine("a"), machine("boot", role="boot"), machine("r", state="retired")], variables
    )
    assert [m.spec.serial for m in chosen] == ["a"]


def test_variables_select_like_upstreams_search() -> None:
    text = json.dumps(
        {
            "having": {"roles": ["cs", "ss"], "racks": [1, 2]},
            "notHaving": {"states": ["UNREACHABLE"], "labels": [{"name": "x", "value": "y"}]},
        }
    )
    variables = parse_variables(text)
    machines = [
        machine("a", rack=1),
        machine("b", rack=3),
        machine("c", role="gpu", rack=1),
        machine("d", rack=2, state="unreachable"),
        machine("e", rack=2, state="retired"),  # an explicit notHaving replaces the default
    ]
    assert [m.spec.serial for m in select_machines(machines, variables)] == ["a", "e"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "want a JSON object"),
        ("{", "not valid JSON"),
        ('{"having": {"states": ["ASLEEP"]}}', "having.states: unknown state"),
        ('{"having": {"colour": ["red"]}}', "having.colour"),
        ('{"having": {"racks": ["1"]}}', "having.racks"),
        ('{"other": 1}', "other"),
    ],
)
def test_bad_variables_are_refused(text: str, problem: str) -> None:
    with pytest.raises(SettingError) as caught:
        parse_variables(text)
    assert str(caught.value).startswith("variables: ") and problem in str(caught.value)


def test_tls_files_are_checked_and_the_key_never_echoed(tmp_path: Any) -> None:
    ca = DevCA(tmp_path / "pki")
    issued = ca.issue("cke", "cke", server=False)
    cert, key = issued.cert.read_text(), issued.key.read_text()
    tls = parse_tls(ca.ca_pem.decode(), cert, key)
    assert tls_from_json(tls.to_json()) == tls
    assert "PRIVATE" not in repr(tls)
    with pytest.raises(SettingError, match="give both or neither"):
        parse_tls(None, cert, None)
    with pytest.raises(SettingError, match="--cacert: not a PEM certificate"):
        parse_tls("nonsense", None, None)
    bad_key = key.replace(key.splitlines()[1], "A" * 64)
    with pytest.raises(SettingError) as caught:
        parse_tls(None, cert, bad_key)
    assert "AAAA" not in str(caught.value)
    encrypted = serialization.load_pem_private_key(key.encode(), password=None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(SettingError, match="--key: not an unencrypted PEM private key"):
        parse_tls(None, cert, encrypted.decode())


def test_enabled_only_with_url_and_template_and_not_disabled() -> None:
    template = parse_template(TEMPLATE).model_dump_json(by_alias=True).encode()
    values = {"sabakan/url": b"https://s:10443", "sabakan/template": template}
    enabled = enabled_settings(values)
    assert enabled is not None and enabled.url == "https://s:10443"
    assert enabled_settings({**values, "sabakan/disabled": b"true"}) is None
    assert enabled_settings({"sabakan/url": b"https://s"}) is None
    with pytest.raises(SettingError, match="URL: must start with https://"):
        enabled_settings({**values, "sabakan/url": b"http://s"})
    with pytest.raises(SettingError, match="not UTF-8"):
        enabled_settings({**values, "sabakan/url": b"\xff"})


def test_machines_from_sabakans_api_form() -> None:
    doc = machine("a").to_api()
    assert doc["spec"]["retire-date"] == "" and "duration" in doc["status"]
    assert machine_from_api(doc) == machine("a")
    body = json.dumps([doc, machine("b").to_api()]).encode()
    assert [m.spec.serial for m in machines_from_answer(body)] == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>", "not JSON"),
        (b'{"a": 1}', "not a list"),
        (b"[1]", "machine [0]: not an object"),
        (b'[{"spec": true, "status": {}}]', "machine [0]: want spec and status objects"),
        (b'[{"spec": {}, "status": []}]', "machine [0]: want spec and status objects"),
        (b'[{"spec": {"serial": "x"}, "status": {}}]', "machine [0]:"),
    ],
)
def test_garbage_from_sabakan_is_refused_whole(body: bytes, problem: str) -> None:
    with pytest.raises(SabakanUnavailable, match=problem.replace("[", r"\[").replace("]", r"\]")):
        machines_from_answer(body)


# Keys of sabakan's machine documents, so that the examples reach the model's checks.
_API_KEYS = st.sampled_from(
    ["spec", "status", "serial", "state", "timestamp", "duration", "retire-date", "ipv4"]
)


@settings(max_examples=1000, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda c: (
            st.lists(c, max_size=4)
            | st.dictionaries(_API_KEYS | st.text(max_size=8), c, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_any_answer_gives_machines_or_sabakan_unavailable(doc: Any) -> None:
    try:
        machines_from_answer(json.dumps(doc).encode())
    except SabakanUnavailable:
        pass
