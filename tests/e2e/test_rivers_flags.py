"""Every bad flag makes ``rivers`` exit 2 with one line that names the flag."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

GOOD_UPSTREAM = "127.0.0.1:9"


async def run_rivers(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rivers.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


BAD_FLAGS: list[tuple[list[str], str]] = [
    (["--upstreams", GOOD_UPSTREAM], "--listen"),
    (["--listen", "127.0.0.1:0"], "--upstreams"),
    (["--listen", "127.0.0.1", "--upstreams", GOOD_UPSTREAM], "--listen"),
    (["--listen", "127.0.0.1:99999", "--upstreams", GOOD_UPSTREAM], "--listen"),
    (["--listen", "bad host:80", "--upstreams", GOOD_UPSTREAM], "--listen"),
    (["--listen", "127.0.0.1:0", "--upstreams", ""], "--upstreams"),
    (["--listen", "127.0.0.1:0", "--upstreams", " , "], "--upstreams"),
    (["--listen", "127.0.0.1:0", "--upstreams", "127.0.0.1:1,nope"], "--upstreams"),
    (["--listen", "127.0.0.1:0", "--upstreams", "127.0.0.1:0"], "--upstreams"),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--check-interval", "20"],
        "--check-interval",
    ),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--check-interval", "0s"],
        "--check-interval",
    ),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--dial-timeout", "ten"],
        "--dial-timeout",
    ),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--dial-keep-alive", "-1s"],
        "--dial-keep-alive",
    ),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--shutdown-timeout", "1x"],
        "--shutdown-timeout",
    ),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--metrics", "localhost"],
        "--metrics",
    ),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--logformat", "xml"],
        "--logformat",
    ),
    (["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--loglevel", "loud"], "--loglevel"),
    (
        [
            "--listen",
            "127.0.0.1:0",
            "--upstreams",
            GOOD_UPSTREAM,
            "--logfile",
            "/nonexistent/dir/x.log",
        ],
        "--logfile",
    ),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--event-loop", "trio"],
        "--event-loop",
    ),
    (["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--workers", "0"], "--workers"),
    (["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--workers", "many"], "--workers"),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--max-connections", "-1"],
        "--max-connections",
    ),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--max-connections", "abc"],
        "--max-connections",
    ),
    (
        ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--max-connections", "1e3"],
        "--max-connections",
    ),
    (["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--no-such-flag"], "--no-such-flag"),
]


async def test_every_bad_flag_exits_2_naming_it() -> None:
    # Run them all at once: each is a separate process that should die quickly.
    results = await asyncio.gather(*(run_rivers(*args) for args, _ in BAD_FLAGS))
    for (args, flag), (code, err) in zip(BAD_FLAGS, results, strict=True):
        lines = err.strip().splitlines()
        assert code == 2, (args, code, err)
        assert len(lines) == 1, (args, err)
        assert flag in lines[0], (args, err)


@pytest.mark.parametrize("flag", ["--listen", "--metrics"])
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_port_in_use_exits_2(flag: str, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        args = ["--listen", "127.0.0.1:0", "--upstreams", GOOD_UPSTREAM, "--metrics", "127.0.0.1:0"]
        args += ["--workers", workers]
        args[args.index(flag) + 1] = busy
        code, err = await run_rivers(*args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and flag in lines[0] and "cannot listen" in lines[0], err
