"""Issue 18: ckecli as upstream's docs/ckecli.md describes it, against a real etcd (TLS).

--version, the ``cstr`` alias, ``constraints show`` printing JSON, ``status`` exiting 4
without a status, ``history -f``, and config files in cybozu-go/etcdutil's shape
(PEM text under ``tls-ca``/``tls-cert``/``tls-key``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from etcd3aio import Etcd3Client

from cke import __version__
from cke.common.etcd import make_client
from cke.devenv import BedConfig, TestBed
from cke.devenv.replicas import ckecli, write_cke_config
from cke.records import Record
from cke.storage import KEY_RECORDS, KEY_RECORDS_PREFIX, KEY_STATUS, record_key_suffix


@pytest.fixture(scope="module")
async def etcd_bed() -> AsyncIterator[TestBed]:
    bed = TestBed(BedConfig(etcd_members=1, nodes=0, vault=False))
    await bed.start()
    try:
        yield bed
    finally:
        await bed.stop()


class Prefix:
    """A fresh prefix on the bed's etcd with a config.yml for ckecli."""

    def __init__(self, bed: TestBed) -> None:
        self.bed = bed
        self.prefix = f"/cke-up-{uuid.uuid4().hex[:8]}/"
        self.dir = bed.base_dir / self.prefix.strip("/")
        self.config = write_cke_config(bed.etcd.settings(self.prefix), self.dir / "config.yml")
        self.client: Etcd3Client = make_client(bed.etcd.settings(self.prefix))

    async def __aenter__(self) -> Prefix:
        await self.client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def put(self, name: str, value: str) -> None:
        assert self.client.kv is not None
        await self.client.kv.put(self.prefix + name, value, timeout=5)

    async def put_record(self, record: Record) -> None:
        await self.put(KEY_RECORDS, str(record.id + 1))
        await self.put(KEY_RECORDS_PREFIX + record_key_suffix(record.id), record.to_json())


async def test_version_needs_no_etcd(tmp_path: Path) -> None:
    result = await ckecli(tmp_path / "absent.yml", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ckecli {__version__}"


async def test_constraints_show_prints_json_and_cstr_is_an_alias(etcd_bed: TestBed) -> None:
    async with Prefix(etcd_bed) as p:
        ok = await ckecli(p.config, "cstr", "set", "maximum-repair-queue-entries", "7")
        assert ok.returncode == 0, ok.stderr
        shown = await ckecli(p.config, "constraints", "show")
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["maximum-repair-queue-entries"] == 7 and doc["control-plane-count"] == 1
        # Upstream's encoder indents by four spaces.
        assert shown.stdout == json.dumps(doc, indent=4) + "\n"
        alias = await ckecli(p.config, "cstr", "show")
        assert alias.returncode == 0 and alias.stdout == shown.stdout
        as_yaml = await ckecli(p.config, "cstr", "show", "-o", "yaml")
        assert yaml.safe_load(as_yaml.stdout) == doc


async def test_status_exits_4_without_a_status(etcd_bed: TestBed) -> None:
    async with Prefix(etcd_bed) as p:
        for args in (("status",), ("status", "-o", "json")):
            result = await ckecli(p.config, *args)
            assert result.returncode == 4, result
            assert result.stdout == "" and result.stderr.strip() == "ckecli: no status"
        status = {
            "leader": "cke0",
            "phase": "completed",
            "timestamp": "2009-11-10T23:00:00Z",
            "blocked": [],
        }
        await p.put(KEY_STATUS, json.dumps(status))
        shown = await ckecli(p.config, "status", "-o", "json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["phase"] == "completed"


async def _read_line(stream: asyncio.StreamReader, timeout: float = 15.0) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "ckecli history -f ended early"
    return line.decode()


async def test_history_follow_prints_new_records_until_interrupted(etcd_bed: TestBed) -> None:
    async with Prefix(etcd_bed) as p:
        for i in range(3):
            await p.put_record(Record(f"op-{i}", [f"10.0.0.{i}"], id=i, status="completed"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cke.cli.ckecli",
            "--config",
            str(p.config),
            "history",
            "-f",
            "-n",
            "2",
            "-o",
            "json",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
        try:
            assert proc.stdout is not None
            # The newest two, oldest first (as upstream's follow mode).
            first = [json.loads(await _read_line(proc.stdout)) for _ in range(2)]
            assert [r["operation"] for r in first] == ["op-1", "op-2"]
            # A new record, then an update of it: each is printed as it is written.
            new = Record("op-3", ["10.0.0.3"], id=3, status="running")
            await p.put_record(new)
            got = json.loads(await _read_line(proc.stdout))
            assert (got["id"], got["operation"], got["status"]) == ("3", "op-3", "running")
            new.finish()
            await p.put(KEY_RECORDS_PREFIX + record_key_suffix(3), new.to_json())
            got = json.loads(await _read_line(proc.stdout))
            assert (got["id"], got["status"]) == ("3", "completed")
            assert proc.returncode is None  # still following
            proc.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(proc.wait(), 15)
            assert code == 130
            assert proc.stderr is not None
            assert b"Traceback" not in await proc.stderr.read()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_history_follow_plain_output_and_no_records(etcd_bed: TestBed) -> None:
    async with Prefix(etcd_bed) as p:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cke.cli.ckecli",
            "--config",
            str(p.config),
            "history",
            "--follow",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=dict(os.environ),
        )
        try:
            assert proc.stdout is not None
            await asyncio.sleep(1.5)  # let it start watching before anything is written
            await p.put_record(Record("first-op", ["10.0.0.9"], id=0, status="new"))
            line = await _read_line(proc.stdout)
            assert "first-op" in line and "targets=10.0.0.9" in line
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 15) == 130
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _indent(text: str) -> str:
    return textwrap.indent(text.strip(), "  ")


async def test_etcdutil_config_with_embedded_pem_text(etcd_bed: TestBed) -> None:
    """Upstream's README shape: PEM text under tls-ca, tls-cert and tls-key."""
    etcd = etcd_bed.etcd
    assert etcd.root_client is not None
    prefix = f"/cke-up-{uuid.uuid4().hex[:8]}/"
    config = etcd_bed.base_dir / prefix.strip("/") / "config.yml"
    config.parent.mkdir(parents=True)
    endpoints = "".join(f"  - {e}\n" for e in etcd.endpoints)
    config.write_text(
        f"endpoints:\n{endpoints}"
        f'prefix: "{prefix}"\ntimeout: "2s"\n'
        f"tls-ca: |\n{_indent(etcd.ca.ca_path.read_text())}\n"
        f"tls-cert: |\n{_indent(etcd.root_client.cert.read_text())}\n"
        f"tls-key: |\n{_indent(etcd.root_client.key.read_text())}\n"
    )
    set_ = await ckecli(config, "constraints", "set", "maximum-repair-queue-entries", "2")
    assert set_.returncode == 0, set_.stderr
    shown = await ckecli(config, "constraints", "show")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["maximum-repair-queue-entries"] == 2


async def test_old_config_with_paths_under_tls_ca_is_a_clear_error(etcd_bed: TestBed) -> None:
    etcd = etcd_bed.etcd
    assert etcd.root_client is not None
    config = etcd_bed.base_dir / f"old-{uuid.uuid4().hex[:8]}.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "endpoints": etcd.endpoints,
                "tls-ca": str(etcd.ca.ca_path),
                "tls-cert-file": str(etcd.root_client.cert),
                "tls-key-file": str(etcd.root_client.key),
            }
        )
    )
    result = await ckecli(config, "constraints", "show")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tls-ca:" in lines[0] and "use tls-ca-file" in lines[0]
