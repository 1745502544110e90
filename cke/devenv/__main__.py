"""``make demo``: the embedded default, in the foreground.

Starts cke's own etcd, an OpenBao server and five nodes that boot systemd; sets Vault up with
``ckecli vault init``; starts sabakan with every node registered and its state setter
probing them; starts three ``cke`` replicas with the sabakan integration enabled, so
that cke generates a cluster with three control planes; waits until the managed etcd is
healthy, prints ``ckecli status`` and how to crash a node and watch it being replaced.
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
from cke.devenv.nodes import SystemdNode
from cke.devenv.sabakan import Inventory, enable_integration, start_inventory


async def _demo(args: argparse.Namespace) -> int:
    config = BedConfig(
        etcd_members=args.etcd_members,
        nodes=args.nodes,
        node_kind=args.node_kind,
        node_subnet=args.node_subnet,
        base_dir=Path(args.dir) if args.dir else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bed = TestBed(config)
    deployment: Deployment | None = None
    inventory: Inventory | None = None
    print("starting the test bed ...", flush=True)
    try:
        await bed.start()
        print(bed.describe(), flush=True)
        if not args.bed_only:
            print("\nsabakan: registering every node, the state setter probing them ...")
            inventory = await start_inventory(bed, bed.base_dir / "sabakan")
            deployment = Deployment(bed, replicas=args.replicas, interval="5s", session_ttl="10s")
            print(f"ckecli vault init, {args.replicas} cke replicas ...", flush=True)
            await deployment.setup()
            await enable_integration(deployment, inventory, args.control_planes)
            print(
                f"sabakan integration enabled (control-plane-count {args.control_planes}); "
                "waiting for the generated cluster's etcd ...",
                flush=True,
            )
            await deployment.wait_for("completed", timeout=180, voters=args.control_planes)
            ckecli = f"ckecli --config {deployment.config}"
            status = await deployment.ckecli("status")
            print(f"\n$ {ckecli} status\n{status.stdout}", flush=True)
            print(f"cke logs: {deployment.dir}/cke-*.log", flush=True)
            print(_how_to_watch(bed, inventory, ckecli), flush=True)
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
        if inventory is not None:
            await inventory.sabakan.stop()
        await bed.stop()
        print("stopped; no process left behind", flush=True)
    return code


def _how_to_watch(bed: TestBed, inventory: Inventory, ckecli: str) -> str:
    node = bed.nodes[0]
    sabakan = f"curl -s {inventory.sabakan.url}/api/v1/machines"
    if isinstance(node, SystemdNode):
        crash = [
            f"crash a node as a power loss would ({node.name}: kill its PID 1, a container):",
            f"  kill -9 {node.init_pid}",
            f"(or reboot it: ssh into {node.name} as below and run systemctl reboot)",
        ]
    else:
        crash = [
            f"crash a node as a power loss would ({node.name}: every process of it):",
            f"  ns=$(readlink /proc/$(cat {node.directory}/sshd.pid)/ns/mnt); "
            'for p in /proc/[0-9]*; do [ "$(readlink $p/ns/mnt)" = "$ns" ] '
            "&& kill -9 ${p#/proc/}; done",
        ]
    return "\n".join(
        [
            "",
            *crash,
            "then watch sabakan mark it unreachable and cke replace it:",
            f"  {sabakan}   (sabactl --server {inventory.sabakan.url} machines get)",
            f"  {ckecli} status",
            f"  {ckecli} history",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cke.devenv", description=__doc__)
    parser.add_argument("--etcd-members", type=int, default=1, choices=(1, 3))
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument(
        "--node-kind",
        choices=("systemd", "process"),
        default="systemd",
        help="systemd: containers booting systemd, cke's runtime: systemd (default); "
        "process: plain sshd namespaces, runtime: process (no systemd-nspawn needed)",
    )
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
