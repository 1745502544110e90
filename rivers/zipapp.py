"""The single-file rivers that cke ships to nodes: ``build_zipapp()``.

A zipapp (PEP 441) of rivers' run-time modules and the two stdlib-only pieces of
``cke.common`` they use; a node runs it with nothing but Python 3.11+
(``python3 rivers.pyz --listen ... --upstreams ...``). The bytes are the same on every
build from the same sources (fixed timestamps and permissions, sorted entries, fixed
compression level), so cke can put the digest in the spec and a node can check it.
uvloop is used when the node's Python has it; the zipapp never needs it.

``python3 -m rivers.zipapp PATH`` writes it to PATH (mode 0755) and prints its sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import zipfile
from collections.abc import Sequence
from importlib import resources

# Every member of the archive, in archive order. ``__main__.py`` is generated; the
# others are read from the installed packages.
ZIPAPP_MEMBERS: tuple[str, ...] = (
    "__main__.py",
    "cke/__init__.py",
    "cke/common/__init__.py",
    "cke/common/durations.py",
    "cke/common/logs.py",
    "rivers/__init__.py",
    "rivers/main.py",
    "rivers/metrics.py",
    "rivers/proxy.py",
    "rivers/workers.py",
)

SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = b'''"""rivers as a zipapp: python3 rivers.pyz --listen ADDR:PORT --upstreams HOST:PORT,..."""

import sys

from rivers.main import main

sys.exit(main())
'''
# 1980-01-01 00:00:00, the earliest time a zip entry can hold.
_EPOCH = (1980, 1, 1, 0, 0, 0)
_MODE = stat.S_IFREG | 0o644
_LEVEL = 9


def _source(member: str) -> bytes:
    if member == "__main__.py":
        return MAIN
    package, _, name = member.rpartition("/")
    return resources.files(package.replace("/", ".")).joinpath(name).read_bytes()


def build_zipapp() -> bytes:
    """The zipapp's bytes: the shebang line, then a zip of ``ZIPAPP_MEMBERS``."""
    buf = io.BytesIO()
    buf.write(SHEBANG)
    with zipfile.ZipFile(buf, "w") as archive:
        for member in sorted(ZIPAPP_MEMBERS):
            info = zipfile.ZipInfo(member, date_time=_EPOCH)
            info.create_system = 3  # Unix, whatever builds it, so the mode below counts
            info.external_attr = _MODE << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, _source(member), compresslevel=_LEVEL)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python3 -m rivers.zipapp PATH", file=sys.stderr)
        return 2
    data = build_zipapp()
    path = args[0]
    with open(path, "wb") as out:
        out.write(data)
    os.chmod(path, 0o755)
    print(f"{hashlib.sha256(data).hexdigest()}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
