"""rivers as the single-file zipapp cke ships to nodes, run with nothing but Python.

Every run here uses the system interpreter in isolated mode without site-packages,
``/usr/bin/python3 -I -S``: ``-I`` ignores ``PYTHON*`` variables and the user's site
directory, ``-S`` skips site-packages, so an import of anything outside the standard
library (prometheus_client, aiohttp, uvloop...) fails as it would on a bare node. Real
processes and sockets on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from rivers.zipapp import ZIPAPP_MEMBERS, build_zipapp
from tests.e2e.test_rivers_proxy import (
    LOOPBACK,
    Rivers,
    Upstream,
    alive,
    echo,
    http_get,
    tree,
    wait_for,
    workers_up,
)

pytestmark = pytest.mark.e2e

ISOLATED = ("-I", "-S")
RUNTIME_MODULES = [
    member.removesuffix("/__init__.py").removesuffix(".py").replace("/", ".")
    for member in ZIPAPP_MEMBERS
    if member != "__main__.py"
]
METRIC_NAMES = (
    "rivers_connections_accepted_total",
    "rivers_connections_active",
    "rivers_dial_errors_total",
    "rivers_upstream_healthy",
    "rivers_bytes_total",
    "rivers_no_upstream_total",
    "rivers_connections_dialing",
    "rivers_workers",
    "rivers_connections_shed_total",
    "rivers_connections_limit",
    "rivers_local_errors_total",
)


@pytest.fixture(scope="module")
def python() -> str:
    """The system Python if it is 3.11+. Otherwise this test's interpreter: with
    ``-I -S`` it leaves out the venv's site-packages too (they are added by ``site``)."""
    system = "/usr/bin/python3"
    if os.access(system, os.X_OK):
        check = "import sys; print(sys.version_info >= (3, 11))"
        done = subprocess.run(
            [system, *ISOLATED, "-c", check], capture_output=True, timeout=30, check=False
        )
        if done.stdout.strip() == b"True":
            return system
    return sys.executable


@pytest.fixture
def pyz(tmp_path: Path) -> Path:
    path = tmp_path / "rivers.pyz"
    path.write_bytes(build_zipapp())
    path.chmod(0o755)
    return path


def run(python: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, *ISOLATED, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_isolated_python_has_no_third_party_packages(python: str) -> None:
    # The isolation the other tests rely on: the packages the venv has are not importable.
    for name in ("prometheus_client", "aiohttp", "uvloop", "cke.server"):
        assert run(python, "-c", f"import {name}").returncode == 1, name


def test_zipapp_help_runs_isolated(python: str, pyz: Path) -> None:
    assert pyz.stat().st_mode & 0o777 == 0o755
    done = run(python, str(pyz), "--help")
    assert done.returncode == 0, done.stderr
    assert "--upstreams" in done.stdout and "--metrics" in done.stdout
    bad = run(python, str(pyz), "--listen", "127.0.0.1:1")  # flag errors work as installed
    assert bad.returncode == 2
    assert bad.stderr.startswith("rivers: ")


def test_zipapp_is_deterministic() -> None:
    first, second = build_zipapp(), build_zipapp()
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    assert first.startswith(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == sorted(ZIPAPP_MEMBERS) == list(ZIPAPP_MEMBERS)
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == 0o100644
            assert info.compress_type == zipfile.ZIP_DEFLATED
        for member, name in zip(ZIPAPP_MEMBERS[1:], RUNTIME_MODULES, strict=True):
            source = importlib.import_module(name).__file__
            assert source is not None and source.endswith(member)
            assert archive.read(member) == Path(source).read_bytes(), member


# Run with -I -S -c: imports one module with nothing on sys.path but the standard
# library and ROOT (-I ignores PYTHONPATH, so ROOT is put on sys.path here), then
# reports every module loaded from elsewhere.
IMPORT_CHECK = """
import importlib, json, sys, sysconfig
root, name = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
importlib.import_module(name)
stdlib = tuple(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib"))
files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
files = [f for f in files if f]
print(json.dumps({
    "from_root": sorted(f[len(root) + 1 :] for f in files if f.startswith(root + "/")),
    "elsewhere": sorted(f for f in files if not f.startswith((root + "/", *stdlib))),
}))
"""


@pytest.mark.parametrize("name", RUNTIME_MODULES)
def test_runtime_module_imports_with_stdlib_only(python: str, tmp_path: Path, name: str) -> None:
    root = tmp_path / "extracted"
    with zipfile.ZipFile(io.BytesIO(build_zipapp())) as archive:
        archive.extractall(root)
    done = run(python, "-c", IMPORT_CHECK, str(root), name)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert loaded["elsewhere"] == []
    assert name.replace(".", "/") in " ".join(loaded["from_root"])
    assert set(loaded["from_root"]) <= set(ZIPAPP_MEMBERS)


class ZipappRivers(Rivers):
    """``Rivers`` (flags, metrics, log, stop) run as ``python -I -S rivers.pyz``."""

    def __init__(
        self, python: str, pyz: Path, upstreams: list[str], *extra: str, tmp: Path
    ) -> None:
        super().__init__(upstreams, *extra, tmp=tmp)
        self.command = [python, *ISOLATED, str(pyz)]

    async def start(self) -> ZipappRivers:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, *self.args, stderr=asyncio.subprocess.PIPE
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                err = await self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(f"rivers exited {self.proc.returncode}: {err!r}")
            try:
                status, _ = await http_get(self.metrics_port, "/health")
                if status in (200, 503):
                    return self
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("rivers did not come up")


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


async def test_zipapp_proxies_loopback_traffic(python: str, pyz: Path, tmp_path: Path) -> None:
    upstream = await Upstream(echo).start()
    rivers = ZipappRivers(python, pyz, [upstream.address], "--workers", "2", tmp=tmp_path)
    try:
        await rivers.start()
        # The second worker is started from the archive too, just as isolated.
        await workers_up(rivers, 2)
        pids = tree(rivers.pid)
        assert len(pids) == 2
        for pid in pids:
            assert cmdline(pid)[:4] == [python, *ISOLATED, str(pyz)]

        rng = random.Random(7)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, rivers.port), 5)
        try:
            for _ in range(100):
                payload = rng.randbytes(1024)
                writer.write(payload)
                assert await asyncio.wait_for(reader.readexactly(1024), 5) == payload
        finally:
            writer.close()

        status, body = await http_get(rivers.metrics_port, "/metrics")
        assert status == 200
        text = body.decode()
        for name in METRIC_NAMES:
            assert f"# TYPE {name} " in text, name
        metrics = await rivers.metrics()
        assert metrics['rivers_bytes_total{direction="upstream"}'] == 100 * 1024
        assert metrics['rivers_bytes_total{direction="downstream"}'] == 100 * 1024
        assert metrics[f'rivers_upstream_healthy{{upstream="{upstream.address}"}}'] == 1
        assert metrics["rivers_workers"] == 2
        status, body = await http_get(rivers.metrics_port, "/health")
        assert status == 200 and json.loads(body)["healthy"] is True

        os.kill(rivers.pid, signal.SIGTERM)
        assert rivers.proc is not None
        assert await asyncio.wait_for(rivers.proc.wait(), 20) == 0
        await wait_for(lambda: _gone(pids), 5)
        assert not any(alive(pid) for pid in pids)
        log = rivers.log()
        assert "worker died" not in log and "Traceback" not in log
    finally:
        await rivers.stop()
        upstream.kill()


async def _gone(pids: list[int]) -> bool:
    return not any(alive(pid) for pid in pids)


def test_zipapp_module_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rivers.zipapp import main

    path = tmp_path / "out.pyz"
    assert main([str(path)]) == 0
    data = path.read_bytes()
    assert data == build_zipapp()
    assert path.stat().st_mode & 0o777 == 0o755
    assert capsys.readouterr().out.split() == [hashlib.sha256(data).hexdigest(), str(path)]
    assert main([]) == 2
