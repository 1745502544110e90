"""Admin hosts (issue 13): the units in ``systemd/`` run, verbatim, under a real systemd.

Three systemd-nspawn containers (systemd as PID 1, the host's network, each node on its
own loopback address) get ``systemd/cke.service`` as it is in the repository, with
``/etc/cke/config.yml`` made from ``configs/cke.yml`` for the test bed's etcd. One of
them also runs ``systemd/sabakan.service`` (``configs/sabakan.yml``) and another
``systemd/rivers.service`` (``configs/rivers.env``). The programs are installed in
``/usr/local/bin`` as small entry-point scripts, as ``pip install`` would put them
(``[project.scripts]``). Everything is checked the way an operator would: ``systemctl
show``, the journal, the services' own HTTP endpoints and who leads in etcd.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import sysconfig
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
import yaml
from etcd3aio import Etcd3Client

from cke.common.durations import parse_duration
from cke.common.etcd import endpoint_host_port, make_client
from cke.devenv import BedConfig, TestBed
from cke.devenv.nodes import Bind, SystemdNode, pick_node_subnet
from cke.storage import Storage

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
CONFIGS = REPO / "configs"
CKE_HTTP_PORT = 10180  # cke's default --http port, on each node's own address
SABAKAN_HTTP_PORT = 10080
SABAKAN_HTTPS_PORT = 10443
PROGRAMS = ("cke", "sabakan", "rivers")
T = TypeVar("T")


# --- installing the programs ---------------------------------------------------------------


def _interpreter() -> str:
    """A Python every user of a node may run, of the venv's version.

    Installed by ``pip``, the entry points run a Python under /usr. The venv's own
    interpreter may live in root's home (pyenv): a ``DynamicUser=`` service cannot enter
    /root (0700) and ``ProtectHome=yes`` hides it, so use the system's Python of the same
    minor version then, with the venv's packages on its path.
    """
    real = Path(sys.executable).resolve()
    if not any(home == real or home in real.parents for home in (Path("/root"), Path("/home"))):
        return str(real)
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        pytest.fail(f"the venv's Python is under a home directory and {system} is missing")
    return str(system)


# Where the project and its dependencies are installed on the admin hosts. Not their
# host paths: a checkout under /tmp (CI's clone) would be hidden from the units by
# PrivateTmp=, as any program installed under /tmp would be.
INSTALL_SOURCE = "/opt/cke-py/src"
INSTALL_SITE = "/opt/cke-py/site-packages"


def install_binds(bin_dir: Path) -> list[Bind]:
    """The entry points on /usr/local/bin, the source and the dependencies under /opt."""
    return [
        Bind(str(bin_dir), "/usr/local/bin"),
        # The packages, not the checkout: a checkout made with ``mktemp -d`` is mode 0700,
        # and through a bind of it rivers' DynamicUser= could not import anything.
        *(Bind(str(REPO / package), f"{INSTALL_SOURCE}/{package}") for package in PROGRAMS),
        Bind(sysconfig.get_paths()["purelib"], INSTALL_SITE),
    ]


def write_entry_points(directory: Path) -> None:
    """``/usr/local/bin/{cke,sabakan,rivers}``: what ``[project.scripts]`` names them."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    path = f"{INSTALL_SOURCE}:{INSTALL_SITE}"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    for name in PROGRAMS:
        module, _, function = scripts[name].partition(":")
        script = directory / name
        script.write_text(
            "#!/bin/sh\n"
            f"# cke-py's {name} entry point ({scripts[name]})\n"
            f"export PYTHONPATH={path}\n"
            f"exec {_interpreter()} -c 'import sys; from {module} import {function}; "
            f'sys.exit({function}())\' "$@"\n'
        )
        script.chmod(0o755)


def install_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


# --- systemctl and journalctl, as an operator reads them -------------------------------------


async def show(node: SystemdNode, unit: str, *props: str) -> dict[str, str]:
    result = await node.exec("systemctl", "show", unit, *(f"--property={p}" for p in props))
    assert result.ok, result.stderr.decode()
    pairs = (line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


async def systemctl(node: SystemdNode, *args: str) -> None:
    result = await node.exec("systemctl", *args)
    assert result.ok, f"systemctl {' '.join(args)}: {result.stderr.decode().strip()}"


async def journal(node: SystemdNode, *matches: str, since: float = 0.0) -> list[str]:
    """MESSAGE of each journal entry matching ``matches`` logged at ``since`` or later."""
    result = await node.exec("journalctl", "--no-pager", "--output=json", *matches)
    assert result.ok, result.stderr.decode()
    messages = []
    for line in result.stdout.decode().splitlines():
        entry = json.loads(line)
        if int(entry["__REALTIME_TIMESTAMP"]) / 1e6 >= since and isinstance(
            entry.get("MESSAGE"), str
        ):
            messages.append(entry["MESSAGE"])
    return messages


def json_msgs(lines: list[str]) -> list[str]:
    """The ``msg`` of each JSON log line (``--logformat json``)."""
    out = []
    for line in lines:
        if line.startswith("{"):
            out.append(json.loads(line)["msg"])
    return out


async def until(
    what: str, probe: Callable[[], Awaitable[T | None]], timeout: float, interval: float = 0.1
) -> tuple[T, float]:
    """Poll ``probe`` until it returns something (not None); (value, seconds taken)."""
    started = time.monotonic()
    while True:
        value = await probe()
        took = time.monotonic() - started
        if value is not None:
            return value, took
        assert took < timeout, f"{what}: not within {timeout}s"
        await asyncio.sleep(interval)


async def http_get(url: str, ssl_context: ssl.SSLContext | None = None) -> tuple[int, str] | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(url, ssl=ssl_context if ssl_context is not None else True) as resp,
        ):
            return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return None


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# --- the admin hosts -------------------------------------------------------------------------


@dataclass
class AdminHosts:
    bed: TestBed
    nodes: list[SystemdNode]
    client: Etcd3Client
    storage: Storage
    session_ttl: float

    def node(self, name: str) -> SystemdNode:
        return next(n for n in self.nodes if n.name == name)

    async def candidates(self) -> list[str]:
        return [name for _, _, name in await self.storage.leader_candidates()]

    async def leader(self) -> str | None:
        """Who leads, as ``ckecli leader`` reads it (the oldest ``leader/`` key)."""
        return await self.storage.get_leader_name()

    async def wait_leader_other_than(self, old: str, timeout: float) -> tuple[str, float]:
        async def probe() -> str | None:
            now = await self.leader()
            return now if now is not None and now != old else None

        return await until(f"a leader other than {old}", probe, timeout, interval=0.05)

    async def wait_running(self, node: SystemdNode, timeout: float = 60.0) -> str:
        """Wait until the node's cke unit runs and its replica campaigns; its MainPID."""

        async def probe() -> str | None:
            props = await show(node, "cke.service", "ActiveState", "SubState", "MainPID")
            if (props["ActiveState"], props["SubState"]) != ("active", "running"):
                return None
            return props["MainPID"] if node.name in await self.candidates() else None

        pid, _ = await until(f"cke on {node.name} campaigning", probe, timeout)
        return pid

    async def cke_metric(self, node: SystemdNode, name: str) -> float | None:
        got = await http_get(f"http://{node.address}:{CKE_HTTP_PORT}/metrics")
        return metric(got[1], name) if got is not None and got[0] == 200 else None


def cke_config(hosts_bed: TestBed) -> bytes:
    """``configs/cke.yml`` with the bed's endpoints; its certificate paths stay /etc/cke/."""
    doc = yaml.safe_load((CONFIGS / "cke.yml").read_text())
    doc["endpoints"] = hosts_bed.etcd.endpoints
    return yaml.safe_dump(doc, sort_keys=False).encode()


def install_etcd_client_files(bed: TestBed, root: Path, directory: str, cn: str) -> None:
    """The etcd CA, a client certificate and its key (0600), where the configs name them."""
    client = bed.ca.issue(f"{directory.strip('/').replace('/', '-')}-{cn}", cn, server=False)
    base = root / directory.strip("/")
    install_file(base / "etcd-ca.crt", bed.ca.ca_path.read_bytes())
    install_file(base / "etcd-client.crt", client.cert.read_bytes())
    install_file(base / "etcd-client.key", client.key.read_bytes(), 0o600)


@pytest.fixture(scope="module")
async def hosts() -> AsyncIterator[AdminHosts]:
    bed = TestBed(BedConfig(etcd_members=1, nodes=0, vault=False))
    nodes: list[SystemdNode] = []
    client: Etcd3Client | None = None
    try:
        await bed.start()
        bin_dir = bed.base_dir / "admin" / "bin"
        write_entry_points(bin_dir)
        public_key = Path(f"{bed.ssh_key_path}.pub").read_text()
        prefix = pick_node_subnet(3)
        nodes = [
            SystemdNode(
                f"cke{i}",
                f"{prefix}.{i}",
                bed.base_dir / "admin" / f"cke{i}",
                public_key,
                binds=install_binds(bin_dir),
            )
            for i in (1, 2, 3)
        ]
        await asyncio.gather(*(n.start() for n in nodes))
        for node in nodes:
            for unit in UNITS.glob("*.service"):
                install_file(node.root / "etc/systemd/system" / unit.name, unit.read_bytes())
            install_etcd_client_files(bed, node.root, "/etc/cke", "cke")
            install_file(node.root / "etc/cke/config.yml", cke_config(bed))
            # Three replicas share one network here: each serves /metrics and /health on
            # its own address (cke's default --http is every address, port 10180).
            install_file(
                node.root / "etc/default/cke",
                f"CKE_OPTS=--http {node.address}:{CKE_HTTP_PORT}\n".encode(),
            )
            await systemctl(node, "daemon-reload")
            fragment = await show(node, "cke.service", "FragmentPath")
            assert fragment["FragmentPath"] == "/etc/systemd/system/cke.service"
        await asyncio.gather(*(systemctl(n, "enable", "--now", "cke.service") for n in nodes))
        client = make_client(bed.etcd.settings("/cke/"))
        await client.connect()
        admin = AdminHosts(bed, nodes, client, Storage(client, "/cke/"), 0.0)
        for node in nodes:
            await admin.wait_running(node)
        started = json.loads(
            next(
                line
                for line in await journal(nodes[0], "_SYSTEMD_UNIT=cke.service")
                if '"cke started"' in line
            )
        )
        admin.session_ttl = float(started["session_ttl"])
        yield admin
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)
        if client is not None:
            await client.close()
        await bed.stop()


# --- cke ----------------------------------------------------------------------------------


async def test_kill_9_of_the_leader_is_restarted_by_systemd_and_leadership_moves(
    hosts: AdminHosts,
) -> None:
    leader, _ = await until("a cke leader", hosts.leader, 30)
    node = hosts.node(leader)
    assert await hosts.cke_metric(node, "cke_leader") == 1.0
    before = await show(node, "cke.service", "MainPID", "NRestarts", "RestartUSec")
    restart_sec = parse_duration(before["RestartUSec"])

    killed_at, killed_wall = time.monotonic(), time.time()
    assert (await node.exec("kill", "-9", before["MainPID"])).ok

    new_leader, handover = await hosts.wait_leader_other_than(leader, hosts.session_ttl + 10)
    assert new_leader in {"cke1", "cke2", "cke3"} - {leader}

    async def restarted() -> dict[str, str] | None:
        props = await show(
            node,
            "cke.service",
            "MainPID",
            "NRestarts",
            "ActiveState",
            "SubState",
            "ExecMainStartTimestampMonotonic",
        )
        running = (props["ActiveState"], props["SubState"]) == ("active", "running")
        return props if running and props["MainPID"] != before["MainPID"] else None

    after, _ = await until("systemd restarting cke", restarted, restart_sec + 30)
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    restart = int(after["ExecMainStartTimestampMonotonic"]) / 1e6 - killed_at
    assert restart_sec <= restart < restart_sec + 5, f"restarted {restart:.1f}s after the kill"
    systemd_said = await journal(node, "--unit=cke.service", since=killed_wall)
    assert any("code=killed, status=9/KILL" in m for m in systemd_said), systemd_said

    # The restarted replica campaigns again, behind the others: the leader stays.
    await hosts.wait_running(node)
    assert await hosts.leader() == new_leader
    assert await hosts.cke_metric(hosts.node(new_leader), "cke_leader") == 1.0
    print(
        f"\nkill -9 of {leader}: restarted by systemd after {restart:.2f}s "
        f"(RestartSec={restart_sec:g}s); {new_leader} leads after {handover:.2f}s "
        f"(session TTL {hosts.session_ttl:g}s)"
    )


async def test_systemctl_stop_of_the_leader_hands_over_at_once(hosts: AdminHosts) -> None:
    leader, _ = await until("a cke leader", hosts.leader, hosts.session_ttl + 10)
    node = hosts.node(leader)
    pid = (await show(node, "cke.service", "MainPID"))["MainPID"]
    try:
        stopped_at = time.monotonic()
        await systemctl(node, "stop", "cke.service")
        stop_took = time.monotonic() - stopped_at
        new_leader, _ = await hosts.wait_leader_other_than(leader, hosts.session_ttl)
        handover = time.monotonic() - stopped_at
        # A resigned key hands over at once; waiting out the lease would take the TTL.
        assert handover < hosts.session_ttl / 3, f"{new_leader} led after {handover:.2f}s"

        props = await show(
            node, "cke.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus"
        )
        assert props["ActiveState"] == "inactive"
        assert props["Result"] == "success"
        assert (props["ExecMainCode"], props["ExecMainStatus"]) == ("1", "0")  # exited 0
        said = json_msgs(await journal(node, "_SYSTEMD_UNIT=cke.service", f"_PID={pid}"))
        assert said[-2:] == ["resigned leadership", "cke stopped"], said
        print(
            f"\nsystemctl stop of {leader}: stopped in {stop_took:.2f}s; {new_leader} "
            f"leads {handover:.2f}s after the stop began (session TTL {hosts.session_ttl:g}s)"
        )
    finally:
        await systemctl(node, "start", "cke.service")
        await hosts.wait_running(node)


@pytest.mark.parametrize(
    ("name", "broken", "error"),
    [
        (
            "unknown key",
            lambda good: good.replace("endpoints:", "endpoint:", 1),
            "cke: /etc/cke/config.yml: endpoint: Extra inputs are not permitted",
        ),
        (
            "YAML syntax",
            lambda good: "endpoints: [\n  - oops\n" + good,
            "cke: /etc/cke/config.yml: invalid YAML at line 2, column 3",
        ),
    ],
    ids=["unknown-key", "yaml-syntax"],
)
async def test_a_bad_config_fails_the_unit_with_one_line_in_the_journal(
    hosts: AdminHosts, name: str, broken: Callable[[str], str], error: str
) -> None:
    leader, _ = await until("a cke leader", hosts.leader, hosts.session_ttl + 10)
    node = next(n for n in hosts.nodes if n.name != leader)
    config = node.root / "etc/cke/config.yml"
    good = config.read_text()
    since = time.time()
    try:
        install_file(config, broken(good).encode())
        await systemctl(node, "restart", "cke.service")

        async def failed() -> dict[str, str] | None:
            props = await show(
                node,
                "cke.service",
                "ActiveState",
                "SubState",
                "Result",
                "ExecMainStatus",
                "ExecMainPID",
            )
            state = (props["ActiveState"], props["SubState"])
            ok = state in {("activating", "auto-restart"), ("failed", "failed")}
            return props if ok and props["Result"] == "exit-code" else None

        props, _ = await until(f"cke failing on a bad config ({name})", failed, 30)
        assert props["ExecMainStatus"] == "1"
        said, _ = await until(
            "the error in the journal",
            lambda: _nonempty(
                journal(node, "_SYSTEMD_UNIT=cke.service", f"_PID={props['ExecMainPID']}")
            ),
            10,
        )
        assert said == [error]
        everything = "\n".join(await journal(node, "--unit=cke.service", since=since))
        assert "Traceback" not in everything
        # The others go on: a leader is still there, and it is not the broken replica.
        assert await hosts.leader() in {n.name for n in hosts.nodes} - {node.name}
    finally:
        install_file(config, good.encode())
        await systemctl(node, "restart", "cke.service")
        await hosts.wait_running(node)


async def _nonempty(lines: Awaitable[list[str]]) -> list[str] | None:
    got = await lines
    return got or None


# --- sabakan and rivers ---------------------------------------------------------------------


async def test_sabakan_runs_from_its_unit_and_serves_its_api_on_the_node_address(
    hosts: AdminHosts,
) -> None:
    node = hosts.nodes[0]
    bed = hosts.bed
    install_etcd_client_files(bed, node.root, "/etc/sabakan", "sabakan")
    server = bed.ca.issue("sabakan-server", "sabakan", client=False, ip_addresses=(node.address,))
    install_file(node.root / "etc/sabakan/server.crt", server.cert.read_bytes())
    install_file(node.root / "etc/sabakan/server.key", server.key.read_bytes(), 0o600)
    install_file(node.root / "etc/sabakan/client-ca.crt", bed.ca.ca_path.read_bytes())
    doc = yaml.safe_load((CONFIGS / "sabakan.yml").read_text())
    doc["etcd"]["endpoints"] = bed.etcd.endpoints
    doc["http"] = f"{node.address}:{SABAKAN_HTTP_PORT}"
    doc["https"] = f"{node.address}:{SABAKAN_HTTPS_PORT}"
    install_file(node.root / "etc/sabakan/sabakan.yml", yaml.safe_dump(doc).encode())

    await systemctl(node, "start", "sabakan.service")
    try:
        base = f"http://{node.address}:{SABAKAN_HTTP_PORT}"

        async def leading() -> dict[str, object] | None:
            got = await http_get(f"{base}/health")
            body = json.loads(got[1]) if got is not None and got[0] == 200 else None
            return body if body is not None and body.get("leader") else None

        health, took = await until("sabakan healthy and leading", leading, 30)
        assert health["health"] == "healthy"
        props = await show(node, "sabakan.service", "ActiveState", "SubState", "NRestarts")
        assert (props["ActiveState"], props["SubState"], props["NRestarts"]) == (
            "active",
            "running",
            "0",
        )
        # Mutations over plain HTTP from an allowed address (allow-ips: 127.0.0.1).
        machine = {"serial": "admin-1", "rack": 1, "role": "boot", "ipv4": ["10.13.0.1"]}
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.1", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(f"{base}/api/v1/machines", json=[machine]) as resp,
        ):
            assert resp.status == 201, await resp.text()
        # Reads over HTTPS, with the server certificate the config names.
        tls = ssl.create_default_context(cafile=str(bed.ca.ca_path))
        got = await http_get(
            f"https://{node.address}:{SABAKAN_HTTPS_PORT}/api/v1/machines?serial=admin-1", tls
        )
        assert got is not None and got[0] == 200, got
        assert [m["spec"]["serial"] for m in json.loads(got[1])] == ["admin-1"]
        # The unit made the directory for a `logfile:` (LogsDirectory=).
        assert (await node.exec("test", "-d", "/var/log/sabakan")).ok
        print(f"\nsabakan leading {took:.2f}s after systemctl start")
    finally:
        pid = (await show(node, "sabakan.service", "MainPID"))["MainPID"]
        await systemctl(node, "stop", "sabakan.service")
    props = await show(node, "sabakan.service", "ActiveState", "Result")
    assert (props["ActiveState"], props["Result"]) == ("inactive", "success")
    said = await journal(node, "_SYSTEMD_UNIT=sabakan.service", f"_PID={pid}")
    assert any('msg="sabakan stopping"' in line for line in said), said


async def _etcd_health_through(host: str, port: int, bed: TestBed) -> dict[str, str]:
    """GET /health of etcd over TLS (client certificate) through a TCP proxy."""
    assert bed.etcd.root_client is not None
    tls = ssl.create_default_context(cafile=str(bed.ca.ca_path))
    tls.load_cert_chain(str(bed.etcd.root_client.cert), str(bed.etcd.root_client.key))
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=tls, server_hostname="localhost"), 10
    )
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    health: dict[str, str] = json.loads(body)
    return health


async def _uids(node: SystemdNode, main_pid: str) -> list[int] | None:
    """The uid of rivers' main process and of its workers, once it has one."""
    ps = await node.exec("ps", "-o", "uid=", "-p", main_pid, "--ppid", main_pid)
    uids = [int(u) for u in ps.stdout.decode().split()]
    return uids if len(uids) >= 2 else None


async def _worker_forked(node: SystemdNode) -> bool | None:
    """Whether a rivers worker process exists (``python -m rivers.main``), seen from the host."""
    for pid in node.processes():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"rivers.main" in argv and b"-m" in argv:
            return True
    return None


async def test_rivers_runs_as_a_dynamic_user_and_proxies_to_etcd(hosts: AdminHosts) -> None:
    node = hosts.nodes[1]
    upstream_host, upstream_port = endpoint_host_port(hosts.bed.etcd.endpoints[0])
    listen = (node.address, 16443)
    metrics = (node.address, 16444)
    replace = {
        "RIVERS_LISTEN": f"{listen[0]}:{listen[1]}",
        "RIVERS_UPSTREAMS": f"{upstream_host}:{upstream_port}",
        "RIVERS_METRICS": f"{metrics[0]}:{metrics[1]}",
    }
    lines = []
    for line in (CONFIGS / "rivers.env").read_text().splitlines():
        key = line.partition("=")[0]
        lines.append(f"{key}={replace.pop(key)}" if key in replace else line)
    assert not replace, f"configs/rivers.env lacks {sorted(replace)}"
    install_file(node.root / "etc/rivers/rivers.env", ("\n".join(lines) + "\n").encode())

    last: list[tuple[int, str] | None] = [None]

    async def healthy() -> str | None:
        last[0] = got = await http_get(f"http://{metrics[0]}:{metrics[1]}/health")
        return got[1] if got is not None and got[0] == 200 else None

    # SIGTERM reaches every process of the unit at once (KillMode=control-group), and the
    # workers again from the main process; a stop must be clean whether the workers are
    # serving (the first round) or still starting (a stop the moment one is forked).
    for round_, serving in enumerate((True, False, False)):
        since = time.time()
        await systemctl(node, "start", "rivers.service")
        if serving:
            try:
                await until("rivers healthy", healthy, 30)
            except AssertionError as e:
                said = await journal(node, "--unit=rivers.service", since=since)
                state = await show(node, "rivers.service", "ActiveState", "SubState", "MainPID")
                raise AssertionError(
                    f"{e}; last /health answer {last[0]}; unit {state}\n" + "\n".join(said)
                ) from None
            props = await show(node, "rivers.service", "MainPID", "User", "DynamicUser")
            assert (props["User"], props["DynamicUser"]) == ("rivers", "yes")
            main_pid = props["MainPID"]
            uids, _ = await until("rivers workers", partial(_uids, node, main_pid), 15)
            assert len(set(uids)) == 1 and 0 not in uids, f"rivers runs as uid {uids}"
            health = await _etcd_health_through(*listen, hosts.bed)
            assert health["health"] == "true", health
        else:
            await until("a rivers worker", partial(_worker_forked, node), 30, interval=0.002)

        await systemctl(node, "stop", "rivers.service")
        props = await show(node, "rivers.service", "ActiveState", "Result", "ExecMainStatus")
        said = await journal(node, "--unit=rivers.service", since=since)
        assert (props["ActiveState"], props["Result"], props["ExecMainStatus"]) == (
            "inactive",
            "success",
            "0",
        ), f"round {round_}: {props}\n" + "\n".join(said)
