"""The cke server's one loop.

    campaign -> (as leader) cancel unfinished records -> repeat:
        read cluster and constraints -> collect status -> decide -> record status
        -> run the next operation, or sleep until the interval or a config change

Leadership is checked by every write (fencing) and by the election's lease
watch; losing it stops the loop at once and the replica campaigns again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

from etcd3aio import Etcd3Client, EtcdError, prefix_range_end

from cke.backup import BackupSchedule, run_scheduled
from cke.certinfo import CertInfo
from cke.cluster import (
    Cluster,
    ClusterError,
    Constraints,
    cluster_from_json,
    constraints_from_json,
    validate_cluster,
)
from cke.common.election import LeaseFence
from cke.common.logs import error_line, get_logger
from cke.nodes.runtime import runtime_for
from cke.op.base import OpContext
from cke.op.etcd import EtcdRenewCertsOp
from cke.op.reboot import booted_nodes
from cke.op.repair import healthy_machines
from cke.op.rivers import rivers_app
from cke.pki import TIDY_SAFETY_BUFFER, CertIssuer
from cke.rebootqueue import QueueStatus
from cke.repairqueue import RepairQueueStatus
from cke.restore import RestoreError, SnapshotChecker, parse_request
from cke.sabakan.autorepair import AutoRepairer
from cke.sabakan.integration import (
    RESULT_ERROR,
    RESULT_GENERATED,
    GenerationReport,
    Integrator,
)
from cke.server.carotation import RotationError, RotationRecord, parse_rotation, trust_of
from cke.server.certrenewal import RULE_CERTIFICATES_RENEWED, first_expiry
from cke.server.clusterstatus import ClusterStatus, PKIStatus, Trust
from cke.server.collect import collect
from cke.server.election import Election, LeadershipLost
from cke.server.executor import run_operation
from cke.server.infra import Infrastructure
from cke.server.metrics import ServerMetrics
from cke.server.phases import Phase
from cke.server.safety import RULE_HOST_KEY_VERIFIED, host_key_verified
from cke.server.statusjson import Collected, CollectedWriter
from cke.server.strategy import Blocked, Decision, decide
from cke.storage import (
    KEY_CLUSTER,
    KEY_CONSTRAINTS,
    KEY_ETCD_RESTORE,
    KEY_REBOOTS_PREFIX,
    KEY_REPAIRS_PREFIX,
    LeaderKey,
    NotLeader,
    Status,
    Storage,
    UnreadableValue,
    now_rfc3339,
    stored_text,
)
from cke.vault import VaultError, VaultSession

log = get_logger("cke.server")

T = TypeVar("T")

# Phases in which the world changes by itself (a member starting up, a learner
# catching up): decide again soon rather than after the whole interval.
RETRY_SOON_PHASES = frozenset(
    {
        Phase.ETCD_WAIT,
        Phase.ETCD_BOOT_ABORTED,
        Phase.ETCD_MAINTAIN_ABORTED,
        Phase.REBOOT,
        Phase.REPAIR,
    }
)
# How soon: a started member answers within a fraction of a second, so the first retry
# comes quickly; the wait doubles while the world stays unsettled, up to RETRY_SOON_MAX.
RETRY_SOON_FIRST = 0.2
RETRY_SOON_MAX = 2.0


def retry_soon_wait(previous: float | None, interval: float) -> float:
    """The wait before deciding again in a retry-soon phase, given the previous such wait
    in a row (None: the first)."""
    wait = RETRY_SOON_FIRST if previous is None else previous * 2
    return min(wait, RETRY_SOON_MAX, interval)


def report_host_key_mismatches(decision: Decision, status: ClusterStatus) -> Decision:
    """Every node with a changed host key is reported, whether or not a step needed it."""
    if any(b.rule == RULE_HOST_KEY_VERIFIED for b in decision.blocked):
        return decision
    blocked = host_key_verified(status, status.nodes)
    if blocked is None:
        return decision
    return Decision(decision.operators, decision.phase, [*decision.blocked, blocked])


RULE_VALID_CONFIGURATION = "valid-configuration"
RULE_DECISION_SUCCEEDS = "decision-succeeds"
RULE_VAULT_AVAILABLE = "vault-available"
# The CAs whose certificates the etcd members hold or trust.
NODE_CAS = ("server", "etcd-peer", "etcd-client")


def held_for_vault(decision: Decision, vault_state: str) -> Decision:
    """Vault is away: an operation that needs a certificate or a key from it does not run.
    Etcd maintenance that does not (defragmentation, NOSPACE recovery: cke's own client,
    which it already holds) goes on, so etcd accepts writes again without Vault.
    Due renewals are reported: the certificates in place keep working until they expire."""
    if all(not op.needs_vault for op in decision.operators):
        return decision
    blocked = [
        *decision.blocked,
        Blocked(
            RULE_VAULT_AVAILABLE,
            f"Vault is needed for SSH keys and certificates: {vault_state}",
        ),
    ]
    for op in decision.operators:
        if isinstance(op, EtcdRenewCertsOp):
            due = "; ".join(f"{a}: {', '.join(r)}" for a, r in sorted(op.reasons.items()))
            blocked.append(
                Blocked(
                    RULE_CERTIFICATES_RENEWED,
                    "certificates inside their renewal window cannot be renewed while Vault "
                    f"is unavailable; the current ones keep working until they expire: {due}",
                    tuple(sorted(op.reasons)),
                )
            )
    return Decision([], Phase.ETCD_WAIT, blocked, decision.rotations, decision.rivers)


def certificate_summary(status: ClusterStatus) -> dict[str, Any]:
    """Per node, the leaf that expires first (``ckecli status``)."""
    summary: dict[str, Any] = {}
    for address, ns in sorted(status.nodes.items()):
        first = first_expiry(ns)
        if first is None:
            continue
        name, cert = first
        summary[address] = {
            "certificate": name,
            "serial": cert.serial,
            "not-after": _rfc3339(cert.not_after),
        }
    return summary


def _rfc3339(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decide_safely(
    cluster: Cluster | None, constraints: Constraints, status: ClusterStatus
) -> Decision:
    """``decide`` plus the host-key report; an exception becomes a held-back decision.

    The validator keeps every value the decision uses in shape, so this is the last
    line of defence against a bug: the replica keeps leading (and keeps reporting),
    changes nothing, and says what failed.
    """
    try:
        return report_host_key_mismatches(decide(cluster, constraints, status), status)
    except Exception as exc:
        error = f"{type(exc).__name__}: {error_line(exc)}"
        log.error("the decision failed; nothing is changed", error=error)
        blocked = Blocked(
            RULE_DECISION_SUCCEEDS,
            f"the decision failed ({error}); cke changes nothing until it succeeds. "
            "Check the cluster configuration and report this as a bug.",
        )
        return Decision([], Phase.DECISION_FAILED, [blocked])


def full_decision(
    cluster: Cluster | None,
    constraints: Constraints,
    status: ClusterStatus,
    extra_blocked: Sequence[Blocked] = (),
    vault_away: str = "",
) -> Decision:
    """The leader's whole decision on a collected status (pure; ``ckecli plan`` runs it
    again): ``decide_safely``, the CA rotation records it could not read
    (``extra_blocked``), and Vault's state when it is unavailable (``vault_away``)."""
    decision = decide_safely(cluster, constraints, status)
    if extra_blocked:
        decision = dataclasses.replace(decision, blocked=[*decision.blocked, *extra_blocked])
    if vault_away:
        decision = held_for_vault(decision, vault_away)
    return decision


Trusted = tuple[str, ...]  # key ids of the CAs in one trust bundle


class Stopped(Exception):
    """The awaited work was cut short by an event (stop or lost leadership)."""


async def until(work: Awaitable[T], *events: asyncio.Event) -> T:
    """Await ``work`` unless one of ``events`` fires first (then raise Stopped)."""
    task = asyncio.ensure_future(work)
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait([task, *waiters], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise Stopped()


class Server:
    def __init__(
        self,
        client: Etcd3Client,
        storage: Storage,
        name: str,
        interval: float,
        session_ttl: int,
        metrics: ServerMetrics,
        vault: VaultSession | None = None,
        certs_gc_interval: float = 3600.0,
        infra: Infrastructure | None = None,
        sabakan: Integrator | None = None,
        backups: BackupSchedule | None = None,
    ) -> None:
        self.client = client
        self.storage = storage
        self.name = name
        self.interval = interval
        self.session_ttl = session_ttl
        self.metrics = metrics
        self.vault = vault
        self.certs_gc_interval = certs_gc_interval
        self.infra = infra
        self.sabakan = sabakan
        # Sabakan-triggered repair shares the integration's client (one query a round).
        self.auto_repair = AutoRepairer(storage, sabakan.client) if sabakan else None
        self.backups = backups  # --backup-interval and its flags (None: off)
        self._cluster: Cluster | None = None
        self._cluster_revision = 0
        self._last_certs: dict[str, tuple[Mapping[str, CertInfo], Mapping[str, Trusted]]] = {}
        self._snapshots = SnapshotChecker()
        self._collected = CollectedWriter()  # what ``ckecli plan`` replays
        self.stop_requested = asyncio.Event()
        self._wake = asyncio.Event()
        # The members whose connections the leader watches (healthy at the last status),
        # and the event that re-arms the watch after each status.
        self._watched: list[str] = []
        self._watched_changed = asyncio.Event()
        # Nothing leaves for a node or Vault unless the lease is known valid.
        self.fence = LeaseFence(margin=session_ttl / 3)
        if infra is not None:
            infra.pool.fence = self.fence
        if vault is not None:
            vault.fence = self.fence
        if vault is not None:
            vault.ready_listeners.append(self._wake.set)

    async def run(self) -> None:
        """Campaign and lead until ``stop_requested`` is set."""
        while not self.stop_requested.is_set():
            election = Election(self.client, self.storage, self.name, self.session_ttl)
            try:
                leader = await until(election.campaign(), self.stop_requested)
                self.fence.arm(election)
                self.metrics.set_leader(True)
                await until(self.lead(leader), self.stop_requested, election.lost)
            except Stopped:
                pass
            except (NotLeader, LeadershipLost) as exc:
                log.warning("stepping down", reason=str(exc))
            except EtcdError as exc:
                log.error("etcd error; campaigning again", error=error_line(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_requested.wait(), 1.0)
            except Exception as exc:
                # A bug must not take the replica down (restarting would meet it again):
                # say what it was, step down so another replica may lead, and try again.
                log.error(
                    "unexpected error; stepping down and campaigning again",
                    error=f"{type(exc).__name__}: {error_line(exc)}",
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_requested.wait(), 2.0)
            finally:
                self.fence.disarm()
                was_leader = election.leader_key is not None
                self.metrics.set_leader(False)
                await election.resign()
                if was_leader:
                    log.info("resigned leadership", name=self.name)

    # -- as leader -------------------------------------------------------------------------

    async def lead(self, leader: LeaderKey) -> None:
        if self.infra is not None:
            self.infra.leader = leader
        await self.cancel_unfinished_records(leader)
        watcher = asyncio.create_task(self._watch_config())
        # ckecli's requests: the reboot and repair queues, a restore after quorum loss.
        requests = [
            asyncio.create_task(self._watch_prefix(prefix))
            for prefix in (KEY_REBOOTS_PREFIX, KEY_REPAIRS_PREFIX, KEY_ETCD_RESTORE)
        ]
        tidier = asyncio.create_task(self._tidy_certificates()) if self.vault else None
        members = asyncio.create_task(self._watch_members())
        backups = asyncio.create_task(self._scheduled_backups()) if self.backups else None
        retry_wait: float | None = None  # the last retry-soon wait in a row
        try:
            while True:
                self._wake.clear()
                try:
                    decision = await self.step(leader)
                except EtcdError as exc:
                    log.error("etcd error in the control loop", error=error_line(exc))
                    await asyncio.sleep(1.0)
                    continue
                if decision.operators:
                    operator = decision.operators[0]
                    self.metrics.progressing.set(1)
                    try:
                        ctx = self.op_context(leader)
                        record = await run_operation(self.storage, leader, operator, ctx)
                    except EtcdError as exc:
                        log.error("etcd error while recording an operation", error=error_line(exc))
                        await asyncio.sleep(1.0)
                        continue
                    finally:
                        self.metrics.progressing.set(0)
                    outcome = "error" if record.error else "ok"
                    self.metrics.operations.labels(operator.name, outcome).inc()
                    retry_wait = None
                    if record.error:
                        # Let the world settle before deciding again (no hot loop): a
                        # failed step usually meets the same refusal for a few seconds
                        # (etcd refuses a member add right after a restart), and each
                        # attempt costs certificates and SSH commands.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(
                                self._wake.wait(), min(self.interval, RETRY_SOON_MAX)
                            )
                    continue
                if decision.phase in RETRY_SOON_PHASES:
                    retry_wait = retry_soon_wait(retry_wait, self.interval)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), retry_wait)
                    continue
                retry_wait = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
        finally:
            if self.infra is not None:
                self.infra.leader = None
            for task in (watcher, *requests, tidier, members, backups):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _tidy_certificates(self) -> None:
        """Tidy every PKI mount each ``--certs-gc-interval`` (leader only, as CKE does)."""
        assert self.vault is not None
        while True:
            await asyncio.sleep(self.certs_gc_interval)
            try:
                vault = await self.vault.client(timeout=10)
                buffer = self.infra.tidy_safety_buffer() if self.infra else TIDY_SAFETY_BUFFER
                mounts = await CertIssuer(vault).tidy(buffer)
            except VaultError as exc:
                log.warning("certificate tidy skipped; Vault unavailable", error=str(exc))
                continue
            log.info("tidied certificates", mounts=mounts, safety_buffer=buffer)

    async def _scheduled_backups(self) -> None:
        """A backup of the managed etcd every ``--backup-interval`` (leader only; never
        raises: a failure is logged and counted, see cke/backup.py)."""
        if self.backups is None or self.infra is None:
            return

        def control_planes() -> list[str]:
            return [n.address for n in self._cluster.control_planes] if self._cluster else []

        await run_scheduled(
            self.backups, self.infra.etcd_credentials, control_planes, self.metrics, self.fence
        )

    async def cancel_unfinished_records(self, leader: LeaderKey) -> None:
        """A record left ``new`` or ``running`` belongs to a leader that died mid-way."""
        for record in await self.storage.unfinished_records():
            record.cancel(f"cancelled by the new leader {self.name}")
            await self.storage.update_record(leader, record)
            log.warning(
                "cancelled an unfinished operation", record=record.id, operation=record.operation
            )

    async def load_config(self) -> tuple[Cluster | None, Constraints, list[Blocked]]:
        cluster_raw = await self.storage.get_cluster()
        self._cluster_revision = cluster_raw.mod_revision
        constraints_raw = await self.storage.get_constraints()
        try:
            constraints = constraints_from_json(stored_text(constraints_raw.value, "constraints"))
            cluster_text = stored_text(cluster_raw.value, "cluster")
            cluster = cluster_from_json(cluster_text) if cluster_text else None
            if cluster is not None:
                validate_cluster(cluster, constraints)
        except (ClusterError, UnreadableValue) as exc:
            blocked = Blocked(RULE_VALID_CONFIGURATION, f"stored configuration is invalid: {exc}")
            return None, Constraints(), [blocked]
        return cluster, constraints, []

    def op_context(self, leader: LeaderKey) -> OpContext:
        services: dict[str, object] = {
            "vault": self.vault,
            "storage": self.storage,
            "leader": leader,
        }
        if self.infra is not None and self._cluster is not None:
            services["etcd-tools"] = self.infra.tools(runtime_for(self._cluster.runtime))
        return OpContext(services)

    async def load_pki(self) -> tuple[PKIStatus, list[Blocked]]:
        """The trust the nodes must hold now (CA rotations included) and the renewal policy."""
        blocked = []
        rotations: dict[str, RotationRecord] = {}
        for name, stored in (await self.storage.get_ca_rotations()).items():
            try:
                rotations[name] = parse_rotation(name, stored.value)
            except RotationError as exc:
                blocked.append(Blocked("valid-ca-rotation", f"ignored: {exc}"))
        bundles: dict[str, str] = {}
        issuers: dict[str, str] = {}
        for name in NODE_CAS:
            pem = await self.storage.get_ca(name)
            if pem is None:
                continue
            trust = trust_of(pem, rotations.get(name))
            bundles[name] = trust.bundle
            if trust.issuer_key_id:
                issuers[name] = trust.issuer_key_id
        pki = PKIStatus(
            now=time.time(),
            renew_fraction=self.infra.renew_fraction if self.infra else 1 / 3,
            trust=Trust(bundles, issuers),
            rotations={name: r.stage for name, r in sorted(rotations.items())},
            rotation_since={name: r.since for name, r in rotations.items()},
            rotation_grace=self.infra.rotation_grace if self.infra else 0.0,
        )
        return pki, blocked

    async def collect_status(self, cluster: Cluster | None, pki: PKIStatus) -> ClusterStatus:
        if cluster is None or self.infra is None:
            return ClusterStatus(pki=pki)
        self.infra.trust = pki.trust
        admin = None
        if self.vault is not None and (self.vault.ready or self.infra.client_certificate):
            admin = self.infra.admin
        started, cpu = time.monotonic(), time.process_time()
        status = await collect(cluster, self.infra.pool, runtime_for(cluster.runtime), admin)
        took = time.monotonic() - started
        self.metrics.status_collection.observe(took)
        log.debug(
            "status collected",
            nodes=len(status.nodes),
            reachable=sum(1 for ns in status.nodes.values() if ns.ssh_ok),
            seconds=round(took, 4),
            cpu=round(time.process_time() - cpu, 4),  # the whole process's, meanwhile
        )
        status = self._with_last_seen_certificates(status)
        own = self.infra.client_certificate
        if own is not None:
            pki = dataclasses.replace(pki, own_client_issuer=own.issuer_key_id)
            self.metrics.set_certificate("", "etcd-client-cke", own.not_after)
        for address, ns in status.nodes.items():
            for name, cert in ns.certs.items():
                self.metrics.set_certificate(address, name, cert.not_after)
        return dataclasses.replace(
            status,
            pki=pki,
            max_concurrent_updates=self.infra.max_concurrent_updates,
            rivers_app=await asyncio.to_thread(rivers_app),
            defrag=self.infra.defrag,
        )

    async def with_restore_request(self, status: ClusterStatus) -> ClusterStatus:
        """The restore ``ckecli etcd restore`` requested, if any, and whether its snapshot
        can be read here and is the one ckecli checked."""
        got = await self.storage.get_restore_request()
        if got.value is None:
            return status
        try:
            request = parse_request(got.value)
        except RestoreError as exc:
            log.error("ignored an unreadable restore request", error=str(exc))
            return status
        return dataclasses.replace(
            status,
            restore=request,
            restore_revision=got.mod_revision,
            restore_problem=await self._snapshots.problem(request),
        )

    async def with_reboot_queue(
        self, cluster: Cluster | None, status: ClusterStatus
    ) -> ClusterStatus:
        """The reboot queue, and which of its rebooting nodes the boot check says booted."""
        entries = await self.storage.get_reboot_entries()
        enabled = await self.storage.reboot_queue_enabled()
        names = {n.address: n.name for n in cluster.nodes} if cluster is not None else {}
        self.metrics.set_reboot_queue(enabled, [e for e, _ in entries], names)
        if not entries:
            return status
        booted: frozenset[str] = frozenset()
        if cluster is not None and self.infra is not None:
            booted = await booted_nodes(self.infra.pool, cluster, [e for e, _ in entries])
        queue = QueueStatus(
            entries=tuple(e for e, _ in entries),
            revisions={e.index: revision for e, revision in entries},
            enabled=enabled,
            booted=booted,
            now=dt.datetime.now(dt.UTC),
        )
        return dataclasses.replace(status, reboots=queue)

    async def with_repair_queue(
        self, cluster: Cluster | None, status: ClusterStatus
    ) -> ClusterStatus:
        """The repair queue, and which of its unfinished entries' machines the health
        check says are healthy."""
        entries = await self.storage.get_repair_entries()
        enabled = await self.storage.repair_queue_enabled()
        self.metrics.auto_repair_enabled.set(1 if await self.storage.auto_repair_enabled() else 0)
        nodes = [n.address for n in cluster.nodes] if cluster is not None else []
        self.metrics.set_repair_queue(enabled, [e for e, _ in entries], nodes)
        if not entries:
            return status
        healthy: frozenset[str] = frozenset()
        if cluster is not None and self.infra is not None:
            healthy = await healthy_machines(self.infra.pool, cluster, [e for e, _ in entries])
        queue = RepairQueueStatus(
            entries=tuple(e for e, _ in entries),
            revisions={e.index: revision for e, revision in entries},
            enabled=enabled,
            healthy=healthy,
            now=dt.datetime.now(dt.UTC),
        )
        return dataclasses.replace(status, repairs=queue)

    def _with_last_seen_certificates(self, status: ClusterStatus) -> ClusterStatus:
        """Nodes that did not answer keep the certificates last seen on them, so that a
        certificate expiring on an unreachable node is still reported."""
        nodes = dict(status.nodes)
        for address, ns in status.nodes.items():
            if ns.ssh_ok:
                self._last_certs[address] = (ns.certs, ns.trusted)
            elif not ns.certs and address in self._last_certs:
                certs, trusted = self._last_certs[address]
                nodes[address] = dataclasses.replace(ns, certs=certs, trusted=trusted)
        for address in set(self._last_certs) - set(nodes):
            del self._last_certs[address]  # no longer in the cluster
        return dataclasses.replace(status, nodes=nodes)

    async def step(self, leader: LeaderKey) -> Decision:
        if self.sabakan is not None:
            self.sabakan.client.new_round()
        cluster, constraints, config_blocked = await self.load_config()
        self._cluster = cluster
        etcd_members: list[str] | None = None
        certificates: dict[str, Any] = {}
        vault_away = self.vault is not None and not self.vault.ready
        away = (self.vault.state or "unavailable") if vault_away and self.vault else ""
        collected: ClusterStatus | None = None  # what the decision was made from
        extra_blocked: list[Blocked] = []
        if config_blocked:
            decision = Decision([], Phase.CONFIG_INVALID, config_blocked)
        elif (
            cluster is not None
            and self.vault is not None
            and vault_away
            and not (self.infra is not None and self.infra.has_ssh_keys)
        ):
            # Never reached Vault: no SSH key, so nothing can even be looked at.
            blocked = Blocked(
                RULE_VAULT_AVAILABLE,
                f"Vault is needed for SSH keys and certificates: {self.vault.state}",
            )
            decision = Decision([], Phase.ETCD_WAIT, [blocked])
        else:
            pki, pki_blocked = await self.load_pki()
            status = await self.with_restore_request(await self.collect_status(cluster, pki))
            status = await self.with_reboot_queue(cluster, status)
            status = await self.with_repair_queue(cluster, status)
            collected, extra_blocked = status, pki_blocked
            decision = full_decision(cluster, constraints, status, pki_blocked, away)
            certificates = certificate_summary(status)
            if status.etcd.reachable:
                etcd_members = sorted(m.address for m in status.etcd.voters)
            self._watched = sorted(m.address for m in status.etcd.members if m.healthy)
            self._watched_changed.set()
        previous = await self.storage.get_status()
        sabakan_report: dict[str, Any] = {}
        auto_repair: dict[str, Any] = {}
        if (
            not decision.operators
            and not config_blocked
            and decision.phase is not (Phase.DECISION_FAILED)
        ):
            # Checked against the voters as ``ckecli cluster set`` checks: the ones seen
            # now, else the ones last seen (none on a new installation).
            voters = etcd_members
            if voters is None:
                voters = previous.etcd_members if previous else []
            sabakan_report = await self.integrate(leader, voters)
            if cluster is not None and collected is not None:
                auto_repair = await self.repair_from_sabakan(
                    leader, cluster, constraints, collected
                )
        last_operation = previous.last_operation if previous else ""
        if etcd_members is None:  # unknown now: keep what was last seen
            etcd_members = previous.etcd_members if previous else []
        if decision.operators:
            last_operation = decision.operators[0].name
        timestamp = now_rfc3339()
        collected_json = self._collected.text(
            Collected(
                timestamp=timestamp,
                leader=self.name,
                cluster_revision=self._cluster_revision,
                status=collected,
                extra_blocked=tuple(extra_blocked),
                vault_away=away,
                phase=decision.phase.value if collected is None else "",
                blocked=tuple(decision.blocked) if collected is None else (),
            ),
            leader.create_revision,
            time.monotonic(),
            (
                decision.phase,
                [(op.name, op.targets) for op in decision.operators],
                decision.blocked,
            ),
        )
        await self.storage.put_status(
            leader,
            Status(
                phase=decision.phase.value,
                timestamp=timestamp,
                leader=self.name,
                blocked=[b.to_dict() for b in decision.blocked],
                last_operation=last_operation,
                vault=self.vault.state if self.vault else "",
                etcd_members=etcd_members,
                cluster_revision=self._cluster_revision,
                sabakan=sabakan_report,
                auto_repair=auto_repair,
                certificates=certificates,
                ca_rotations={p.name: p.to_dict() for p in decision.rotations},
                rivers=decision.rivers,
            ),
            collected_json,
        )
        self._collected.stored()
        self.metrics.set_phase(decision.phase.value)
        if decision.blocked:
            log.info(
                "steps held back",
                phase=decision.phase.value,
                rules=[b.rule for b in decision.blocked],
            )
        log.debug("decided", phase=decision.phase.value, operations=len(decision.operators))
        return decision

    async def _watch_members(self) -> None:
        """Decide at once when a healthy member's connection drops (a killed etcd), instead
        of at the next ``--interval``: repairs take about as long as etcd itself needs."""
        if self.infra is None:
            return
        while True:
            self._watched_changed.clear()
            drop = asyncio.create_task(self.infra.admin.wait_for_a_drop(self._watched))
            rearm = asyncio.create_task(self._watched_changed.wait())
            try:
                await asyncio.wait({drop, rearm}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (drop, rearm):
                    task.cancel()
                await asyncio.gather(drop, rearm, return_exceptions=True)
            if drop.cancelled():
                continue  # a new status: watch its healthy members
            exc = drop.exception()
            if exc is not None:
                log.debug("etcd member watch failed", error=error_line(exc))
                await asyncio.sleep(1.0)
                continue
            log.info("etcd member connection dropped; deciding now", member=drop.result())
            self._wake.set()
            await self._watched_changed.wait()  # the next status re-arms the watch

    async def integrate(self, leader: LeaderKey, voters: list[str]) -> dict[str, Any]:
        """One sabakan generation while nothing else is to be done (as CKE's integrator
        runs); the report for the status ({} when the integration is not enabled)."""
        if self.sabakan is None:
            return {}
        try:
            report = await self.sabakan.run(leader, voters)
        except (NotLeader, LeadershipLost, EtcdError):
            raise
        except Exception as exc:  # a bug: the cluster is kept, and the status says so
            error = f"{type(exc).__name__}: {error_line(exc)}"
            log.error("sabakan integration failed; the cluster is kept", error=error)
            report = GenerationReport(RESULT_ERROR, reason=f"integration failed: {error}")
        if report is None:
            self.metrics.sabakan_enabled = False
            return {}
        self.metrics.set_sabakan(report.successful, report.workers_by_role, report.unused_machines)
        if report.result == RESULT_GENERATED:
            self._wake.set()  # decide on the new cluster at once
        return report.to_dict()

    async def repair_from_sabakan(
        self, leader: LeaderKey, cluster: Cluster, constraints: Constraints, status: ClusterStatus
    ) -> dict[str, Any]:
        """Queue the repairs sabakan's failure reports call for (``ckecli auto-repair``),
        while nothing else is to be done, as upstream; the report for the status ({}:
        auto-repair is off)."""
        if self.auto_repair is None:
            return {}
        try:
            report = await self.auto_repair.run(
                leader, cluster, constraints, status.repairs.entries, status.reboots.entries
            )
        except (NotLeader, LeadershipLost, EtcdError):
            raise
        except Exception as exc:  # a bug: nothing is queued, and the status says so
            error = f"{type(exc).__name__}: {error_line(exc)}"
            log.error("auto-repair failed; nothing queued", error=error)
            return {"error": f"auto-repair failed: {error}"}
        return {} if report is None else report.to_dict()

    async def _watch_prefix(self, prefix: str) -> None:
        """Wake the loop when a key under ``prefix`` changes: ckecli asked for something
        (a reboot, a repair, a restore), so the leader acts now, not at the next interval."""
        assert self.client.watch is not None
        start = self.storage.key(prefix)
        async for response in self.client.watch.watch(start, range_end=prefix_range_end(start)):
            if response.events:
                self._wake.set()

    async def _watch_config(self) -> None:
        """Wake the loop when the cluster or the constraints change."""
        assert self.client.watch is not None
        start = self.storage.key(KEY_CLUSTER)
        end = self.storage.key(KEY_CONSTRAINTS)
        # ``cluster`` < ``constraints`` < ``constraints\0``: one range covers both keys.
        async for response in self.client.watch.watch(start, range_end=end + b"\0"):
            keys = {e.kv.key for e in response.events}
            if keys & {start, end}:
                self._wake.set()
