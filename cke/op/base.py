"""What an operation is: a named sequence of commands, produced one at a time.

Like CKE's ``Operator``/``Commander``: the decision function returns operators,
the executor asks each for its next command until there is none, and records
every command. An operator decides its next command from what it has done so
far, so a new leader can always start an operation afresh from the real state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


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
    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def targets(self) -> list[str]: ...

    @abstractmethod
    def next_command(self) -> Commander | None:
        """The next step, or None when the operation is complete."""
