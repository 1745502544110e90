"""Shared pieces: durations, structured logs, etcd settings, listen addresses."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cke.common.durations import format_duration, parse_duration
from cke.common.etcd import ConfigError, EtcdSettings, load_etcd_settings
from cke.common.httpserver import parse_listen_address
from cke.common.logs import get_logger, op_context, setup_logging


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("20s", 20.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0", 0.0),
        ("10us", 1e-5),
        ("2h45m", 9900.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "1x", "1m 2s", "--1s", "ms"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for seconds in (0.5, 20.0, 90.0, 3600.0, 3661.0):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def _log_line(tmp_path: Path, fmt: str) -> str:
    logfile = tmp_path / f"{fmt}.log"
    setup_logging("info", fmt, str(logfile))
    try:
        with op_context(42):
            get_logger("test").info("operation started", target="10.0.0.1", n=3)
        get_logger("test").debug("hidden")
    finally:
        for handler in logging.getLogger().handlers:
            handler.close()
        setup_logging("warning", "plain")
    return logfile.read_text()


def test_json_logs_carry_fields_and_op_id(tmp_path: Path) -> None:
    lines = _log_line(tmp_path, "json").splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["msg"] == "operation started"
    assert doc["op_id"] == "42" and doc["target"] == "10.0.0.1" and doc["n"] == 3


def test_logfmt_logs_quote_values(tmp_path: Path) -> None:
    line = _log_line(tmp_path, "logfmt").strip()
    assert 'msg="operation started"' in line
    assert "op_id=42" in line and "target=10.0.0.1" in line


def test_bad_log_flags_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--logformat"):
        setup_logging("info", "xml")
    with pytest.raises(ValueError, match="--loglevel"):
        setup_logging("loud", "plain")


def test_etcd_settings_from_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(
        "endpoints: [https://10.0.0.1:2379]\nprefix: /x\ntimeout: 3s\n"
        "tls-ca-file: /ca.crt\ntls-cert-file: /c.crt\ntls-key-file: /c.key\n"
    )
    settings = load_etcd_settings(path)
    assert settings.prefix == "/x/" and settings.timeout == 3.0
    assert settings.tls_key_file == "/c.key" and settings.uses_tls


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("endpoints: []\n", "endpoints"),
        ("timeout: soon\n", "timeout"),
        ("prefix: cke\n", "prefix"),
        ("servers: [a]\n", "servers"),
        ("- a\n", "mapping"),
    ],
)
def test_etcd_settings_errors_name_the_field(tmp_path: Path, body: str, field: str) -> None:
    path = tmp_path / "config.yml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=field):
        load_etcd_settings(path)


def test_etcd_password_is_not_in_repr() -> None:
    settings = EtcdSettings.model_validate({"username": "u", "password": "s3cret"})
    assert "s3cret" not in repr(settings)


def test_parse_listen_address() -> None:
    assert parse_listen_address("127.0.0.1:10180", "--http") == ("127.0.0.1", 10180)
    assert parse_listen_address(":8080", "--http") == ("0.0.0.0", 8080)
    assert parse_listen_address("[::1]:80", "--http") == ("::1", 80)
    for bad in ("localhost", "1.2.3.4:x", "1.2.3.4:99999"):
        with pytest.raises(ValueError, match="--http"):
            parse_listen_address(bad, "--http")


@pytest.mark.parametrize(
    "body",
    [
        "endpoints: [https://127.0.0.1:2379]\npassword: hunter2\n  x: y\n",
        "password: 'hunter2\n",
        "endpoints:\n\t- password-hunter2\n",
    ],
)
def test_yaml_errors_in_config_show_position_not_content(tmp_path: Path, body: str) -> None:
    """Issue 10: PyYAML's message quotes the offending line, which may hold a password."""
    path = tmp_path / "config.yml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_etcd_settings(path)
    message = str(caught.value)
    assert "hunter2" not in message and "\n" not in message
    assert "invalid YAML at line" in message and "column" in message


def test_non_utf8_config_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_bytes(b"password: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"config.yml: not UTF-8 text$"):
        load_etcd_settings(path)
