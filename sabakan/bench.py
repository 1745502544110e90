"""State-setter benchmark: probe 1,000 loopback machines at a 10 s interval on this host.

``python -m sabakan.bench`` (``make bench-sabakan``). 100 machines have a listener on
their probe port (healthy), 900 have a closed port (connection refused: probe
failures count as probes). A round is the state setter's own ``run_round`` with its
bounded concurrency; the references, measured in the same run, are a plain
sequential probe loop over the same machines and the 10 s interval itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import sys
import time

from cke.devenv.procs import free_port
from sabakan.model import BMC, Machine, MachineSpec, MachineState, MachineStatus
from sabakan.statesetter import StateSetter, StateSetterConfig, probe_tcp


def _machines(count: int) -> list[Machine]:
    now = dt.datetime.now(dt.UTC)
    out = []
    for i in range(count):
        ip = f"127.77.{i // 250}.{i % 250 + 1}"
        spec = MachineSpec.model_validate(
            {
                "serial": f"bench{i:04d}",
                "rack": i // 40,
                "index-in-rack": i % 40 + 1,
                "role": "cs",
                "ipv4": [ip],
                "register-date": now,
                "bmc": BMC(),
            }
        )
        out.append(
            Machine(spec=spec, status=MachineStatus(state=MachineState.HEALTHY, timestamp=now))
        )
    return out


async def _bench(count: int, interval: float, rounds: int, concurrency: int) -> int:
    port = free_port()
    machines = _machines(count)
    listeners = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    for m in machines[: count // 10]:
        listeners.append(await asyncio.start_server(accept, m.spec.ipv4[0], port))
    config = StateSetterConfig.model_validate(
        {"interval": interval, "timeout": 1.0, "ssh-port": port, "concurrency": concurrency}
    )
    setter = StateSetter(None, config)
    try:
        times = []
        for _ in range(rounds):
            stats = await setter.run_round(machines)
            assert stats.probed == count
            times.append(stats.seconds)
        start = time.perf_counter()
        ok = 0
        for m in machines:
            good, _ = await probe_tcp(m.spec.ipv4[0], port, 1.0)
            ok += good
        sequential = time.perf_counter() - start
        unreachable = sum(1 for c in setter.counters.values() if c.failures >= 3)
    finally:
        for server in listeners:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
    worst = max(times)
    print(f"machines: {count} ({count // 10} listening, {count - count // 10} closed port)")
    print(f"interval: {interval:.1f}s, concurrency limit: {concurrency}, rounds: {rounds}")
    print("state-setter round times: " + ", ".join(f"{t * 1000:.1f} ms" for t in times))
    print(f"reference, sequential probe of the same machines: {sequential * 1000:.1f} ms")
    print(f"worst round / interval: {worst / interval:.4f} ({interval / worst:.0f}x headroom)")
    print(f"sequential / worst round: {sequential / worst:.2f}x")
    print(
        f"machines past the unreachable threshold: {unreachable} (expected {count - count // 10})"
    )
    keeps_up = worst < interval
    print(f"a round completes within the interval: {'yes' if keeps_up else 'NO'}")
    return 0 if keeps_up else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sabakan.bench")
    p.add_argument("--machines", type=int, default=1000)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=200)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= a.machines <= 60000 or not 1 <= a.rounds <= 20:
        p.error("machines must be 1..60000 and rounds 1..20")
    return asyncio.run(_bench(a.machines, a.interval, a.rounds, a.concurrency))


if __name__ == "__main__":
    sys.exit(main())
