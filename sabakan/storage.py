"""sabakan's etcd key layout and every transaction (one module, so the layout is in one place).

Keys under the prefix (default ``/sabakan/``)::

    machines/<serial>          Machine JSON (spec + status)
    index                      registry of serials, their IPv4 addresses and rack slots
    audit/<ns-time>-<rand>     one audit record (JSON) per change
    leader/<lease-id>          election candidates (the lowest create revision leads)

Every update is a compare-and-swap on the mod revision of the keys it read; a
failed compare re-reads and re-checks, so concurrent writers never lose an update.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from etcd3aio import Etcd3Client, SortOrder, SortTarget, prefix_range_end
from etcd3aio.kv import KVService
from pydantic import BaseModel, ConfigDict, Field

from sabakan.model import (
    Machine,
    MachineInput,
    MachineSpec,
    MachineState,
    MachineStatus,
    check_transition,
    now,
    rfc3339,
)

MAX_CAS_ATTEMPTS = 100


class NotFoundError(LookupError):
    """HTTP 404."""


class ConflictError(RuntimeError):
    """HTTP 409: the request conflicts with stored data."""


@dataclass(frozen=True)
class Actor:
    """Who asked for a change (goes into the audit log)."""

    user: str
    ip: str


class _IndexEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rack: int
    index: int
    ipv4: list[str] = Field(default_factory=list)


class _Index(BaseModel):
    model_config = ConfigDict(extra="forbid")
    machines: dict[str, _IndexEntry] = Field(default_factory=dict)

    def owner_of_ipv4(self) -> dict[str, str]:
        return {ip: serial for serial, e in self.machines.items() for ip in e.ipv4}

    def used_slots(self, rack: int) -> set[int]:
        return {e.index for e in self.machines.values() if e.rack == rack}


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
    async def _read_index(self) -> tuple[_Index, int]:
        resp = await self.kv.get(self.index_key)
        if not resp.kvs:
            return _Index(), 0
        return _Index.model_validate_json(resp.kvs[0].value), int(resp.kvs[0].mod_revision)

    async def get(self, serial: str) -> tuple[Machine, int]:
        resp = await self.kv.get(self.machine_key(serial))
        if not resp.kvs:
            raise NotFoundError(f"machine {serial} not found")
        return Machine.load(resp.kvs[0].value), int(resp.kvs[0].mod_revision)

    async def list_machines(self) -> list[Machine]:
        start = f"{self.prefix}machines/"
        resp = await self.kv.get(start, range_end=prefix_range_end(start.encode()))
        return [Machine.load(kv.value) for kv in resp.kvs]

    # ---- registration and removal
    async def register(self, inputs: list[MachineInput], actor: Actor) -> list[Machine]:
        """All machines or none, in one transaction guarded by the registry's revision."""
        for _ in range(MAX_CAS_ATTEMPTS):
            index, rev = await self._read_index()
            owners = index.owner_of_ipv4()
            for i, m in enumerate(inputs):
                if m.serial in index.machines:
                    raise ConflictError(f"[{i}].serial: machine {m.serial} already exists")
                for ip in m.ipv4:
                    if ip in owners:
                        raise ConflictError(f"[{i}].ipv4: address {ip} is used by {owners[ip]}")
            when = now()
            machines: list[Machine] = []
            taken: dict[int, set[int]] = {}
            for m in inputs:
                used = taken.setdefault(m.rack, index.used_slots(m.rack))
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
                index.machines[m.serial] = _IndexEntry(rack=m.rack, index=slot, ipv4=m.ipv4)
            ops = [KVService.txn_op_put(self.index_key, index.model_dump_json())]
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
        """Remove a retired machine, its addresses and its rack slot in one transaction."""
        for _ in range(MAX_CAS_ATTEMPTS):
            machine, mrev = await self.get(serial)
            if machine.status.state != MachineState.RETIRED:
                raise ConflictError(
                    f"machine {serial} is {machine.status.state.value}; "
                    "only a retired machine may be deleted"
                )
            index, irev = await self._read_index()
            index.machines.pop(serial, None)
            ops = [
                KVService.txn_op_put(self.index_key, index.model_dump_json()),
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
        when the current state is one of ``only_from``: it raises ConflictError otherwise)."""
        allowed = frozenset(only_from) if only_from is not None else None

        def change(m: Machine) -> tuple[Machine, Any, Any]:
            current = m.status.state
            if allowed is not None and current not in allowed:
                raise ConflictError(f"machine {serial} is {current.value}; left alone")
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
