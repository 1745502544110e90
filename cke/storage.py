"""The etcd key layout of cke and every read and write of it.

All keys live under the configured prefix (default ``/cke/``), as in CKE's
``docs/schema.md``:

=========================  ====================================================
``cluster``                the cluster configuration (JSON)
``constraints``            the constraints (JSON)
``vault``                  Vault connection: endpoint, role-id, secret-id, ca-cert
``ca/<name>``              CA certificates (PEM)
``ca-rotation/<name>``     a CA rotation in progress (JSON; cke/server/carotation.py)
``records``                the next operation record id (decimal)
``records/<016x id>``      operation records (JSON)
``leader/<lease hex>``     election candidates; the oldest is the leader
``status``                 the leader's view: phase, timestamp, leader, blocked
``status/collected``       what the leader decided from (cke/server/statusjson.py)
``hostkeys/<address>``     pinned SSH host keys of nodes
``sabakan/…``              sabakan integration settings
``reboots/data/<016x>``   reboot queue entries (JSON; cke/rebootqueue.py)
``reboots/write-index``   the next reboot queue index (decimal)
``reboots/disabled``      ``true``: the reboot queue is not processed
``repairs/data/<016x>``   repair queue entries (JSON; cke/repairqueue.py)
``repairs/write-index``   the next repair queue index (decimal)
``repairs/disabled``      ``true``: the repair queue is not processed
``auto-repair/disabled``   ``true``: no repair entries from sabakan's reports
``auto-repair/query-variables``  which machines auto-repair asks sabakan for (JSON)
=========================  ====================================================

Every write the leader makes goes through ``Storage.fenced`` with its
``LeaderKey``: the transaction also checks that the leader key still exists with
the create revision it had when this replica won, so a replica that lost its
lease (paused, partitioned) can change nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from etcd3aio import Etcd3Client, SortOrder, SortTarget, prefix_range_end
from etcd3aio._protobuf import Compare, RequestOp

from cke.common.logs import get_logger
from cke.rebootqueue import EntryError, RebootEntry
from cke.records import Record
from cke.repairqueue import RepairEntry

log = get_logger("cke.storage")

KEY_CLUSTER = "cluster"
KEY_CONSTRAINTS = "constraints"
KEY_VAULT = "vault"
KEY_CA_PREFIX = "ca/"
KEY_CA_ROTATION_PREFIX = "ca-rotation/"
KEY_RECORDS = "records"
KEY_RECORDS_PREFIX = "records/"
KEY_LEADER_PREFIX = "leader/"
KEY_STATUS = "status"
KEY_STATUS_COLLECTED = "status/collected"  # the collected status, for ``ckecli plan``
KEY_HOSTKEYS_PREFIX = "hostkeys/"
KEY_SABAKAN_PREFIX = "sabakan/"
KEY_SABAKAN_DISABLED = "sabakan/disabled"
KEY_SABAKAN_QUERY_VARIABLES = "sabakan/query-variables"
KEY_SABAKAN_TEMPLATE = "sabakan/template"
KEY_SABAKAN_URL = "sabakan/url"
KEY_SABAKAN_TLS = "sabakan/tls"
KEY_REBOOTS_PREFIX = "reboots/"
KEY_REBOOTS_DATA_PREFIX = "reboots/data/"
KEY_REBOOTS_WRITE_INDEX = "reboots/write-index"
KEY_REBOOTS_DISABLED = "reboots/disabled"
KEY_REPAIRS_PREFIX = "repairs/"
KEY_REPAIRS_DATA_PREFIX = "repairs/data/"
KEY_REPAIRS_WRITE_INDEX = "repairs/write-index"
KEY_REPAIRS_DISABLED = "repairs/disabled"
KEY_AUTO_REPAIR_PREFIX = "auto-repair/"
KEY_AUTO_REPAIR_DISABLED = "auto-repair/disabled"
KEY_AUTO_REPAIR_QUERY_VARIABLES = "auto-repair/query-variables"
KEY_ETCD_RESTORE = "etcd-restore"  # ckecli's request to restore etcd from a snapshot

DEFAULT_RECORD_LIMIT = 1000


class NotLeader(Exception):
    """A fenced write failed: this replica is no longer the leader."""


class Conflict(Exception):
    """A compare-and-swap lost against a concurrent writer."""


@dataclass(frozen=True)
class LeaderKey:
    """Proof of leadership: the election key and the revision that created it."""

    key: bytes
    create_revision: int
    lease_id: int
    name: str


@dataclass(frozen=True)
class Versioned:
    """A value with its mod revision (0 when the key does not exist)."""

    value: bytes | None
    mod_revision: int


@dataclass
class Status:
    """What the leader last decided, for ``ckecli status`` and the metrics."""

    phase: str = ""
    timestamp: str = ""
    leader: str = ""
    blocked: list[dict[str, Any]] = field(default_factory=list)
    last_operation: str = ""
    vault: str = ""
    etcd_members: list[str] = field(default_factory=list)  # voters' addresses, for rule 5
    cluster_revision: int = 0  # mod revision of the cluster configuration decided on
    sabakan: dict[str, Any] = field(default_factory=dict)  # the last generation, if enabled
    # The last round of sabakan-triggered repair, if enabled (cke/sabakan/autorepair.py).
    auto_repair: dict[str, Any] = field(default_factory=dict)
    # Per node, the certificate that expires first: {address: {certificate, serial, not-after}}.
    certificates: dict[str, Any] = field(default_factory=dict)
    # CA rotations in progress: {name: {stage, waiting-for}}.
    ca_rotations: dict[str, Any] = field(default_factory=dict)
    # Per node, rivers and etcd-rivers: {address: {service: current|outdated|stopped|...}}.
    rivers: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "phase": self.phase,
                "timestamp": self.timestamp,
                "leader": self.leader,
                "blocked": self.blocked,
                "last-operation": self.last_operation,
                "vault": self.vault,
                "etcd-members": self.etcd_members,
                "cluster-revision": self.cluster_revision,
                "sabakan": self.sabakan,
                "auto-repair": self.auto_repair,
                "certificates": self.certificates,
                "ca-rotations": self.ca_rotations,
                "rivers": self.rivers,
            }
        )

    @classmethod
    def from_json(cls, text: bytes | str) -> Status:
        doc = json.loads(text)
        return cls(
            phase=doc.get("phase", ""),
            timestamp=doc.get("timestamp", ""),
            leader=doc.get("leader", ""),
            blocked=list(doc.get("blocked", [])),
            last_operation=doc.get("last-operation", ""),
            vault=doc.get("vault", ""),
            etcd_members=list(doc.get("etcd-members", [])),
            cluster_revision=int(doc.get("cluster-revision", 0)),
            sabakan=dict(doc.get("sabakan") or {}),
            auto_repair=dict(doc.get("auto-repair") or {}),
            certificates=dict(doc.get("certificates") or {}),
            ca_rotations=dict(doc.get("ca-rotations") or {}),
            rivers=dict(doc.get("rivers") or {}),
        )


class UnreadableValue(ValueError):
    """A stored value that is not UTF-8 text."""


def stored_text(value: bytes | None, key: str) -> str | None:
    """A stored value as text (None if absent); bytes that are not UTF-8 raise
    UnreadableValue naming the key, never UnicodeDecodeError."""
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise UnreadableValue(f"{key}: the stored value is not UTF-8 text") from None


def record_key_suffix(record_id: int) -> str:
    return f"{record_id:016x}"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Storage:
    """cke's data in etcd. One instance per process; the client is shared."""

    def __init__(self, client: Etcd3Client, prefix: str = "/cke/", timeout: float = 5.0) -> None:
        if client.kv is None:
            raise RuntimeError("etcd client is not connected")
        self.client = client
        self.kv = client.kv
        self.prefix = prefix
        self.timeout = timeout
        self.record_limit = DEFAULT_RECORD_LIMIT

    def key(self, name: str) -> bytes:
        return (self.prefix + name).encode()

    # -- generic ----------------------------------------------------------------------------

    async def get(self, name: str) -> Versioned:
        resp = await self.kv.get(self.key(name), timeout=self.timeout)
        if not resp.kvs:
            return Versioned(None, 0)
        return Versioned(resp.kvs[0].value, resp.kvs[0].mod_revision)

    async def compare_and_put(self, name: str, value: str | bytes, mod_revision: int) -> None:
        """Write ``name`` only if it is still at ``mod_revision`` (0: does not exist)."""
        resp = await self.kv.txn(
            compare=[self._mod_revision_is(self.key(name), mod_revision)],
            success=[self.kv.txn_op_put(self.key(name), value)],
            timeout=self.timeout,
        )
        if not resp.succeeded:
            raise Conflict(f"{name} was changed by someone else; read it again")

    async def fenced(
        self,
        leader: LeaderKey,
        ops: Sequence[RequestOp],
        compares: Sequence[Compare] = (),
    ) -> bool:
        """Apply ``ops`` atomically if this replica still leads and ``compares`` hold.

        Raises NotLeader when the leader key is gone or is another's; returns
        False when only ``compares`` failed.
        """
        leader_check = Compare(
            result=Compare.EQUAL,
            target=Compare.CREATE,
            key=leader.key,
            create_revision=leader.create_revision,
        )
        resp = await self.kv.txn(
            compare=[leader_check, *compares],
            success=list(ops),
            failure=[self.kv.txn_op_get(leader.key)],
            timeout=self.timeout,
        )
        if resp.succeeded:
            return True
        kvs = resp.responses[0].response_range.kvs
        if not kvs or kvs[0].create_revision != leader.create_revision:
            raise NotLeader(f"leader key {leader.key.decode()} is gone; stepping down")
        return False

    async def fenced_put_if_absent(self, leader: LeaderKey, name: str, value: str) -> bool:
        """As the leader, write ``name`` only if nobody wrote it yet; False if it exists."""
        key = self.key(name)
        absent = Compare(result=Compare.EQUAL, target=Compare.CREATE, key=key, create_revision=0)
        return await self.fenced(leader, [self.kv.txn_op_put(key, value)], [absent])

    async def _prefix_range(
        self,
        prefix: str,
        order: SortOrder,
        target: SortTarget,
        *,
        limit: int = 0,
        keys_only: bool = False,
    ) -> Any:
        """Every key under ``prefix`` (at most ``limit``; 0: all), sorted."""
        start = self.key(prefix)
        return await self.kv.get(
            start,
            range_end=prefix_range_end(start),
            sort_order=order,
            sort_target=target,
            limit=limit,
            keys_only=keys_only,
            timeout=self.timeout,
        )

    @staticmethod
    def _mod_revision_is(key: bytes, mod_revision: int) -> Compare:
        return Compare(result=Compare.EQUAL, target=Compare.MOD, key=key, mod_revision=mod_revision)

    # -- cluster and constraints (written by ckecli) ------------------------------------------

    async def get_cluster(self) -> Versioned:
        return await self.get(KEY_CLUSTER)

    async def get_constraints(self) -> Versioned:
        return await self.get(KEY_CONSTRAINTS)

    async def put_cluster_and_constraints(
        self,
        cluster_json: str | None,
        cluster_revision: int,
        constraints_json: str | None,
        constraints_revision: int,
    ) -> None:
        """Store cluster and/or constraints in one transaction, if neither changed meanwhile.

        Both revisions are checked even when only one value is written, because the
        validity of each depends on the other.
        """
        ops = []
        if cluster_json is not None:
            ops.append(self.kv.txn_op_put(self.key(KEY_CLUSTER), cluster_json))
        if constraints_json is not None:
            ops.append(self.kv.txn_op_put(self.key(KEY_CONSTRAINTS), constraints_json))
        resp = await self.kv.txn(
            compare=[
                self._mod_revision_is(self.key(KEY_CLUSTER), cluster_revision),
                self._mod_revision_is(self.key(KEY_CONSTRAINTS), constraints_revision),
            ],
            success=ops,
            timeout=self.timeout,
        )
        if not resp.succeeded:
            raise Conflict("the cluster or constraints changed meanwhile; run the command again")

    # -- Vault and CA certificates -------------------------------------------------------------

    async def get_vault_config(self) -> Versioned:
        return await self.get(KEY_VAULT)

    async def get_ca(self, name: str) -> str | None:
        got = await self.get(KEY_CA_PREFIX + name)
        return got.value.decode() if got.value is not None else None

    async def get_ca_rotations(self) -> dict[str, Versioned]:
        """Every CA rotation in progress, by CA name."""
        resp = await self._prefix_range(KEY_CA_ROTATION_PREFIX, SortOrder.ASCEND, SortTarget.KEY)
        start = len(self.key(KEY_CA_ROTATION_PREFIX))
        return {
            kv.key[start:].decode(errors="replace"): Versioned(kv.value, kv.mod_revision)
            for kv in resp.kvs
        }

    async def put_if_absent(self, name: str, value: str) -> bool:
        """Write ``name`` unless it exists (False)."""
        key = self.key(name)
        resp = await self.kv.txn(
            compare=[
                Compare(result=Compare.EQUAL, target=Compare.CREATE, key=key, create_revision=0)
            ],
            success=[self.kv.txn_op_put(key, value)],
            timeout=self.timeout,
        )
        return bool(resp.succeeded)

    async def request_ca_rotation(self, name: str, value: str) -> bool:
        """ckecli's request: write ``ca-rotation/<name>`` unless a rotation exists (False)."""
        return await self.put_if_absent(KEY_CA_ROTATION_PREFIX + name, value)

    async def fenced_update_ca_rotation(
        self, leader: LeaderKey, name: str, value: str, mod_revision: int
    ) -> bool:
        """As the leader, move a rotation to its next stage (False: it changed meanwhile)."""
        key = self.key(KEY_CA_ROTATION_PREFIX + name)
        return await self.fenced(
            leader, [self.kv.txn_op_put(key, value)], [self._mod_revision_is(key, mod_revision)]
        )

    async def fenced_finish_ca_rotation(
        self, leader: LeaderKey, name: str, ca_pem: str, mod_revision: int
    ) -> bool:
        """As the leader, store the new CA and end its rotation, in one transaction."""
        key = self.key(KEY_CA_ROTATION_PREFIX + name)
        return await self.fenced(
            leader,
            [
                self.kv.txn_op_put(self.key(KEY_CA_PREFIX + name), ca_pem),
                self.kv.txn_op_delete(key),
            ],
            [self._mod_revision_is(key, mod_revision)],
        )

    # -- restore after quorum loss (requested by ckecli, finished by the leader) ------------

    async def get_restore_request(self) -> Versioned:
        return await self.get(KEY_ETCD_RESTORE)

    async def request_restore(self, value: str) -> bool:
        """ckecli's request: write ``etcd-restore`` unless one is there (False)."""
        return await self.put_if_absent(KEY_ETCD_RESTORE, value)

    async def cancel_restore(self) -> bool:
        """ckecli's cancel: delete the request (False: there was none)."""
        resp = await self.kv.delete(self.key(KEY_ETCD_RESTORE), timeout=self.timeout)
        return bool(resp.deleted)

    async def fenced_finish_restore(self, leader: LeaderKey, mod_revision: int) -> bool:
        """As the leader, delete the request it carried out (False: it changed meanwhile)."""
        key = self.key(KEY_ETCD_RESTORE)
        return await self.fenced(
            leader, [self.kv.txn_op_delete(key)], [self._mod_revision_is(key, mod_revision)]
        )

    async def put_many(self, values: dict[str, str]) -> None:
        """Write several keys in one transaction (all or none)."""
        if values:
            await self.kv.txn(
                compare=[],
                success=[self.kv.txn_op_put(self.key(k), v) for k, v in values.items()],
                timeout=self.timeout,
            )

    # -- sabakan integration (written by ckecli) -------------------------------------------

    async def get_sabakan(self) -> dict[str, bytes]:
        """Every ``sabakan/...`` setting in one read, by key (``sabakan/url``: ...)."""
        resp = await self._prefix_range(KEY_SABAKAN_PREFIX, SortOrder.ASCEND, SortTarget.KEY)
        start = len(self.prefix)
        return {kv.key.decode(errors="replace")[start:]: kv.value for kv in resp.kvs}

    async def put_setting(self, name: str, value: str) -> None:
        await self.kv.put(self.key(name), value, timeout=self.timeout)

    async def put_generated_cluster(
        self, leader: LeaderKey, cluster_json: str, cluster_revision: int
    ) -> bool:
        """As the leader, store a generated cluster if nobody changed the cluster since
        ``cluster_revision`` was read; False when someone did."""
        key = self.key(KEY_CLUSTER)
        unchanged = self._mod_revision_is(key, cluster_revision)
        return await self.fenced(leader, [self.kv.txn_op_put(key, cluster_json)], [unchanged])

    # -- leader and status ----------------------------------------------------------------------

    async def leader_candidates(self) -> list[tuple[bytes, int, str]]:
        """(key, create revision, name) of every candidate, oldest first."""
        resp = await self._prefix_range(KEY_LEADER_PREFIX, SortOrder.ASCEND, SortTarget.CREATE)
        return [(kv.key, kv.create_revision, kv.value.decode(errors="replace")) for kv in resp.kvs]

    async def get_leader_name(self) -> str | None:
        candidates = await self.leader_candidates()
        return candidates[0][2] if candidates else None

    async def get_status(self) -> Status | None:
        """The last status; None when there is none or it cannot be read (the leader
        overwrites it every round, so a damaged one is only reported, never fatal)."""
        got = await self.get(KEY_STATUS)
        if got.value is None:
            return None
        try:
            return Status.from_json(got.value)
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("stored status is unreadable; ignored", error=f"{type(exc).__name__}")
            return None

    async def put_status(
        self, leader: LeaderKey, status: Status, collected: str | None = None
    ) -> None:
        """The status and (with it, in one transaction) what it was decided from."""
        ops = [self.kv.txn_op_put(self.key(KEY_STATUS), status.to_json())]
        if collected is not None:
            ops.append(self.kv.txn_op_put(self.key(KEY_STATUS_COLLECTED), collected))
        ok = await self.fenced(leader, ops)
        if not ok:  # no extra compares: only the leader check can fail
            raise NotLeader("status write refused")

    # -- operation records ----------------------------------------------------------------------

    async def register_record(self, leader: LeaderKey, record: Record) -> Record:
        """Give ``record`` the next id and store it; drop records beyond the limit."""
        for _ in range(10):
            got = await self.get(KEY_RECORDS)
            next_id = await self._next_record_id(got.value)
            record.id = next_id
            ops = [
                self.kv.txn_op_put(self.key(KEY_RECORDS), str(next_id + 1)),
                self.kv.txn_op_put(
                    self.key(KEY_RECORDS_PREFIX + record_key_suffix(next_id)), record.to_json()
                ),
            ]
            oldest_kept = next_id - self.record_limit + 1
            if oldest_kept > 1:
                ops.append(
                    self.kv.txn_op_delete(
                        self.key(KEY_RECORDS_PREFIX),
                        range_end=self.key(KEY_RECORDS_PREFIX + record_key_suffix(oldest_kept)),
                    )
                )
            compare = self._mod_revision_is(self.key(KEY_RECORDS), got.mod_revision)
            if await self.fenced(leader, ops, [compare]):
                return record
        raise Conflict("could not allocate a record id")

    async def _next_record_id(self, counter: bytes | None) -> int:
        """The id counter, or (when it was damaged) one past the newest record's key."""
        if counter is None:
            return 1
        text = counter.decode(errors="replace").strip()
        if text.isdecimal() and 0 < len(text) <= 15:
            return int(text)
        log.warning("the record id counter is unreadable; continuing after the newest record")
        start = self.key(KEY_RECORDS_PREFIX)
        resp = await self._prefix_range(
            KEY_RECORDS_PREFIX, SortOrder.DESCEND, SortTarget.KEY, limit=1, keys_only=True
        )
        for kv in resp.kvs:
            suffix = kv.key[len(start) :].decode(errors="replace")
            with contextlib.suppress(ValueError):
                return int(suffix, 16) + 1
        return 1

    async def update_record(self, leader: LeaderKey, record: Record) -> None:
        key = self.key(KEY_RECORDS_PREFIX + record_key_suffix(record.id))
        if not await self.fenced(leader, [self.kv.txn_op_put(key, record.to_json())]):
            raise NotLeader("record write refused")

    async def get_records(self, count: int = 0) -> list[Record]:
        """The newest ``count`` records (all when 0), newest first."""
        resp = await self._prefix_range(
            KEY_RECORDS_PREFIX, SortOrder.DESCEND, SortTarget.KEY, limit=count
        )
        records = []
        for kv in resp.kvs:
            try:
                records.append(Record.from_json(kv.value))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                log.warning(
                    "unreadable operation record skipped",
                    key=kv.key.decode(errors="replace"),
                    error=type(exc).__name__,
                )
        return records

    async def unfinished_records(self) -> list[Record]:
        return [r for r in await self.get_records(10) if r.status in ("new", "running")]

    # -- the reboot queue (written by ckecli, processed by the leader) ----------------------

    @staticmethod
    def _reboot_key(index: int) -> str:
        return KEY_REBOOTS_DATA_PREFIX + record_key_suffix(index)

    async def get_reboot_entries(self) -> list[tuple[RebootEntry, int]]:
        """Every entry with its mod revision, oldest first; unreadable ones are logged and
        skipped (ckecli cancel-all still reaches them by key)."""
        resp = await self._prefix_range(KEY_REBOOTS_DATA_PREFIX, SortOrder.ASCEND, SortTarget.KEY)
        entries: list[tuple[RebootEntry, int]] = []
        for kv in resp.kvs:
            try:
                entries.append((RebootEntry.from_json(kv.value), kv.mod_revision))
            except EntryError as exc:
                log.warning(
                    "unreadable reboot queue entry skipped",
                    key=kv.key.decode(errors="replace"),
                    error=str(exc),
                )
        return entries

    async def get_reboot_entry(self, index: int) -> tuple[RebootEntry | None, int]:
        got = await self.get(self._reboot_key(index))
        if got.value is None:
            return None, 0
        return RebootEntry.from_json(got.value), got.mod_revision

    async def add_reboot_entries(self, addresses: Sequence[str]) -> list[RebootEntry]:
        """Queue one entry per address and advance ``reboots/write-index``, atomically."""
        for _ in range(10):
            got = await self.get(KEY_REBOOTS_WRITE_INDEX)
            text = got.value.decode(errors="replace").strip() if got.value is not None else "0"
            if not text.isdecimal():
                raise UnreadableValue(f"{KEY_REBOOTS_WRITE_INDEX}: not a decimal number")
            first = int(text)
            entries = [RebootEntry(first + i, a) for i, a in enumerate(addresses)]
            ops = [
                self.kv.txn_op_put(self.key(self._reboot_key(e.index)), e.to_json())
                for e in entries
            ]
            ops.append(
                self.kv.txn_op_put(self.key(KEY_REBOOTS_WRITE_INDEX), str(first + len(entries)))
            )
            resp = await self.kv.txn(
                compare=[
                    self._mod_revision_is(self.key(KEY_REBOOTS_WRITE_INDEX), got.mod_revision)
                ],
                success=ops,
                timeout=self.timeout,
            )
            if resp.succeeded:
                return entries
        raise Conflict("the reboot queue kept changing; run the command again")

    async def update_reboot_entry(self, entry: RebootEntry, mod_revision: int) -> bool:
        """ckecli's change of an entry, if nobody changed or removed it since (False)."""
        key = self.key(self._reboot_key(entry.index))
        resp = await self.kv.txn(
            compare=[self._mod_revision_is(key, mod_revision)],
            success=[self.kv.txn_op_put(key, entry.to_json())],
            timeout=self.timeout,
        )
        return bool(resp.succeeded)

    async def fenced_update_reboot_entry(
        self, leader: LeaderKey, entry: RebootEntry, mod_revision: int
    ) -> bool:
        """As the leader, change an entry unless it changed meanwhile (a cancel: False)."""
        key = self.key(self._reboot_key(entry.index))
        return await self.fenced(
            leader,
            [self.kv.txn_op_put(key, entry.to_json())],
            [self._mod_revision_is(key, mod_revision)],
        )

    async def fenced_delete_reboot_entry(self, leader: LeaderKey, index: int) -> None:
        """As the leader, remove an entry (done or cancelled)."""
        key = self.key(self._reboot_key(index))
        if not await self.fenced(leader, [self.kv.txn_op_delete(key)]):
            raise NotLeader("reboot queue write refused")

    async def reboot_queue_enabled(self) -> bool:
        """False only when ``reboots/disabled`` is ``true`` (CKE's rule)."""
        got = await self.get(KEY_REBOOTS_DISABLED)
        return got.value is None or got.value.strip() != b"true"

    async def set_reboot_queue_disabled(self, disabled: bool) -> None:
        await self.put_setting(KEY_REBOOTS_DISABLED, "true" if disabled else "false")

    # -- the repair queue (written by ckecli, processed by the leader) ----------------------

    @staticmethod
    def _repair_key(index: int) -> str:
        return KEY_REPAIRS_DATA_PREFIX + record_key_suffix(index)

    async def get_repair_entries(self) -> list[tuple[RepairEntry, int]]:
        """Every entry with its mod revision, oldest first; unreadable ones are logged and
        skipped."""
        resp = await self._prefix_range(KEY_REPAIRS_DATA_PREFIX, SortOrder.ASCEND, SortTarget.KEY)
        entries: list[tuple[RepairEntry, int]] = []
        for kv in resp.kvs:
            try:
                entries.append((RepairEntry.from_json(kv.value), kv.mod_revision))
            except EntryError as exc:
                log.warning(
                    "unreadable repair queue entry skipped",
                    key=kv.key.decode(errors="replace"),
                    error=str(exc),
                )
        return entries

    async def get_repair_entry(self, index: int) -> tuple[RepairEntry | None, int]:
        got = await self.get(self._repair_key(index))
        if got.value is None:
            return None, 0
        return RepairEntry.from_json(got.value), got.mod_revision

    async def add_repair_entry(self, entry: RepairEntry) -> RepairEntry:
        """Queue ``entry`` at the next index and advance ``repairs/write-index``,
        atomically; returns the entry with its index."""
        for _ in range(10):
            got = await self.get(KEY_REPAIRS_WRITE_INDEX)
            text = got.value.decode(errors="replace").strip() if got.value is not None else "0"
            if not text.isdecimal():
                raise UnreadableValue(f"{KEY_REPAIRS_WRITE_INDEX}: not a decimal number")
            queued = dataclasses.replace(entry, index=int(text))
            resp = await self.kv.txn(
                compare=[
                    self._mod_revision_is(self.key(KEY_REPAIRS_WRITE_INDEX), got.mod_revision)
                ],
                success=[
                    self.kv.txn_op_put(self.key(self._repair_key(queued.index)), queued.to_json()),
                    self.kv.txn_op_put(self.key(KEY_REPAIRS_WRITE_INDEX), str(queued.index + 1)),
                ],
                timeout=self.timeout,
            )
            if resp.succeeded:
                return queued
        raise Conflict("the repair queue kept changing; run the command again")

    async def update_repair_entry(self, entry: RepairEntry, mod_revision: int) -> bool:
        """ckecli's change of an entry, if nobody changed or removed it since (False)."""
        key = self.key(self._repair_key(entry.index))
        resp = await self.kv.txn(
            compare=[self._mod_revision_is(key, mod_revision)],
            success=[self.kv.txn_op_put(key, entry.to_json())],
            timeout=self.timeout,
        )
        return bool(resp.succeeded)

    async def fenced_update_repair_entry(
        self, leader: LeaderKey, entry: RepairEntry, mod_revision: int
    ) -> bool:
        """As the leader, change an entry unless it changed meanwhile (a delete: False)."""
        key = self.key(self._repair_key(entry.index))
        return await self.fenced(
            leader,
            [self.kv.txn_op_put(key, entry.to_json())],
            [self._mod_revision_is(key, mod_revision)],
        )

    async def fenced_delete_repair_entry(self, leader: LeaderKey, index: int) -> None:
        """As the leader, remove an entry (marked deleted)."""
        key = self.key(self._repair_key(index))
        if not await self.fenced(leader, [self.kv.txn_op_delete(key)]):
            raise NotLeader("repair queue write refused")

    async def repair_queue_enabled(self) -> bool:
        """False only when ``repairs/disabled`` is ``true`` (CKE's rule)."""
        got = await self.get(KEY_REPAIRS_DISABLED)
        return got.value is None or got.value.strip() != b"true"

    async def set_repair_queue_disabled(self, disabled: bool) -> None:
        await self.put_setting(KEY_REPAIRS_DISABLED, "true" if disabled else "false")

    async def fenced_add_repair_entries(
        self, leader: LeaderKey, entries: Sequence[RepairEntry]
    ) -> list[RepairEntry] | None:
        """As the leader, queue ``entries`` (sabakan-triggered repairs) in one transaction
        at the next indexes; None when the queue's write index moved since it was read
        (``ckecli repair-queue add`` meanwhile: decide again on the new queue)."""
        got = await self.get(KEY_REPAIRS_WRITE_INDEX)
        text = got.value.decode(errors="replace").strip() if got.value is not None else "0"
        if not text.isdecimal():
            raise UnreadableValue(f"{KEY_REPAIRS_WRITE_INDEX}: not a decimal number")
        first = int(text)
        queued = [dataclasses.replace(e, index=first + i) for i, e in enumerate(entries)]
        ops = [self.kv.txn_op_put(self.key(self._repair_key(e.index)), e.to_json()) for e in queued]
        ops.append(self.kv.txn_op_put(self.key(KEY_REPAIRS_WRITE_INDEX), str(first + len(queued))))
        compare = self._mod_revision_is(self.key(KEY_REPAIRS_WRITE_INDEX), got.mod_revision)
        if not await self.fenced(leader, ops, [compare]):
            return None
        return queued

    # -- sabakan-triggered repair (``ckecli auto-repair``) ----------------------------------

    async def auto_repair_enabled(self) -> bool:
        """False only when ``auto-repair/disabled`` is ``true`` (CKE's rule)."""
        got = await self.get(KEY_AUTO_REPAIR_DISABLED)
        return got.value is None or got.value.strip() != b"true"

    async def set_auto_repair_disabled(self, disabled: bool) -> None:
        await self.put_setting(KEY_AUTO_REPAIR_DISABLED, "true" if disabled else "false")

    async def get_auto_repair(self) -> dict[str, bytes]:
        """Every ``auto-repair/...`` setting in one read, by key."""
        resp = await self._prefix_range(KEY_AUTO_REPAIR_PREFIX, SortOrder.ASCEND, SortTarget.KEY)
        start = len(self.prefix)
        return {kv.key.decode(errors="replace")[start:]: kv.value for kv in resp.kvs}
