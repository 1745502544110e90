"""rivers flag parsing and upstream selection, without processes."""

from __future__ import annotations

import errno
import random
import resource
import socket

import pytest

from rivers.main import FlagError, build_parser, parse_args, parse_host_port, parse_upstreams
from rivers.proxy import (
    FD_RESERVE,
    HostPort,
    Upstream,
    connection_limit,
    dial_order,
    local_errno,
    merge_snapshots,
)


def test_defaults_match_cke_rivers() -> None:
    options = parse_args(["--listen", "127.0.0.1:16443", "--upstreams", "10.0.0.1:6443"])
    assert options.proxy.listen == HostPort("127.0.0.1", 16443)
    assert options.proxy.upstreams == (HostPort("10.0.0.1", 6443),)
    assert options.proxy.check_interval == 20
    assert options.proxy.dial_timeout == 10
    assert options.proxy.dial_keep_alive == 15
    assert options.proxy.shutdown_timeout == 10
    assert options.metrics is None
    assert (options.logformat, options.loglevel, options.event_loop) == ("plain", "info", "auto")


def test_go_durations_and_lists() -> None:
    options = parse_args(
        [
            "--listen=:2379",
            "--upstreams",
            "10.0.0.1:2379, 10.0.0.2:2379,[::1]:2379,etcd.example:2379",
            "--check-interval",
            "500ms",
            "--dial-timeout",
            "1m",
            "--dial-keep-alive",
            "0",
            "--shutdown-timeout",
            "1m30s",
            "--metrics",
            "127.0.0.1:9090",
        ]
    )
    assert options.proxy.listen == HostPort("0.0.0.0", 2379)
    assert [str(u) for u in options.proxy.upstreams] == [
        "10.0.0.1:2379",
        "10.0.0.2:2379",
        "[::1]:2379",
        "etcd.example:2379",
    ]
    assert options.proxy.check_interval == 0.5
    assert options.proxy.dial_timeout == 60
    assert options.proxy.dial_keep_alive == 0
    assert options.proxy.shutdown_timeout == 90
    assert options.metrics == HostPort("127.0.0.1", 9090)


@pytest.mark.parametrize("text", ["0", "0s"])
def test_shutdown_timeout_zero_means_no_limit(text: str) -> None:
    # Upstream rivers: "Timeout for server shutting-down gracefully (disabled if
    # specified "0")"; 0 is accepted and kept as 0 (= wait for every connection).
    args = ["--listen", "127.0.0.1:1", "--upstreams", "127.0.0.1:2", "--shutdown-timeout", text]
    assert parse_args(args).proxy.shutdown_timeout == 0
    assert "0: no limit" in build_parser().format_help()


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1", "127.0.0.1:", ":x", "1.2.3.4:70000", "a b:1", "[::1:80", "[zz]:1", "::1:80"],
)
def test_bad_addresses_name_the_flag(text: str) -> None:
    with pytest.raises(FlagError, match=r"^--listen: "):
        parse_host_port("--listen", text)


@pytest.mark.parametrize("text", ["", ",", "127.0.0.1:0", "127.0.0.1:80,bad"])
def test_bad_upstream_lists(text: str) -> None:
    with pytest.raises(FlagError, match=r"^--upstreams: "):
        parse_upstreams(text)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--check-interval", "0s"),
        ("--check-interval", "20"),
        ("--dial-timeout", "-1s"),
        ("--dial-keep-alive", "soon"),
        ("--shutdown-timeout", "1d"),
        ("--event-loop", "trio"),
    ],
)
def test_bad_values_name_the_flag(flag: str, value: str) -> None:
    with pytest.raises(FlagError, match=f"^{flag}: "):
        parse_args(["--listen", "127.0.0.1:1", "--upstreams", "127.0.0.1:2", f"{flag}={value}"])


def test_missing_and_unknown_flags() -> None:
    with pytest.raises(FlagError, match="--upstreams"):
        parse_args(["--listen", "127.0.0.1:1"])
    with pytest.raises(FlagError, match="--frobnicate"):
        parse_args(["--listen", "127.0.0.1:1", "--upstreams", "127.0.0.1:2", "--frobnicate"])


def _pool(n: int) -> list[Upstream]:
    return [Upstream(HostPort("10.0.0.1", 6443 + i)) for i in range(n)]


def test_dial_order_skips_unhealthy_and_tries_every_healthy_one() -> None:
    pool = _pool(4)
    pool[1].healthy = False
    rng = random.Random(7)
    for _ in range(50):
        order = dial_order(pool, rng)
        assert sorted(u.name for u in order) == sorted(pool[i].name for i in (0, 2, 3))


def test_dial_order_spreads_the_first_pick() -> None:
    pool = _pool(3)
    rng = random.Random(1)
    firsts = [dial_order(pool, rng)[0].name for _ in range(300)]
    counts = {u.name: firsts.count(u.name) for u in pool}
    assert all(count > 60 for count in counts.values()), counts


def test_dial_order_empty_when_nothing_is_healthy() -> None:
    pool = _pool(2)
    for upstream in pool:
        upstream.healthy = False
    assert dial_order(pool) == []


def test_workers_flag() -> None:
    base = ["--listen", "127.0.0.1:16443", "--upstreams", "10.0.0.1:6443"]
    assert parse_args([*base, "--workers", "3"]).workers == 3
    assert 1 <= parse_args(base).workers <= 4  # auto: CPUs, at most 4
    for bad in ("0", "-1", "65", "two"):
        with pytest.raises(FlagError, match="--workers"):
            parse_args([*base, "--workers", bad])


def test_max_connections_flag() -> None:
    base = ["--listen", "127.0.0.1:16443", "--upstreams", "10.0.0.1:6443", "--workers", "1"]
    assert parse_args(base).proxy.max_connections is None  # auto
    assert parse_args([*base, "--max-connections", "0"]).proxy.max_connections == 0
    assert parse_args([*base, "--max-connections", "500"]).proxy.max_connections == 500
    # Split over the workers, rounded up.
    three = [*base, "--workers", "3", "--max-connections", "10"]
    assert parse_args(three).proxy.max_connections == 4
    for bad in ("-1", "abc", "1.5", "", "10000001"):
        with pytest.raises(FlagError, match=r"^--max-connections: "):
            parse_args([*base, "--max-connections", bad])


def test_connection_limit_from_the_descriptor_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    cap = (1024 - FD_RESERVE - 3) // 2
    assert connection_limit(None, 3) == (cap, cap)  # auto
    assert connection_limit(100, 3) == (100, cap)
    assert connection_limit(10_000, 3) == (cap, cap)  # more than descriptors allow
    assert connection_limit(0, 3) == (0, cap)  # no limit
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY,) * 2)
    assert connection_limit(None, 3) == (0, 0)
    assert connection_limit(100, 3) == (100, 0)


def test_local_errors_are_told_from_upstream_errors() -> None:
    for code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL):
        assert local_errno(OSError(code, "x")) == errno.errorcode[code]
    for exc in (
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        OSError(errno.EHOSTUNREACH, "no route"),
        OSError(errno.ENETUNREACH, "unreachable"),
        TimeoutError(),
        socket.gaierror(socket.EAI_NONAME, "unknown host"),
    ):
        assert local_errno(exc) is None


def _snap(shed: int, limit: int, local: dict[str, int]) -> dict[str, object]:
    return {
        "upstreams": {},
        "bytes_up": 0,
        "bytes_down": 0,
        "no_upstream": 0,
        "dialing": 0,
        "workers": 1,
        "shed": shed,
        "max_connections": limit,
        "local_errors": local,
    }


def test_merged_limits_and_local_errors() -> None:
    merged = merge_snapshots(
        [_snap(1, 50, {"EMFILE": 2}), _snap(2, 50, {"EMFILE": 1, "ENFILE": 4})]
    )
    assert merged["shed"] == 3
    assert merged["max_connections"] == 100
    assert merged["local_errors"] == {"EMFILE": 3, "ENFILE": 4}
    # One worker without a limit: no limit overall.
    assert merge_snapshots([_snap(0, 50, {}), _snap(0, 0, {})])["max_connections"] == 0
