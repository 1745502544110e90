"""The repair queue's operations (CKE's ``op/repair_*.go``) and the health check the
leader runs while collecting the status.

Every command runs **on the machine, over SSH**, with the machine's address appended as
its last argument, as CKE appends it (CKE runs them on its own host, for out-of-band
tools such as a BMC; here the node itself runs them):

``repair-execute``
    mark the entry ``processing`` / ``watching`` at the step (now), then run the
    step's ``repair_command`` (``command_retries`` more times on failure, every
    ``command_interval`` seconds). A command that still fails makes the entry
    ``failed`` (not an error of cke, as CKE). CKE drains the node first when the step
    sets ``need_drain``; there is no Kubernetes here, so nothing is drained.
``repair-finish``
    on success run the operation's ``success_command`` (a failure makes the entry
    ``failed``), then store ``succeeded`` or ``failed``.
``repair-dequeue``
    remove an entry ``ckecli repair-queue delete`` marked deleted.

``health_check_command`` runs every round for every unfinished entry
(:func:`healthy_machines`); it prints ``true`` when the machine is healthy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shlex
from collections.abc import Sequence

from cke.cluster import Cluster, Node
from cke.common.logs import error_line, get_logger
from cke.nodes.pool import NodePool
from cke.op.base import OpContext
from cke.op.etcd import StepOperator, _Command, tools
from cke.op.reboot import _storage, answering_true
from cke.rebootqueue import EntryError
from cke.repairqueue import (
    DEFAULT_COMMAND_TIMEOUT_SECONDS,
    RepairEntry,
    current_step,
    find_operation,
)
from cke.storage import NotLeader

log = get_logger("cke.op.repair")


def _seconds(value: int | None) -> float:
    return float(value) if value else float(DEFAULT_COMMAND_TIMEOUT_SECONDS)


async def _run(pool: NodePool, node: Node, argv: list[str], timeout: float) -> str:
    """Run ``argv`` on ``node``; '' when it succeeded, else why not (one line)."""
    try:
        result = await pool.run(node, shlex.join(argv), timeout=timeout, update=True)
    except NotLeader:
        raise
    except Exception as exc:  # unreachable, timed out: the command may not have run
        return f"{type(exc).__name__}: {error_line(exc)}"
    if result.ok:
        return ""
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit {result.exit_status}"


class _EntryCommand(_Command):
    def __init__(self, name: str, entry: RepairEntry, revision: int, detail: str = "") -> None:
        super().__init__(name, entry.address, detail or f"entry {entry.index}")
        self.entry = entry
        self.revision = revision

    async def store(self, ctx: OpContext, entry: RepairEntry) -> None:
        """Write ``entry`` unless it changed since the decision (a delete wins)."""
        storage, leader = _storage(ctx)
        if not await storage.fenced_update_repair_entry(leader, entry, self.revision):
            raise RuntimeError(f"repair queue entry {entry.index} changed meanwhile")
        _, self.revision = await storage.get_repair_entry(entry.index)


class RunRepairStep(_EntryCommand):
    """Mark the entry watching at ``step``, run the step's repair command; on failure
    (after the retries) finish the entry ``failed``."""

    def __init__(
        self, node: Node, entry: RepairEntry, revision: int, cluster: Cluster, step: int
    ) -> None:
        repair_step = current_step(cluster, entry, step)
        if repair_step is None:
            raise EntryError(f"step {step}: out of range")
        self.argv = [*repair_step.repair_command, entry.address]
        super().__init__("repair-command", entry, revision, shlex.join(self.argv))
        self.node = node
        self.step = step
        self.repair_step = repair_step

    async def run(self, ctx: OpContext) -> None:
        marked = self.entry.watching(self.step, dt.datetime.now(dt.UTC))
        await self.store(ctx, marked)
        pool = tools(ctx).pool
        s = self.repair_step
        attempts = (s.command_retries or 0) + 1
        error = ""
        for attempt in range(attempts):
            if attempt and s.command_interval:
                await asyncio.sleep(s.command_interval)
            error = await _run(pool, self.node, self.argv, _seconds(s.command_timeout_seconds))
            if not error:
                log.info(
                    "repair command ran",
                    address=self.entry.address,
                    index=self.entry.index,
                    step=self.step,
                )
                return
            log.warning(
                "repair command failed",
                address=self.entry.address,
                index=self.entry.index,
                step=self.step,
                attempt=attempt + 1,
                error=error,
            )
        # As CKE: a failed repair command fails the entry, not the operation.
        log.warning("given up repairing the machine", address=self.entry.address, error=error)
        await self.store(ctx, marked.finish(False, dt.datetime.now(dt.UTC)))


class FinishRepair(_EntryCommand):
    """Run ``success_command`` when succeeded (its failure fails the entry); store the
    outcome."""

    def __init__(
        self, node: Node | None, entry: RepairEntry, revision: int, cluster: Cluster, ok: bool
    ) -> None:
        super().__init__("repair-finish", entry, revision, "succeeded" if ok else "failed")
        self.node = node
        self.cluster = cluster
        self.ok = ok

    async def run(self, ctx: OpContext) -> None:
        ok = self.ok
        if ok:
            try:
                op = find_operation(self.cluster, self.entry.machine_type, self.entry.operation)
            except EntryError:
                op = None
            if op is not None and op.success_command and self.node is not None:
                argv = [*op.success_command, self.entry.address]
                pool = tools(ctx).pool
                error = await _run(pool, self.node, argv, _seconds(op.success_command_timeout))
                if error:
                    ok = False
                    log.warning(
                        "success command failed",
                        address=self.entry.address,
                        index=self.entry.index,
                        error=error,
                    )
        await self.store(ctx, self.entry.finish(ok, dt.datetime.now(dt.UTC)))
        log.info(
            "repair finished",
            address=self.entry.address,
            index=self.entry.index,
            status="succeeded" if ok else "failed",
        )


class DeleteRepairEntry(_Command):
    def __init__(self, entry: RepairEntry) -> None:
        super().__init__("repair-dequeue", entry.address, f"entry {entry.index}")
        self.entry = entry

    async def run(self, ctx: OpContext) -> None:
        storage, leader = _storage(ctx)
        await storage.fenced_delete_repair_entry(leader, self.entry.index)


class RepairExecuteOp(StepOperator):
    """Run the repair command of one step of one entry (``repair-execute``)."""

    def __init__(
        self, node: Node, entry: RepairEntry, revision: int, cluster: Cluster, step: int
    ) -> None:
        self.entry = entry
        self.step = step
        super().__init__(
            "repair-execute",
            [entry.address],
            [RunRepairStep(node, entry, revision, cluster, step)],
        )


class RepairFinishOp(StepOperator):
    """Finish one entry, ``succeeded`` (after ``success_command``) or ``failed``."""

    def __init__(
        self, node: Node | None, entry: RepairEntry, revision: int, cluster: Cluster, ok: bool
    ) -> None:
        self.entry = entry
        self.ok = ok
        super().__init__(
            "repair-finish", [entry.address], [FinishRepair(node, entry, revision, cluster, ok)]
        )


class RepairDequeueOp(StepOperator):
    """Remove one entry marked deleted (``repair-dequeue``)."""

    def __init__(self, entry: RepairEntry) -> None:
        self.entry = entry
        super().__init__("repair-dequeue", [entry.address], [DeleteRepairEntry(entry)])


async def healthy_machines(
    pool: NodePool, cluster: Cluster, entries: Sequence[RepairEntry]
) -> frozenset[str]:
    """The addresses of unfinished, undeleted entries whose operation's
    ``health_check_command`` (run on the node with its address appended) prints
    ``true``; a machine that does not answer, or has no check, is not healthy."""
    nodes = {n.address: n for n in cluster.nodes}
    checks: list[tuple[Node, list[str], float]] = []
    for e in entries:
        if e.finished or e.deleted or e.address not in nodes:
            continue
        try:
            op = find_operation(cluster, e.machine_type, e.operation)
        except EntryError:
            continue
        if op.health_check_command:
            argv = [*op.health_check_command, e.address]
            checks.append((nodes[e.address], argv, _seconds(op.command_timeout_seconds)))
    return await answering_true(pool, checks, "health check")
