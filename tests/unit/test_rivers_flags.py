"""rivers flag parsing and upstream selection, without processes."""

from __future__ import annotations

import random

import pytest

from rivers.main import FlagError, parse_args, parse_host_port, parse_upstreams
from rivers.proxy import HostPort, Upstream, dial_order


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
