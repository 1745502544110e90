"""``ckecli plan`` and ``ckecli cluster set --dry-run`` against what the leader then does.

One bed (3 process nodes, OpenBao, cke's own etcd) and one replica deciding only when
something changes (``--interval 1h``), so that the collected status ckecli replays is
the one the leader decides from next: the dry run's first step must be the leader's
first record after the real ``cluster set``, and its modelled restarts the ones the
leader runs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

from cke.devenv import BedConfig, TestBed
from cke.devenv.deploy import Deployment

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def deployment() -> AsyncIterator[Deployment]:
    async with TestBed(BedConfig(etcd_members=1, nodes=3)) as bed:
        d = Deployment(bed, replicas=1, interval="1h")
        try:
            await d.bootstrap(bed.nodes)
            yield d
        finally:
            await d.stop()


async def _records(d: Deployment) -> list[dict[str, Any]]:
    result = await d.ckecli("history", "-o", "json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    return sorted(records, key=lambda r: int(r["id"]))


async def test_plan_replays_the_leaders_decision(deployment: Deployment) -> None:
    result = await deployment.ckecli("plan", "-o", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    (step,) = doc["steps"]
    assert step["phase"] == "completed" and step["operation"] is None, doc
    assert doc["end"] == "done" and doc["notes"] == []
    assert doc["collected"]["leader"] == "cke0"
    assert 0 <= doc["collected"]["age-seconds"] < 120
    text = await deployment.ckecli("plan")
    assert text.returncode == 0, text.stderr
    assert "status collected at " in text.stdout and "phase: completed" in text.stdout


async def test_dry_run_shows_what_the_leader_then_does(deployment: Deployment) -> None:
    d = deployment
    stored = (await d.ckecli("cluster", "get", "-o", "json")).stdout
    changed = yaml.safe_load(d.cluster_yaml(d.bed.nodes))
    changed["options"] = {"etcd": {"extra_args": ["--snapshot-count=20000"]}}
    text = yaml.safe_dump(changed).encode()

    dry = await d.ckecli("cluster", "set", "--dry-run", "-o", "json", "-", stdin=text)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert "--snapshot-count=20000" in plan["diff"]
    ops = [s["operation"] for s in plan["steps"] if s["operation"] is not None]
    planned = [(op["operation"], op["targets"]) for op in ops]
    assert plan["steps"][-1]["phase"] == "completed", plan
    assert [op for op, _ in planned] == ["etcd-restart"] * 3, plan
    assert sorted(t for _, (t,) in planned) == sorted(n.address for n in d.bed.nodes)
    assert plan["end"] == "done"
    human = await d.ckecli("cluster", "set", "--dry-run", "-", stdin=text)
    assert human.returncode == 0 and "dry run, nothing stored" in human.stdout
    assert (await d.ckecli("cluster", "get", "-o", "json")).stdout == stored  # nothing stored

    before = max((int(r["id"]) for r in await _records(d)), default=0)
    stored_it = await d.ckecli("cluster", "set", "-", stdin=text)
    assert stored_it.returncode == 0, stored_it.stderr
    deadline = time.monotonic() + 60
    done: list[dict[str, Any]] = []
    succeeded: list[tuple[str, list[str]]] = []
    while time.monotonic() < deadline:
        done = [r for r in await _records(d) if int(r["id"]) > before]
        succeeded = [
            (r["operation"], r["targets"])
            for r in done
            if r["status"] == "completed" and not r["error"]
        ]
        if len(succeeded) >= 3:
            break
        await asyncio.sleep(0.5)
    # The first record after the real change is the dry run's first step; the whole
    # sequence is the modelled one (followers first, the leader last).
    assert done and (done[0]["operation"], done[0]["targets"]) == planned[0], (done, planned)
    assert succeeded == planned, (succeeded, planned)
    await d.wait_for("completed", timeout=30)


async def test_dry_run_exits_3_with_the_rule_that_holds_a_step_back(
    deployment: Deployment,
) -> None:
    d = deployment
    grown = yaml.safe_load(d.cluster_yaml(d.bed.nodes))
    # A fourth control plane nobody serves (loopback, nothing listens): rule 1.
    grown["nodes"].append(
        {"address": "127.254.0.9", "hostname": "gone", "user": "root", "control_plane": True}
    )
    dry = await d.ckecli(
        "cluster",
        "set",
        "--dry-run",
        "--control-plane-count",
        "4",
        "-",
        stdin=yaml.safe_dump(grown).encode(),
    )
    assert dry.returncode == 3, (dry.stdout, dry.stderr)
    assert "all-control-planes-reachable (127.254.0.9)" in dry.stderr
    assert "no collected status for 127.254.0.9" in dry.stdout
    assert len(dry.stderr.strip().splitlines()) == 1
    bad = await d.ckecli("cluster", "set", "-o", "json", "-", stdin=yaml.safe_dump(grown).encode())
    assert bad.returncode == 1 and bad.stderr.strip() == "ckecli: -o: only with --dry-run"
