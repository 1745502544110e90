"""The reboot queue's operations (CKE's ``op/reboot.go``) and the boot check the leader
runs while collecting the status.

``reboot`` runs for ONE node (the decision picks them one per round, as CKE's
``ChooseRebootCandidates``): move etcd's leadership away when the node hosts the leader,
mark the entry ``rebooting``, then run ``reboot.reboot_command`` on the node over SSH
with the node's address as the last argument (CKE runs it on its own host, for an
out-of-band power cycle; here the command runs on the node itself). A command that
still fails after ``reboot.command_retries`` puts the entry back to ``queued`` with
CKE's backoff. CKE drains the node (cordon, evict Pods, wait for volumes) before this
step; there is no Kubernetes here, so nothing is drained.

``boot_check_command`` runs on the node with the node's address and the time of the
reboot (Unix seconds) as arguments, as CKE passes them; it prints ``true`` once the
node booted since. ``reboot-dequeue`` then removes the entry; ``reboot-cancel``
removes cancelled ones.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import shlex
from collections.abc import Sequence

from cke.cluster import Cluster, Node, Reboot
from cke.common.logs import error_line, get_logger
from cke.nodes.pool import NodePool
from cke.op.base import Commander, OpContext
from cke.op.etcd import MoveLeader, StepOperator, _Command, tools
from cke.rebootqueue import STATUS_CANCELLED, STATUS_REBOOTING, RebootEntry
from cke.server.clusterstatus import EtcdMember
from cke.storage import LeaderKey, NotLeader, Storage

log = get_logger("cke.op.reboot")

# CKE runs the commands with no timeout unless command_timeout_seconds is set; an SSH
# command here always has one.
DEFAULT_COMMAND_TIMEOUT = 120.0
BOOT_CHECK_TIMEOUT = 30.0


def _storage(ctx: OpContext) -> tuple[Storage, LeaderKey]:
    storage, leader = ctx.services["storage"], ctx.services["leader"]
    assert isinstance(storage, Storage) and isinstance(leader, LeaderKey)
    return storage, leader


def command_timeout(reboot: Reboot) -> float:
    seconds = reboot.command_timeout_seconds
    return float(seconds) if seconds else DEFAULT_COMMAND_TIMEOUT


class MarkRebooting(_Command):
    """Set the entry ``rebooting`` (now), unless it changed since the decision (a cancel)."""

    def __init__(self, entry: RebootEntry, revision: int) -> None:
        super().__init__("reboot-mark-rebooting", entry.node, f"entry {entry.index}")
        self.entry = entry
        self.revision = revision

    async def run(self, ctx: OpContext) -> None:
        storage, leader = _storage(ctx)
        marked = self.entry.rebooting(dt.datetime.now(dt.UTC))
        if not await storage.fenced_update_reboot_entry(leader, marked, self.revision):
            raise RuntimeError(f"reboot queue entry {self.entry.index} changed meanwhile")


class RunRebootCommand(_Command):
    """``reboot_command`` on the node; on failure (after the retries) back off the entry."""

    def __init__(self, node: Node, entry: RebootEntry, reboot: Reboot) -> None:
        argv = [*reboot.reboot_command, node.address]
        super().__init__("reboot-command", node.address, shlex.join(argv))
        self.node = node
        self.entry = entry
        self.argv = argv
        self.reboot = reboot

    async def run(self, ctx: OpContext) -> None:
        pool = tools(ctx).pool
        attempts = (self.reboot.command_retries or 0) + 1
        error = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.reboot.command_interval or 0)
            try:
                result = await pool.run(
                    self.node,
                    shlex.join(self.argv),
                    timeout=command_timeout(self.reboot),
                    update=True,
                )
            except NotLeader:
                raise
            except Exception as exc:  # unreachable, timed out: the command may not have run
                error = f"{type(exc).__name__}: {error_line(exc)}"
            else:
                if result.ok:
                    log.info("reboot command sent", node=self.node.address, index=self.entry.index)
                    return
                lines = result.stderr.decode(errors="replace").strip().splitlines()
                error = lines[-1] if lines else f"exit {result.exit_status}"
            log.warning(
                "reboot command failed", node=self.node.address, attempt=attempt + 1, error=error
            )
        await self.back_off(ctx)
        raise RuntimeError(f"{self.node.address}: reboot command failed: {error}")

    async def back_off(self, ctx: OpContext) -> None:
        storage, leader = _storage(ctx)
        current, revision = await storage.get_reboot_entry(self.entry.index)
        if current is None or current.status == STATUS_CANCELLED:
            return
        backed = current.backed_off(dt.datetime.now(dt.UTC), random.random())
        if await storage.fenced_update_reboot_entry(leader, backed, revision):
            log.warning(
                "reboot backed off",
                node=self.node.address,
                count=backed.drain_backoff_count,
                until=backed.to_dict().get("drain_backoff_expire"),
            )


class DeleteEntries(_Command):
    def __init__(self, name: str, entries: Sequence[RebootEntry]) -> None:
        super().__init__(name, ",".join(e.node for e in entries))
        self.entries = list(entries)

    async def run(self, ctx: OpContext) -> None:
        storage, leader = _storage(ctx)
        for e in self.entries:
            await storage.fenced_delete_reboot_entry(leader, e.index)


class RebootOp(StepOperator):
    """Reboot one queued node (its etcd leadership handed over first)."""

    def __init__(
        self,
        node: Node,
        entry: RebootEntry,
        revision: int,
        cluster: Cluster,
        leader: EtcdMember | None = None,
        move_leader_to: EtcdMember | None = None,
    ) -> None:
        self.node = node
        self.entry = entry
        self.move_leader_to = move_leader_to
        steps: list[Commander] = []
        if leader is not None and move_leader_to is not None:
            steps.append(MoveLeader(leader, move_leader_to))
        steps += [MarkRebooting(entry, revision), RunRebootCommand(node, entry, cluster.reboot)]
        super().__init__("reboot", [node.address], steps)


class RebootDequeueOp(StepOperator):
    """Remove the entries of nodes that booted (``reboot-dequeue``), or cancelled ones
    (``reboot-cancel``)."""

    def __init__(self, entries: Sequence[RebootEntry], cancel: bool = False) -> None:
        self.entries = list(entries)
        name = "reboot-cancel" if cancel else "reboot-dequeue"
        super().__init__(name, [e.node for e in entries], [DeleteEntries(name, entries)])


async def booted_nodes(
    pool: NodePool, cluster: Cluster, entries: Sequence[RebootEntry]
) -> frozenset[str]:
    """The nodes of ``rebooting`` entries whose boot check prints ``true`` (run on the
    node with its address and the reboot's Unix time); a node that does not answer has
    not booted yet."""
    command = cluster.reboot.boot_check_command
    nodes = {n.address: n for n in cluster.nodes}
    timeout = min(command_timeout(cluster.reboot), BOOT_CHECK_TIMEOUT)
    checks: list[tuple[Node, list[str], float]] = []
    for e in entries:
        if e.status == STATUS_REBOOTING and e.node in nodes and command:
            since = e.last_transition_time
            stamp = str(int(since.timestamp())) if since is not None else "0"
            checks.append((nodes[e.node], [*command, e.node, stamp], timeout))
    return await answering_true(pool, checks, "boot check")


async def answering_true(
    pool: NodePool, checks: Sequence[tuple[Node, list[str], float]], what: str
) -> frozenset[str]:
    """The addresses of the nodes whose command (argv, timeout) prints ``true``, run all
    at once; a node that does not answer, or a command that fails, does not count."""

    async def check(node: Node, argv: list[str], timeout: float) -> bool:
        try:
            result = await pool.run(node, shlex.join(argv), timeout=timeout)
        except NotLeader:
            raise
        except Exception as exc:
            log.debug(f"{what}: no answer", node=node.address, error=error_line(exc))
            return False
        return result.ok and result.stdout.strip() == b"true"

    answers = await asyncio.gather(*(check(n, a, t) for n, a, t in checks))
    return frozenset(n.address for (n, _, _), ok in zip(checks, answers, strict=True) if ok)
