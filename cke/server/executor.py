"""Runs one operation, command by command, recording each step in etcd."""

from __future__ import annotations

from cke.common.logs import get_logger, op_context
from cke.op.base import OpContext, Operator
from cke.records import Record
from cke.storage import LeaderKey, NotLeader, Storage

log = get_logger("cke.executor")


async def run_operation(
    storage: Storage, leader: LeaderKey, operator: Operator, ctx: OpContext
) -> Record:
    """Run ``operator`` to its end. NotLeader propagates: the caller steps down."""
    record = await storage.register_record(leader, Record(operator.name, operator.targets))
    with op_context(record.id):
        log.info("operation started", operation=operator.name, targets=operator.targets)
        while True:
            command = operator.next_command()
            if command is None:
                break
            info = command.info
            step = record.start_command(info.name, info.target, info.detail)
            await storage.update_record(leader, record)
            log.info("command started", command=info.name, target=info.target)
            try:
                await command.run(ctx)
            except NotLeader:
                raise
            except Exception as exc:
                step.result = "error"
                step.error = str(exc)
                record.finish(error=f"{info.name}: {exc}")
                await storage.update_record(leader, record)
                log.error(
                    "operation failed", operation=operator.name, command=info.name, error=str(exc)
                )
                return record
            step.result = "ok"
        record.finish()
        await storage.update_record(leader, record)
        log.info("operation completed", operation=operator.name)
        return record
