"""Issue 17 (docs/parity.md): small upstream items that the parity table revealed."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cke import __version__
from cke.cli.ckecli import build_parser
from cke.server.metrics import ServerMetrics
from cke.server.phases import ALL_PHASES
from sabakan.sabactl import main as sabactl_main


def _families() -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(ServerMetrics().registry).decode()
    return {
        f.name: [(s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
    }


def test_operation_phase_has_a_series_per_phase() -> None:
    # Upstream's names are among ALL_PHASES: tests/unit/test_core_shapes.py.
    phases = [labels["phase"] for labels, _ in _families()["cke_operation_phase"]]
    assert sorted(phases) == sorted(ALL_PHASES)


def test_process_metrics_are_exported_as_upstreams() -> None:
    families = _families()
    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        assert name in families, name
    assert families["process_open_fds"][0][1] > 0


@pytest.mark.parametrize("argv", [["version"], ["--version"]])
def test_sabactl_version_needs_no_server(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = sabactl_main([*argv])
    except SystemExit as exc:  # --version is argparse's own action
        code = int(exc.code or 0)
    assert code == 0
    assert capsys.readouterr().out == f"sabactl version {__version__}\n"


# -- docs/parity.md stays true to itself and to ckecli --------------------------------------

PARITY = Path(__file__).resolve().parents[2] / "docs" / "parity.md"
STATUSES = ("present", "different", "N/A", "missing")


def _rows() -> dict[str, list[tuple[str, str]]]:
    """Section title -> (first cell, status) of each table row that has a status."""
    sections: dict[str, list[tuple[str, str]]] = {}
    title = ""
    for line in PARITY.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:]
            sections[title] = []
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)]
        if title and len(cells) >= 4 and cells[2] in STATUSES:
            sections[title].append((cells[1], cells[2]))
    return sections


def test_parity_summary_counts_its_rows() -> None:
    text = PARITY.read_text()
    total = re.search(r"\| \*\*total\*\* \| (.+) \|", text)
    assert total is not None
    stated = [int(n.strip("* ")) for n in total.group(1).split("|")]
    rows = [status for section in _rows().values() for _, status in section]
    assert stated == [rows.count(s) for s in STATUSES]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_ckecli_command_the_table_calls_present_exists() -> None:
    (ckecli_rows,) = [rows for title, rows in _rows().items() if title.startswith("ckecli")]
    checked = 0
    for cell, status in ckecli_rows:
        if status not in ("present", "different") or not cell.startswith("`"):
            continue
        words = []
        for word in cell.split("`")[1].split():
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            words.append(word)
        parser = build_parser()
        for word in words:
            choices = _subcommands(parser)
            assert word in choices, f"{cell}: no ckecli {' '.join(words)}"
            parser = choices[word]
        checked += bool(words)
    assert checked >= 25


# -- /metrics on a replica that does not lead ------------------------------------------------


def _exposed(metrics: ServerMetrics) -> set[str]:
    text = generate_latest(metrics.exposed).decode()
    return {f.name for f in text_string_to_metric_families(text)}


def test_a_follower_exports_cke_leader_and_process_metrics_only() -> None:
    metrics = ServerMetrics()
    metrics.set_phase("completed")
    metrics.auto_repair_enabled.set(1)
    follower = _exposed(metrics)
    assert [n for n in follower if n.startswith("cke_")] == ["cke_leader"]
    assert "process_open_fds" in follower and "python_info" in follower
    metrics.set_leader(True)
    leader = _exposed(metrics)
    assert {"cke_leader", "cke_operation_phase", "cke_auto_repair_enabled"} <= leader
    assert metrics.exposed.get_sample_value("cke_leader") == 1
    metrics.set_leader(False)
    assert _exposed(metrics) == follower
    assert metrics.exposed.get_sample_value("cke_leader") == 0


def test_sabakan_metrics_are_exported_only_while_the_integration_runs() -> None:
    metrics = ServerMetrics()
    metrics.set_leader(True)
    assert not {n for n in _exposed(metrics) if n.startswith("cke_sabakan_")}
    metrics.set_sabakan(True, {"cs": 2}, 1)
    assert {
        "cke_sabakan_integration_successful",
        "cke_sabakan_integration_timestamp_seconds",
        "cke_sabakan_workers",
        "cke_sabakan_unused_machines",
    } <= _exposed(metrics)
    metrics.sabakan_enabled = False  # the leader found it disabled
    assert not {n for n in _exposed(metrics) if n.startswith("cke_sabakan_")}


# -- ckecli starts fast: Vault's and SSH's clients load only for the commands that use them ---


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = _subcommands(parser)
    if not subs:
        return [parser]
    return [leaf for sub in subs.values() for leaf in _leaf_parsers(sub)] + [parser]


def test_every_command_named_by_string_resolves_to_a_coroutine_function() -> None:
    import inspect

    from cke.cli.ckecli import resolve_command

    named = {
        p.get_default("func")
        for p in _leaf_parsers(build_parser())
        if isinstance(p.get_default("func"), str)
    }
    assert len(named) >= 14  # vault, ca, etcd issue/user-add/backup, ssh, scp
    for name in named:
        assert inspect.iscoroutinefunction(resolve_command(name)), name


def test_status_loads_neither_vault_nor_ssh_clients() -> None:
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from cke.cli.ckecli import build_parser, resolve_command\n"
        "for argv in (['status'], ['cluster', 'get'], ['repair-queue', 'list']):\n"
        "    resolve_command(build_parser().parse_args(argv).func)\n"
        "print(sorted(m for m in ('hvac', 'asyncssh', 'aiohttp') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
