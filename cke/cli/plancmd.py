"""``ckecli plan`` and ``ckecli cluster set --dry-run``: what the leader would do.

Both read the status the leader last collected (``status/collected``) and run the same
pure decision on it (:mod:`cke.server.plan`); they write nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from cke.cli.ckecli import CLIError
from cke.cluster import Cluster, Constraints, cluster_from_json, constraints_from_json
from cke.op.rivers import rivers_app
from cke.records import Record
from cke.server.plan import MAX_STEPS, Plan, age_text, make_plan, parse_rfc3339
from cke.server.statusjson import Collected, CollectedError, app_digest, collected_from_json
from cke.storage import KEY_STATUS_COLLECTED, Storage, stored_text

# Exit status of a dry run whose plan holds a step back (1: an error or a refusal of
# ``cluster set`` itself; 4: no collected status, as ``ckecli status`` without one).
EXIT_HELD_BACK = 3


async def load_collected(storage: Storage) -> tuple[Collected, list[str]]:
    """The leader's last collected status, and notes on how far to trust a replay."""
    got = await storage.get(KEY_STATUS_COLLECTED)
    if got.value is None:
        raise CLIError(
            "no collected status: no leader of this version has decided yet "
            f"(it writes {KEY_STATUS_COLLECTED} every round)",
            code=4,
        )
    try:
        collected = collected_from_json(got.value)
    except CollectedError as exc:
        raise CLIError(f"{KEY_STATUS_COLLECTED}: {exc}") from None
    notes: list[str] = []
    if collected.rivers_app_sha256:
        app = rivers_app()
        if app_digest(app) != collected.rivers_app_sha256:
            notes.append(
                "the leader ships another rivers than this ckecli (another cke version): "
                "the rivers steps shown may differ from the leader's"
            )
        collected = collected_from_json(got.value, app)
    return collected, notes


def collected_doc(collected: Collected, now: dt.datetime) -> dict[str, Any]:
    when = parse_rfc3339(collected.timestamp)
    age = (now - when).total_seconds() if when is not None else None
    return {
        "timestamp": collected.timestamp,
        "leader": collected.leader,
        "age-seconds": round(age, 1) if age is not None else None,
        "cluster-revision": collected.cluster_revision,
    }


def _collected_line(doc: dict[str, Any]) -> str:
    age = doc["age-seconds"]
    ago = f" ({age_text(age)})" if age is not None else ""
    return (
        f"status collected at {doc['timestamp']}{ago} by {doc['leader'] or '(unknown)'}, "
        f"cluster revision {doc['cluster-revision']}"
    )


def _operation_lines(op: dict[str, Any], indent: str) -> list[str]:
    lines = [f"{op['operation']} on {', '.join(op['targets']) or '(no node)'}"]
    for i, c in enumerate(op["commands"], 1):
        where = c["target"]
        if "parallel" in c:
            where = f"{', '.join(c['parallel'])} (in parallel)"
        text = f"{indent}{i}. {c['name']}"
        if where:
            text += f" on {where}"
        if c["detail"]:
            text += f": {c['detail']}"
        lines.append(text)
    return lines


def _blocked_lines(blocked: list[dict[str, Any]], indent: str) -> list[str]:
    lines = []
    for b in blocked:
        nodes = f" nodes={','.join(b['nodes'])}" if b.get("nodes") else ""
        lines.append(f"{indent}- [{b['rule']}] {b['message']}{nodes}")
    return lines


def _end_line(end: str, steps: int) -> str:
    limit = (
        "then: the leader decides again once it is done"
        if steps == 1
        else f"then: more steps may follow (the plan stops after {steps}; at most "
        f"{MAX_STEPS} with --steps)"
    )
    return {
        "done": "then: nothing more to do",
        "held": "then: nothing runs until the rules above allow it",
        "re-plan": "then: re-plan after this step (what comes next depends on what the "
        "nodes and etcd report then)",
        "limit": limit,
    }.get(end, f"then: {end}")


def plan_text(doc: dict[str, Any]) -> str:
    """``ckecli plan``'s and ``cluster set --dry-run``'s human output."""
    lines = [_collected_line(doc["collected"])]
    lines += [f"note: {n}" for n in doc["notes"]]
    if doc.get("collected-nothing"):
        left = doc["collected-nothing"]
        lines.append(f"the leader collected nothing: phase {left['phase']}")
        lines += _blocked_lines(left["blocked"], "  ")
        return "\n".join(lines)
    steps = doc["steps"]
    for n, step in enumerate(steps, 1):
        head = f"phase: {step['phase']}" if len(steps) == 1 else f"step {n}: {step['phase']}"
        lines.append(head)
        op = step["operation"]
        if op is not None:
            first, *commands = _operation_lines(op, "    ")
            lines.append(f"  {'next operation' if n == 1 else 'operation'}: {first}")
            lines += commands
        else:
            lines.append("  operation: none")
        if step["blocked"]:
            lines.append("  held back:")
            lines += _blocked_lines(step["blocked"], "    ")
    started = doc.get("started")
    if started:
        lines.append(
            f"the leader started it: record #{started['id']} {started['operation']} "
            f"({started['status']})"
        )
    lines.append(_end_line(doc["end"], len(steps)))
    return "\n".join(lines)


def started_record(records: list[Record], collected: Collected, plan: Plan) -> Record | None:
    """The record of the first step, if the leader started it after that collection."""
    op = plan.steps[0].operation if plan.steps else None
    when = parse_rfc3339(collected.timestamp)
    if op is None or when is None:
        return None
    for r in records:
        start = parse_rfc3339(r.start_at)
        same = r.operation == op["operation"] and r.targets == op["targets"]
        if same and start is not None and start >= when:
            return r
    return None


def plan_doc(
    collected: Collected,
    notes: list[str],
    cluster: Cluster | None,
    constraints: Constraints,
    now: dt.datetime,
    max_steps: int = 1,
) -> tuple[dict[str, Any], Plan | None]:
    doc: dict[str, Any] = {"collected": collected_doc(collected, now), "notes": list(notes)}
    if collected.status is None:
        doc["collected-nothing"] = {
            "phase": collected.phase,
            "blocked": [b.to_dict() for b in collected.blocked],
        }
        return doc, None
    plan = make_plan(
        cluster,
        constraints,
        collected.status,
        collected.extra_blocked,
        collected.vault_away,
        max_steps,
    )
    doc.update(plan.to_dict())
    return doc, plan


async def _stored_config(storage: Storage) -> tuple[Cluster | None, Constraints, int]:
    raw = await storage.get_cluster()
    text = stored_text(raw.value, "cluster")
    cluster = cluster_from_json(text) if text is not None else None
    constraints = constraints_from_json(
        stored_text((await storage.get_constraints()).value, "constraints")
    )
    return cluster, constraints, raw.mod_revision


async def cmd_plan(storage: Storage, args: argparse.Namespace) -> None:
    collected, notes = await load_collected(storage)
    cluster, constraints, revision = await _stored_config(storage)
    if revision != collected.cluster_revision:
        notes.append(
            f"the cluster changed since (revision {collected.cluster_revision} -> {revision}): "
            "the leader collects again before it decides on the new one"
        )
    doc, plan = plan_doc(collected, notes, cluster, constraints, dt.datetime.now(dt.UTC))
    if plan is not None:
        record = started_record(await storage.get_records(10), collected, plan)
        doc["started"] = record.to_dict() if record is not None else None
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        print(plan_text(doc))


async def dry_run(
    storage: Storage,
    args: argparse.Namespace,
    cluster: Cluster,
    constraints: Constraints,
    diff: str,
) -> None:
    """``cluster set --dry-run``: the plan the new cluster would cause; nothing stored.
    Exit status 3 (with the rules) when a step would be held back."""
    collected, notes = await load_collected(storage)
    if collected.status is not None:
        new_nodes = sorted({n.address for n in cluster.nodes} - set(collected.status.nodes))
        if new_nodes:
            notes.append(
                f"no collected status for {', '.join(new_nodes)} (not in the stored cluster): "
                "the leader looks at them first; steps needing them show as held back"
            )
    doc, plan = plan_doc(
        collected, notes, cluster, constraints, dt.datetime.now(dt.UTC), args.steps
    )
    doc["file"] = args.file
    doc["diff"] = diff
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        print(diff, end="")
        print(f"dry run, nothing stored; the plan for {args.file}:")
        print(plan_text(doc))
    if plan is None:
        raise CLIError("--dry-run: the leader collected nothing to plan on", code=4)
    refusals = plan.refusals
    if refusals:
        rules = ", ".join(
            f"{b.rule}" + (f" ({','.join(b.nodes)})" if b.nodes else "") for b in refusals
        )
        raise CLIError(f"--dry-run: a step would be held back by rule {rules}", EXIT_HELD_BACK)
