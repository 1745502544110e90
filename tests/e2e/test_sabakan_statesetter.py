"""The state setter on a test bed of its own: stopping sshd makes a machine unreachable."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiohttp

from sabakan.testing import SabakanProcess
from tests.conftest import BedFactory

INTERVAL = 0.3
THRESHOLD = 3


async def _state(url: str, serial: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v1/state/{serial}") as resp:
        assert resp.status == 200
        return await resp.text()


async def _wait_state(url: str, serial: str, want: str, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (state := await _state(url, serial)) != want:
        assert loop.time() < deadline, f"{serial} still {state} after {within}s (want {want})"
        await asyncio.sleep(0.05)


async def test_stopped_sshd_makes_a_machine_unreachable(
    bed_factory: BedFactory, tmp_path: Path
) -> None:
    bed = await bed_factory(nodes=2, vault=False)
    watched, retiring = bed.nodes
    proc = SabakanProcess(
        tmp_path,
        bed.etcd.settings(f"/sabakan-test-{uuid.uuid4().hex}/"),
        state_setter={
            "interval": f"{INTERVAL}s",
            "timeout": "0.5s",
            "unreachable-threshold": THRESHOLD,
            "healthy-threshold": 2,
        },
    )
    await proc.start()
    try:
        specs = [
            {"serial": "w1", "role": "cs", "ipv4": [watched.address]},
            {"serial": "r1", "role": "cs", "ipv4": [retiring.address]},
        ]
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{proc.url}/api/v1/machines", data=json.dumps(specs)) as resp:
                assert resp.status == 201
            # r1 goes to retiring before the setter can see it: it must never change after.
            async with s.put(f"{proc.url}/api/v1/state/r1", data="retiring") as resp:
                assert resp.status == 200
        # uninitialized machines that pass their probes become healthy
        await _wait_state(proc.url, "w1", "healthy", within=10 * INTERVAL + 5)
        await watched.stop_sshd()
        await retiring.stop_sshd()
        await _wait_state(proc.url, "w1", "unreachable", within=INTERVAL * THRESHOLD + 2.0)
        await watched.start_sshd()
        await _wait_state(proc.url, "w1", "healthy", within=INTERVAL * 2 + 2.0)
        await retiring.start_sshd()
        await asyncio.sleep(INTERVAL * (THRESHOLD + 2))
        assert await _state(proc.url, "r1") == "retiring"
        async with aiohttp.ClientSession() as s, s.get(f"{proc.url}/api/v1/logs") as resp:
            records = [json.loads(x) for x in (await resp.text()).splitlines()]
        setter = [
            (r["instance"], r["before"], r["after"]) for r in records if r["user"] == "state-setter"
        ]
        assert setter == [
            ("w1", "uninitialized", "healthy"),
            ("w1", "healthy", "unreachable"),
            ("w1", "unreachable", "healthy"),
        ]
        # Each change says why: which check failed (or passed) how many times in a row.
        reasons = [r["reason"] for r in records if r["user"] == "state-setter"]
        assert reasons[0] == "every check passed 2 times in a row (threshold 2)"
        assert reasons[1].startswith(
            f"connect to {watched.address}:22 failed {THRESHOLD} times in a row "
            f"(threshold {THRESHOLD}): "
        ), reasons
        assert reasons[2] == reasons[0]
    finally:
        await proc.stop()
