"""sabakan's data model: machine specs, states and the lifecycle table (pure, no I/O)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from enum import StrEnum
from typing import Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from cke.common.etcd import format_validation_error

# Caps on what a client may store (README, "Limits"). They bound every record and
# every transaction: the largest machine record is about 27 KB, and the largest
# registration transaction (a body of MAX_BODY_BYTES written as machine records plus
# its audit record) stays well below etcd's default 1.5 MiB request limit.
MAX_BODY_BYTES = 256 * 1024  # any request body
MAX_BATCH = 100  # machines per registration
MAX_LABELS = 64  # labels per machine (after a PUT merges them)
MAX_LABEL_KEY = 128  # characters; room for a Kubernetes-style ``prefix/name``
MAX_LABEL_VALUE = 256  # characters
MAX_ADDRESSES = 16  # ipv4 and ipv6 addresses per machine, each (bmc has one of each)
MAX_NAME = 128  # serial and role
MAX_BMC_TYPE = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,126}[A-Za-z0-9])?$")
_BMC_TYPE_RE = re.compile(r"^[ -~]{0,64}$")  # printable ASCII
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,126}[A-Za-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^[-A-Za-z0-9_./:@+ ]{0,256}$")


def shown(value: str, limit: int = 40) -> str:
    """``value`` for an error message: repr'd, cut to ``limit`` characters."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"


class MachineState(StrEnum):
    UNINITIALIZED = "uninitialized"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNREACHABLE = "unreachable"
    UPDATING = "updating"
    RETIRING = "retiring"
    RETIRED = "retired"


S = MachineState
TRANSITIONS: dict[MachineState, frozenset[MachineState]] = {
    S.UNINITIALIZED: frozenset({S.HEALTHY, S.RETIRING}),
    S.HEALTHY: frozenset({S.UNHEALTHY, S.UNREACHABLE, S.UPDATING, S.RETIRING}),
    S.UNHEALTHY: frozenset({S.HEALTHY, S.UNREACHABLE, S.UPDATING, S.RETIRING}),
    S.UNREACHABLE: frozenset({S.HEALTHY, S.UNHEALTHY, S.UPDATING, S.RETIRING}),
    S.UPDATING: frozenset({S.UNINITIALIZED}),
    S.RETIRING: frozenset({S.RETIRED}),
    S.RETIRED: frozenset({S.UNINITIALIZED}),
}


class InputError(ValueError):
    """Bad input from a client; the message names the field (HTTP 400)."""


class TransitionError(ValueError):
    """A state change the lifecycle does not allow (HTTP 409)."""


def parse_state(text: str) -> MachineState:
    try:
        return MachineState(text.strip())
    except ValueError:
        names = ", ".join(s.value for s in MachineState)
        raise InputError(
            f"state: invalid state name {shown(text.strip())} (want one of {names})"
        ) from None


def parse_state_body(body: bytes) -> MachineState:
    """``PUT /api/v1/state``: the state name as plain (UTF-8) text."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("state: want a state name as UTF-8 text") from None
    return parse_state(text)


def check_transition(current: MachineState, target: MachineState) -> None:
    if target not in TRANSITIONS[current]:
        raise TransitionError(f"transition from {current.value} to {target.value} is not allowed")


def rfc3339(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"invalid {what}: want letters, digits, '-', '_' or '.' (max {MAX_NAME})")
    return value


def _check_ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"invalid IPv4 address {shown(value)}") from None


def _check_ipv6(value: str) -> str:
    try:
        return str(ipaddress.IPv6Address(value))
    except ValueError:
        raise ValueError(f"invalid IPv6 address {shown(value)}") from None


def _check_addresses(values: list[str], check: Any) -> list[str]:
    if len(values) > MAX_ADDRESSES:
        raise ValueError(f"at most {MAX_ADDRESSES} addresses per machine (got {len(values)})")
    out = [check(v) for v in values]
    if len(set(out)) != len(out):
        raise ValueError("duplicate address in list")
    return out


def check_label_count(count: int) -> None:
    if count > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels per machine (got {count})")


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    check_label_count(len(labels))
    for key, value in labels.items():
        if not _LABEL_KEY_RE.match(key):
            raise ValueError(
                f"invalid label name {shown(key)}: want letters, digits, '-', '_', '.' or '/', "
                f"starting and ending with a letter or digit, at most {MAX_LABEL_KEY} characters"
            )
        if not _LABEL_VALUE_RE.match(value):
            raise ValueError(
                f"invalid value for label {shown(key)}: want letters, digits, spaces or "
                f"'-_./:@+', at most {MAX_LABEL_VALUE} characters"
            )
    return labels


class BMC(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: str = ""
    ipv4: str = ""
    ipv6: str = ""

    @field_validator("ipv4")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        return _check_ipv4(value) if value else value

    @field_validator("ipv6")
    @classmethod
    def _ipv6(cls, value: str) -> str:
        return _check_ipv6(value) if value else value


class MachineInput(BaseModel):
    """One element of the ``POST /api/v1/machines`` array (fields a client may set)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    serial: str
    labels: dict[str, str] = Field(default_factory=dict)
    rack: int = Field(default=0, ge=0, le=65535)
    role: str = ""
    ipv4: list[str] = Field(default_factory=list)
    ipv6: list[str] = Field(default_factory=list)
    retire_date: AwareDatetime | None = Field(default=None, alias="retire-date")
    bmc: BMC = Field(default_factory=BMC)

    @field_validator("serial")
    @classmethod
    def _serial(cls, value: str) -> str:
        return _check_name(value, "serial")

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        return _check_name(value, "role") if value else value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)

    @field_validator("bmc")
    @classmethod
    def _bmc(cls, value: BMC) -> BMC:
        # Checked here, not in BMC: records stored before the cap must still load.
        if not _BMC_TYPE_RE.match(value.type):
            raise ValueError(f"type: want printable ASCII, at most {MAX_BMC_TYPE} characters")
        return value

    @field_validator("ipv4")
    @classmethod
    def _ipv4(cls, value: list[str]) -> list[str]:
        return _check_addresses(value, _check_ipv4)

    @field_validator("ipv6")
    @classmethod
    def _ipv6(cls, value: list[str]) -> list[str]:
        return _check_addresses(value, _check_ipv6)


class MachineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    serial: str
    labels: dict[str, str] = Field(default_factory=dict)
    rack: int = 0
    index_in_rack: int = Field(default=0, alias="index-in-rack")
    role: str = ""
    ipv4: list[str] = Field(default_factory=list)
    ipv6: list[str] = Field(default_factory=list)
    register_date: dt.datetime = Field(alias="register-date")
    retire_date: dt.datetime | None = Field(default=None, alias="retire-date")
    bmc: BMC = Field(default_factory=BMC)


class MachineStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: MachineState = MachineState.UNINITIALIZED
    timestamp: dt.datetime


class Machine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: MachineSpec
    status: MachineStatus

    def to_api(self, at: dt.datetime | None = None) -> dict[str, Any]:
        """The JSON document the API returns (with ``duration`` in seconds)."""
        when = at or now()
        spec = self.spec.model_dump(by_alias=True, mode="json")
        spec["register-date"] = rfc3339(self.spec.register_date)
        spec["retire-date"] = rfc3339(self.spec.retire_date) if self.spec.retire_date else ""
        return {
            "spec": spec,
            "status": {
                "state": self.status.state.value,
                "timestamp": rfc3339(self.status.timestamp),
                "duration": max(0.0, (when - self.status.timestamp).total_seconds()),
            },
        }

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def load(cls, raw: bytes) -> Machine:
        return cls.model_validate_json(raw)


_BATCH = TypeAdapter(list[MachineInput])
_DATE = TypeAdapter(AwareDatetime)
_LABELS = TypeAdapter(dict[str, str])


def parse_machines(body: bytes) -> list[MachineInput]:
    """Parse and check a registration batch; raises InputError naming the field.

    Duplicate serials and addresses inside the batch are refused here.
    """
    if not body.strip():
        raise InputError("(body): want a JSON array of machine specs")
    try:
        machines = _BATCH.validate_json(body, strict=True)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc)) from None
    if not machines:
        raise InputError("(body): empty list of machines")
    if len(machines) > MAX_BATCH:
        raise InputError(f"(body): at most {MAX_BATCH} machines per request")
    serials: dict[str, int] = {}
    addrs: dict[str, int] = {}
    for i, m in enumerate(machines):
        if m.serial in serials:
            raise InputError(
                f"[{i}].serial: duplicate serial {m.serial} (also in [{serials[m.serial]}])"
            )
        serials[m.serial] = i
        for ip in m.ipv4:
            if ip in addrs:
                raise InputError(f"[{i}].ipv4: duplicate address {ip} (also in [{addrs[ip]}])")
            addrs[ip] = i
    return machines


_RFC3339_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)
_RETIRE_DATE_WANT = (
    "want an RFC 3339 date-time such as 2018-11-21T01:23:45Z, raw or as a JSON string"
)


def parse_rfc3339(text: str) -> dt.datetime:
    """A full RFC 3339 date-time with an offset (what Go's ``time.RFC3339Nano`` reads);
    fractions beyond microseconds are cut."""
    match = _RFC3339_RE.fullmatch(text)
    if not match:
        raise ValueError(f"not an RFC 3339 date-time: {shown(text)}")
    date, clock, frac, zone = match.groups()
    zone = "+00:00" if zone in ("Z", "z") else zone
    return dt.datetime.fromisoformat(f"{date}T{clock}{(frac or '')[:7]}{zone}")


def parse_retire_date(body: bytes) -> dt.datetime:
    """``PUT /api/v1/retire-date``: an RFC 3339 date-time, as the raw body (upstream's
    form, surrounding white space ignored) or as a JSON string (this API's older form)."""
    try:
        text = body.decode("utf-8").strip()
        if text.startswith('"'):
            try:
                value = json.loads(text)
            except ValueError:
                value = None
            if not isinstance(value, str):
                raise ValueError("a body starting with '\"' must be one JSON string")
            text = value
        return parse_rfc3339(text)
    except ValueError as exc:  # also UnicodeDecodeError
        raise InputError(f"retire-date: {exc} ({_RETIRE_DATE_WANT})") from None


def parse_label_value(label: str, body: bytes) -> dict[str, str]:
    """``PUT /api/v1/labels/<serial>/<label>``: the value is the raw body (upstream's
    form; not trimmed, an empty body is an empty value). Returns ``{label: value}``."""
    try:
        value = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"labels: the value of {shown(label)} must be UTF-8 text") from None
    try:
        return check_labels({label: value})
    except ValueError as exc:
        raise InputError(f"labels: {exc}") from None


def parse_labels(body: bytes) -> dict[str, str]:
    try:
        labels = _LABELS.validate_json(body, strict=True)
    except ValidationError as exc:
        raise InputError(f"labels: {format_validation_error(exc)}") from None
    try:
        return check_labels(labels)
    except ValueError as exc:
        raise InputError(f"labels: {exc}") from None


def parse_label_pairs(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` (the ``labels`` query filter)."""
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise InputError(f"labels: want k=v[,k2=v2], got {shown(part)}")
        out[key] = value
    return out


def parse_log_time(value: str, field: str) -> dt.datetime:
    """``YYYYMMDD`` (as upstream's logs API) or an RFC 3339 date-time."""
    try:
        if re.fullmatch(r"\d{8}", value):
            return dt.datetime.strptime(value, "%Y%m%d").replace(tzinfo=dt.UTC)
        return _DATE.validate_python(value)
    except (ValueError, ValidationError):
        raise InputError(f"{field}: want YYYYMMDD or an RFC 3339 date-time") from None
