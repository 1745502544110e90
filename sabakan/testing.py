"""Helpers for the sabakan tests and benchmark: a real ``sabakan`` process on loopback."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from cke.common.etcd import EtcdSettings
from cke.devenv.procs import ManagedProcess, free_port


class SabakanProcess:
    """``python -m sabakan.main`` with a generated config file, on 127.0.0.1."""

    def __init__(
        self,
        directory: Path,
        etcd: EtcdSettings,
        name: str = "sabakan",
        state_setter: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.settings = etcd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config: dict[str, Any] = {
            "etcd": etcd.model_dump(by_alias=True, exclude_none=True),
            "http": f"127.0.0.1:{self.port}",
            "loglevel": "debug",
            "election-ttl": 2,
            "state-setter": state_setter or {"enabled": False},
        }
        config.update(extra or {})
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / f"{name}.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-m", "sabakan.main", "--config-file", str(self.config_path)]
        self.process = ManagedProcess(name, argv + (args or []), directory / f"{name}.log")

    async def start(self, timeout: float = 20.0) -> None:
        await self.process.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"{self.url}/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if not self.process.running:
                    raise RuntimeError(f"sabakan exited:\n{self.process.log_tail()}")
                if loop.time() > deadline:
                    raise TimeoutError(f"sabakan not healthy:\n{self.process.log_tail()}")
                await asyncio.sleep(0.1)

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; the exit code."""
        return await self.process.stop()

    # -- for the failover tests ------------------------------------------------------------

    async def kill(self) -> None:
        await self.process.kill()

    async def pause(self) -> None:
        await self.process.send_signal(signal.SIGSTOP)

    async def resume(self) -> None:
        await self.process.send_signal(signal.SIGCONT)

    async def health(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """``GET /health`` as JSON, or None when it does not answer 200 in time."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.get(f"{self.url}/health") as resp,
            ):
                if resp.status != 200:
                    return None
                doc: dict[str, Any] = await resp.json()
                return doc
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def is_leader(self) -> bool:
        doc = await self.health()
        return bool(doc and doc.get("leader"))

    def log(self) -> str:
        try:
            return self.process.log_path.read_text(errors="replace")
        except OSError:
            return ""
