"""Restore after quorum loss (issue 16, part 2): the rules, the decision, the request."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from cke.cluster import Cluster
from cke.op.restore import EtcdRestoreOp, RestoreEtcdData, restore_data_script
from cke.restore import RestoreError, RestoreRequest, SnapshotChecker, parse_request
from cke.server.clusterstatus import ClusterStatus, EtcdStatus
from cke.server.phases import Phase
from cke.server.safety import (
    RULE_ALL_CONTROL_PLANES_REACHABLE,
    RULE_ETCD_QUORUM_LOST,
    RULE_RESTORE_ONLY_AFTER_QUORUM_LOSS,
    RULE_RESTORE_SNAPSHOT_USABLE,
    etcd_quorum_lost,
    restore_only_after_quorum_loss,
    restore_snapshot_usable,
)
from tests.unit.etcd_builders import member, node_commands
from tests.unit.test_strategy import A, B, C, D, E, clean, cluster, healthy, rules, run, running

pytestmark = pytest.mark.unit

REQUEST = RestoreRequest(
    snapshot="/var/lib/cke-backup/etcd-20261202T150000Z.db",
    sha256="ab" * 32,
    revision=1234,
    token="cke-restore-20261202T160000Z",
    requested="2026-12-02T16:00:00Z",
)


def two_of_three_lost() -> tuple[ClusterStatus, Cluster]:
    """A keeps its data and runs etcd, alone and leaderless; B and C lost theirs."""
    c = cluster([A, B, C], [D])
    s = ClusterStatus(
        nodes={
            A: running(c, A),
            B: clean(B),
            C: clean(C),
            D: clean(D),
        },
        etcd=EtcdStatus(reachable=True, members=(member(A, healthy=False),), leader_id=None),
    )
    return s, c


# -- rule 10: etcd-quorum-lost ------------------------------------------------------------


def test_quorum_lost_when_a_majority_of_control_planes_lost_their_data() -> None:
    s, c = two_of_three_lost()
    blocked = etcd_quorum_lost(c, s)
    assert blocked is not None and blocked.rule == RULE_ETCD_QUORUM_LOST
    assert blocked.nodes == (B, C)
    assert (
        "ckecli etcd restore" in blocked.message and "Restore after quorum loss" in blocked.message
    )


def test_not_lost_while_a_node_that_may_hold_data_is_unreachable() -> None:
    s, c = two_of_three_lost()
    s = dataclasses.replace(s, nodes={**s.nodes, B: dataclasses.replace(clean(B), ssh_ok=False)})
    assert etcd_quorum_lost(c, s) is None


def test_not_lost_with_a_leader_or_with_a_majority_keeping_data() -> None:
    c = cluster([A, B, C])
    assert etcd_quorum_lost(c, healthy(c, [A, B, C])) is None
    s, c2 = two_of_three_lost()
    s = dataclasses.replace(s, nodes={**s.nodes, B: running(c2, B, etcd_running=False)})
    assert etcd_quorum_lost(c2, s) is None


# -- the decision ---------------------------------------------------------------------------


def test_quorum_lost_changes_nothing_and_says_why() -> None:
    s, c = two_of_three_lost()
    d = run(c, s)
    assert d.operators == [] and d.phase is Phase.ETCD_WAIT
    assert rules(d)[RULE_ETCD_QUORUM_LOST] == (B, C)


def test_a_requested_restore_rebuilds_every_control_plane_from_the_snapshot() -> None:
    s, c = two_of_three_lost()
    s = dataclasses.replace(s, restore=REQUEST, restore_revision=77)
    d = run(c, s)
    assert d.phase is Phase.ETCD_RESTORE
    (op,) = d.operators
    assert isinstance(op, EtcdRestoreOp) and op.targets == [A, B, C]
    commands = node_commands(op)
    names = [cmd.info.name for cmd in commands]
    assert names[0] == "read-snapshot" and names[-1] == "finish-restore"
    restores = [cmd for cmd in commands if isinstance(cmd, RestoreEtcdData)]
    assert [r.node.address for r in restores] == [A, B, C]
    for r in restores:
        assert "--initial-cluster-token=cke-restore-20261202T160000Z" in r.script
        assert f"--initial-advertise-peer-urls=https://{r.node.address}:2380" in r.script
        # Nothing is deleted: the old data directory is moved aside.
        assert "rm -rf" not in r.script and "before-restore" in r.script


def test_a_restore_waits_for_every_control_plane_and_a_usable_snapshot() -> None:
    s, c = two_of_three_lost()
    s = dataclasses.replace(s, restore=REQUEST, restore_problem="snapshot X cannot be read here")
    d = run(c, s)
    assert d.operators == [] and RULE_RESTORE_SNAPSHOT_USABLE in rules(d)
    s, c = two_of_three_lost()
    five = cluster([A, B, C, D, E])
    s = dataclasses.replace(
        s,
        nodes={A: running(five, A), B: clean(B), C: clean(C), D: clean(D)},  # E: no answer
        restore=REQUEST,
    )
    d = run(five, s)
    assert d.operators == [] and rules(d)[RULE_ALL_CONTROL_PLANES_REACHABLE] == (E,)
    assert RULE_ETCD_QUORUM_LOST in rules(d)


def test_a_restore_is_never_run_while_etcd_can_form_a_quorum() -> None:
    c = cluster([A, B, C])
    s = dataclasses.replace(healthy(c, [A, B, C]), restore=REQUEST)
    d = run(c, s)
    assert not any(isinstance(op, EtcdRestoreOp) for op in d.operators)
    assert RULE_RESTORE_ONLY_AFTER_QUORUM_LOSS in rules(d)
    assert restore_only_after_quorum_loss(c, healthy(c, [A, B, C])) is None
    assert restore_snapshot_usable(c, healthy(c, [A, B, C])) is None


# -- the request and its snapshot -------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"snapshot": "relative/path.db"}, "snapshot"),
        ({"snapshot": "/a/../b.db"}, "snapshot"),
        ({"sha256": "xyz"}, "sha256"),
        ({"token": "bad token; rm -rf /"}, "token"),
        ({"revision": -1}, "revision"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_bad_request_names_its_field(change: dict[str, object], field: str) -> None:
    doc = {**REQUEST.model_dump(), **change}
    with pytest.raises(RestoreError) as raised:
        parse_request(json.dumps(doc))
    assert field in str(raised.value) and "\n" not in str(raised.value)


async def test_the_leader_uses_only_the_snapshot_ckecli_checked(tmp_path: Path) -> None:
    snapshot = tmp_path / "etcd.db"
    snapshot.write_bytes(b"snapshot bytes")
    request = REQUEST.model_copy(
        update={
            "snapshot": str(snapshot),
            "sha256": hashlib.sha256(b"snapshot bytes").hexdigest(),
        }
    )
    checker = SnapshotChecker()
    assert await checker.problem(request) == ""
    snapshot.write_bytes(b"another snapshot")
    assert "not the one ckecli checked" in await checker.problem(request)
    snapshot.unlink()
    assert "cannot be read here" in await checker.problem(request)


def test_the_node_script_quotes_what_it_is_given() -> None:
    c = cluster([A])
    node = c.nodes[0]
    script = restore_data_script("/opt/etcd dir/etcdutl", node, ("--initial-cluster=a=b",))
    assert "'/opt/etcd dir/etcdutl'" in script
