"""Sabakan-triggered repair: each limiter rule of ``plan_auto_repairs`` on its own, the
query variables, the report, ``ckecli auto-repair`` parsing and its commands' checks."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cke.cli.autorepaircmd import (
    cmd_disable,
    cmd_enable,
    cmd_get_variables,
    cmd_is_enabled,
    cmd_set_variables,
)
from cke.cli.ckecli import CLIError, build_parser
from cke.cluster import Constraints
from cke.rebootqueue import STATUS_QUEUED, STATUS_REBOOTING, RebootEntry
from cke.repairqueue import RepairEntry
from cke.sabakan.autorepair import (
    RULE_CLUSTER_NODES,
    RULE_MAXIMUM,
    RULE_NEEDS_ADDRESS,
    RULE_ONE_ENTRY,
    RULE_PROCEDURE,
    RULE_REBOOTING,
    AutoRepairer,
    AutoRepairReport,
    Skip,
    has_recent_entry,
    maybe_rebooting,
    plan_auto_repairs,
    too_many_repairs,
)
from cke.sabakan.integration import SabakanUnavailable
from cke.sabakan.settings import (
    SettingError,
    parse_auto_repair_variables,
    select_machines,
)
from cke.storage import (
    KEY_AUTO_REPAIR_DISABLED,
    KEY_AUTO_REPAIR_QUERY_VARIABLES,
    Storage,
    Versioned,
)
from sabakan.model import BMC, Machine, MachineSpec, MachineState, MachineStatus
from tests.unit.test_repair_queue import rcluster
from tests.unit.test_strategy import A, D, E

pytestmark = pytest.mark.unit

S = MachineState
NOW = dt.datetime(2026, 12, 2, 12, 0, 0, tzinfo=dt.UTC)
OUTSIDE = "10.0.9.9"


def machine(
    address: str | None,
    state: S = S.UNREACHABLE,
    *,
    serial: str = "",
    seconds: int = 3600,
    bmc: str = "qemu",
    role: str = "cs",
) -> Machine:
    return Machine(
        spec=MachineSpec(
            serial=serial or f"s-{address}",
            role=role,
            ipv4=[address] if address else [],
            register_date=NOW - dt.timedelta(days=100),
            bmc=BMC(type=bmc),
        ),
        status=MachineStatus(state=state, timestamp=NOW - dt.timedelta(seconds=seconds)),
    )


def limits(maximum: int = 10, wait: int = 0) -> Constraints:
    return Constraints.model_validate(
        {"maximum-repair-queue-entries": maximum, "wait-seconds-to-repair-rebooting": wait}
    )


def plan(
    machines: list[Machine],
    repairs: tuple[RepairEntry, ...] = (),
    reboots: tuple[RebootEntry, ...] = (),
    constraints: Constraints | None = None,
) -> tuple[list[tuple[str, str, str, str, str]], list[tuple[str, str]], str]:
    p = plan_auto_repairs(machines, rcluster(), repairs, reboots, constraints or limits(), NOW)
    entries = [(e.address, e.operation, e.machine_type, e.nodename, e.serial) for e in p.entries]
    skipped = [(s.address, s.rule) for s in p.skipped]
    return entries, skipped, p.refused.rule if p.refused else ""


# -- the rules, one by one --------------------------------------------------------------------


def test_an_unreachable_node_becomes_an_entry_named_after_its_state() -> None:
    assert plan([machine(D, serial="SN-D")]) == (
        [(D, "unreachable", "qemu", "w4", "SN-D")],
        [],
        "",
    )


def test_a_machine_without_an_address_is_left_out() -> None:
    assert plan([machine(None)])[1] == [("", RULE_NEEDS_ADDRESS)]


def test_any_entry_for_the_address_finished_or_not_is_recent() -> None:
    finished = RepairEntry(3, D, "qemu", "unhealthy", status="succeeded")
    assert has_recent_entry(D, [finished])
    assert not has_recent_entry(E, [finished])
    entries, skipped, _ = plan([machine(D), machine(E)], repairs=(finished,))
    assert [e[0] for e in entries] == [E]
    assert skipped == [(D, RULE_ONE_ENTRY)]


def test_two_machines_with_one_address_get_one_entry() -> None:
    entries, skipped, _ = plan([machine(D, serial="old"), machine(D, serial="new")])
    assert [e[4] for e in entries] == ["old"] and skipped == [(D, RULE_ONE_ENTRY)]


def test_a_machine_outside_the_cluster_is_left_out() -> None:
    assert plan([machine(OUTSIDE)])[1] == [(OUTSIDE, RULE_CLUSTER_NODES)]


def test_without_a_repair_operation_for_the_state_or_type_nothing_is_queued() -> None:
    # The test cluster repairs only ``unreachable`` qemu/kvm machines.
    entries, skipped, _ = plan([machine(D, S.UNHEALTHY), machine(E, bmc="ipmi")])
    assert entries == []
    assert skipped == [(D, RULE_PROCEDURE), (E, RULE_PROCEDURE)]


def test_a_rebooting_node_is_not_repaired_before_the_wait() -> None:
    rebooting = RebootEntry(0, D, status=STATUS_REBOOTING)
    c = limits(wait=600)
    assert maybe_rebooting(machine(D, seconds=100), D, [rebooting], c, NOW)
    assert not maybe_rebooting(machine(D, seconds=600), D, [rebooting], c, NOW)  # waited
    assert not maybe_rebooting(machine(D, seconds=100), D, [], c, NOW)  # not rebooting
    queued_only = RebootEntry(0, D, status=STATUS_QUEUED)
    assert not maybe_rebooting(machine(D, seconds=100), D, [queued_only], c, NOW)
    unhealthy = machine(D, S.UNHEALTHY, seconds=100)
    assert not maybe_rebooting(unhealthy, D, [rebooting], c, NOW)  # only unreachable waits
    assert plan([machine(D, seconds=100)], reboots=(rebooting,), constraints=c)[1] == [
        (D, RULE_REBOOTING)
    ]
    assert plan([machine(D, seconds=601)], reboots=(rebooting,), constraints=c)[0] != []


def test_too_many_reports_queue_nothing_at_all() -> None:
    assert too_many_repairs(1, 2, limits(maximum=2))
    assert not too_many_repairs(1, 1, limits(maximum=2))
    entries, _, refused = plan([machine(D), machine(E)], constraints=limits(maximum=1))
    assert (entries, refused) == ([], RULE_MAXIMUM)
    # The default maximum, 0, queues nothing until the operator sets it.
    assert plan([machine(D)], constraints=Constraints())[2] == RULE_MAXIMUM
    # Entries already queued count, finished or not.
    old = RepairEntry(0, A, "qemu", "unreachable", status="failed")
    assert plan([machine(D)], repairs=(old,), constraints=limits(maximum=1))[2] == RULE_MAXIMUM
    assert plan([machine(D)], repairs=(old,), constraints=limits(maximum=2))[2] == ""


def test_reports_that_are_left_out_do_not_count_against_the_maximum() -> None:
    entries, skipped, refused = plan(
        [machine(D), machine(OUTSIDE), machine(None)], constraints=limits(maximum=1)
    )
    assert [e[0] for e in entries] == [D] and refused == ""
    assert len(skipped) == 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([A, D, E, OUTSIDE, None]),
            st.sampled_from([S.UNREACHABLE, S.UNHEALTHY]),
            st.integers(0, 2000),
        ),
        max_size=8,
    ),
    st.lists(st.sampled_from([A, D, E]), max_size=3),
    st.integers(0, 6),
    st.integers(0, 1000),
)
def test_never_two_entries_for_one_machine_and_never_over_the_maximum(
    reports: list[tuple[str | None, S, int]], queued_for: list[str], maximum: int, wait: int
) -> None:
    repairs = tuple(RepairEntry(i, a, "qemu", "unreachable") for i, a in enumerate(queued_for))
    machines = [machine(a, s, seconds=sec, serial=f"n{i}") for i, (a, s, sec) in enumerate(reports)]
    p = plan_auto_repairs(machines, rcluster(), repairs, (), limits(maximum, wait), NOW)
    addresses = [e.address for e in p.entries]
    assert len(set(addresses)) == len(addresses)  # sabakan may list one address twice
    assert not set(addresses) & set(queued_for)
    assert len(repairs) + len(p.entries) <= maximum or not p.entries
    assert all(e.operation == "unreachable" for e in p.entries)  # the only procedure
    # Every report is accounted for: queued, skipped, or refused as a whole.
    if p.refused is None:
        assert len(p.entries) + len(p.skipped) == len(machines)


# -- the query -----------------------------------------------------------------------------


def test_the_default_query_selects_unhealthy_and_unreachable_machines_but_no_boot_server() -> None:
    ms = [
        machine(A, S.HEALTHY),
        machine(D, S.UNHEALTHY),
        machine(E, S.UNREACHABLE),
        machine(OUTSIDE, S.UNREACHABLE, role="boot"),
        machine("10.0.9.8", S.RETIRED),
    ]
    chosen = select_machines(ms, parse_auto_repair_variables(None))
    assert [m.spec.ipv4[0] for m in chosen] == [D, E]
    only = parse_auto_repair_variables('{"having": {"states": ["UNREACHABLE"]}}')
    assert [m.spec.ipv4[0] for m in select_machines(ms, only)] == [E]


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("[]", "JSON object"),
        ("{nope", "not valid JSON"),
        ('{"having": {"states": ["BROKEN"]}}', "having.states"),
        ('{"having": {"racks": "0"}}', "racks"),
        ('{"other": 1}', "other"),
    ],
)
def test_bad_variables_are_refused_naming_the_field(text: str, word: str) -> None:
    with pytest.raises(SettingError, match=word):
        parse_auto_repair_variables(text)


# -- the report ------------------------------------------------------------------------------


def test_the_report_shows_at_most_twenty_machines_left_out() -> None:
    skips = tuple(Skip(f"s{i}", f"10.1.0.{i}", RULE_CLUSTER_NODES, "outside") for i in range(25))
    doc = AutoRepairReport(skipped=skips).to_dict()
    assert len(doc["skipped"]) == 20 and doc["skipped-not-shown"] == 5
    queued = RepairEntry(4, D, "qemu", "unreachable")
    assert AutoRepairReport(queued=(queued,)).to_dict() == {
        "queued": [{"index": 4, "address": D, "operation": "unreachable"}]
    }


# -- ckecli auto-repair ----------------------------------------------------------------------


def test_ckecli_auto_repair_parses_upstreams_commands() -> None:
    parser = build_parser()
    for words in (["enable"], ["disable"], ["is-enabled"], ["get-variables"]):
        assert parser.parse_args(["auto-repair", *words]).subcommand == words[0]
    assert parser.parse_args(["auto-repair", "set-variables", "f.json"]).file == "f.json"


class FakeSettings:
    """Just the two calls the commands make (the e2e test runs them on etcd)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, name: str) -> Versioned:
        value = self.values.get(name)
        return Versioned(value.encode() if value is not None else None, 1 if value else 0)

    async def put_setting(self, name: str, value: str) -> None:
        self.values[name] = value

    # Storage's own code, over the two calls above.
    auto_repair_enabled = Storage.auto_repair_enabled
    set_auto_repair_disabled = Storage.set_auto_repair_disabled


async def test_set_variables_refuses_bad_json_and_stores_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"having": {"states": ["SICK"]}}')
    storage = FakeSettings()
    with pytest.raises(CLIError, match=r"bad.json: variables: having.states"):
        await cmd_set_variables(storage, SimpleNamespace(file=str(bad)))  # type: ignore[arg-type]
    assert storage.values == {}
    await cmd_get_variables(storage, SimpleNamespace())  # type: ignore[arg-type]
    assert '"UNHEALTHY"' in capsys.readouterr().out  # the default
    good = tmp_path / "good.json"
    good.write_text('{"having": {"states": ["UNREACHABLE"]}}')
    await cmd_set_variables(storage, SimpleNamespace(file=str(good)))  # type: ignore[arg-type]
    assert storage.values[KEY_AUTO_REPAIR_QUERY_VARIABLES] == (
        '{"having": {"states": ["UNREACHABLE"]}}'
    )
    await cmd_is_enabled(storage, SimpleNamespace())  # type: ignore[arg-type]
    await cmd_disable(storage, SimpleNamespace())  # type: ignore[arg-type]
    assert storage.values[KEY_AUTO_REPAIR_DISABLED] == "true"
    await cmd_is_enabled(storage, SimpleNamespace())  # type: ignore[arg-type]
    storage.values[KEY_AUTO_REPAIR_DISABLED] = " true\n"  # written by hand
    await cmd_is_enabled(storage, SimpleNamespace())  # type: ignore[arg-type]
    await cmd_enable(storage, SimpleNamespace())  # type: ignore[arg-type]
    await cmd_is_enabled(storage, SimpleNamespace())  # type: ignore[arg-type]
    assert capsys.readouterr().out.split() == ["true", "false", "false", "true"]


# -- the leader's runner: stored settings, sabakan's answer, the log ---------------------------


class _Stored:
    """The reads and the one write ``AutoRepairer.run`` makes (etcd in the e2e test)."""

    def __init__(self, settings: dict[str, str]) -> None:
        self.settings = settings
        self.stored: list[list[RepairEntry]] = []
        self.moved = False  # the write index moved since it was read

    async def auto_repair_enabled(self) -> bool:
        return self.settings.get(KEY_AUTO_REPAIR_DISABLED) != "true"

    async def _under(self, prefix: str) -> dict[str, bytes]:
        return {k: v.encode() for k, v in self.settings.items() if k.startswith(prefix)}

    async def get_auto_repair(self) -> dict[str, bytes]:
        return await self._under("auto-repair/")

    async def get_sabakan(self) -> dict[str, bytes]:
        return await self._under("sabakan/")

    async def fenced_add_repair_entries(
        self, leader: object, entries: list[RepairEntry]
    ) -> list[RepairEntry] | None:
        if self.moved:
            return None
        self.stored.append(list(entries))
        return [dataclasses.replace(e, index=i) for i, e in enumerate(entries)]


class _Sabakan:
    def __init__(self, machines: list[Machine] | Exception) -> None:
        self.answer = machines

    async def machines(self, url: str, tls: object) -> list[Machine]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)


URL = {"sabakan/url": "https://sabakan.example:10443"}


async def _round(
    settings: dict[str, str], answer: list[Machine] | Exception, maximum: int = 5
) -> tuple[AutoRepairReport | None, _Stored]:
    stored = _Stored(settings)
    repairer = AutoRepairer(stored, _Sabakan(answer))  # type: ignore[arg-type]
    report = await repairer.run(object(), rcluster(), limits(maximum), (), ())  # type: ignore[arg-type]
    return report, stored


async def test_off_without_a_url_or_when_disabled() -> None:
    assert (await _round({}, [machine(D)]))[0] is None
    disabled = {**URL, KEY_AUTO_REPAIR_DISABLED: "true"}
    assert (await _round(disabled, [machine(D)]))[0] is None


@pytest.mark.parametrize(
    ("settings", "answer", "error"),
    [
        ({**URL, KEY_AUTO_REPAIR_QUERY_VARIABLES: "{nope"}, [], "settings: variables: not valid"),
        ({"sabakan/url": "http://clear.example"}, [], "settings: URL: must start with https"),
        ({**URL, "sabakan/tls": "[]"}, [], "settings:"),
        (URL, SabakanUnavailable("sabakan answered HTTP 503"), "sabakan answered HTTP 503"),
    ],
)
async def test_unusable_settings_or_sabakan_queue_nothing_and_say_why(
    settings: dict[str, str], answer: list[Machine] | Exception, error: str
) -> None:
    report, stored = await _round(settings, answer)
    assert report is not None and report.error.startswith(error), report
    assert stored.stored == []


async def test_a_round_queues_and_a_moved_write_index_queues_nothing() -> None:
    report, stored = await _round(URL, [machine(D, serial="SD")])
    assert report is not None and [e.serial for e in report.queued] == ["SD"]
    assert [[e.address for e in batch] for batch in stored.stored] == [[D]]
    moved = _Stored(URL)
    moved.moved = True
    repairer = AutoRepairer(moved, _Sabakan([machine(D)]))  # type: ignore[arg-type]
    again = await repairer.run(object(), rcluster(), limits(), (), ())  # type: ignore[arg-type]
    assert again is not None and again.queued == () and "changed meanwhile" in again.error


async def test_a_reason_is_logged_once_not_every_round(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    stored = _Stored(URL)
    repairer = AutoRepairer(stored, _Sabakan([machine(OUTSIDE)]))  # type: ignore[arg-type]
    for _ in range(3):
        await repairer.run(object(), rcluster(), limits(), (), ())  # type: ignore[arg-type]
    said = [r for r in caplog.records if r.getMessage() == "auto-repair: machine not queued"]
    assert len(said) == 1
