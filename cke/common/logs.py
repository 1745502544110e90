"""Structured logging shared by every service: one line per event.

Formats are ``plain``, ``logfmt`` and ``json`` (the ``--logformat`` flag of CKE's
tools). Callers pass fields as keyword arguments::

    log = get_logger("cke.server")
    log.info("operation started", op="etcd-bootstrap", targets=["10.0.0.1"])

The operation id of the running operation, when one is set with ``op_context``,
is added to every line as ``op_id`` so that a line can be traced to its record.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

LOG_FORMATS = ("plain", "logfmt", "json")
LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")

current_op_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_op_id", default=None
)


@contextlib.contextmanager
def op_context(op_id: str | int) -> Iterator[None]:
    """Tag every log line emitted inside the block with ``op_id``."""
    token = current_op_id.set(str(op_id))
    try:
        yield
    finally:
        current_op_id.reset(token)


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    op_id = current_op_id.get()
    if op_id is not None:
        fields["op_id"] = op_id
    extra = getattr(record, "fields", None)
    if isinstance(extra, Mapping):
        fields.update(extra)
    if record.exc_info and record.exc_info[1] is not None:
        fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="microseconds")


def _logfmt_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    elif value is None:
        value = ""
    elif not isinstance(value, str):
        value = json.dumps(value) if isinstance(value, dict) else str(value)
    if value == "" or any(c in value for c in ' ="\\\n\t'):
        return str(json.dumps(value, ensure_ascii=False))
    return str(value)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"time={_timestamp(record)}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_logfmt_value(record.getMessage())}",
        ]
        parts += [f"{k}={_logfmt_value(v)}" for k, v in _record_fields(record).items()]
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_record_fields(record))
        return json.dumps(doc, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={_logfmt_value(v)}" for k, v in _record_fields(record).items())
        line = f"{_timestamp(record)} {record.levelname.lower()} {record.name}: "
        line += record.getMessage()
        return f"{line} {fields}" if fields else line


_FORMATTERS: dict[str, type[logging.Formatter]] = {
    "plain": PlainFormatter,
    "logfmt": LogfmtFormatter,
    "json": JSONFormatter,
}


def setup_logging(level: str = "info", fmt: str = "plain", logfile: str | None = None) -> None:
    """Configure the root logger once for a process.

    Raises ValueError naming the bad value when level or format is unknown.
    """
    if fmt not in _FORMATTERS:
        raise ValueError(f"--logformat: unknown format {fmt!r} (want plain, logfmt or json)")
    lvl = level.lower()
    if lvl == "warn":
        lvl = "warning"
    if lvl not in LOG_LEVELS:
        raise ValueError(f"--loglevel: unknown level {level!r}")
    stream: TextIO
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(logfile, encoding="utf-8")
    else:
        stream = sys.stderr
        handler = logging.StreamHandler(stream)
    handler.setFormatter(_FORMATTERS[fmt]())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, lvl.upper()))
    # Libraries' debug chatter is not our events; keep them at info or above.
    for noisy in ("grpc", "asyncio", "aiohttp.access", "urllib3", "hvac"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.INFO))
    logging.getLogger("asyncssh").setLevel(max(root.level, logging.WARNING))


class StructLogger:
    """A logger whose calls take the event's fields as keyword arguments."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def is_enabled_for(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def _log(self, level: int, msg: str, exc: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, msg, exc_info=exc, extra={"fields": fields}, stacklevel=3)

    def debug(self, msg: str, **fields: Any) -> None:
        self._log(logging.DEBUG, msg, False, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._log(logging.INFO, msg, False, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._log(logging.WARNING, msg, False, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, False, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, True, fields)


def get_logger(name: str) -> StructLogger:
    return StructLogger(name)


def error_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line for a log field or an operator's message: gRPC and
    Vault errors span many lines, and a log event must stay on one."""
    lines = str(exc).splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
