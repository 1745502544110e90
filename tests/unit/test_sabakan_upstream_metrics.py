"""sabakan's metrics under upstream's names, without processes or etcd."""

from __future__ import annotations

import datetime as dt

from prometheus_client.parser import text_string_to_metric_families

from sabakan.api import Metrics
from sabakan.model import Machine, MachineSpec, MachineState, MachineStatus

WHEN = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _machine(serial: str, state: MachineState, **spec: object) -> Machine:
    return Machine(
        spec=MachineSpec.model_validate({"serial": serial, "register-date": WHEN, **spec}),
        status=MachineStatus(state=state, timestamp=WHEN),
    )


def test_machine_status_one_series_per_state() -> None:
    metrics = Metrics()
    metrics.observe_machines(
        [
            _machine(
                "s1",
                MachineState.RETIRING,
                rack=2,
                role="cs",
                ipv4=["10.0.0.1", "10.0.0.2"],
                labels={"machine-type": "qemu"},
            ),
            _machine("s2", MachineState.HEALTHY),
        ]
    )
    metrics.observe_machines([_machine("s1", MachineState.RETIRED, ipv4=["10.0.0.1"])])
    families = {f.name: f for f in text_string_to_metric_families(metrics.expose().decode())}
    samples = families["sabakan_machine_status"].samples
    assert len(samples) == len(MachineState)  # s2 is gone, and s1's old labels
    assert {s.labels["status"]: s.value for s in samples} == {
        s.value: float(s is MachineState.RETIRED) for s in MachineState
    }
    assert samples[0].labels.keys() == {
        "status",
        "address",
        "serial",
        "rack",
        "role",
        "machine_type",
    }


def test_api_request_count_keeps_upstreams_name() -> None:
    metrics = Metrics()
    metrics.count_request(200, "/api/v1/machines", "GET")
    metrics.count_request(200, "/api/v1/machines", "GET")
    metrics.count_request(404, 'odd"path\\\n', "GET")
    text = metrics.expose().decode()
    lines = text.splitlines()
    assert "# TYPE sabakan_api_request_count counter" in lines
    assert 'sabakan_api_request_count{code="200",path="/api/v1/machines",verb="GET"} 2' in lines
    assert "sabakan_api_request_count_total" not in text
    families = list(text_string_to_metric_families(text))
    [count] = [f for f in families if f.name.startswith("sabakan_api_request_count")]
    assert count.type == "counter"
    paths = {s.labels["path"]: s.value for s in count.samples}
    assert paths == {"/api/v1/machines": 2.0, 'odd"path\\\n': 1.0}
