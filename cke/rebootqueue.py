"""The reboot queue's entries (CKE's ``RebootQueueEntry``, ``docs/reboot.md``) and the
pure rules around them: the JSON shape, the backoff, and which nodes an operator may
queue.

Keys (under cke's prefix, as CKE's ``docs/schema.md``): ``reboots/data/<016x index>``
holds one entry, ``reboots/write-index`` the next index, ``reboots/disabled`` ``true``
when the queue is not processed (see :mod:`cke.storage`).

An entry is ``queued`` until the leader reboots its node (``rebooting``, with the time
of that transition), and is removed once the boot check says the node booted after
that time; ``ckecli reboot-queue cancel`` marks it ``cancelled`` and the leader removes
it. CKE's ``draining`` status (cordon and evict Pods) is never set here: there is no
Kubernetes to drain. When the reboot command fails, the entry goes back to ``queued``
with a backoff, as CKE backs off a failed drain.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from cke.cluster import Cluster

STATUS_QUEUED = "queued"
STATUS_DRAINING = "draining"  # CKE's; never set here (no Kubernetes)
STATUS_REBOOTING = "rebooting"
STATUS_CANCELLED = "cancelled"
STATUSES = (STATUS_QUEUED, STATUS_DRAINING, STATUS_REBOOTING, STATUS_CANCELLED)
IN_PROGRESS = frozenset({STATUS_DRAINING, STATUS_REBOOTING})

# CKE's drain backoff: 2^(count-1) * 300 s, at most 1200 s, plus up to 300 s of jitter.
BACKOFF_BASE_SECONDS = 300
BACKOFF_MAX_SECONDS = 1200
# CKE's default for ``reboot.max_concurrent_reboots``.
DEFAULT_MAX_CONCURRENT_REBOOTS = 1


class EntryError(ValueError):
    """A stored entry or an operator's input that cannot be used."""


def _format_time(when: dt.datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: object, name: str) -> dt.datetime | None:
    if value is None or value == "" or value == "0001-01-01T00:00:00Z":
        return None  # Go's zero time: not set
    if not isinstance(value, str):
        raise EntryError(f"{name}: not a time: {value!r}")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise EntryError(f"{name}: not an RFC 3339 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise EntryError(f"{name}: the time has no zone: {value!r}")
    return parsed.astimezone(dt.UTC)


@dataclass(frozen=True)
class RebootEntry:
    """One node to reboot; ``index`` orders the queue (oldest first)."""

    index: int
    node: str  # the node's address
    status: str = STATUS_QUEUED
    last_transition_time: dt.datetime | None = None
    drain_backoff_count: int = 0
    drain_backoff_expire: dt.datetime | None = None

    def to_dict(self) -> dict[str, object]:
        """CKE's JSON shape: the index as a string, times in RFC 3339, zeros left out."""
        doc: dict[str, object] = {
            "index": str(self.index),
            "node": self.node,
            "status": self.status,
        }
        return times_to_doc(
            doc, self.last_transition_time, self.drain_backoff_count, self.drain_backoff_expire
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: str | bytes) -> RebootEntry:
        doc, index = entry_doc(raw)
        node = doc.get("node")
        if not isinstance(node, str) or not node:
            raise EntryError("node: missing")
        status = doc.get("status", STATUS_QUEUED)
        if status not in STATUSES:
            raise EntryError(f"status: one of {', '.join(STATUSES)}, not {status!r}")
        count = doc.get("drain_backoff_count", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise EntryError(f"drain_backoff_count: not a count: {count!r}")
        return cls(
            index=index,
            node=node,
            status=status,
            last_transition_time=_parse_time(
                doc.get("last_transition_time"), "last_transition_time"
            ),
            drain_backoff_count=count,
            drain_backoff_expire=_parse_time(
                doc.get("drain_backoff_expire"), "drain_backoff_expire"
            ),
        )

    def rebooting(self, now: dt.datetime) -> RebootEntry:
        """The entry once its reboot command was sent (``now``, to the second)."""
        return replace(self, status=STATUS_REBOOTING, last_transition_time=_second(now))

    def backed_off(self, now: dt.datetime, jitter: float) -> RebootEntry:
        """Back to ``queued`` after a failure, not picked again before the backoff ends
        (``jitter`` in [0, 1): the fraction of the base added, against thundering herds)."""
        count = self.drain_backoff_count + 1
        seconds = backoff_seconds(count) + int(jitter * BACKOFF_BASE_SECONDS)
        now = _second(now)
        return replace(
            self,
            status=STATUS_QUEUED,
            last_transition_time=now,
            drain_backoff_count=count,
            drain_backoff_expire=now + dt.timedelta(seconds=seconds),
        )

    def reset_backoff(self) -> RebootEntry:
        return replace(self, drain_backoff_count=0, drain_backoff_expire=None)

    def backing_off(self, now: dt.datetime) -> bool:
        """A queued entry whose backoff has not ended at ``now``."""
        expire = self.drain_backoff_expire
        return self.status == STATUS_QUEUED and expire is not None and expire > now


def entry_doc(raw: str | bytes) -> tuple[dict[str, object], int]:
    """A stored queue entry's JSON object and its index (CKE writes it as a string)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise EntryError("not JSON") from None
    if not isinstance(doc, dict):
        raise EntryError("not a JSON object")
    index = doc.get("index")
    if isinstance(index, str) and index.isdecimal():
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise EntryError(f"index: not a decimal number: {doc.get('index')!r}")
    return doc, index


def times_to_doc(
    doc: dict[str, object],
    last_transition: dt.datetime | None,
    backoff_count: int,
    backoff_expire: dt.datetime | None,
) -> dict[str, object]:
    """``doc`` with a queue entry's times and backoff, left out when zero (as CKE)."""
    if last_transition is not None:
        doc["last_transition_time"] = _format_time(last_transition)
    if backoff_count:
        doc["drain_backoff_count"] = backoff_count
    if backoff_expire is not None:
        doc["drain_backoff_expire"] = _format_time(backoff_expire)
    return doc


def _second(when: dt.datetime) -> dt.datetime:
    return when.astimezone(dt.UTC).replace(microsecond=0)


def backoff_seconds(count: int) -> int:
    """CKE's drain backoff before jitter, after the ``count``-th failure in a row."""
    if count <= 0:
        return 0
    return min(BACKOFF_BASE_SECONDS << min(count - 1, 16), BACKOFF_MAX_SECONDS)


def parse_node_list(text: str, cluster: Cluster | None) -> list[str]:
    """The addresses ``ckecli reboot-queue add`` queues: whitespace-separated node
    addresses (as CKE) or names (hostnames) of nodes of the stored cluster, in order;
    a node named twice is queued once. Every word must name a node, or nothing is queued."""
    words = text.split()
    if not words:
        raise EntryError("no node given")
    if cluster is None:
        raise EntryError("there is no cluster configuration; nothing can be rebooted")
    by_key: dict[str, str] = {}
    for n in cluster.nodes:
        by_key[n.address] = n.address
        if n.hostname:
            by_key.setdefault(n.hostname, n.address)
    addresses: list[str] = []
    for word in words:
        address = by_key.get(word)
        if address is None:
            raise EntryError(f"{word}: not a node of the cluster (address or hostname)")
        if address not in addresses:
            addresses.append(address)
    return addresses


def dedup(entries: Iterable[RebootEntry]) -> list[RebootEntry]:
    """One entry per node, the oldest (CKE's ``DedupRebootQueueEntries``)."""
    seen: set[str] = set()
    kept: list[RebootEntry] = []
    for e in sorted(entries, key=lambda e: e.index):
        if e.node not in seen:
            seen.add(e.node)
            kept.append(e)
    return kept


def count_by_status(entries: Iterable[RebootEntry]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for e in entries:
        counts[e.status] += 1
    return counts


@dataclass(frozen=True)
class QueueStatus:
    """What the leader read of the queue for one decision (``ClusterStatus.reboots``)."""

    entries: tuple[RebootEntry, ...] = ()
    # Mod revision of each entry, by index: the leader changes an entry only if it is
    # still the one it decided on (a cancel in between wins).
    revisions: Mapping[int, int] = field(default_factory=dict)
    enabled: bool = True
    # Nodes of ``rebooting`` entries whose boot check said they booted since.
    booted: frozenset[str] = frozenset()
    now: dt.datetime = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def choose_candidates(
    entries: Iterable[RebootEntry],
    nodes: Collection[str],
    control_planes: Collection[str],
    max_concurrent: int,
    now: dt.datetime,
) -> list[RebootEntry]:
    """The entry to start next, if any (CKE's ``ChooseRebootCandidates``): entries of
    nodes outside the cluster and entries backing off are skipped; workers first, at most
    ``max_concurrent`` under way; a control plane only when nothing else is queued or
    under way, and then alone."""
    cp_in_progress = False
    cp_ready: RebootEntry | None = None
    workers_in_progress = 0
    workers_ready: list[RebootEntry] = []
    for e in dedup(entries):
        if e.node not in nodes:
            continue
        is_cp = e.node in control_planes
        if e.status in IN_PROGRESS:
            if is_cp:
                cp_in_progress = True
            else:
                workers_in_progress += 1
        elif e.status == STATUS_QUEUED and not e.backing_off(now):
            if not is_cp:
                workers_ready.append(e)
            elif cp_ready is None:
                cp_ready = e
    if cp_in_progress:
        return []
    if workers_in_progress == 0 and not workers_ready:
        return [cp_ready] if cp_ready is not None else []
    if workers_in_progress < max(1, max_concurrent) and workers_ready:
        return workers_ready[:1]
    return []
