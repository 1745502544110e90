"""sabakan's pure model: the lifecycle table and the input parsers (with hypothesis)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sabakan.model import (
    MAX_ADDRESSES,
    MAX_BMC_TYPE,
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    InputError,
    MachineState,
    TransitionError,
    check_transition,
    parse_label_pairs,
    parse_label_value,
    parse_labels,
    parse_machines,
    parse_retire_date,
    parse_state,
    parse_state_body,
    rfc3339,
    shown,
)

S = MachineState
ALLOWED = {
    ("uninitialized", "healthy"),
    ("uninitialized", "retiring"),
    ("healthy", "unhealthy"),
    ("healthy", "unreachable"),
    ("healthy", "updating"),
    ("healthy", "retiring"),
    ("unhealthy", "healthy"),
    ("unhealthy", "unreachable"),
    ("unhealthy", "updating"),
    ("unhealthy", "retiring"),
    ("unreachable", "healthy"),
    ("unreachable", "unhealthy"),
    ("unreachable", "updating"),
    ("unreachable", "retiring"),
    ("updating", "uninitialized"),
    ("retiring", "retired"),
    ("retired", "uninitialized"),
}


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", list(S))
def test_lifecycle_table(current: MachineState, target: MachineState) -> None:
    if (current.value, target.value) in ALLOWED:
        check_transition(current, target)
    else:
        with pytest.raises(TransitionError) as err:
            check_transition(current, target)
        assert current.value in str(err.value) and target.value in str(err.value)


def test_state_names() -> None:
    assert parse_state(" healthy\n") is S.HEALTHY
    with pytest.raises(InputError, match="state: invalid state name 'fine'"):
        parse_state("fine")


def _spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"serial": "s1", "rack": 0, "role": "cs", "ipv4": ["10.0.0.1"]}
    spec.update(over)
    return spec


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (_spec(colour="red"), "[0].colour"),
        (_spec(rack="1"), "[0].rack"),
        (_spec(rack=-1), "[0].rack"),
        (_spec(ipv4=["10.0.0.300"]), "[0].ipv4"),
        (_spec(ipv4="10.0.0.1"), "[0].ipv4"),
        (_spec(ipv6=["::zz"]), "[0].ipv6"),
        (_spec(serial=""), "[0].serial"),
        (_spec(serial="a/b"), "[0].serial"),
        (_spec(labels={"k": 1}), "[0].labels.k"),
        (_spec(labels={"bad key": "v"}), "[0].labels"),
        (_spec(**{"retire-date": "2030-01-01T00:00:00"}), "[0].retire-date"),
        (_spec(**{"retire-date": "soon"}), "[0].retire-date"),
        (_spec(**{"index-in-rack": 3}), "[0].index-in-rack"),
        (_spec(bmc={"type": "IPMI-2.0", "ipv4": "x"}), "[0].bmc.ipv4"),
        ({"rack": 1}, "[0].serial"),
    ],
)
def test_bad_specs_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as err:
        parse_machines(json.dumps([spec]).encode())
    assert str(err.value).startswith(field), str(err.value)


def test_duplicates_within_a_batch() -> None:
    with pytest.raises(InputError, match=r"\[1\]\.serial: duplicate serial s1"):
        parse_machines(json.dumps([_spec(), _spec(ipv4=["10.0.0.2"])]).encode())
    with pytest.raises(InputError, match=r"\[1\]\.ipv4: duplicate address 10.0.0.1"):
        parse_machines(json.dumps([_spec(), _spec(serial="s2")]).encode())


def test_good_spec() -> None:
    [m] = parse_machines(
        json.dumps(
            [_spec(labels={"product": "R630"}, **{"retire-date": "2030-01-01T00:00:00Z"})]
        ).encode()
    )
    assert m.serial == "s1" and m.labels == {"product": "R630"} and m.retire_date is not None


def test_retire_date_body() -> None:
    assert parse_retire_date(b'"2030-01-02T03:04:05Z"').year == 2030
    for bad in (b"2030-01-02", b'"2030-01-02T03:04:05"', b"12", b'"tomorrow"'):
        with pytest.raises(InputError, match=r"^retire-date:"):
            parse_retire_date(bad)


@pytest.mark.parametrize(
    ("body", "want"),
    [
        # upstream's form: the raw RFC 3339 body (docs/api.md's curl example)
        (b"2018-11-21T01:23:45Z", "2018-11-21T01:23:45Z"),
        (b"2018-11-21T01:23:45Z\n", "2018-11-21T01:23:45Z"),  # white space trimmed
        (b"2018-11-21t01:23:45z", "2018-11-21T01:23:45Z"),
        (b"2018-11-21T10:23:45+09:00", "2018-11-21T01:23:45Z"),
        (b"2018-11-21T01:23:45.123456789Z", "2018-11-21T01:23:45.123456Z"),  # RFC3339Nano
        # this API's older form: a JSON string
        (b' "2018-11-21T01:23:45Z" ', "2018-11-21T01:23:45Z"),
    ],
)
def test_retire_date_raw_and_json(body: bytes, want: str) -> None:
    assert rfc3339(parse_retire_date(body)) == want


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"2018-11-21",
        b"2018-11-21T01:23:45",
        b"2018-11-21 01:23:45Z",
        b"2018-13-01T00:00:00Z",
        b'"2018-11-21T01:23:45Z',
        b'["2018-11-21T01:23:45Z"]',
        b"\xff",
        b"9" * 100_000,
    ],
)
def test_retire_date_bad(body: bytes) -> None:
    with pytest.raises(InputError, match=r"^retire-date: ") as err:
        parse_retire_date(body)
    assert len(str(err.value)) < 300


def test_one_label_raw_value() -> None:
    assert parse_label_value("os-release", b"1855.4.0") == {"os-release": "1855.4.0"}
    assert parse_label_value("empty", b"") == {"empty": ""}
    assert parse_label_value("example.com/x", b"v") == {"example.com/x": "v"}
    for key, body in [("-bad", b"v"), ("k", b"a\nb"), ("k", b"\xff"), ("k", b"v" * 257)]:
        with pytest.raises(InputError, match=r"^labels: "):
            parse_label_value(key, body)


def test_label_pairs() -> None:
    assert parse_label_pairs("a=1,b=2") == {"a": "1", "b": "2"}
    with pytest.raises(InputError, match=r"^labels:"):
        parse_label_pairs("a")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_fieldnames = st.sampled_from(
    ["serial", "labels", "rack", "role", "ipv4", "ipv6", "retire-date", "bmc", "index-in-rack", "x"]
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parser_never_crashes_on_bytes(body: bytes) -> None:
    try:
        parse_machines(body)
    except InputError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(_fieldnames, _json, max_size=6), min_size=1, max_size=4))
def test_parser_accepts_only_wellformed_specs(specs: list[dict[str, Any]]) -> None:
    body = json.dumps(specs).encode()
    try:
        machines = parse_machines(body)
    except InputError as exc:
        msg = str(exc)
        # every error names a location: an element index or the body
        assert msg.startswith("[") or msg.startswith("(body)"), msg
        return
    serials = [m.serial for m in machines]
    assert len(set(serials)) == len(serials)
    for m, raw in zip(machines, specs, strict=True):
        assert m.serial == raw["serial"]
        assert isinstance(m.rack, int) and m.rack >= 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True),
            st.integers(0, 40),
            st.ip_addresses(v=4).map(str),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_valid_batches_parse_and_duplicates_are_refused(rows: list[tuple[str, int, str]]) -> None:
    specs = [{"serial": s, "rack": r, "ipv4": [ip]} for s, r, ip in rows]
    dup = len({s for s, _, _ in rows}) < len(rows) or len({ip for _, _, ip in rows}) < len(rows)
    if dup:
        with pytest.raises(InputError, match="duplicate"):
            parse_machines(json.dumps(specs).encode())
    else:
        parsed = parse_machines(json.dumps(specs).encode())
        assert [(m.serial, m.rack, m.ipv4[0]) for m in parsed] == rows


def test_caps_per_machine() -> None:
    labels = {f"k{i}": "v" for i in range(MAX_LABELS)}
    v4 = [f"10.0.0.{i + 1}" for i in range(MAX_ADDRESSES)]
    v6 = [f"fd00::{i + 1:x}" for i in range(MAX_ADDRESSES)]
    bmc = {"type": "t" * MAX_BMC_TYPE}
    full = _spec(labels=labels, ipv4=v4, ipv6=v6, bmc=bmc)
    full["labels"]["k" * MAX_LABEL_KEY] = "v" * MAX_LABEL_VALUE
    del full["labels"]["k0"]
    [m] = parse_machines(json.dumps([full]).encode())
    assert len(m.labels) == MAX_LABELS and len(m.ipv4) == len(m.ipv6) == MAX_ADDRESSES
    over = [
        (_spec(labels={**labels, "one-more": "v"}), "[0].labels", f"at most {MAX_LABELS} labels"),
        (_spec(ipv4=[*v4, "10.0.1.1"]), "[0].ipv4", f"at most {MAX_ADDRESSES} addresses"),
        (_spec(ipv6=[*v6, "fd00::ffff"]), "[0].ipv6", f"at most {MAX_ADDRESSES} addresses"),
        (_spec(labels={"k" * (MAX_LABEL_KEY + 1): "v"}), "[0].labels", "at most 128 char"),
        (_spec(labels={"k": "v" * (MAX_LABEL_VALUE + 1)}), "[0].labels", "at most 256 char"),
        (_spec(bmc={"type": "t" * (MAX_BMC_TYPE + 1)}), "[0].bmc", "at most 64 char"),
        (_spec(bmc={"type": "tab\there"}), "[0].bmc", "printable ASCII"),
    ]
    for spec, field, words in over:
        with pytest.raises(InputError) as err:
            parse_machines(json.dumps([spec]).encode())
        assert str(err.value).startswith(field) and words in str(err.value), str(err.value)
        assert len(str(err.value)) < 600
    with pytest.raises(InputError, match=rf"^labels: at most {MAX_LABELS} labels"):
        parse_labels(json.dumps({**labels, "one-more": "v"}).encode())


def test_errors_never_echo_a_whole_value() -> None:
    for body in (b"x" * 100_000, b"\xff\xfe"):
        with pytest.raises(InputError, match=r"^state:") as err:
            parse_state_body(body)
        assert len(str(err.value)) < 300
    with pytest.raises(InputError) as err:
        parse_machines(json.dumps([_spec(ipv4=["9" * 10_000])]).encode())
    assert str(err.value).startswith("[0].ipv4") and len(str(err.value)) < 300
    with pytest.raises(InputError) as err:
        parse_label_pairs("k" * 10_000)
    assert len(str(err.value)) < 300
    assert shown("abc") == "'abc'" and shown("a" * 100, 4) == "'aaaa'…"


def test_a_deep_or_broken_body_is_a_400() -> None:
    for body in (b"[" * 100_000, b"[" * 5000 + b"]" * 5000, b'[{"serial": "\xff"}]'):
        with pytest.raises(InputError):
            parse_machines(body)
        with pytest.raises(InputError):
            parse_labels(body)
