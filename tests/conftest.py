"""Shared fixtures: the test bed (real etcd, OpenBao, sshd nodes) and the leak check.

Tests under ``tests/unit`` are marked ``unit``, those under ``tests/e2e`` ``e2e``.
The session-wide ``bed`` is shared: a test that crashes or stops a node must use
``bed_factory`` for a bed of its own, or put the node back as it found it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cke.devenv import BedConfig, TestBed
from cke.devenv.procs import LEDGER

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        if _HERE / "unit" in path.parents:
            item.add_marker(pytest.mark.unit)
        elif _HERE / "e2e" in path.parents:
            item.add_marker(pytest.mark.e2e)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any process the bed started is still alive."""
    leftovers = LEDGER.leftovers()
    if leftovers:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "processes started by the test bed are still running:\n  " + "\n  ".join(leftovers)
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
async def bed() -> AsyncIterator[TestBed]:
    """One bed for the whole session: 1-member etcd with TLS, OpenBao, 3 nodes."""
    testbed = TestBed(BedConfig(etcd_members=1, nodes=3))
    await testbed.start()
    try:
        yield testbed
    finally:
        await testbed.stop()


BedFactory = Callable[..., Awaitable[TestBed]]


@pytest.fixture
async def bed_factory() -> AsyncIterator[BedFactory]:
    """Start beds of a test's own shape (``await bed_factory(etcd_members=3)``)."""
    started: list[TestBed] = []

    async def make(**kwargs: object) -> TestBed:
        testbed = TestBed(BedConfig(**kwargs))  # type: ignore[arg-type]
        started.append(testbed)
        await testbed.start()
        return testbed

    try:
        yield make
    finally:
        for testbed in started:
            await testbed.stop()
