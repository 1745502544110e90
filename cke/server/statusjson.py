"""The collected status as JSON, so that ``ckecli plan`` can run the same decision.

The leader writes, every round, what it decided from (``status/collected``,
:func:`collected_to_json`); ``ckecli plan`` and ``ckecli cluster set --dry-run`` read
it back (:func:`collected_from_json`) and call the same pure ``decide``.

Everything :func:`cke.server.strategy.decide` reads of a :class:`ClusterStatus` is kept,
except the rivers program itself (a 24 KB zipapp): only its SHA-256 is stored, and the
reader uses its own copy when the digests match (one cke version ships one zipapp).
Nothing secret is in a ClusterStatus (certificates are kept as serials, times and key
ids; trust bundles are CA certificates, public). Values equal to their defaults are
left out, so that 1,000 nodes stay far below etcd's 1.5 MiB request limit (measured by
``tests/unit/test_plan.py``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cke.certinfo import CertInfo
from cke.rebootqueue import EntryError, QueueStatus
from cke.repairqueue import RepairQueueStatus
from cke.restore import RestoreRequest
from cke.server.clusterstatus import (
    ClusterStatus,
    DefragPolicy,
    EtcdMember,
    EtcdStatus,
    NodeStatus,
    PKIStatus,
    ServiceStatus,
    Trust,
)
from cke.server.safety import Blocked

FORMAT_VERSION = 1


class CollectedError(ValueError):
    """A stored collected status that cannot be read (one line)."""


@dataclass(frozen=True)
class Collected:
    """What the leader decided from in one round.

    ``status`` is None when it collected nothing (the configuration was unusable, or
    Vault was never reached): ``phase`` and ``blocked`` then say why.
    ``extra_blocked``: what the leader adds to the decision's blocked list (CA rotation
    records it cannot read); ``vault_away``: Vault's state when it was unavailable
    ("" when available or not used), which holds every operation back.
    """

    timestamp: str  # RFC 3339, when the leader wrote it
    leader: str
    cluster_revision: int
    status: ClusterStatus | None
    rivers_app_sha256: str = ""  # "" when the leader had no rivers app
    extra_blocked: tuple[Blocked, ...] = ()
    vault_away: str = ""
    phase: str = ""  # the leader's phase when it collected nothing
    blocked: tuple[Blocked, ...] = field(default=())


def app_digest(app: bytes) -> str:
    return hashlib.sha256(app).hexdigest() if app else ""


# -- encoding ----------------------------------------------------------------------------------


def _time(when: dt.datetime) -> str:
    return when.isoformat()


def _cert(c: CertInfo) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "serial": c.serial,
        "not-before": c.not_before,
        "not-after": c.not_after,
        "issuer": c.issuer_key_id,
    }
    if c.key_id:
        doc["key-id"] = c.key_id
    if c.fingerprint:
        doc["fingerprint"] = c.fingerprint
    return doc


def _node(ns: NodeStatus) -> dict[str, Any]:
    doc: dict[str, Any] = {"ssh": ns.ssh_ok}
    if ns.host_key_mismatch:
        doc["host-key-mismatch"] = True
    if ns.etcd_running:
        doc["etcd-running"] = True
    if ns.etcd_digest is not None:
        doc["etcd-digest"] = ns.etcd_digest
    if ns.etcd_has_data:
        doc["etcd-data"] = True
    if ns.identity is not None:
        doc["identity"] = ns.identity
    if ns.etcd_peer_url is not None:
        doc["etcd-peer-url"] = ns.etcd_peer_url
    if ns.certs:
        doc["certs"] = {name: _cert(c) for name, c in ns.certs.items()}
    if ns.trusted:
        doc["trusted"] = {name: list(ids) for name, ids in ns.trusted.items()}
    if ns.services:
        doc["services"] = {
            name: {"running": s.running, **({"digest": s.digest} if s.digest else {})}
            for name, s in ns.services.items()
        }
    return doc


def _member(m: EtcdMember) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": m.id, "name": m.name, "address": m.address}
    if m.learner:
        doc["learner"] = True
    if m.healthy:
        doc["healthy"] = True
    if m.raft_index:
        doc["raft-index"] = m.raft_index
    if m.leader:
        doc["leader"] = True
    if m.peer_urls:
        doc["peer-urls"] = list(m.peer_urls)
    if m.db_size:
        doc["db-size"] = m.db_size
    if m.db_size_in_use:
        doc["db-size-in-use"] = m.db_size_in_use
    return doc


def _plain(value: Any) -> Any:
    """A queue's value as JSON: entries field by field (defaults left out), times in
    full (not the entries' own to_dict: CKE's shape drops the sub-second part)."""
    if isinstance(value, dt.datetime):
        return _time(value)
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        doc: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.default is dataclasses.MISSING or v != f.default:
                doc[f.name] = _plain(v)
        return doc
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__}")


def _typed(hint: Any, value: Any) -> Any:
    """The inverse of :func:`_plain` for a value of type ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _typed(hint, value)
    if hint is dt.datetime:
        return _parse_time(value)
    if origin is tuple:
        return tuple(_typed(args[0], v) for v in value)
    if origin is frozenset:
        return frozenset(_typed(args[0], v) for v in value)
    if origin in (Mapping, dict):
        key = int if args[0] is int else str  # JSON keys are strings
        return {key(k): _typed(args[1], v) for k, v in value.items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = typing.get_type_hints(hint)
        return hint(**{k: _typed(hints[k], v) for k, v in value.items()})
    if hint in (bool, int, float, str):
        if not isinstance(value, hint if hint is not float else (int, float)):
            raise TypeError(f"{value!r} is not a {hint.__name__}")
        return hint(value)
    raise TypeError(f"cannot read a {hint}")


def status_to_doc(status: ClusterStatus) -> dict[str, Any]:
    """Every field the decision reads, as a JSON-able document (rivers app: its digest)."""
    pki = status.pki
    return {
        "nodes": {address: _node(ns) for address, ns in status.nodes.items()},
        "etcd": {
            "reachable": status.etcd.reachable,
            "members": [_member(m) for m in status.etcd.members],
            "leader-id": status.etcd.leader_id,
            "alarms": [[member, alarm] for member, alarm in status.etcd.alarms],
        },
        "pki": {
            "now": pki.now,
            "renew-fraction": pki.renew_fraction,
            "bundles": dict(pki.trust.bundles),
            "issuers": dict(pki.trust.issuers),
            "rotations": dict(pki.rotations),
            "rotation-since": dict(pki.rotation_since),
            "rotation-grace": pki.rotation_grace,
            "own-client-issuer": pki.own_client_issuer,
        },
        "max-concurrent-updates": status.max_concurrent_updates,
        "rivers-app-sha256": app_digest(status.rivers_app),
        "defrag": {
            "min-db-size": status.defrag.min_db_size,
            "in-use-ratio": status.defrag.in_use_ratio,
        },
        "restore": status.restore.model_dump(mode="json") if status.restore else None,
        "restore-revision": status.restore_revision,
        "restore-problem": status.restore_problem,
        "reboots": _plain(status.reboots),
        "repairs": _plain(status.repairs),
    }


def collected_to_json(collected: Collected) -> str:
    doc: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "timestamp": collected.timestamp,
        "leader": collected.leader,
        "cluster-revision": collected.cluster_revision,
        "status": status_to_doc(collected.status) if collected.status is not None else None,
        "extra-blocked": [b.to_dict() for b in collected.extra_blocked],
        "vault-away": collected.vault_away,
        "phase": collected.phase,
        "blocked": [b.to_dict() for b in collected.blocked],
    }
    return json.dumps(doc, separators=(",", ":"))


# -- decoding ----------------------------------------------------------------------------------


def _parse_time(value: Any) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time without a zone: {value!r}")
    return parsed


def _cert_of(doc: Mapping[str, Any]) -> CertInfo:
    return CertInfo(
        serial=str(doc["serial"]),
        not_before=float(doc["not-before"]),
        not_after=float(doc["not-after"]),
        issuer_key_id=str(doc["issuer"]),
        key_id=str(doc.get("key-id", "")),
        fingerprint=str(doc.get("fingerprint", "")),
    )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _node_of(address: str, doc: Mapping[str, Any]) -> NodeStatus:
    return NodeStatus(
        address=address,
        ssh_ok=bool(doc["ssh"]),
        host_key_mismatch=bool(doc.get("host-key-mismatch", False)),
        etcd_running=bool(doc.get("etcd-running", False)),
        etcd_digest=_optional_str(doc.get("etcd-digest")),
        etcd_has_data=bool(doc.get("etcd-data", False)),
        identity=_optional_str(doc.get("identity")),
        etcd_peer_url=_optional_str(doc.get("etcd-peer-url")),
        certs={name: _cert_of(c) for name, c in doc.get("certs", {}).items()},
        trusted={name: tuple(str(i) for i in ids) for name, ids in doc.get("trusted", {}).items()},
        services={
            name: ServiceStatus(bool(s["running"]), _optional_str(s.get("digest")))
            for name, s in doc.get("services", {}).items()
        },
    )


def _member_of(doc: Mapping[str, Any]) -> EtcdMember:
    return EtcdMember(
        id=int(doc["id"]),
        name=str(doc["name"]),
        address=str(doc["address"]),
        learner=bool(doc.get("learner", False)),
        healthy=bool(doc.get("healthy", False)),
        raft_index=int(doc.get("raft-index", 0)),
        leader=bool(doc.get("leader", False)),
        peer_urls=tuple(str(u) for u in doc.get("peer-urls", ())),
        db_size=int(doc.get("db-size", 0)),
        db_size_in_use=int(doc.get("db-size-in-use", 0)),
    )


def status_from_doc(doc: Mapping[str, Any], rivers_app: bytes = b"") -> ClusterStatus:
    """The status of :func:`status_to_doc`; ``rivers_app`` stands for the app whose
    digest was stored (the caller checks that it is the same one)."""
    etcd = doc["etcd"]
    pki = doc["pki"]
    leader_id = etcd.get("leader-id")
    restore = doc.get("restore")
    return ClusterStatus(
        nodes={a: _node_of(a, ns) for a, ns in doc["nodes"].items()},
        etcd=EtcdStatus(
            reachable=bool(etcd["reachable"]),
            members=tuple(_member_of(m) for m in etcd["members"]),
            leader_id=int(leader_id) if leader_id is not None else None,
            alarms=tuple((int(m), str(a)) for m, a in etcd["alarms"]),
        ),
        pki=PKIStatus(
            now=float(pki["now"]),
            renew_fraction=float(pki["renew-fraction"]),
            trust=Trust(
                {str(k): str(v) for k, v in pki["bundles"].items()},
                {str(k): str(v) for k, v in pki["issuers"].items()},
            ),
            rotations={str(k): str(v) for k, v in pki["rotations"].items()},
            rotation_since={str(k): float(v) for k, v in pki["rotation-since"].items()},
            rotation_grace=float(pki["rotation-grace"]),
            own_client_issuer=str(pki["own-client-issuer"]),
        ),
        max_concurrent_updates=int(doc["max-concurrent-updates"]),
        rivers_app=rivers_app if doc["rivers-app-sha256"] else b"",
        defrag=DefragPolicy(
            min_db_size=int(doc["defrag"]["min-db-size"]),
            in_use_ratio=float(doc["defrag"]["in-use-ratio"]),
        ),
        restore=RestoreRequest.model_validate(restore) if restore is not None else None,
        restore_revision=int(doc["restore-revision"]),
        restore_problem=str(doc["restore-problem"]),
        reboots=_typed(QueueStatus, doc["reboots"]),
        repairs=_typed(RepairQueueStatus, doc["repairs"]),
    )


def _blocked_of(doc: Mapping[str, Any]) -> Blocked:
    return Blocked(
        str(doc["rule"]), str(doc["message"]), tuple(str(n) for n in doc.get("nodes", ()))
    )


def collected_from_json(text: str | bytes, rivers_app: bytes = b"") -> Collected:
    """Read a stored collected status; CollectedError (one line) when it cannot be."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise CollectedError("not a JSON object")
        if doc.get("version") != FORMAT_VERSION:
            raise CollectedError(
                f"format version {doc.get('version')!r}, this ckecli reads {FORMAT_VERSION}"
            )
        raw = doc["status"]
        return Collected(
            timestamp=str(doc["timestamp"]),
            leader=str(doc["leader"]),
            cluster_revision=int(doc["cluster-revision"]),
            status=status_from_doc(raw, rivers_app) if raw is not None else None,
            rivers_app_sha256=str(raw["rivers-app-sha256"]) if raw is not None else "",
            extra_blocked=tuple(_blocked_of(b) for b in doc["extra-blocked"]),
            vault_away=str(doc["vault-away"]),
            phase=str(doc["phase"]),
            blocked=tuple(_blocked_of(b) for b in doc["blocked"]),
        )
    except CollectedError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, EntryError) as exc:
        # pydantic's ValidationError is a ValueError.
        raise CollectedError(f"unreadable ({type(exc).__name__}: {exc})".splitlines()[0]) from None


# The leader rewrites an unchanged collected status (apart from its clock) only this
# often: every round at 1,000 nodes would add ~200 KB to etcd's history each time.
REFRESH_SECONDS = 60.0


def without_clocks(status: ClusterStatus) -> ClusterStatus:
    """The status with the clocks of its collection zeroed: two rounds that saw the same
    world compare equal."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return dataclasses.replace(
        status,
        pki=dataclasses.replace(status.pki, now=0.0),
        reboots=dataclasses.replace(status.reboots, now=epoch),
        repairs=dataclasses.replace(status.repairs, now=epoch),
    )


class CollectedWriter:
    """Which rounds' collected status the leader stores: a changed one at once, an
    unchanged one (same world, same decision, same leadership term) once every
    ``refresh`` seconds."""

    def __init__(self, refresh: float = REFRESH_SECONDS) -> None:
        self.refresh = refresh
        self._last: tuple[object, ...] | None = None
        self._at = 0.0
        self._pending: tuple[tuple[object, ...], float] | None = None

    def text(self, collected: Collected, term: int, now: float, decided: object) -> str | None:
        """The JSON to store with this round's status, or None to keep the stored one.
        ``decided``: what the leader decided (phase, operation, rules), so that a
        decision the clock alone changed (a certificate due) is stored at once too."""
        status = without_clocks(collected.status) if collected.status is not None else None
        key = (
            term,
            decided,
            collected.leader,
            collected.cluster_revision,
            status,
            collected.extra_blocked,
            collected.vault_away,
            collected.phase,
            collected.blocked,
        )
        if key == self._last and now - self._at < self.refresh:
            return None
        self._pending = (key, now)
        return collected_to_json(collected)

    def stored(self) -> None:
        """The text last returned is in etcd (a failed write is retried next round)."""
        if self._pending is not None:
            (self._last, self._at), self._pending = self._pending, None
