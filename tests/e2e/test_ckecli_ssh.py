"""Issue 17: ``ckecli ssh`` and ``ckecli scp`` on the test bed (real OpenSSH and OpenBao).

The nodes: node1 has ``host_key`` in the cluster, node2's key is pinned in etcd as cke
pins it at first contact, node3's pinned key is another machine's (a changed host
key), and one more entry has no known key at all. The private key comes from Vault
(``vault ssh-privkey``), and must never be left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest
import yaml

from cke.cli.sshcmd import Target, run_openssh
from cke.cluster import Node
from cke.common.etcd import make_client
from cke.devenv import TestBed
from cke.devenv.deploy import Deployment
from cke.devenv.replicas import CkecliResult, ckecli, spawn_ckecli
from cke.storage import KEY_HOSTKEYS_PREFIX


class SSHBed:
    def __init__(self, bed: TestBed) -> None:
        self.bed = bed
        self.deployment = Deployment(bed, replicas=0)
        self.node1, self.node2, self.node3 = bed.nodes[:3]
        self.unknown = self.node1.address.rsplit(".", 1)[0] + ".200"
        self.other_key = (
            asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        )

    async def setup(self) -> None:
        d = self.deployment
        await d.setup()  # vault init and the bed's key as the default SSH key; no replica
        doc = yaml.safe_load(d.cluster_yaml([self.node1], [self.node2, self.node3]))
        doc["nodes"][0]["host_key"] = self.node1.host_public_key
        doc["nodes"].append({"address": self.unknown, "hostname": "nokey", "user": "root"})
        stored = await d.ckecli("cluster", "set", "-", stdin=yaml.safe_dump(doc).encode())
        assert stored.returncode == 0, stored.stderr
        client = make_client(self.bed.etcd.settings(d.prefix))
        await client.connect()
        try:
            assert client.kv is not None
            for address, key in (
                (self.node2.address, self.node2.host_public_key),
                (self.node3.address, self.other_key),
            ):
                await client.kv.put(d.prefix + KEY_HOSTKEYS_PREFIX + address, key, timeout=5)
        finally:
            await client.close()

    async def ckecli(self, tmp: Path, *calls: tuple[str, ...]) -> list[CkecliResult]:
        """Each ``ckecli ARGS`` of ``calls`` at once, as an operator without a Vault
        token; none may leave its key directory behind in TMPDIR."""
        tmp.mkdir(exist_ok=True)
        env = {"TMPDIR": str(tmp)}
        results = await asyncio.gather(
            *(ckecli(self.deployment.config, *args, env=env, cwd=tmp) for args in calls)
        )
        assert _key_dirs(tmp) == [], "ckecli left its key directory behind"
        return results


def _key_dirs(tmp: Path) -> list[Path]:
    return list(tmp.glob("ckecli-ssh-*"))


@pytest.fixture(scope="module")
async def sshbed(bed: TestBed) -> AsyncIterator[SSHBed]:
    s = SSHBed(bed)
    await s.setup()
    try:
        yield s
    finally:
        await s.deployment.stop()


def _one_line_error(result: CkecliResult, *words: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("ckecli: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


async def test_ssh_runs_a_command_on_the_node_by_address_or_hostname(
    sshbed: SSHBed, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    for node in (sshbed.node1, sshbed.node2):
        wrote = await sshbed.bed.run(node, f"echo {marker}-{node.name} > /var/lib/cke/marker")
        assert wrote.ok, wrote.stderr
    script = "cat /var/lib/cke/marker; echo err >&2; exit 7"
    by_address, by_name, dashes = await sshbed.ckecli(
        tmp_path / "tmp",
        ("ssh", sshbed.node1.address, script),  # host_key from the cluster
        ("ssh", "root@node2", script),  # the key pinned in etcd; by hostname
        # A command's own options stay the command's (never OpenSSH's).
        ("ssh", "node2", "--", "ls", "-d", "/var/lib/cke"),
    )
    assert (by_address.returncode, by_address.stdout, by_address.stderr) == (
        7,
        f"{marker}-node1\n",
        "err\n",
    )
    assert (by_name.returncode, by_name.stdout, by_name.stderr) == (7, f"{marker}-node2\n", "err\n")
    assert (dashes.returncode, dashes.stdout) == (0, "/var/lib/cke\n"), dashes


async def test_scp_copies_files_both_ways(sshbed: SSHBed, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    data = os.urandom(70_000)
    local = tmp_path / "payload.bin"
    local.write_bytes(data)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("hello\n")
    remote = f"/var/lib/cke/scp-{uuid.uuid4().hex[:8]}"
    results = await sshbed.ckecli(
        tmp,
        ("scp", str(local), f"node2:{remote}"),
        ("scp", "-r", str(tree), f"root@{sshbed.node1.address}:{remote}-tree"),
    )
    assert [r.returncode for r in results] == [0, 0], results
    on_node = await sshbed.bed.run(sshbed.node2, f"sha256sum {remote}")
    assert on_node.stdout.decode().split()[0] == hashlib.sha256(data).hexdigest()
    tree_on_node = await sshbed.bed.run(sshbed.node1, f"cat {remote}-tree/sub/f.txt")
    assert tree_on_node.stdout == b"hello\n"
    back = tmp_path / "back.bin"
    (down,) = await sshbed.ckecli(tmp, ("scp", f"root@{sshbed.node2.address}:{remote}", str(back)))
    assert down.returncode == 0, down.stderr
    assert back.read_bytes() == data


async def test_changed_or_unknown_host_key_is_refused(sshbed: SSHBed, tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_text("x\n")
    ssh, scp, unknown = await sshbed.ckecli(
        tmp_path / "tmp",
        ("ssh", "node3", "touch /var/lib/cke/reached"),
        ("scp", str(local), f"{sshbed.node3.address}:/var/lib/cke/reached"),
        ("ssh", "nokey", "true"),
    )
    for refused in (ssh, scp):
        _one_line_error(refused, "host key changed", "refusing")
    _one_line_error(unknown, "no host key is known")
    reached = await sshbed.bed.run(sshbed.node3, "test -e /var/lib/cke/reached")
    assert reached.exit_status == 1


async def test_openssh_itself_refuses_a_key_other_than_the_pinned_one(sshbed: SSHBed) -> None:
    """Past ckecli's own check (a key swapped in between), OpenSSH still refuses."""
    node = Node(address=sshbed.node3.address, user="root")
    status = await run_openssh(
        "ssh",
        Target(node, sshbed.other_key),
        sshbed.bed.ssh_private_key,
        [node.address, "touch /var/lib/cke/reached-by-openssh"],
    )
    assert status == 255
    reached = await sshbed.bed.run(sshbed.node3, "test -e /var/lib/cke/reached-by-openssh")
    assert reached.exit_status == 1


async def test_bad_arguments_give_one_line_errors(sshbed: SSHBed, tmp_path: Path) -> None:
    # (Usage errors, found before etcd is asked: tests/unit/test_ckecli_sshcmd.py.)
    no_node, two_nodes = await sshbed.ckecli(
        tmp_path / "tmp", ("ssh", "node9", "true"), ("scp", "node1:a", "node2:b")
    )
    _one_line_error(no_node, "NODE node9")
    _one_line_error(two_nodes, "two nodes")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def test_private_key_is_private_while_in_use_and_removed_after(
    sshbed: SSHBed, tmp_path: Path
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = await spawn_ckecli(
        sshbed.deployment.config,
        "ssh",
        "node1",
        "cat",
        stdin=asyncio.subprocess.PIPE,
        env={"TMPDIR": str(tmp)},
    )
    try:
        for _ in range(400):  # at most 20 s
            if _key_dirs(tmp):
                break
            await asyncio.sleep(0.05)
        (directory,) = _key_dirs(tmp)
        assert directory.name.startswith("ckecli-ssh-") and _mode(directory) == 0o700
        files = {p.name: p for p in directory.iterdir()}
        assert sorted(files) == ["id", "known_hosts"]
        assert {_mode(p) for p in files.values()} == {0o600}
        assert files["id"].read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        # Only the pinned key is trusted.
        key = " ".join(sshbed.node1.host_public_key.split()[:2])
        assert files["known_hosts"].read_text() == f"{sshbed.node1.address} {key}\n"
        # A stop passes on to OpenSSH, and the key goes with it.
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode != 0 and b"Traceback" not in err
        assert _key_dirs(tmp) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
