"""``make bench-cke``: how fast cke bootstraps and repairs the managed etcd on the test bed.

Each round starts a fresh bed (5 sshd nodes, OpenBao, cke's own etcd), sets Vault up
and runs one cke replica with the default ``--interval`` (1m: nothing waits for it). It
measures

- bootstrap: from ``ckecli cluster set`` (3 control planes) to a healthy 3-member etcd;
- repair: from ``kill -9`` of one member's etcd to a healthy cluster again, with its
  breakdown from the leader's log: noticed (the member's connection dropped), decided
  (status collected over SSH, operation started), started (the operation's commands),
  confirmed (the next status sees the member healthy);
- replace (with sabakan, the integration enabled): from crashing a control-plane node
  to a healthy 3-member etcd without it again, with sabakan's detection time apart;

and, as the reference measured in the same run, how long the same etcd binary takes
to form a 3-member TLS cluster and to restart one member when started directly
(the bed's own etcd). Prints the medians and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time

from cke.common.etcd import make_client
from cke.devenv import BedConfig, TestBed
from cke.devenv.deploy import Deployment
from cke.devenv.sabakan import enable_integration, start_inventory
from cke.storage import Status, Storage

# Issue goals: bootstrap within 2x etcd started directly; a killed member repaired in 2 s
# (median) with the default interval.
BOOTSTRAP_GOAL_RATIO = 2.0
REPAIR_GOAL = 2.0
REPLACE_AFTER_DETECTION_GOAL = 15.0
SABAKAN_INTERVAL = 1.0


# Phases in which the etcd cluster is not (yet) whole; any other phase with every voter
# listed means the leader saw a healthy etcd and moved on (to rivers, say).
ETCD_UNSETTLED = (
    "etcd-boot",
    "etcd-boot-aborted",
    "etcd-start",
    "etcd-wait",
    "waiting-for-cluster",
)


async def _wait_healthy_status(
    storage: Storage,
    voters: int,
    after: float,
    timeout: float = 180.0,
    phases: tuple[str, ...] = ("completed",),
) -> float:
    """time.time() when the leader reports one of ``phases`` (``()``: any phase past etcd's)
    with ``voters`` members, decided after ``after`` (a time.time()); polled every 50 ms
    straight from etcd."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await storage.get("status")
        if got.value is not None:
            st = Status.from_json(got.value)
            stamp = time.mktime(time.strptime(st.timestamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
            wanted = st.phase in phases if phases else st.phase not in ETCD_UNSETTLED
            if wanted and len(st.etcd_members) == voters and stamp >= after:
                return time.time()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no healthy {voters}-member etcd within {timeout}s")


async def _stored_at(storage: Storage) -> float:
    """time.time() when a cluster appears in etcd (polled every 10 ms)."""
    while True:
        if (await storage.get_cluster()).value is not None:
            return time.time()
        await asyncio.sleep(0.01)


def _log_time(log: str, after: float, *marks: str) -> float | None:
    """time.time() of the first line of the cke log at or after ``after`` with every mark."""
    for line in log.splitlines():
        if not line.startswith("time=") or not all(m in line for m in marks):
            continue
        when = dt.datetime.fromisoformat(line[5 : line.index(" ")]).timestamp()
        if when >= after:
            return when
    return None


Breakdown = dict[str, float]


def _operations(log: str, after: float, until: float) -> Breakdown:
    """Seconds each operation took (by name, summed) between two times, from the log."""
    took: Breakdown = {}
    started: dict[str, float] = {}
    for line in log.splitlines():
        if not line.startswith("time=") or "operation=" not in line:
            continue
        when = dt.datetime.fromisoformat(line[5 : line.index(" ")]).timestamp()
        if not after <= when <= until:
            continue
        name = line.split("operation=", 1)[1].split()[0]
        if 'msg="operation started"' in line:
            started[name] = when
        elif 'msg="operation completed"' in line and name in started:
            took[name] = took.get(name, 0.0) + when - started.pop(name)
    return took


def _repair_breakdown(log: str, killed: float, healthy: float) -> Breakdown:
    noticed = _log_time(log, killed, "etcd member connection dropped")
    started = _log_time(log, killed, "operation started", "operation=etcd-start")
    completed = _log_time(log, killed, "operation completed", "operation=etcd-start")
    if noticed is None or started is None or completed is None:
        return {}
    return {
        "noticed": noticed - killed,
        "decided": started - noticed,
        "started": completed - started,
        "confirmed": healthy - completed,
    }


Round = tuple[float, float, float, float, Breakdown, float, Breakdown]


async def _round() -> Round:
    bed = TestBed(BedConfig(etcd_members=1, nodes=5))
    await bed.start()
    deployment = Deployment(bed, replicas=1, interval="1m", session_ttl="10s")
    client = make_client(bed.etcd.settings(deployment.prefix))
    try:
        await deployment.setup()
        await client.connect()
        storage = Storage(client, deployment.prefix)
        cps = bed.nodes[:3]
        # From the moment the cluster is stored: ckecli's own start-up is not cke's time.
        stored = asyncio.create_task(_stored_at(storage))
        result = await deployment.set_cluster(cps, bed.nodes[3:])
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        started = await asyncio.wait_for(stored, 10)
        # Status timestamps have one-second resolution: require a status of the next second.
        etcd_ready = await _wait_healthy_status(storage, 3, int(started) + 1, phases=())
        bootstrap = etcd_ready - started
        done = await _wait_healthy_status(storage, 3, int(started) + 1)
        complete = done - started
        boot_ops = _operations(deployment.replicas[0].log(), started, done)
        await asyncio.sleep(2)
        killed = time.time()
        await bed.run(cps[1], "kill -9 $(head -1 /var/lib/cke/run/etcd.pid)")
        # Wait for a status decided after the kill that shows the cluster whole again.
        while True:
            done = await _wait_healthy_status(storage, 3, int(killed) + 1)
            alive = await bed.run(cps[1], "kill -0 $(head -1 /var/lib/cke/run/etcd.pid) && echo y")
            if alive.stdout == b"y\n":
                break
        repair = done - killed
        breakdown = _repair_breakdown(deployment.replicas[0].log(), killed, done)
    finally:
        await client.close()
        await deployment.stop()
        await bed.stop()

    reference = TestBed(BedConfig(etcd_members=3, nodes=0, vault=False))
    t0 = time.time()
    await reference.start()
    ref_boot = time.time() - t0
    try:
        await reference.etcd.stop_member("etcd1", kill=True)
        t0 = time.time()
        await reference.etcd.start_member("etcd1")
        ref_repair = time.time() - t0
    finally:
        await reference.stop()
    return bootstrap, repair, ref_boot, ref_repair, breakdown, complete, boot_ops


async def _replace_round() -> tuple[float, float]:
    """(detection, replace) seconds after crashing a control-plane node, with sabakan."""
    bed = TestBed(BedConfig(etcd_members=1, nodes=5))
    await bed.start()
    deployment = Deployment(bed, replicas=1, interval="1m", session_ttl="10s")
    client = make_client(bed.etcd.settings(deployment.prefix))
    inventory = await start_inventory(bed, bed.base_dir / "sabakan", SABAKAN_INTERVAL, 3)
    try:
        await deployment.setup()
        await client.connect()
        storage = Storage(client, deployment.prefix)
        await enable_integration(deployment, inventory, 3)
        await _wait_healthy_status(storage, 3, time.time())
        await asyncio.sleep(2)
        doc = json.loads((await deployment.ckecli("cluster", "get", "-o", "json")).stdout)
        victim_address = next(n["address"] for n in doc["nodes"] if n["control_plane"])
        victim = next(n for n in bed.nodes if n.address == victim_address)
        serial = inventory.serial(bed, victim_address)
        crashed = time.time()
        await victim.crash()
        for _ in range(6000):  # 5 minutes at most
            if await inventory.state(serial) == "unreachable":
                break
            await asyncio.sleep(0.05)
        detection = time.time() - crashed
        while True:
            done = await _wait_healthy_status(storage, 3, int(crashed) + 1)
            st = await storage.get_status()
            if st is not None and victim_address not in st.etcd_members:
                break
        return detection, done - crashed
    finally:
        await client.close()
        await deployment.stop()
        await inventory.sabakan.stop()
        await bed.stop()


async def _bench(rounds: int) -> int:
    results: list[Round] = []
    replaces = []
    for i in range(rounds):
        r = await _round()
        detection, replace = await _replace_round()
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in r[4].items())
        ops = ", ".join(f"{k} {v:.2f} s" for k, v in r[6].items())
        print(
            f"round {i + 1}: bootstrap {r[0]:.1f} s (complete with rivers {r[5]:.1f} s: {ops}), "
            f"repair {r[1]:.1f} s ({parts}), replace {replace:.1f} s (sabakan's detection "
            f"{detection:.1f} s) (direct etcd: start {r[2]:.1f} s, restart {r[3]:.1f} s)",
            flush=True,
        )
        results.append(r)
        replaces.append((detection, replace))
    boot = statistics.median(r[0] for r in results)
    complete = statistics.median(r[5] for r in results)
    repair = statistics.median(r[1] for r in results)
    ref_boot = statistics.median(r[2] for r in results)
    ref_repair = statistics.median(r[3] for r in results)
    print(
        f"bootstrap: {boot:.1f} s to a healthy 3-member etcd from the stored cluster; "
        f"{complete:.1f} s to completed (rivers on 5 nodes, etcd-rivers on 3)"
    )
    op_names = sorted({k for r in results for k in r[6]})
    print(
        "bootstrap operations (medians): "
        + ", ".join(
            f"{k} {statistics.median(r[6].get(k, 0.0) for r in results):.2f} s" for k in op_names
        )
    )
    print(f"repair: {repair:.1f} s")
    steps = [r[4] for r in results if r[4]]
    if steps:
        print(
            "repair breakdown (medians): "
            + ", ".join(f"{k} {statistics.median(b[k] for b in steps):.2f} s" for k in steps[0])
        )
    print(
        f"reference, 3-member etcd started directly: {ref_boot:.1f} s "
        f"(bootstrap/reference = {boot / ref_boot:.1f}x)"
    )
    print(
        f"reference, one member restarted directly: {ref_repair:.1f} s "
        f"(repair/reference = {repair / ref_repair:.1f}x)"
    )
    detection = statistics.median(d for d, _ in replaces)
    replace = statistics.median(r for _, r in replaces)
    print(
        f"replace: {replace:.1f} s, of which sabakan's detection {detection:.1f} s "
        f"(interval {SABAKAN_INTERVAL:.0f} s x 3); after detection {replace - detection:.1f} s "
        f"(after-detection/reference restart = {(replace - detection) / ref_repair:.1f}x)"
    )
    ok = (
        boot <= BOOTSTRAP_GOAL_RATIO * ref_boot
        and repair <= REPAIR_GOAL
        and replace - detection <= REPLACE_AFTER_DETECTION_GOAL
    )
    print(
        f"goals: bootstrap <= {BOOTSTRAP_GOAL_RATIO:.0f}x reference, "
        f"repair <= {REPAIR_GOAL:.0f} s, "
        f"replace <= detection + {REPLACE_AFTER_DETECTION_GOAL:.0f} s: "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cke.bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    return asyncio.run(_bench(args.rounds))


if __name__ == "__main__":
    sys.exit(main())
