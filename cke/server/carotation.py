"""CA rotation: a new issuer in the same Vault PKI mount, rolled out with no lost connection.

``ckecli ca rotate NAME`` writes ``ca-rotation/<NAME>`` at stage ``requested``; the
leader moves it through the stages below, each step an operation in the records
(``ca-rotation``), taken only once the previous stage reached every member:

``requested``   create the new issuer in the CA's mount (the old one stays the default)
``trust-both``  every trust bundle holds old + new; members restart one at a time
                (etcd reads trusted CA files only at start) under the quorum rules;
                for the ``server`` CA, clients outside cke fetch the bundle
                (``ckecli ca get server``) during the grace period
``reissue``     the new issuer is the mount's default; every leaf of the CA is renewed
                in place (members keep running), cke's own client certificate too;
                for ``etcd-client``, clients outside cke get certificates from the new
                CA during the grace period (``--ca-rotation-grace``)
``drop-old``    the trust bundles hold the new CA only; members restart one at a time
                again; then ``ca/<NAME>`` becomes the new CA and the rotation ends

A step that is interrupted (leader killed, Vault down) is taken again by the next
leader: every step checks the stage it starts from, and the Vault calls are idempotent
(the issuer is found by its name before one is created).

Pure parts (``trust_of``, ``rotation_progress``) feed the decision; the command at the
bottom is the only part that does I/O.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cke.certinfo import CertificateError, bundle_key_ids, join_bundle
from cke.common.etcd import format_validation_error
from cke.op.base import Commander, CommandInfo, OpContext
from cke.op.etcd import StepOperator
from cke.pki import CA_BY_NAME, ROTATABLE_CAS
from cke.server.certrenewal import ETCD_LEAVES, ETCD_TRUST
from cke.server.clusterstatus import NodeStatus, PKIStatus
from cke.storage import LeaderKey, Storage

REQUESTED = "requested"
TRUST_BOTH = "trust-both"
REISSUE = "reissue"
DROP_OLD = "drop-old"
NEXT_STAGE = {REQUESTED: TRUST_BOTH, TRUST_BOTH: REISSUE, REISSUE: DROP_OLD, DROP_OLD: "done"}
Stage = Literal["requested", "trust-both", "reissue", "drop-old"]


class RotationRecord(BaseModel):
    """``ca-rotation/<name>``: written by ckecli (requested), then by the leader only."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    stage: Stage
    requested: str  # RFC 3339, when ckecli asked
    issuer_name: str = Field(alias="issuer-name", min_length=1, max_length=128)
    old: str = ""  # the CA certificate being replaced (PEM)
    new: str = ""  # the new issuer's certificate (PEM)
    new_issuer_id: str = Field(default="", alias="new-issuer-id")
    since: float = 0.0  # Unix time the current stage began

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True))


class RotationError(ValueError):
    """A stored rotation that cannot be used; the message names the key and the field."""


def parse_rotation(name: str, raw: bytes | None) -> RotationRecord:
    where = f"ca-rotation/{name}"
    if name not in ROTATABLE_CAS:
        raise RotationError(f"{where}: {name!r} is not a CA cke rotates")
    try:
        record = RotationRecord.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise RotationError(f"{where}: {format_validation_error(exc)}") from None
    if record.stage != REQUESTED:
        try:
            bundle_key_ids(record.old)
            bundle_key_ids(record.new)
        except CertificateError as exc:
            raise RotationError(f"{where}: old/new: {exc}") from None
    return record


def new_request(issuer_name: str, requested: str, since: float) -> RotationRecord:
    return RotationRecord.model_validate(
        {"stage": REQUESTED, "requested": requested, "issuer-name": issuer_name, "since": since}
    )


# Stages at which clients outside cke must act before the rotation goes on: learn the
# new server CA before serving certificates change; get a client certificate from the
# new client CA before the old one is no longer trusted.
GRACE_STAGES = {("server", TRUST_BOTH), ("etcd-client", REISSUE)}


@dataclass(frozen=True)
class CATrust:
    """What one CA means on the nodes now: the bundle to trust, the issuer leaves need."""

    bundle: str
    issuer_key_id: str  # "" outside a rotation: any issuer is fine


def trust_of(ca_pem: str, rotation: RotationRecord | None) -> CATrust:
    """The trust of a CA at each stage of its rotation (``ca_pem``: ``ca/<name>``)."""
    if rotation is None or rotation.stage == REQUESTED:
        return CATrust(ca_pem, "")
    new_id = bundle_key_ids(rotation.new)[0]
    if rotation.stage == TRUST_BOTH:
        return CATrust(join_bundle(rotation.old, rotation.new), "")
    if rotation.stage == REISSUE:
        return CATrust(join_bundle(rotation.old, rotation.new), new_id)
    return CATrust(rotation.new, new_id)  # drop-old


async def trusted_bundle(storage: Storage, name: str) -> str | None:
    """What a client must trust for CA ``name`` now: ``ca/<name>``, or during its rotation
    the bundle of the current stage (``ckecli ca get``, ``etcd root-issue``)."""
    pem = await storage.get_ca(name)
    if pem is None:
        return None
    stored = (await storage.get_ca_rotations()).get(name)
    if stored is None:
        return pem
    try:
        return trust_of(pem, parse_rotation(name, stored.value)).bundle
    except RotationError:
        return pem  # reported by the leader's status; the stored CA is still right


@dataclass(frozen=True)
class Progress:
    name: str
    stage: str
    ready: bool  # the next step may be taken
    waiting_for: str  # what it waits for ("" when ready)

    def to_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "waiting-for": self.waiting_for}


def rotation_progress(
    name: str,
    stage: str,
    pki: PKIStatus,
    members: Iterable[NodeStatus],
    spec_current: Callable[[NodeStatus], bool],
) -> Progress:
    """Whether the rotation of ``name`` at ``stage`` reached every member.

    ``members``: the node status of every control plane that is an etcd member;
    ``spec_current``: whether that member runs the spec it must run now (trust
    bundles included, so: restarted since its bundle changed).
    """
    members = list(members)
    if stage == REQUESTED:
        return Progress(name, stage, True, "")
    if (name, stage) in GRACE_STAGES and pki.rotation_grace > 0:
        left = pki.rotation_since.get(name, 0.0) + pki.rotation_grace - pki.now
        if left > 0:
            what = "trust the new server CA" if name == "server" else "get new client certificates"
            return Progress(
                name,
                stage,
                False,
                f"clients outside cke to {what} (grace period, {left:.0f}s left)",
            )
    if stage in (TRUST_BOTH, DROP_OLD):
        stems = [stem for stem, ca in ETCD_TRUST.items() if ca == name]
        bundle = pki.trust.bundles.get(name, "")
        try:
            wanted = bundle_key_ids(bundle) if bundle else ()
        except CertificateError:
            return Progress(name, stage, False, "the wanted trust bundle is unreadable")
        behind = sorted(
            ns.address
            for ns in members
            if not spec_current(ns) or any(tuple(ns.trusted.get(s, ())) != wanted for s in stems)
        )
        if behind:
            return Progress(name, stage, False, f"members to restart with the new trust: {behind}")
        return Progress(name, stage, True, "")
    # reissue: every leaf of this CA comes from the new issuer.
    new_id = pki.trust.issuers.get(name, "")
    leaves = [leaf for leaf, ca in ETCD_LEAVES.items() if ca == name]
    behind = sorted(
        ns.address
        for ns in members
        for leaf in leaves
        if (cert := ns.certs.get(leaf)) is None or cert.issuer_key_id != new_id
    )
    if name == "etcd-client" and pki.own_client_issuer != new_id:
        behind.append("cke's own client certificate")
    if behind:
        return Progress(name, stage, False, f"leaves still from the old CA: {sorted(set(behind))}")
    return Progress(name, stage, True, "")


# -- the operation --------------------------------------------------------------------------


class AdvanceCARotation(Commander):
    """Take a rotation from ``stage`` to the next; refuses if it is no longer at ``stage``."""

    def __init__(self, name: str, stage: str) -> None:
        self.name = name
        self.stage = stage
        self._info = CommandInfo("ca-rotation-advance", name, f"{stage} -> {NEXT_STAGE[stage]}")

    @property
    def info(self) -> CommandInfo:
        return self._info

    async def run(self, ctx: OpContext) -> None:
        # Imported here: the Vault issuer calls are needed only by this command.
        from cke.pkiissuers import ensure_issuer, set_default_issuer

        storage: Storage = ctx.services["storage"]
        leader: LeaderKey = ctx.services["leader"]
        stored = (await storage.get_ca_rotations()).get(self.name)
        if stored is None or stored.value is None:
            raise RuntimeError(f"ca-rotation/{self.name} is gone")
        record = parse_rotation(self.name, stored.value)
        if record.stage != self.stage:
            raise RuntimeError(f"ca-rotation/{self.name} moved on to {record.stage}")
        mount = CA_BY_NAME[self.name].mount
        written: bool
        now = time.time()
        if self.stage == REQUESTED:
            old = await storage.get_ca(self.name)
            if old is None:
                raise RuntimeError(f"no ca/{self.name} in etcd; run 'ckecli vault init'")
            vault = await ctx.services["vault"].client(timeout=30)
            issuer = await ensure_issuer(
                vault, mount, record.issuer_name, CA_BY_NAME[self.name].common_name
            )
            updated = record.model_copy(
                update={
                    "stage": TRUST_BOTH,
                    "old": old,
                    "new": issuer.certificate,
                    "new_issuer_id": issuer.id,
                    "since": now,
                }
            )
            written = await storage.fenced_update_ca_rotation(
                leader, self.name, updated.to_json(), stored.mod_revision
            )
        elif self.stage == TRUST_BOTH:
            vault = await ctx.services["vault"].client(timeout=30)
            await set_default_issuer(vault, mount, record.new_issuer_id)
            updated = record.model_copy(update={"stage": REISSUE, "since": now})
            written = await storage.fenced_update_ca_rotation(
                leader, self.name, updated.to_json(), stored.mod_revision
            )
        elif self.stage == REISSUE:
            updated = record.model_copy(update={"stage": DROP_OLD, "since": now})
            written = await storage.fenced_update_ca_rotation(
                leader, self.name, updated.to_json(), stored.mod_revision
            )
        else:
            written = await storage.fenced_finish_ca_rotation(
                leader, self.name, record.new, stored.mod_revision
            )
        if not written:
            raise RuntimeError(f"ca-rotation/{self.name} changed meanwhile; decided again")


class CARotationOp(StepOperator):
    def __init__(self, name: str, stage: str) -> None:
        self.ca = name
        self.stage = stage
        super().__init__("ca-rotation", [name], [AdvanceCARotation(name, stage)])
