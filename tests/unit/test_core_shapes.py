"""The decision function's shape, phases, records and cke's flags."""

from __future__ import annotations

import pytest

from cke.cli.cke_main import main as cke_main
from cke.cluster import Constraints, parse_cluster
from cke.records import Record
from cke.server.phases import ALL_PHASES, Phase
from cke.server.strategy import ClusterStatus, Decision, decide

# Upstream's AllOperationPhases (phase.go), each a value of cke_operation_phase{phase}.
CKE_PHASES = {
    "upgrade-aborted",
    "upgrade",
    "rivers",
    "etcd-boot-aborted",
    "etcd-boot",
    "etcd-start",
    "etcd-wait",
    "k8s-start",
    "etcd-maintain",
    "k8s-maintain",
    "stop-control-plane",
    "repair-machines",
    "uncordon-nodes",
    "reboot-nodes",
    "completed",
}


def test_phases_include_ckes() -> None:
    assert set(ALL_PHASES) >= CKE_PHASES
    assert any(p.endswith("-aborted") for p in ALL_PHASES)


def test_decide_without_cluster_waits() -> None:
    decision = decide(None, Constraints(), ClusterStatus())
    assert isinstance(decision, Decision)
    assert decision.operators == [] and decision.phase is Phase.WAITING_FOR_CLUSTER


def test_decide_with_an_unknown_control_plane_refuses_to_boot() -> None:
    cluster = parse_cluster(
        "name: c\nservice_subnet: 10.68.0.0/16\n"
        "nodes:\n- {address: 10.0.0.1, user: root, control_plane: true}\n"
    )
    decision = decide(cluster, Constraints(), ClusterStatus())
    # No status for the node: it counts as unreachable, so nothing may be bootstrapped.
    assert decision.operators == [] and decision.phase is Phase.ETCD_BOOT_ABORTED
    assert [b.rule for b in decision.blocked] == ["all-control-planes-reachable"]
    assert decision.blocked[0].nodes == ("10.0.0.1",)


def test_record_round_trip_and_cancel() -> None:
    record = Record("etcd-bootstrap", ["10.0.0.1"], id=12)
    step = record.start_command("write-file", "10.0.0.1", "/etc/cke/etcd.conf")
    step.result = "ok"
    again = Record.from_json(record.to_json())
    assert again == record and again.status == "running"
    assert record.to_dict()["command"]["name"] == "write-file"
    record.cancel("new leader")
    assert record.status == "cancelled" and record.end_at and record.error == "new leader"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--interval", "soon"], "--interval"),
        (["--session-ttl", "0s"], "--session-ttl"),
        (["--http", "nowhere"], "--http"),
        (["--max-concurrent-updates", "0"], "--max-concurrent-updates"),
        (["--logformat", "xml"], "--logformat"),
        (["--certs-gc-interval", "1"], "--certs-gc-interval"),
        (["--cert-ttl", "a year"], "--cert-ttl"),
        (["--cert-ttl", "60s", "--cert-renew-fraction", "0.7"], "--cert-renew-fraction"),
        (["--peer-cert-ttl", "20s", "--cert-renew-fraction", "0.4"], "--peer-cert-ttl 20s"),
    ],
)
def test_cke_bad_flags_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cke_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err
