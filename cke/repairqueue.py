"""The repair queue's entries (CKE's ``RepairQueueEntry``, ``docs/repair.md``) and the
pure rules around them: the JSON shape, which repair operation and step an entry runs,
and which entries the leader acts on next (CKE's ``repairOps``).

Keys (under cke's prefix, as CKE's ``storage.go``): ``repairs/data/<016x index>`` holds
one entry, ``repairs/write-index`` the next index, ``repairs/disabled`` ``true`` when
the queue is not processed (see :mod:`cke.storage`).

An entry is ``queued`` until the leader runs the repair command of its first step
(``processing``, step status ``watching``). The health check (run every round for every
unfinished entry) saying ``true`` makes it ``succeeded`` (after ``success_command``); a
step whose ``watch_seconds`` passed without that moves to the next step; a failed
command, a failed success command or the end of the steps make it ``failed``. Finished
entries stay until ``ckecli repair-queue delete`` marks them ``deleted`` and the leader
removes them. CKE's ``draining`` step status (cordon and evict Pods when ``need_drain``)
is never set here: there is no Kubernetes to drain.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from cke.cluster import Cluster, RepairOperation, RepairStep
from cke.rebootqueue import EntryError, _parse_time, _second, entry_doc, times_to_doc

STATUS_QUEUED = "queued"
STATUS_PROCESSING = "processing"
STATUS_SUCCEEDED = "succeeded"
STATUS_FAILED = "failed"
STATUSES = (STATUS_QUEUED, STATUS_PROCESSING, STATUS_SUCCEEDED, STATUS_FAILED)
FINISHED = frozenset({STATUS_SUCCEEDED, STATUS_FAILED})

STEP_WAITING = "waiting"
STEP_DRAINING = "draining"  # CKE's; never set here (no Kubernetes)
STEP_WATCHING = "watching"
STEP_STATUSES = (STEP_WAITING, STEP_DRAINING, STEP_WATCHING)

# CKE's defaults (cluster.go).
DEFAULT_MAX_CONCURRENT_REPAIRS = 1
DEFAULT_COMMAND_TIMEOUT_SECONDS = 30  # repair, health check and success commands
# CKE repairs API servers (control planes) one at a time.
MAX_CONCURRENT_CONTROL_PLANE_REPAIRS = 1


@dataclass(frozen=True)
class RepairEntry:
    """One machine to repair with one operation; ``index`` orders the queue."""

    index: int
    address: str
    machine_type: str
    operation: str
    nodename: str = ""
    serial: str = ""
    status: str = STATUS_QUEUED
    step: int = 0
    step_status: str = STEP_WAITING
    deleted: bool = False
    last_transition_time: dt.datetime | None = None
    drain_backoff_count: int = 0
    drain_backoff_expire: dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict[str, object]:
        """CKE's JSON shape: the index as a string, times in RFC 3339, zeros left out
        where CKE leaves them out."""
        doc: dict[str, object] = {
            "index": str(self.index),
            "address": self.address,
            "nodename": self.nodename,
        }
        if self.serial:
            doc["serial"] = self.serial
        doc.update(
            {
                "machine_type": self.machine_type,
                "operation": self.operation,
                "status": self.status,
                "step": self.step,
                "step_status": self.step_status,
                "deleted": self.deleted,
            }
        )
        return times_to_doc(
            doc, self.last_transition_time, self.drain_backoff_count, self.drain_backoff_expire
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: str | bytes) -> RepairEntry:
        doc, index = entry_doc(raw)
        texts: dict[str, str] = {}
        for name in ("address", "machine_type", "operation", "nodename", "serial"):
            value = doc.get(name, "")
            if not isinstance(value, str):
                raise EntryError(f"{name}: not a string")
            texts[name] = value
        if not texts["address"]:
            raise EntryError("address: missing")
        status = doc.get("status", STATUS_QUEUED)
        if status not in STATUSES:
            raise EntryError(f"status: one of {', '.join(STATUSES)}, not {status!r}")
        step_status = doc.get("step_status", STEP_WAITING) or STEP_WAITING
        if step_status not in STEP_STATUSES:
            raise EntryError(f"step_status: one of {', '.join(STEP_STATUSES)}, not {step_status!r}")
        counts: dict[str, int] = {}
        for name in ("step", "drain_backoff_count"):
            value = doc.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise EntryError(f"{name}: not a count: {value!r}")
            counts[name] = value
        deleted = doc.get("deleted", False)
        if not isinstance(deleted, bool):
            raise EntryError(f"deleted: not true or false: {deleted!r}")
        return cls(
            index=index,
            address=texts["address"],
            machine_type=texts["machine_type"],
            operation=texts["operation"],
            nodename=texts["nodename"],
            serial=texts["serial"],
            status=status,
            step=counts["step"],
            step_status=step_status,
            deleted=deleted,
            last_transition_time=_parse_time(
                doc.get("last_transition_time"), "last_transition_time"
            ),
            drain_backoff_count=counts["drain_backoff_count"],
            drain_backoff_expire=_parse_time(
                doc.get("drain_backoff_expire"), "drain_backoff_expire"
            ),
        )

    def watching(self, step: int, now: dt.datetime) -> RepairEntry:
        """The entry once the repair command of ``step`` is about to run."""
        return replace(
            self,
            status=STATUS_PROCESSING,
            step=step,
            step_status=STEP_WATCHING,
            last_transition_time=_second(now),
        )

    def finish(self, succeeded: bool, now: dt.datetime) -> RepairEntry:
        return replace(
            self,
            status=STATUS_SUCCEEDED if succeeded else STATUS_FAILED,
            last_transition_time=_second(now),
        )

    def reset_backoff(self) -> RepairEntry:
        return replace(self, drain_backoff_count=0, drain_backoff_expire=None)


def find_operation(cluster: Cluster | None, machine_type: str, operation: str) -> RepairOperation:
    """The repair operation for a machine type (CKE's ``GetMatchingRepairOperation``:
    the first procedure listing the type, then its operation of that name)."""
    if cluster is None:
        raise EntryError("there is no cluster configuration; nothing can be repaired")
    for proc in cluster.repair.repair_procedures:
        if machine_type in proc.machine_types:
            for op in proc.repair_operations:
                if op.operation == operation:
                    return op
            raise EntryError(
                f"OPERATION: no repair operation {operation!r} for machine type {machine_type!r}"
            )
    raise EntryError(f"MACHINE_TYPE: no repair procedure for machine type {machine_type!r}")


def current_step(
    cluster: Cluster, entry: RepairEntry, step: int | None = None
) -> RepairStep | None:
    """The entry's step (``step``, default its own); None past the last step. Raises
    EntryError when the cluster has no procedure or operation for the entry."""
    op = find_operation(cluster, entry.machine_type, entry.operation)
    index = entry.step if step is None else step
    return op.repair_steps[index] if index < len(op.repair_steps) else None


def nodename_of(cluster: Cluster | None, address: str) -> str:
    """CKE's ``FillNodename``: the node's name, empty for a machine outside the cluster."""
    if cluster is not None:
        for n in cluster.nodes:
            if n.address == address:
                return n.hostname or n.address
    return ""


def count_by_status(entries: Iterable[RepairEntry]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for e in entries:
        counts[e.status] += 1
    return counts


@dataclass(frozen=True)
class RepairQueueStatus:
    """What the leader read of the queue for one decision (``ClusterStatus.repairs``)."""

    entries: tuple[RepairEntry, ...] = ()
    # Mod revision of each entry, by index: the leader changes an entry only if it is
    # still the one it decided on (a delete in between wins).
    revisions: Mapping[int, int] = field(default_factory=dict)
    enabled: bool = True
    # Addresses of unfinished entries whose health check printed ``true`` this round.
    healthy: frozenset[str] = frozenset()
    now: dt.datetime = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# What the leader does with one entry (``Action.kind``).
ACTION_DEQUEUE = "dequeue"  # remove an entry marked deleted
ACTION_SUCCEED = "succeed"  # the health check passed: success_command, then succeeded
ACTION_FAIL = "fail"  # past the last step (or a misconfiguration): failed
ACTION_EXECUTE = "execute"  # run the repair command of ``step``


@dataclass(frozen=True)
class Action:
    kind: str
    entry: RepairEntry
    step: int = 0


@dataclass(frozen=True)
class RepairPlan:
    """The repair decision (pure): ``actions`` in order (the leader runs the first);
    ``active`` says the repair phase holds (something is being repaired or waited for,
    even with no action); ``unknown`` lists entries no procedure matches or whose
    machine is not a node of the cluster (they are left alone)."""

    actions: tuple[Action, ...] = ()
    active: bool = False
    unknown: tuple[RepairEntry, ...] = ()


def plan_repairs(
    cluster: Cluster,
    queue: RepairQueueStatus,
    control_planes: Collection[str],
    rebooting_control_planes: Collection[str],
) -> RepairPlan:
    """CKE's ``repairOps``: dequeue deleted entries; finish healthy ones; then, with
    entries under way before queued ones and control planes before others, at most
    ``repair.max_concurrent_repairs`` entries (one per machine; one control plane, and
    none while another control plane reboots): start the next step of an entry whose
    watch expired (failed past the last), or the first step of a queued one (only with
    the queue enabled)."""
    nodes = {n.address for n in cluster.nodes}
    actions: list[Action] = []
    unknown: list[RepairEntry] = []
    groups: tuple[list[RepairEntry], ...] = ([], [], [], [])
    for e in sorted(queue.entries, key=lambda e: e.index):
        if e.deleted:
            actions.append(Action(ACTION_DEQUEUE, e))
            continue
        if e.finished:
            continue
        if e.address not in nodes:
            unknown.append(e)
            continue
        if e.address in queue.healthy:
            actions.append(Action(ACTION_SUCCEED, e))
            continue
        is_cp = e.address in control_planes
        if e.status == STATUS_QUEUED:
            groups[2 if is_cp else 3].append(e)
        elif e.status == STATUS_PROCESSING:
            expire = e.drain_backoff_expire
            if e.step_status == STEP_WAITING and expire is not None and expire > queue.now:
                continue
            groups[0 if is_cp else 1].append(e)
    limit = cluster.repair.max_concurrent_repairs or DEFAULT_MAX_CONCURRENT_REPAIRS
    rebooting = set(rebooting_control_planes)
    active = bool(actions)
    running = 0
    running_cp = 0
    seen: set[str] = set()
    for e in (e for group in groups for e in group):
        if running >= limit:
            break
        if e.address in seen:
            continue
        if e.address in control_planes:
            if (
                running_cp >= MAX_CONCURRENT_CONTROL_PLANE_REPAIRS
                or len(rebooting) >= 2
                or (len(rebooting) == 1 and e.address not in rebooting)
            ):
                continue
            running_cp += 1
        running += 1
        seen.add(e.address)
        step = e.step
        try:
            while True:
                current = current_step(cluster, e, step)
                if current is None:
                    # Past the last step (also when the cluster lost steps): failed.
                    actions.append(Action(ACTION_FAIL, e))
                    active = True
                    break
                active = True
                if e.step_status == STEP_WATCHING and step == e.step:
                    since = e.last_transition_time or queue.now
                    watch = current.watch_seconds
                    if watch is not None and since + dt.timedelta(seconds=watch) >= queue.now:
                        break  # still watching for the health check
                    step += 1  # the watch expired: the next step
                    continue
                # waiting (or draining, which is never set here): run the step's command.
                # CKE drains the node first when need_drain is set; no Kubernetes runs
                # here, so nothing is cordoned or evicted.
                if queue.enabled:
                    actions.append(Action(ACTION_EXECUTE, e, step))
                break
        except EntryError:
            unknown.append(e)
    return RepairPlan(tuple(actions), active, tuple(unknown))
