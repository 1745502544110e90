"""``make demo``: it brings the embedded default up and Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from cke.devenv.nodes import pick_node_subnet


def _processes_using(*marks: str) -> list[int]:
    """PIDs whose command line mentions one of ``marks`` (the bed dir, the node subnet)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if any(mark.encode() in cmdline for mark in marks):
            found.append(int(entry))
    return found


async def test_demo_comes_up_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    bed_dir = tmp_path / "bed"
    subnet = pick_node_subnet(3)
    marks = (str(bed_dir), f"https://{subnet}.")  # the managed etcd listens on the nodes
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cke.devenv",
        "--nodes",
        "3",
        "--control-planes",
        "1",
        "--replicas",
        "1",
        "--node-subnet",
        pick_node_subnet(3),
        "--dir",
        str(bed_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(180):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "demo exited early:\n" + "".join(seen)
                seen.append(line)
                if "press Ctrl-C" in line:
                    break
        output = "".join(seen)
        assert "phase: completed" in output and "leader: cke0" in output
        running = _processes_using(*marks)
        assert len(running) >= 5, "etcd, OpenBao, sshd, cke and the managed etcd should run"
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert "stopped; no process left behind" in rest.decode()
    assert _processes_using(*marks) == []
