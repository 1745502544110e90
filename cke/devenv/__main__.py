"""``make demo``: start the embedded default environment in the foreground.

Ctrl-C (or SIGTERM) stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from cke.devenv.bed import BedConfig, TestBed


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
    print("starting the test bed ...", flush=True)
    try:
        await bed.start()
    except Exception as exc:
        print(f"demo: the bed did not start: {exc}", file=sys.stderr)
        return 1
    print(bed.describe(), flush=True)
    print("\nrunning; press Ctrl-C to stop everything", flush=True)
    try:
        await stop.wait()
    finally:
        print("stopping ...", flush=True)
        await bed.stop()
        print("stopped; no process left behind", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cke.devenv", description=__doc__)
    parser.add_argument("--etcd-members", type=int, default=1, choices=(1, 3))
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument(
        "--node-subnet",
        default="127.0.1",
        help="loopback /24 prefix for node addresses (default 127.0.1)",
    )
    parser.add_argument("--dir", help="keep the bed's files in this directory")
    args = parser.parse_args(argv)
    return asyncio.run(_demo(args))


if __name__ == "__main__":
    sys.exit(main())
