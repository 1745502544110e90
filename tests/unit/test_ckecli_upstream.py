"""Issue 18: ckecli's upstream-shaped pieces that need no etcd."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest

from cke import __version__
from cke.cli.ckecli import CLIError, build_parser
from cke.cli.vaultcmd import rotate_aescbc

NOW = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)


def _keys_strict(value: str) -> list[dict[str, str]]:
    keys: list[dict[str, str]] = json.loads(value)["keys"]
    for key in keys:
        assert len(base64.b64decode(key["secret"])) == 32
    return keys


def test_first_key_has_upstream_shape() -> None:
    keys = _keys_strict(rotate_aescbc(None, NOW))
    assert len(keys) == 1 and keys[0]["name"] == "2024-05-06T07:08:09Z"


def test_rotation_keeps_only_the_current_key() -> None:
    # Shaped as upstream stores it: the JSON of an AESConfiguration.
    stored = json.dumps(
        {"keys": [{"name": "current", "secret": "QUFB"}, {"name": "older", "secret": "QkJC"}]}
    )
    keys = _keys_loose(rotate_aescbc(stored, NOW))
    assert [k["name"] for k in keys] == ["2024-05-06T07:08:09Z", "current"]


def test_rotation_reads_the_list_earlier_versions_stored() -> None:
    stored = json.dumps([{"name": "key-1700000000", "secret": "QUFB"}])
    keys = _keys_loose(rotate_aescbc(stored, NOW))
    assert [k["name"] for k in keys] == ["2024-05-06T07:08:09Z", "key-1700000000"]


def test_unreadable_stored_key_is_a_one_line_error() -> None:
    with pytest.raises(CLIError, match="not JSON"):
        rotate_aescbc("{nope", NOW)


def _keys_loose(value: str) -> list[dict[str, str]]:
    keys: list[dict[str, str]] = json.loads(value)["keys"]
    assert len(base64.b64decode(keys[0]["secret"])) == 32
    return keys


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"ckecli {__version__}"


def test_upstream_aliases_and_flags_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["cstr", "set", "control-plane-count", "3"])
    assert (args.name, args.value) == ("control-plane-count", "3")
    args = parser.parse_args(["history", "-f", "-n", "5"])
    assert args.follow and args.n == 5
    args = parser.parse_args(["vault", "init", "--endpoint", "https://v:8200", "--cacert", "c"])
    assert (args.endpoint, args.cacert) == ("https://v:8200", "c")
