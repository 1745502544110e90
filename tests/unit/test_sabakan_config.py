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


def test_default_http_is_loopback() -> None:
    assert load_config(parse_args([])).http == "127.0.0.1:10080"
    assert load_config(parse_args(["--http", "0.0.0.0:10080"])).http == "0.0.0.0:10080"


SECRET = "hunter2"
BROKEN_YAML = [
    # (text, line, column) of the error PyYAML reports
    (f"http: 127.0.0.1:1\npassword: {SECRET}: x\n", 2, 18),  # scanner
    (f"etcd:\n  password: '{SECRET}\n", 3, 1),  # unterminated quote
    (f"- a\npassword: {SECRET}\n", 2, 1),  # parser
    (f"password: !{SECRET} x\n", 1, 11),  # constructor: the tag names content
    (f"http: x\n\tpassword: {SECRET}\n", 2, 1),  # tab
    (f"http: x\npassword: {SECRET}\x01\n", 2, 18),  # reader: unacceptable character
]


@pytest.mark.parametrize(("text", "line", "column"), BROKEN_YAML)
def test_yaml_errors_show_line_and_column_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, column: int
) -> None:
    from sabakan import main as sabakan_main
    from sabakan.sabactl import CLIError, _parser, _settings

    path = tmp_path / "secret.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(parse_args(["--config-file", str(path)]))
    message = str(err.value)
    assert f"line {line}, column {column}" in message, message
    assert SECRET not in message and "password" not in message
    # nothing chained to it (a traceback would print it) holds the line either
    chained: BaseException | None = err.value
    for _ in range(5):
        if chained is None:
            break
        assert SECRET not in str(chained)
        chained = chained.__cause__ or chained.__context__

    assert sabakan_main.main(["--config-file", str(path)]) == 2
    out, errout = capsys.readouterr()
    assert f"line {line}, column {column}" in errout and SECRET not in out + errout

    with pytest.raises(CLIError) as cli_err:
        _settings(_parser().parse_args(["--config-file", str(path), "logs"]))
    assert f"line {line}, column {column}" in str(cli_err.value)
    assert SECRET not in str(cli_err.value) and "password" not in str(cli_err.value)
