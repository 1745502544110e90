"""Issue 17: the pure parts of ``ckecli ssh`` / ``ckecli scp`` (the rest: tests/e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cke.cli.ckecli import CLIError, build_parser
from cke.cli.sshargs import colon, split_user
from cke.cli.sshcmd import find_node, known_hosts_line, openssh_options
from cke.cluster import Node


def _node(address: str, hostname: str = "", port: int = 22) -> Node:
    return Node(address=address, hostname=hostname, user="root", port=port)


@pytest.mark.parametrize(
    ("arg", "at"),
    [
        ("node1:/etc/x", 5),
        ("root@node1:x", 10),
        ("root@[fd00::1]:x", 14),
        ("[fd00::1]:x", 9),
        ("./a:b", None),  # a '/' before the ':' makes it local, as in OpenSSH's scp
        (":leading", None),
        ("plain", None),
        ("/abs/a:b", None),
    ],
)
def test_remote_paths_split_where_openssh_scp_splits(arg: str, at: int | None) -> None:
    assert colon(arg) == at


def test_user_and_node() -> None:
    assert split_user("node1") == (None, "node1")
    assert split_user("core@10.0.0.1") == ("core", "10.0.0.1")
    assert split_user("a@b@c") == ("a@b", "c")


def test_node_by_address_or_hostname() -> None:
    nodes = [_node("10.0.0.1", "n1"), _node("10.0.0.2", "n2"), _node("fd00::3", "n3")]
    assert find_node(nodes, "10.0.0.2").address == "10.0.0.2"
    assert find_node(nodes, "n1").address == "10.0.0.1"
    assert find_node(nodes, "[fd00::3]").address == "fd00::3"
    with pytest.raises(CLIError, match="NODE n9: no node"):
        find_node(nodes, "n9")
    with pytest.raises(CLIError, match="several nodes"):
        find_node([*nodes, _node("10.0.0.4", "n1")], "n1")


def test_known_hosts_holds_the_one_pinned_key_for_the_nodes_port() -> None:
    assert known_hosts_line(_node("10.0.0.1"), "ssh-ed25519 AAAA") == "10.0.0.1 ssh-ed25519 AAAA\n"
    assert known_hosts_line(_node("fd00::1", port=2222), "k b") == "[fd00::1]:2222 k b\n"


def test_openssh_checks_the_host_key_strictly_and_uses_only_our_files() -> None:
    opts = openssh_options(_node("10.0.0.1", port=2222), Path("/d/id"), Path("/d/kh"))
    pairs = dict(o.split("=", 1) for o in opts[1::2])
    assert set(opts[0::2]) == {"-o"}
    assert pairs["StrictHostKeyChecking"] == "yes"
    assert pairs["UserKnownHostsFile"] == "/d/kh" and pairs["GlobalKnownHostsFile"] == "/dev/null"
    assert pairs["IdentityFile"] == "/d/id" and pairs["IdentitiesOnly"] == "yes"
    assert pairs["ControlPath"] == "none" and pairs["Port"] == "2222"


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["ssh"],
        ["scp"],
        ["scp", "-x", "a", "n:b"],
        ["scp", "node1:a"],  # no DST
        ["scp", "a", "./b:c"],  # no node: a '/' before the ':' makes a local path
        ["scp", "a", "@:b"],
    ):
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(argv)
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("ckecli: ") and err.count("\n") == 1, err


def test_command_arguments_are_kept_for_the_node() -> None:
    args = build_parser().parse_args(["ssh", "root@n1", "ls", "-l", "--", "x"])
    assert (args.node, args.remote_command) == ("root@n1", ["ls", "-l", "--", "x"])
    args = build_parser().parse_args(["scp", "-r", "d", "n1:/tmp"])
    assert (args.recursive, args.paths) == (True, ["d", "n1:/tmp"])
