"""sabakan's flags and config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cke.common.etcd import ConfigError
from sabakan.main import load_config, parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_loads_and_flags_win() -> None:
    args = parse_args(
        [
            "--config-file",
            str(ROOT / "configs" / "sabakan.yml"),
            "--etcd-prefix",
            "/other",
            "--allow-ips",
            "10.0.0.0/8,::1",
            "--http",
            "127.0.0.1:1",
        ]
    )
    config = load_config(args)
    assert config.etcd.prefix == "/other/"
    assert config.http == "127.0.0.1:1"
    assert [str(n) for n in config.networks()] == ["10.0.0.0/8", "::1/128"]
    assert config.state_setter.interval == 10.0
    assert config.state_setter.roles["cs"].http == "http://{ipv4}:9100/health"


def test_defaults() -> None:
    config = load_config(parse_args([]))
    assert config.etcd.prefix == "/sabakan/"
    assert config.allow_ips == ["127.0.0.1", "::1"]
    assert config.state_setter.unreachable_threshold == 3


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("colour: red\n", "colour"),
        ("state-setter: {interval: soon}\n", "state-setter.interval"),
        ("allow-ips: [not-an-ip]\n", "allow-ips"),
        ("etcd: {endpoints: []}\n", "etcd.endpoints"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "sabakan.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(parse_args(["--config-file", str(path)]))
    assert f"{path}: {field}" in str(err.value)
