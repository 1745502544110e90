"""The control loop's last line of defence: a decision that raises changes nothing and
says why, instead of killing the replica (issue 10, item 2)."""

from __future__ import annotations

import pytest

from cke.cluster import Cluster, Constraints, Node
from cke.server import control
from cke.server.clusterstatus import ClusterStatus
from cke.server.phases import Phase
from cke.server.strategy import Decision

pytestmark = pytest.mark.unit


def test_a_decision_that_raises_is_held_back_with_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: object) -> Decision:
        raise ValueError("binary must be a plain absolute path\nsecond line")

    monkeypatch.setattr(control, "decide", broken)
    cluster = Cluster(
        name="c", service_subnet="10.68.0.0/16", nodes=[Node(address="10.0.0.1", user="u")]
    )
    decision = control.decide_safely(cluster, Constraints(), ClusterStatus())
    assert decision.operators == [] and decision.phase is Phase.DECISION_FAILED
    (blocked,) = decision.blocked
    assert blocked.rule == control.RULE_DECISION_SUCCEEDS
    assert "ValueError: binary must be a plain absolute path" in blocked.message
    assert "second line" not in blocked.message


def test_a_good_decision_passes_through() -> None:
    decision = control.decide_safely(None, Constraints(), ClusterStatus())
    assert decision == Decision([], Phase.WAITING_FOR_CLUSTER)


async def test_a_failing_sabakan_integration_keeps_the_cluster_and_says_so() -> None:
    from typing import Any, cast

    from cke.sabakan.integration import SabakanClient
    from cke.server.metrics import ServerMetrics
    from cke.storage import LeaderKey

    class Broken:
        client = SabakanClient()

        async def run(self, leader: LeaderKey, voters: list[str]) -> None:
            raise KeyError("a bug in the generator")

    metrics = ServerMetrics()
    server = control.Server(
        cast(Any, None), cast(Any, None), "cke0", 1.0, 3, metrics, sabakan=cast(Any, Broken())
    )
    report = await server.integrate(LeaderKey(b"k", 1, 1, "cke0"), [])
    assert report["result"] == "error"
    assert "integration failed: KeyError" in report["reason"]
    assert metrics.registry.get_sample_value("cke_sabakan_integration_successful") == 0


async def test_a_failing_auto_repair_queues_nothing_and_says_so() -> None:
    from typing import Any, cast

    from cke.cluster import Cluster
    from cke.server.metrics import ServerMetrics
    from cke.storage import LeaderKey

    class Broken:
        async def run(self, *args: object) -> None:
            raise KeyError("a bug in the repairer")

    server = control.Server(cast(Any, None), cast(Any, None), "cke0", 1.0, 3, ServerMetrics())
    server.auto_repair = cast(Any, Broken())
    cluster = Cluster(name="c", service_subnet="10.68.0.0/16", nodes=[])
    report = await server.repair_from_sabakan(
        LeaderKey(b"k", 1, 1, "cke0"), cluster, Constraints(), ClusterStatus()
    )
    assert report == {"error": "auto-repair failed: KeyError: 'a bug in the repairer'"}


def test_retry_soon_waits_start_short_and_double_up_to_two_seconds() -> None:
    waits: list[float] = []
    wait: float | None = None
    for _ in range(7):
        wait = control.retry_soon_wait(wait, 60.0)
        waits.append(wait)
    assert waits == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    # Never longer than the interval itself.
    assert control.retry_soon_wait(None, 0.1) == 0.1
    assert control.retry_soon_wait(1.6, 1.0) == 1.0
