"""What an operation is: a named sequence of commands, produced one at a time.

Like CKE's ``Operator``/``Commander``: the decision function returns operators,
the executor asks each for its next command until there is none, and records
every command. An operator decides its next command from what it has done so
far, so a new leader can always start an operation afresh from the real state.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cke.storage import NotLeader


@dataclass(frozen=True)
class CommandInfo:
    name: str
    target: str = ""
    detail: str = ""


@dataclass
class OpContext:
    """What commands may use. Later issues add the SSH pool, Vault and etcd clients."""

    services: dict[str, Any] = field(default_factory=dict)


class Commander(ABC):
    @property
    @abstractmethod
    def info(self) -> CommandInfo: ...

    @abstractmethod
    async def run(self, ctx: OpContext) -> None:
        """Do the step; raise on failure (the message goes into the record)."""


class Operator(ABC):
    # Whether the operation needs Vault (a certificate, a key, a CA). Those that do not
    # (etcd maintenance through cke's own client) still run while Vault is away.
    needs_vault: ClassVar[bool] = True

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def targets(self) -> list[str]: ...

    @abstractmethod
    def next_command(self) -> Commander | None:
        """The next step, or None when the operation is complete."""


class Parallel(Commander):
    """One step on several nodes at once, recorded as one command over all of them.

    CKE runs a command on all its targets at once; done one node after another, an
    operation over 10 nodes took 10 SSH round trips end to end. The node pool bounds
    how many run at a time (``--max-concurrent-updates``). Every node's command runs to
    its end before the step fails, so none is left running behind the record.
    """

    def __init__(self, commands: Sequence[Commander]) -> None:
        if not commands:
            raise ValueError("Parallel needs at least one command")
        first = commands[0].info
        self.commands = list(commands)
        targets = ",".join(c.info.target for c in self.commands)
        self._info = CommandInfo(first.name, targets, first.detail)

    @property
    def info(self) -> CommandInfo:
        return self._info

    async def run(self, ctx: OpContext) -> None:
        results = await asyncio.gather(*(c.run(ctx) for c in self.commands), return_exceptions=True)
        failed: list[tuple[str, Exception]] = []
        for command, result in zip(self.commands, results, strict=True):
            if isinstance(result, NotLeader):
                raise result
            if isinstance(result, Exception):
                failed.append((command.info.target, result))
            elif isinstance(result, BaseException):
                raise result  # cancelled: the replica is stopping
        if len(failed) == 1:
            raise failed[0][1]
        if failed:
            raise RuntimeError("; ".join(f"{target}: {exc}" for target, exc in failed))
