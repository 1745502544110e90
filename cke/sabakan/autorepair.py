"""Sabakan-triggered repair (CKE's ``docs/sabakan-triggered-repair.md``): machines sabakan
reports as unhealthy or unreachable become repair queue entries, within the limiters.

The decision is pure (:func:`plan_auto_repairs`): machines, the cluster, both queues and
the constraints in; the entries to queue and, for every machine left out, the named rule
that left it out. Each rule is a small predicate:

* ``auto-repair-needs-address``: a machine without an IPv4 address cannot be an entry;
* ``one-repair-entry-per-machine``: any entry for the address, finished or not, is
  "recent" (as upstream): the operator deletes it once the machine is repaired;
* ``auto-repair-cluster-nodes-only``: ours. The repair procedure runs on the node over
  SSH with cke's node key, which only the cluster's nodes accept, so a machine outside
  the cluster could never be repaired and its entry would only fill the queue
  (upstream runs the commands on the cke host and repairs any machine);
* ``repair-procedure-exists``: the cluster has a repair operation named after the state
  (``unhealthy``, ``unreachable``) for the machine's ``bmc.type``; otherwise the entry
  could not run (``ckecli repair-queue add`` refuses it in the same words);
* ``wait-seconds-to-repair-rebooting``: an unreachable machine that the reboot queue is
  rebooting is not repaired before it has been unreachable that long;
* ``maximum-repair-queue-entries``: when the entries in the queue plus the new reports
  exceed the constraint, nothing is queued at all (a rack that lost power reports many
  machines at once; repairing them all would do harm). The default, 0, keeps
  auto-repair from queueing anything until the operator sets it.

:class:`AutoRepairer` runs it for the leader: settings from etcd (``auto-repair/...``;
sabakan's URL and TLS from ``sabakan/...``), the machines from sabakan, and the new
entries stored in one fenced transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cke.cluster import Cluster, Constraints
from cke.common.logs import get_logger
from cke.rebootqueue import STATUS_REBOOTING, EntryError, RebootEntry
from cke.repairqueue import RepairEntry, find_operation, nodename_of
from cke.sabakan.integration import SabakanClient, SabakanUnavailable
from cke.sabakan.settings import (
    SettingError,
    parse_auto_repair_variables,
    parse_url,
    select_machines,
    tls_from_json,
)
from cke.storage import (
    KEY_AUTO_REPAIR_QUERY_VARIABLES,
    KEY_SABAKAN_TLS,
    KEY_SABAKAN_URL,
    LeaderKey,
    Storage,
    UnreadableValue,
    stored_text,
)
from sabakan.model import Machine, MachineState

log = get_logger("cke.sabakan")

RULE_NEEDS_ADDRESS = "auto-repair-needs-address"
RULE_ONE_ENTRY = "one-repair-entry-per-machine"
RULE_CLUSTER_NODES = "auto-repair-cluster-nodes-only"
RULE_PROCEDURE = "repair-procedure-exists"
RULE_REBOOTING = "wait-seconds-to-repair-rebooting"
RULE_MAXIMUM = "maximum-repair-queue-entries"

# What a status shows of the machines left out (a rack's worth at most).
MAX_SKIPS_SHOWN = 20


@dataclass(frozen=True)
class Skip:
    """A machine sabakan reported that gets no entry, and the rule that says why."""

    serial: str
    address: str
    rule: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {
            "serial": self.serial,
            "address": self.address,
            "rule": self.rule,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class AutoRepairPlan:
    """``entries`` to queue (indexes are given when stored); ``refused`` is the
    ``maximum-repair-queue-entries`` refusal that queues none of them."""

    entries: tuple[RepairEntry, ...] = ()
    skipped: tuple[Skip, ...] = ()
    refused: Skip | None = None


# -- the rules ---------------------------------------------------------------------------------


def has_recent_entry(address: str, repairs: Sequence[RepairEntry]) -> bool:
    """Any entry for the address, whatever its operation or status (upstream's rule)."""
    return any(e.address == address for e in repairs)


def seconds_in_state(machine: Machine, now: dt.datetime) -> float:
    """How long the machine has been in its state (sabakan's ``duration``)."""
    return max(0.0, (now - machine.status.timestamp).total_seconds())


def maybe_rebooting(
    machine: Machine,
    address: str,
    reboots: Sequence[RebootEntry],
    constraints: Constraints,
    now: dt.datetime,
) -> bool:
    """Unreachable for less than ``wait-seconds-to-repair-rebooting`` while the reboot
    queue reboots it: a planned reboot, not (yet) a failure."""
    if machine.status.state is not MachineState.UNREACHABLE:
        return False
    if seconds_in_state(machine, now) >= constraints.wait_seconds_to_repair_rebooting:
        return False
    return any(e.node == address and e.status == STATUS_REBOOTING for e in reboots)


def too_many_repairs(queued: int, new: int, constraints: Constraints) -> bool:
    """The entries in the queue plus the new reports exceed the constraint."""
    return queued + new > constraints.maximum_repair_queue_entries


# -- the decision ------------------------------------------------------------------------------


def plan_auto_repairs(
    machines: Sequence[Machine],
    cluster: Cluster,
    repairs: Sequence[RepairEntry],
    reboots: Sequence[RebootEntry],
    constraints: Constraints,
    now: dt.datetime,
) -> AutoRepairPlan:
    """CKE's ``Repairer``: which of the non-healthy ``machines`` (already selected by the
    query) get a repair entry now, and why each other one does not."""
    nodes = {n.address for n in cluster.nodes}
    skipped: list[Skip] = []
    chosen: list[RepairEntry] = []
    for machine in machines:
        serial = machine.spec.serial
        if not machine.spec.ipv4:
            skipped.append(Skip(serial, "", RULE_NEEDS_ADDRESS, "the machine has no IPv4 address"))
            continue
        address = machine.spec.ipv4[0]
        operation = machine.status.state.value
        machine_type = machine.spec.bmc.type

        why: tuple[str, str] | None = None
        if has_recent_entry(address, repairs) or any(e.address == address for e in chosen):
            why = RULE_ONE_ENTRY, "the repair queue has an entry for it; delete it when repaired"
        elif address not in nodes:
            why = RULE_CLUSTER_NODES, "not a node of the cluster: cke repairs only its nodes"
        elif maybe_rebooting(machine, address, reboots, constraints, now):
            why = (
                RULE_REBOOTING,
                (
                    f"unreachable for {int(seconds_in_state(machine, now))}s while the reboot "
                    f"queue reboots it; waiting {constraints.wait_seconds_to_repair_rebooting}s"
                ),
            )
        else:
            try:
                find_operation(cluster, machine_type, operation)
            except EntryError as exc:
                why = RULE_PROCEDURE, str(exc)
        if why is not None:
            skipped.append(Skip(serial, address, *why))
            continue
        chosen.append(
            RepairEntry(
                index=0,
                address=address,
                machine_type=machine_type,
                operation=operation,
                nodename=nodename_of(cluster, address),
                serial=serial,
            )
        )
    if chosen and too_many_repairs(len(repairs), len(chosen), constraints):
        reason = (
            f"{len(repairs)} entries in the repair queue and {len(chosen)} new reports exceed "
            f"the maximum of {constraints.maximum_repair_queue_entries}; none is queued"
        )
        return AutoRepairPlan(skipped=tuple(skipped), refused=Skip("", "", RULE_MAXIMUM, reason))
    return AutoRepairPlan(entries=tuple(chosen), skipped=tuple(skipped))


# -- the leader's runner -----------------------------------------------------------------------


@dataclass(frozen=True)
class AutoRepairReport:
    """One round of auto-repair, for ``ckecli status`` (under ``sabakan``)."""

    queued: tuple[RepairEntry, ...] = ()
    skipped: tuple[Skip, ...] = ()
    refused: Skip | None = None
    error: str = ""
    preview: bool = False  # ``cke --debug-sabakan``: ``queued`` would be queued

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.queued and self.preview:
            doc["would-queue"] = [
                {"address": e.address, "operation": e.operation, "serial": e.serial}
                for e in self.queued
            ]
        elif self.queued:
            doc["queued"] = [
                {"index": e.index, "address": e.address, "operation": e.operation}
                for e in self.queued
            ]
        if self.skipped:
            doc["skipped"] = [s.to_dict() for s in self.skipped[:MAX_SKIPS_SHOWN]]
            if len(self.skipped) > MAX_SKIPS_SHOWN:
                doc["skipped-not-shown"] = len(self.skipped) - MAX_SKIPS_SHOWN
        if self.refused is not None:
            doc["refused"] = {"rule": self.refused.rule, "reason": self.refused.reason}
        if self.error:
            doc["error"] = self.error
        return doc


@dataclass
class AutoRepairer:
    """Runs :func:`plan_auto_repairs` for the leader, once a round the decision is idle
    (as upstream's integrator), and says each new reason once in the log."""

    storage: Storage
    client: SabakanClient
    _said: frozenset[tuple[str, str, str]] = field(default=frozenset())

    async def run(
        self,
        leader: LeaderKey | None,
        cluster: Cluster,
        constraints: Constraints,
        repairs: Sequence[RepairEntry],
        reboots: Sequence[RebootEntry],
    ) -> AutoRepairReport | None:
        """Queue the repairs sabakan's reports call for; None when auto-repair is off
        (disabled, or no sabakan URL is set). Without a ``leader`` (``cke
        --debug-sabakan``) nothing is queued: the report says what would be."""
        if not await self.storage.auto_repair_enabled():
            return None
        auto = await self.storage.get_auto_repair()
        sabakan = await self.storage.get_sabakan()
        try:
            url = stored_text(sabakan.get(KEY_SABAKAN_URL), KEY_SABAKAN_URL)
            if url is None:
                return None
            variables = parse_auto_repair_variables(
                stored_text(
                    auto.get(KEY_AUTO_REPAIR_QUERY_VARIABLES), KEY_AUTO_REPAIR_QUERY_VARIABLES
                )
            )
            tls = tls_from_json(stored_text(sabakan.get(KEY_SABAKAN_TLS), KEY_SABAKAN_TLS))
            url = parse_url(url)
        except (SettingError, UnreadableValue) as exc:
            return self._error(f"settings: {exc}")
        try:
            listed = await self.client.machines(url, tls)
        except SabakanUnavailable as exc:
            return self._error(str(exc))
        plan = plan_auto_repairs(
            select_machines(listed, variables),
            cluster,
            repairs,
            reboots,
            constraints,
            dt.datetime.now(dt.UTC),
        )
        self._say(plan)
        if not plan.entries:
            return AutoRepairReport(skipped=plan.skipped, refused=plan.refused)
        if leader is None:
            return AutoRepairReport(queued=plan.entries, skipped=plan.skipped, preview=True)
        queued = await self.storage.fenced_add_repair_entries(leader, plan.entries)
        if queued is None:
            return AutoRepairReport(
                skipped=plan.skipped, error="the repair queue changed meanwhile; next round"
            )
        for entry in queued:
            log.info(
                "sabakan-triggered repair queued",
                serial=entry.serial,
                address=entry.address,
                operation=entry.operation,
                machine_type=entry.machine_type,
                index=entry.index,
            )
        return AutoRepairReport(queued=tuple(queued), skipped=plan.skipped)

    def _error(self, reason: str) -> AutoRepairReport:
        key = ("", "error", reason)
        if key not in self._said:
            log.warning("auto-repair: sabakan cannot be used; nothing queued", error=reason)
        self._said = frozenset({key})
        return AutoRepairReport(error=reason)

    def _say(self, plan: AutoRepairPlan) -> None:
        """One log line per machine left out, when its reason is new (not every round)."""
        said = {(s.serial, s.rule, s.reason) for s in plan.skipped}
        new = [s for s in plan.skipped if (s.serial, s.rule, s.reason) not in self._said]
        for s in new[:MAX_SKIPS_SHOWN]:
            log.info(
                "auto-repair: machine not queued",
                serial=s.serial,
                address=s.address,
                rule=s.rule,
                reason=s.reason,
            )
        if len(new) > MAX_SKIPS_SHOWN:
            log.info(
                "auto-repair: more machines not queued (see ckecli status)",
                count=len(new) - MAX_SKIPS_SHOWN,
            )
        if plan.refused is not None:
            key = ("", plan.refused.rule, plan.refused.reason)
            said.add(key)
            if key not in self._said:
                log.warning(
                    "auto-repair: too many repairs; nothing queued",
                    rule=plan.refused.rule,
                    reason=plan.refused.reason,
                )
        self._said = frozenset(said)
