"""cke replicas and ckecli runs on the test bed, as an operator would start them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

from cke.common.etcd import EtcdSettings
from cke.devenv.procs import ManagedProcess, free_port


def write_cke_config(settings: EtcdSettings, path: Path) -> Path:
    """Write an etcdutil-style ``config.yml`` for cke and ckecli."""
    doc = settings.model_dump(by_alias=True, exclude_none=True)
    doc["timeout"] = f"{settings.timeout}s"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class CkecliResult:
    returncode: int
    stdout: str
    stderr: str


async def spawn_ckecli(
    config: Path,
    *args: str,
    stdin: int = asyncio.subprocess.DEVNULL,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> asyncio.subprocess.Process:
    """Start ``ckecli --config CONFIG ARGS...`` with its output piped (the caller waits)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cke.cli.ckecli",
        "--config",
        str(config),
        *args,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


async def ckecli(
    config: Path,
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> CkecliResult:
    """Run ``ckecli --config CONFIG ARGS...`` as an operator would."""
    pipe = asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL
    proc = await spawn_ckecli(config, *args, stdin=pipe, env=env, cwd=cwd)
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return CkecliResult(proc.returncode, out.decode(), err.decode())


class CkeReplica:
    """One ``cke`` process with its own name, HTTP port and log file."""

    def __init__(
        self,
        name: str,
        config: Path,
        log_dir: Path,
        interval: str = "1s",
        session_ttl: str = "3s",
        certs_gc_interval: str = "1h",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.http_port = free_port()
        self.process = ManagedProcess(
            f"cke/{name}",
            [
                sys.executable,
                "-m",
                "cke.cli.cke_main",
                "--config",
                str(config),
                "--name",
                name,
                "--interval",
                interval,
                "--session-ttl",
                session_ttl,
                "--certs-gc-interval",
                certs_gc_interval,
                "--http",
                f"127.0.0.1:{self.http_port}",
                "--logformat",
                "logfmt",
                "--loglevel",
                "debug",
                *extra,
            ],
            log_dir / f"cke-{name}.log",
            # Its own temporary directory, as PrivateTmp= gives the unit: what a killed
            # replica leaves there (the Vault CA file) stays with the bed, not in /tmp.
            env={**os.environ, "TMPDIR": str(log_dir / f"tmp-{name}")},
        )
        self.tmp_dir = log_dir / f"tmp-{name}"

    async def start(self) -> None:
        self.tmp_dir.mkdir(mode=0o700, exist_ok=True)
        await self.process.start()

    async def stop(self) -> int | None:
        return await self.process.stop(timeout=15)

    async def kill(self) -> None:
        await self.process.kill()

    async def pause(self) -> None:
        await self.process.send_signal(signal.SIGSTOP)

    async def resume(self) -> None:
        await self.process.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.process.running

    def log(self) -> str:
        try:
            return self.process.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def metric(self, name: str) -> float | None:
        """The value of an unlabelled metric from /metrics, or None if unreachable."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(url) as resp,
            ):
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None
