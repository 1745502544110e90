"""Operation records: what cke did, command by command (CKE's ``docs/record.md``)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

RECORD_STATUSES = ("new", "running", "completed", "cancelled")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class CommandRecord:
    name: str
    target: str = ""
    detail: str = ""
    result: str = ""  # "", "ok" or "error"
    error: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "target": self.target,
            "detail": self.detail,
            "result": self.result,
            "error": self.error,
        }


@dataclass
class Record:
    operation: str
    targets: list[str] = field(default_factory=list)
    id: int = 0
    status: str = "new"
    commands: list[CommandRecord] = field(default_factory=list)
    error: str = ""
    start_at: str = field(default_factory=_now)
    end_at: str = ""

    def start_command(self, name: str, target: str, detail: str) -> CommandRecord:
        cmd = CommandRecord(name, target, detail)
        self.commands.append(cmd)
        self.status = "running"
        return cmd

    def finish(self, error: str = "") -> None:
        self.status = "completed"
        self.error = error
        self.end_at = _now()

    def cancel(self, reason: str) -> None:
        self.status = "cancelled"
        self.error = reason
        self.end_at = _now()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "status": self.status,
            "operation": self.operation,
            "targets": self.targets,
            "commands": [c.to_dict() for c in self.commands],
            # CKE's record has the last command as ``command``; keep it for its users.
            "command": self.commands[-1].to_dict() if self.commands else None,
            "error": self.error,
            "start-at": self.start_at,
            "end-at": self.end_at,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: bytes | str) -> Record:
        doc = json.loads(text)
        return cls(
            operation=doc["operation"],
            targets=list(doc.get("targets", [])),
            id=int(doc["id"]),
            status=doc["status"],
            commands=[CommandRecord(**c) for c in doc.get("commands", [])],
            error=doc.get("error", ""),
            start_at=doc.get("start-at", ""),
            end_at=doc.get("end-at", ""),
        )
