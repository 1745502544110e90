"""sabakan drives cke (issue 11): a crashed control plane is replaced by itself.

Real sabakan (HTTPS, client certificates, the state setter probing the nodes' sshd),
real cke, real etcd on real sshd nodes. cke generates the cluster from sabakan's
machines and a template; when sabakan marks a control plane unreachable, cke replaces
it with a healthy machine in another rack, and the etcd data survives.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from cke.devenv import TestBed
from cke.devenv.deploy import Deployment, RootCredentials
from cke.devenv.sabakan import Inventory, enable_integration, start_inventory
from tests.conftest import BedFactory

pytestmark = pytest.mark.e2e

CANARY = "/canary/"
CANARIES = 1000
INTERVAL = 0.5
THRESHOLD = 3


async def _wait(what: str, check: Any, timeout: float) -> float:
    """Poll the coroutine function ``check`` until it returns true; the seconds it took."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.2)
    return time.monotonic() - start


async def serve_garbage(bed: TestBed, url: str) -> web.AppRunner:
    """An HTTPS server at ``url`` (sabakan's certificate) that answers HTML to anything."""
    cert = bed.ca.issue("garbage-server", "sabakan", client=False)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert.cert, cert.key)

    async def html(_: web.Request) -> web.Response:
        return web.Response(text="<html>maintenance</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", html)
    runner = web.AppRunner(app)
    await runner.setup()
    host, port = url.removeprefix("https://").rsplit(":", 1)
    await web.TCPSite(runner, host, int(port), ssl_context=ctx).start()
    return runner


async def _records(d: Deployment) -> list[dict[str, Any]]:
    records = json.loads((await d.ckecli("history", "-o", "json")).stdout)
    assert isinstance(records, list)
    return records


async def _voters(d: Deployment, addresses: list[str], creds: RootCredentials) -> list[str]:
    return [url for url, learner in await d.members(addresses, creds) if not learner]


async def _canaries(d: Deployment, addresses: list[str], creds: RootCredentials) -> int:
    return await d.count_keys(addresses, CANARY, creds)


class Integrated:
    """A bed whose nodes are registered in a real sabakan (HTTPS, state setter) and one
    cke replica with the integration enabled and ``control-plane-count`` 3."""

    def __init__(self, bed: TestBed, inventory: Inventory, d: Deployment) -> None:
        self.bed, self.inventory, self.d = bed, inventory, d
        self.sabakan = inventory.sabakan

    async def control_planes(self) -> list[str]:
        doc = yaml.safe_load((await self.d.ckecli("cluster", "get")).stdout)
        return sorted(n["address"] for n in doc["nodes"] if n.get("control_plane"))


async def integrated(bed: TestBed, tmp_path: Path, replicas: int = 1) -> Integrated:
    inventory = await start_inventory(bed, tmp_path / "sabakan", INTERVAL, THRESHOLD)
    d = Deployment(bed, replicas=replicas, interval="1s")
    try:
        await d.setup()
        await enable_integration(d, inventory, control_planes=3)
        assert (await d.ckecli("sabakan", "is-enabled")).stdout.strip() == "true"
        await d.wait_for("completed", timeout=180, voters=3)
    except BaseException:
        await d.stop()
        await inventory.sabakan.stop()
        raise
    return Integrated(bed, inventory, d)


async def test_crashed_control_plane_is_replaced_from_sabakan(
    bed_factory: BedFactory, tmp_path: Path
) -> None:
    bed: TestBed = await bed_factory(etcd_members=1, nodes=5)
    it = await integrated(bed, tmp_path)
    d, sabakan = it.d, it.sabakan
    try:
        cluster = yaml.safe_load((await d.ckecli("cluster", "get")).stdout)
        cps = [n["address"] for n in cluster["nodes"] if n.get("control_plane")]
        assert len(cps) == 3 and len(cluster["nodes"]) == 5
        status = await d.status()
        assert status["sabakan"]["result"] in ("generated", "unchanged")  # type: ignore[index]

        # One root certificate for every look at the managed etcd in this test.
        creds = await d.root_credentials()
        root = await d.root_client(cps, creds)
        try:
            kv = root.kv
            assert kv is not None
            for batch in range(0, CANARIES, 100):  # 100 writes in flight at a time
                await asyncio.gather(
                    *(
                        kv.put(f"{CANARY}{i:04d}", f"value-{i}", timeout=10)
                        for i in range(batch, batch + 100)
                    )
                )
        finally:
            await root.close()

        # Crash a control plane: sabakan marks it unreachable, cke replaces it.
        victim = next(n for n in bed.nodes if n.address == cps[1])
        serial = f"m{bed.nodes.index(victim)}"
        crashed = time.monotonic()
        await victim.crash()

        async def unreachable() -> bool:
            return await it.inventory.state(serial) == "unreachable"

        detected = await _wait("sabakan marks it unreachable", unreachable, 30)

        async def replaced_in_config() -> bool:
            doc = yaml.safe_load((await d.ckecli("cluster", "get")).stdout)
            return victim.address not in [
                n["address"] for n in doc["nodes"] if n.get("control_plane")
            ]

        generated = await _wait("a cluster without the victim", replaced_in_config, 60)
        new_cluster = yaml.safe_load((await d.ckecli("cluster", "get")).stdout)
        new_cps = sorted(n["address"] for n in new_cluster["nodes"] if n.get("control_plane"))
        assert len(new_cps) == 3 and victim.address not in new_cps
        wanted = sorted(f"https://{a}:2380" for a in new_cps)

        async def members_replaced() -> bool:
            try:
                return await _voters(d, new_cps, creds) == wanted
            except Exception:
                return False

        healed = await _wait("the etcd members replaced", members_replaced, 180)
        await d.wait_for("completed", timeout=120, voters=3)
        total = time.monotonic() - crashed
        assert await _canaries(d, new_cps, creds) == CANARIES
        status = await d.status()
        text = (await d.ckecli("status")).stdout
        assert "sabakan:" in text
        history = [
            r["operation"] for r in json.loads((await d.ckecli("history", "-o", "json")).stdout)
        ]
        assert "etcd-remove-member" in history and "etcd-add-member" in history
        print(
            f"\nreplace: detection {detected:.1f}s (interval {INTERVAL}s x {THRESHOLD}), "
            f"generation +{generated:.1f}s, members replaced +{healed:.1f}s, "
            f"completed after {total:.1f}s"
        )

        # A healthy control plane set to retiring is replaced, its successor joining first:
        # etcd never has fewer than 3 voters (sampled every 50 ms throughout).
        leaving = new_cps[0]
        leaving_serial = f"m{[n.address for n in bed.nodes].index(leaving)}"
        first_id = max(int(r["id"]) for r in await _records(d))
        alive = [n.address for n in bed.nodes if n is not victim]
        sampler_client = await d.root_client(alive, creds)
        samples: list[int] = []
        done = asyncio.Event()

        async def sample() -> None:
            assert sampler_client.cluster is not None
            while not done.is_set():
                try:
                    resp = await sampler_client.cluster.member_list(timeout=2)
                    samples.append(sum(1 for m in resp.members if not m.isLearner))
                except Exception:
                    pass
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            await it.inventory.set_state(leaving_serial, "retiring")

            async def leaves_the_config() -> bool:
                return leaving not in await it.control_planes()

            await _wait("a cluster without the retiring control plane", leaves_the_config, 60)

            async def retired_from_etcd() -> bool:
                try:
                    voters = await _voters(d, alive, creds)
                except Exception:
                    return False
                return f"https://{leaving}:2380" not in voters and len(voters) == 3

            await _wait("the retiring member replaced", retired_from_etcd, 180)
            await d.wait_for("completed", timeout=120, voters=3)
        finally:
            done.set()
            await sampler
            await sampler_client.close()
        assert samples and min(samples) >= 3, samples
        ops = [
            (r["operation"], r["targets"])
            for r in sorted(await _records(d), key=lambda r: int(r["id"]))
            if int(r["id"]) > first_id
        ]
        names = [op for op, _ in ops]
        assert "etcd-remove-member" in names, ops
        removed = names.index("etcd-remove-member")
        assert "etcd-add-member" in names[:removed] and "etcd-promote-member" in names[:removed]
        assert ops[removed][1] == [leaving], ops
        final = yaml.safe_load((await d.ckecli("cluster", "get")).stdout)
        final_cps = [n["address"] for n in final["nodes"] if n.get("control_plane")]
        assert await _canaries(d, final_cps, creds) == CANARIES
        status = await d.status()

        # sabakan knows who asks: cke's client certificate.
        asked = [
            line
            for line in it.sabakan.log().splitlines()
            if "path=/api/v1/machines" in line and "method=GET" in line
        ]
        assert asked and all("user=cke" in line for line in asked), asked[:3]

        # sabakan down: cke keeps the cluster and says why.
        revision = status["cluster-revision"]
        await sabakan.stop()

        async def says_unavailable() -> bool:
            st = await d.status()
            report = st.get("sabakan") or {}
            return report.get("result") == "error" and "sabakan" in str(report.get("reason"))

        await _wait("status says sabakan is unavailable", says_unavailable, 30)
        assert (await d.status())["cluster-revision"] == revision

        # A peer at sabakan's address answering garbage: the same, with the reason.
        garbage = await serve_garbage(bed, it.inventory.https_url)
        try:

            async def says_garbage() -> bool:
                report = (await d.status()).get("sabakan") or {}
                return "not JSON" in str(report.get("reason"))

            await _wait("status says sabakan's answer is garbage", says_garbage, 30)
            assert (await d.status())["cluster-revision"] == revision
        finally:
            await garbage.cleanup()

        # Disabled: no generation; a manual cluster set works and stays.
        assert (await d.ckecli("sabakan", "disable")).returncode == 0
        assert (await d.ckecli("sabakan", "is-enabled")).stdout.strip() == "false"

        async def report_gone() -> bool:
            return not (await d.status()).get("sabakan")

        await _wait("no sabakan report once disabled", report_gone, 30)
        manual = yaml.safe_load((await d.ckecli("cluster", "get")).stdout)
        manual["nodes"] = [n for n in manual["nodes"] if n["address"] != victim.address]
        stored = await d.ckecli("cluster", "set", "-", stdin=yaml.safe_dump(manual).encode())
        assert stored.returncode == 0, stored.stderr
        await asyncio.sleep(3)  # a few rounds: nothing regenerates it
        again = yaml.safe_load((await d.ckecli("cluster", "get")).stdout)
        assert victim.address not in [n["address"] for n in again["nodes"]]
    finally:
        await d.stop()
        await sabakan.stop()


async def test_two_of_three_control_planes_lost_is_refused_until_one_returns(
    bed_factory: BedFactory, tmp_path: Path
) -> None:
    bed: TestBed = await bed_factory(etcd_members=1, nodes=5)
    it = await integrated(bed, tmp_path)
    d, sabakan = it.d, it.sabakan
    try:
        cps = await it.control_planes()
        first, second = (next(n for n in bed.nodes if n.address == a) for a in cps[:2])
        before = await d.status()
        await first.crash()
        await second.crash()

        async def refused() -> bool:
            report = (await d.status()).get("sabakan") or {}
            return report.get("rule") == "enough-control-planes-survive"

        await _wait("the generation refused", refused, 60)
        await asyncio.sleep(3)  # several more rounds: still nothing changes
        assert await it.control_planes() == cps
        assert (await d.status())["cluster-revision"] == before["cluster-revision"]
        text = (await d.ckecli("status")).stdout
        assert "enough-control-planes-survive" in text

        # One returns (its etcd is started again by cke): the other is replaced.
        await first.start()

        async def other_replaced() -> bool:
            now = await it.control_planes()
            return second.address not in now and first.address in now

        await _wait("the lost control plane replaced", other_replaced, 120)
        await d.wait_for("completed", timeout=180, voters=3)
    finally:
        await d.stop()
        await sabakan.stop()


async def test_leader_killed_in_the_middle_of_a_replacement(
    bed_factory: BedFactory, tmp_path: Path
) -> None:
    """The next leader cancels the unfinished record and finishes the replacement."""
    bed: TestBed = await bed_factory(etcd_members=1, nodes=5)
    it = await integrated(bed, tmp_path, replicas=2)
    d = it.d
    creds = await d.root_credentials()
    kill = await d.kill_leader_during("etcd-add-member")
    try:
        cps = await it.control_planes()
        victim = next(n for n in bed.nodes if n.address == cps[0])
        await victim.crash()
        interrupted_id = await kill.done(120)

        async def replaced() -> bool:
            now = await it.control_planes()
            if victim.address in now:
                return False
            try:
                return await _voters(d, now, creds) == sorted(f"https://{a}:2380" for a in now)
            except Exception:
                return False

        await _wait("the replacement finished by the next leader", replaced, 180)
        await d.wait_for("completed", timeout=120, voters=3)
        records = {int(r["id"]): r for r in await _records(d)}
        assert records[interrupted_id]["status"] == "cancelled"
        assert (await d.status())["leader"] != kill.leader
    finally:
        kill.cancel()
        await d.stop()
        await it.sabakan.stop()
