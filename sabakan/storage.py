"""sabakan's etcd key layout and every transaction (one module, so the layout is in one place).

Keys under the prefix (default ``/sabakan/``), layout 2::

    machines/<serial>          Machine JSON (spec + status): the only record of a machine
    index                      a fixed-size marker ``{"layout": 2}``; its mod revision
                               guards registrations and deletions
    audit/<ns-time>-<rand>     one audit record (JSON) per change
    leader/<lease-id>          election candidates (the lowest create revision leads)

No key grows with the number of machines. A registration reads every machine record
at one etcd revision (in pages) to check serials and IPv4 addresses and to pick rack
slots, and commits only if ``index`` was not written since that revision; every
registration and deletion rewrites ``index`` in its own transaction, so two of them
never both succeed on the same snapshot. A state, label or retire-date update cannot
change a serial, an address or a slot, so it compares only its machine's own key.
Every write carries its audit record in the same transaction.

Layout 1 kept the whole registry (serials, addresses, slots) in ``index``: it grew by
about 60-200 bytes per machine, and once it passed etcd's request limit (1.5 MiB by
default) every registration and deletion failed. Its machine records are the same as
layout 2's, so they are read as they are; ``migrate()`` (run by every replica on start,
and in effect by the next registration or deletion) replaces the old ``index`` with the
marker. A replica still running the old version then cannot parse ``index`` and
refuses registrations and deletions instead of writing a stale registry.

Every update is a compare-and-swap on the mod revision of the keys it read; a
failed compare re-reads and re-checks, so concurrent writers never lose an update.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from etcd3aio import Etcd3Client, SortOrder, SortTarget, prefix_range_end
from etcd3aio.kv import KVService

from cke.common.logs import get_logger
from sabakan.model import (
    InputError,
    Machine,
    MachineInput,
    MachineSpec,
    MachineState,
    MachineStatus,
    check_label_count,
    check_transition,
    now,
    rfc3339,
)

log = get_logger("sabakan.storage")

MAX_CAS_ATTEMPTS = 100
LAYOUT = 2
INDEX_MARKER = json.dumps({"layout": LAYOUT})
# Machine records per range read. A record is at most about 27 KB under the input caps,
# so a page stays below gRPC's default 4 MiB receive limit.
PAGE = 100
MAX_PAGES = 100_000


class NotFoundError(LookupError):
    """HTTP 404."""


class ConflictError(RuntimeError):
    """HTTP 409: the request conflicts with stored data."""


@dataclass(frozen=True)
class Actor:
    """Who asked for a change (goes into the audit log)."""

    user: str
    ip: str


@dataclass
class _Registry:
    """Serials, IPv4 owners and used rack slots, derived from the machine records."""

    serials: set[str] = field(default_factory=set)
    owners: dict[str, str] = field(default_factory=dict)
    slots: dict[int, set[int]] = field(default_factory=dict)

    def add(self, raw: bytes) -> None:
        spec = json.loads(raw)["spec"]
        serial = str(spec["serial"])
        self.serials.add(serial)
        for ip in spec.get("ipv4") or []:
            self.owners[str(ip)] = serial
        self.slots.setdefault(int(spec.get("rack", 0)), set()).add(
            int(spec.get("index-in-rack", 0))
        )


def rpc_status(exc: BaseException) -> tuple[str, str] | None:
    """(status code name, details) of a gRPC error that etcd3aio passed through
    unmapped (it maps only auth and transient codes), else None."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if not (callable(code) and callable(details)):
        return None
    try:
        return str(code().name), str(details() or "")
    except Exception:
        return None


def is_marker(raw: bytes) -> bool:
    """True when ``index`` holds the layout-2 marker (not a layout-1 registry)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("layout") == LAYOUT and len(value) == 1


class Storage:
    def __init__(self, client: Etcd3Client, prefix: str) -> None:
        self.client = client
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"

    @property
    def kv(self) -> KVService:
        assert self.client.kv is not None, "etcd client not connected"
        return self.client.kv

    # ---- keys
    def machine_key(self, serial: str) -> str:
        return f"{self.prefix}machines/{serial}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}index"

    @property
    def audit_prefix(self) -> str:
        return f"{self.prefix}audit/"

    @property
    def leader_prefix(self) -> str:
        return f"{self.prefix}leader/"

    def _audit_op(
        self, actor: Actor, action: str, serial: str, before: Any, after: Any, when: dt.datetime
    ) -> Any:
        record = {
            "ts": rfc3339(when),
            "user": actor.user,
            "ip": actor.ip,
            "category": "machines",
            "instance": serial,
            "action": action,
            "before": before,
            "after": after,
        }
        key = f"{self.audit_prefix}{time.time_ns():020d}-{secrets.token_hex(4)}"
        return KVService.txn_op_put(key, json.dumps(record))

    # ---- reads
    async def _range_all(self, prefix: str) -> tuple[list[Any], int]:
        """Every key under ``prefix`` at one etcd revision, read in pages of PAGE keys.

        Returns the key-values (in key order) and that revision. A page at a
        revision compacted meanwhile restarts the read at the newest revision."""
        end = prefix_range_end(prefix.encode())
        for _attempt in range(3):
            start, revision, out = prefix.encode(), 0, list[Any]()
            try:
                for _ in range(MAX_PAGES):
                    resp = await self.kv.get(start, range_end=end, revision=revision, limit=PAGE)
                    revision = revision or int(resp.header.revision)
                    out.extend(resp.kvs)
                    if not resp.more or not resp.kvs:
                        return out, revision
                    start = resp.kvs[-1].key + b"\0"
                raise RuntimeError(f"{prefix}: more than {PAGE * MAX_PAGES} keys")
            except Exception as exc:
                status = rpc_status(exc)
                if status is None or status[0] != "OUT_OF_RANGE":  # compacted
                    raise
        raise ConflictError("the store was compacted during every read; try again")

    async def _snapshot(self) -> tuple[_Registry, int]:
        """The registry derived from all machine records, and the mod revision of
        ``index`` at the same etcd revision (0 when it does not exist)."""
        kvs, revision = await self._range_all(f"{self.prefix}machines/")
        registry = _Registry()
        for kv in kvs:
            registry.add(kv.value)
        resp = await self.kv.get(self.index_key, revision=revision)
        return registry, int(resp.kvs[0].mod_revision) if resp.kvs else 0

    async def get(self, serial: str) -> tuple[Machine, int]:
        resp = await self.kv.get(self.machine_key(serial))
        if not resp.kvs:
            raise NotFoundError(f"machine {serial} not found")
        return Machine.load(resp.kvs[0].value), int(resp.kvs[0].mod_revision)

    async def list_machines(self) -> list[Machine]:
        """Every machine that can be read.  A damaged record (written by hand, or by a
        bug) is logged and left out, so that it cannot stop the listing for everyone,
        nor the state setter's health checks of every other machine."""
        kvs, _ = await self._range_all(f"{self.prefix}machines/")
        machines = []
        for kv in kvs:
            try:
                machines.append(Machine.load(kv.value))
            except ValueError as exc:
                log.warning(
                    "unreadable machine record skipped",
                    key=kv.key.decode(errors="replace"),
                    error=type(exc).__name__,
                )
        return machines

    # ---- layout
    async def migrate(self) -> int:
        """Put the layout-2 marker in ``index`` if it is missing or holds a layout-1
        registry; returns the size in bytes of the registry it replaced (0: none)."""
        for _ in range(MAX_CAS_ATTEMPTS):
            resp = await self.kv.get(self.index_key)
            if resp.kvs and is_marker(resp.kvs[0].value):
                return 0
            rev = int(resp.kvs[0].mod_revision) if resp.kvs else 0
            ops = [KVService.txn_op_put(self.index_key, INDEX_MARKER)]
            if (
                await self.kv.txn(compare=[_mod_revision_is(self.index_key, rev)], success=ops)
            ).succeeded:
                return len(resp.kvs[0].value) if resp.kvs else 0
        raise ConflictError("index is too busy; try again")

    # ---- registration and removal
    async def register(self, inputs: list[MachineInput], actor: Actor) -> list[Machine]:
        """All machines or none, in one transaction guarded by ``index``'s revision."""
        for _ in range(MAX_CAS_ATTEMPTS):
            registry, rev = await self._snapshot()
            for i, m in enumerate(inputs):
                if m.serial in registry.serials:
                    raise ConflictError(f"[{i}].serial: machine {m.serial} already exists")
                for ip in m.ipv4:
                    if ip in registry.owners:
                        owner = registry.owners[ip]
                        raise ConflictError(f"[{i}].ipv4: address {ip} is used by {owner}")
            when = now()
            machines: list[Machine] = []
            for m in inputs:
                used = registry.slots.setdefault(m.rack, set())
                slot = next(n for n in range(1, len(used) + 2) if n not in used)
                used.add(slot)
                spec = MachineSpec.model_validate(
                    {
                        **m.model_dump(by_alias=True),
                        "index-in-rack": slot,
                        "register-date": when,
                    }
                )
                machines.append(Machine(spec=spec, status=MachineStatus(timestamp=when)))
            ops = [KVService.txn_op_put(self.index_key, INDEX_MARKER)]
            ops += [
                KVService.txn_op_put(self.machine_key(x.spec.serial), x.dump()) for x in machines
            ]
            ops.append(
                self._audit_op(
                    actor,
                    "register",
                    ",".join(m.serial for m in inputs),
                    None,
                    [x.to_api(when)["spec"] for x in machines],
                    when,
                )
            )
            compare = [_mod_revision_is(self.index_key, rev)]
            resp = await self.kv.txn(compare=compare, success=ops)
            if resp.succeeded:
                return machines
        raise ConflictError("registry is too busy; try again")

    async def delete(self, serial: str, actor: Actor) -> None:
        """Remove a retired machine (and so its addresses and rack slot) in one transaction."""
        for _ in range(MAX_CAS_ATTEMPTS):
            machine, mrev = await self.get(serial)
            if machine.status.state != MachineState.RETIRED:
                raise ConflictError(
                    f"machine {serial} is {machine.status.state.value}; "
                    "only a retired machine may be deleted"
                )
            resp = await self.kv.get(self.index_key)
            irev = int(resp.kvs[0].mod_revision) if resp.kvs else 0
            ops = [
                KVService.txn_op_put(self.index_key, INDEX_MARKER),
                KVService.txn_op_delete(self.machine_key(serial)),
                self._audit_op(actor, "delete", serial, machine.to_api()["spec"], None, now()),
            ]
            compare = [
                _mod_revision_is(self.machine_key(serial), mrev),
                _mod_revision_is(self.index_key, irev),
            ]
            if (await self.kv.txn(compare=compare, success=ops)).succeeded:
                return
        raise ConflictError(f"machine {serial} is too busy; try again")

    # ---- single-machine updates
    async def _update(
        self,
        serial: str,
        actor: Actor,
        action: str,
        change: Callable[[Machine], tuple[Machine, Any, Any] | None],
    ) -> Machine:
        """Read, change, compare-and-swap; ``change`` returns (new, before, after) or None
        (nothing to do) and raises to refuse. Re-run on a lost race."""
        for _ in range(MAX_CAS_ATTEMPTS):
            machine, rev = await self.get(serial)
            result = change(machine)
            if result is None:
                return machine
            new, before, after = result
            ops = [
                KVService.txn_op_put(self.machine_key(serial), new.dump()),
                self._audit_op(actor, action, serial, before, after, now()),
            ]
            resp = await self.kv.txn(
                compare=[_mod_revision_is(self.machine_key(serial), rev)], success=ops
            )
            if resp.succeeded:
                return new
        raise ConflictError(f"machine {serial} is too busy; try again")

    async def set_state(
        self,
        serial: str,
        target: MachineState,
        actor: Actor,
        only_from: Iterable[MachineState] | None = None,
    ) -> Machine:
        """Change the state if the lifecycle allows it (and, for the state setter, only
        when the current state is one of ``only_from``: it raises ConflictError otherwise).

        The state the machine already has is a no-op, as upstream: nothing is written
        (no timestamp change, no audit record) and the machine is returned as it is."""
        allowed = frozenset(only_from) if only_from is not None else None

        def change(m: Machine) -> tuple[Machine, Any, Any] | None:
            current = m.status.state
            if allowed is not None and current not in allowed:
                raise ConflictError(f"machine {serial} is {current.value}; left alone")
            if current == target:
                return None
            check_transition(current, target)
            new = m.model_copy(
                update={"status": MachineStatus(state=target, timestamp=now())}, deep=True
            )
            return new, current.value, target.value

        return await self._update(serial, actor, "state", change)

    async def set_retire_date(self, serial: str, date: dt.datetime | None, actor: Actor) -> Machine:
        def change(m: Machine) -> tuple[Machine, Any, Any]:
            old = rfc3339(m.spec.retire_date) if m.spec.retire_date else None
            spec = m.spec.model_copy(update={"retire_date": date})
            new = m.model_copy(update={"spec": spec})
            return new, old, rfc3339(date) if date else None

        return await self._update(serial, actor, "retire-date", change)

    async def put_labels(self, serial: str, labels: dict[str, str], actor: Actor) -> Machine:
        def change(m: Machine) -> tuple[Machine, Any, Any]:
            merged = {**m.spec.labels, **labels}
            if len(merged) > len(m.spec.labels):  # a machine stored before the cap keeps its labels
                try:
                    check_label_count(len(merged))
                except ValueError as exc:
                    raise InputError(f"labels: {exc}") from None
            new = m.model_copy(update={"spec": m.spec.model_copy(update={"labels": merged})})
            return new, m.spec.labels, merged

        return await self._update(serial, actor, "labels", change)

    async def delete_label(self, serial: str, key: str, actor: Actor) -> Machine:
        def change(m: Machine) -> tuple[Machine, Any, Any]:
            if key not in m.spec.labels:
                raise NotFoundError(f"label {key} not found on machine {serial}")
            rest = {k: v for k, v in m.spec.labels.items() if k != key}
            new = m.model_copy(update={"spec": m.spec.model_copy(update={"labels": rest})})
            return new, m.spec.labels, rest

        return await self._update(serial, actor, "labels", change)

    # ---- audit log
    def _audit_key_at(self, when: dt.datetime) -> str:
        return f"{self.audit_prefix}{int(when.timestamp() * 1e9):020d}"

    async def logs(
        self, since: dt.datetime | None = None, until: dt.datetime | None = None
    ) -> list[dict[str, Any]]:
        """Audit records with since <= ts < until, oldest first."""
        start = self._audit_key_at(since) if since else self.audit_prefix
        end = (
            self._audit_key_at(until).encode()
            if until
            else prefix_range_end(self.audit_prefix.encode())
        )
        resp = await self.kv.get(
            start, range_end=end, sort_order=SortOrder.ASCEND, sort_target=SortTarget.KEY
        )
        return [json.loads(kv.value) for kv in resp.kvs]

    async def prune_audit(self, retention: float, keep: int) -> int:
        """Delete records older than ``retention`` seconds, and the oldest beyond ``keep``."""
        cutoff = self._audit_key_at(now() - dt.timedelta(seconds=retention))
        deleted = int((await self.kv.delete(self.audit_prefix, range_end=cutoff)).deleted)
        count = int(
            (
                await self.kv.get(
                    self.audit_prefix,
                    range_end=prefix_range_end(self.audit_prefix.encode()),
                    count_only=True,
                )
            ).count
        )
        if count > keep:
            resp = await self.kv.get(
                self.audit_prefix,
                range_end=prefix_range_end(self.audit_prefix.encode()),
                keys_only=True,
                sort_order=SortOrder.ASCEND,
                sort_target=SortTarget.KEY,
                limit=count - keep,
            )
            last = resp.kvs[-1].key
            deleted += int(
                (await self.kv.delete(self.audit_prefix, range_end=last + b"\0")).deleted
            )
        return deleted


def _mod_revision_is(key: str, revision: int) -> Any:
    """A compare on the key's mod revision (0 = the key does not exist)."""
    if revision == 0:
        return KVService.txn_compare_version(key, 0)
    cmp = KVService.txn_compare_version(key, 0)
    cmp.target = cmp.MOD
    cmp.mod_revision = revision
    return cmp
