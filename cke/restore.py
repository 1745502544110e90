"""Restore after quorum loss: the request ``ckecli etcd restore`` stores, and its checks.

When a majority of the control planes lost their etcd data for good, no rule can bring
the cluster back: cke says so (rule ``etcd-quorum-lost``) and changes nothing by itself.
The operator picks a snapshot and runs ``ckecli etcd restore SNAPSHOT --yes``; ckecli
verifies the snapshot and stores this request in etcd; the leader, seeing the quorum
still lost, rebuilds every control plane's member from the snapshot with a new cluster
token (``etcd-restore``) and deletes the request when etcd is healthy again.

The snapshot is read by the leader from the same path on its admin host (a backup
directory shared by the admin hosts, or a copy made there): the request holds the
snapshot's SHA-256 so that the leader restores exactly the file that was checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cke.common.etcd import format_validation_error
from cke.common.fields import absolute_path_problem

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The largest snapshot the leader sends to the nodes (it holds one in memory meanwhile);
# etcd's own default quota is 2 GiB, and its recommended maximum 8 GiB.
MAX_SNAPSHOT_BYTES = 8 << 30


class RestoreError(Exception):
    """A request or snapshot that cannot be used; the message is one line."""


class RestoreRequest(BaseModel):
    """What ``ckecli etcd restore`` stores under ``etcd-restore``."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    snapshot: str  # absolute path on the admin hosts
    sha256: str
    revision: int = Field(ge=0)  # the snapshot's revision, as etcdutl reported it
    token: str  # the new --initial-cluster-token
    requested: str  # RFC 3339, when ckecli stored it

    @field_validator("snapshot")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        problem = absolute_path_problem(value)
        if problem is None and posixpath.normpath(value) != value:
            problem = "must be a normalised path"
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not SHA256_RE.match(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: str) -> str:
        if not TOKEN_RE.match(value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
        return value


def parse_request(raw: bytes | str) -> RestoreRequest:
    try:
        return RestoreRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RestoreError(f"etcd-restore: {format_validation_error(exc)}") from None


def _sha256_of(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def sha256_of(path: Path) -> tuple[str, int]:
    """(hex SHA-256, size) of a file, read off the event loop."""
    return await asyncio.to_thread(_sha256_of, path)


@dataclass(frozen=True)
class _Seen:
    size: int
    mtime_ns: int
    sha256: str


class SnapshotChecker:
    """Whether the requested snapshot is readable here and is the one ckecli checked.

    Hashing a large snapshot every round would cost seconds: a file whose size and
    modification time did not change keeps its last digest.
    """

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}

    async def problem(self, request: RestoreRequest) -> str:
        """ "" when the snapshot can be restored, else why not (one line)."""
        path = Path(request.snapshot)
        try:
            st = await asyncio.to_thread(os.stat, path)
        except OSError as exc:
            return f"snapshot {request.snapshot} cannot be read here: {exc.strerror}"
        if st.st_size > MAX_SNAPSHOT_BYTES:
            return f"snapshot {request.snapshot} is larger than {MAX_SNAPSHOT_BYTES >> 30} GiB"
        seen = self._seen.get(request.snapshot)
        if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
            try:
                digest, size = await sha256_of(path)
            except OSError as exc:
                return f"snapshot {request.snapshot} cannot be read here: {exc.strerror}"
            seen = _Seen(size, st.st_mtime_ns, digest)
            self._seen = {request.snapshot: seen}
        if seen.sha256 != request.sha256:
            return (
                f"snapshot {request.snapshot} here is not the one ckecli checked "
                f"(SHA-256 {seen.sha256[:12]}..., requested {request.sha256[:12]}...)"
            )
        return ""


async def read_snapshot(request: RestoreRequest) -> bytes:
    """The snapshot's bytes, checked against the request's SHA-256 (RestoreError if not)."""
    path = Path(request.snapshot)
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        raise RestoreError(f"snapshot {request.snapshot}: {exc.strerror}") from None
    digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    if digest != request.sha256:
        raise RestoreError(f"snapshot {request.snapshot} changed since ckecli checked it")
    return data
