"""``make demo``: the embedded default, in the foreground.

Starts cke's own etcd, an OpenBao server and five sshd nodes; sets Vault up with
``ckecli vault init``; starts three ``cke`` replicas; stores a cluster with three
control planes; waits until the managed etcd is healthy and prints ``ckecli status``.
Ctrl-C (or SIGTERM) stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from cke.devenv.bed import BedConfig, TestBed
from cke.devenv.deploy import Deployment


async def _demo(args: argparse.Namespace) -> int:
    config = BedConfig(
        etcd_members=args.etcd_members,
        nodes=args.nodes,
        node_subnet=args.node_subnet,
        base_dir=Path(args.dir) if args.dir else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bed = TestBed(config)
    deployment: Deployment | None = None
    print("starting the test bed ...", flush=True)
    try:
        await bed.start()
        print(bed.describe(), flush=True)
        if not args.bed_only:
            deployment = Deployment(bed, replicas=args.replicas, interval="5s", session_ttl="10s")
            print(f"\nckecli vault init, {args.replicas} cke replicas ...", flush=True)
            await deployment.setup()
            control_planes = bed.nodes[: args.control_planes]
            result = await deployment.set_cluster(control_planes, bed.nodes[args.control_planes :])
            if result.returncode != 0:
                raise RuntimeError(f"ckecli cluster set: {result.stderr.strip()}")
            print(
                f"cluster stored: {args.control_planes} control planes; waiting for etcd ...",
                flush=True,
            )
            await deployment.wait_for("completed", timeout=180, voters=args.control_planes)
            status = await deployment.ckecli("status")
            print(f"\n$ ckecli --config {deployment.config} status\n{status.stdout}", flush=True)
            print(f"cke logs: {deployment.dir}/cke-*.log", flush=True)
    except Exception as exc:
        print(f"demo: {exc}", file=sys.stderr)
        stop.set()
        code = 1
    else:
        print("\nrunning; press Ctrl-C to stop everything", flush=True)
        code = 0
    try:
        await stop.wait()
    finally:
        print("stopping ...", flush=True)
        if deployment is not None:
            await deployment.stop()
        await bed.stop()
        print("stopped; no process left behind", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cke.devenv", description=__doc__)
    parser.add_argument("--etcd-members", type=int, default=1, choices=(1, 3))
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--control-planes", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=3, help="cke replicas")
    parser.add_argument("--bed-only", action="store_true", help="start the bed, nothing else")
    parser.add_argument(
        "--node-subnet",
        default="127.0.1",
        help="loopback /24 prefix for node addresses (default 127.0.1)",
    )
    parser.add_argument("--dir", help="keep the bed's files in this directory")
    args = parser.parse_args(argv)
    if not 1 <= args.control_planes <= args.nodes:
        parser.error("--control-planes: between 1 and --nodes")
    return asyncio.run(_demo(args))


if __name__ == "__main__":
    sys.exit(main())
