"""Specs, digests, status parsing and the exact scripts and unit files the runtimes produce.

The systemd runtime cannot run here (no systemd), so its unit file and commands are
checked as text, and every script of both runtimes goes through ``sh -n``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import subprocess

import pytest

from cke.nodes.runtime import (
    NodeFile,
    ProcessRuntime,
    Runtime,
    ServiceSpec,
    ServiceState,
    SystemdRuntime,
    runtime_for,
    systemd_quote,
)

KEY = (
    b"-----BEGIN EC PRIVATE KEY-----\nc2VjcmV0IGtleSBtYXRlcmlhbA==\n-----END EC PRIVATE KEY-----\n"
)
KEY_FILE = NodeFile("/etc/cke/etcd/server.key", KEY, 0o600)
CERT_FILE = NodeFile("/etc/cke/etcd/server.crt", b"certificate\n")
TRICKY_ARGS = (
    "--name",
    "node 1",
    'say "hi"',
    "cost=$HOME",
    "100%",
    "back\\slash",
    "it's",
    "line\nbreak",
    ";",
    "",
)
SPEC = ServiceSpec(
    "etcd",
    "/usr/local/bin/etcd",
    TRICKY_ARGS,
    (("ETCD_LOG_LEVEL", "info"), ("GREETING", 'a "b" $c 50% \\d')),
    (KEY_FILE, CERT_FILE),
)
RUNTIMES: list[Runtime] = [ProcessRuntime(), SystemdRuntime()]
DIGEST_A = "a" * 64


def sh_syntax_ok(script: bytes) -> None:
    checked = subprocess.run(["sh", "-n"], input=script, capture_output=True, timeout=10)
    assert checked.returncode == 0, checked.stderr.decode()


def heredocs(script: bytes) -> dict[str, bytes]:
    """Decoded content of every file a script writes, by path."""
    found = re.findall(
        r"^cke_write (\S+) (\d{4}) 'base64 -d' <<'(\w+)'.*?\n(.*?)^\3$",
        script.decode(),
        flags=re.M | re.S,
    )
    return {path: base64.b64decode(body) for path, _mode, _end, body in found}


# -- specs and digests ----------------------------------------------------------------------


def test_digest_is_the_sha256_of_the_documented_canonical_json() -> None:
    spec = ServiceSpec(
        "etcd",
        "/usr/local/bin/etcd",
        ("--name", "n1"),
        (("ETCD_X", "1"),),
        (NodeFile("/etc/cke/etcd/server.key", b"k", 0o600),),
    )
    canonical = (
        '{"args":["--name","n1"],"binary":"/usr/local/bin/etcd","env":[["ETCD_X","1"]],'
        '"files":[{"mode":"0600","path":"/etc/cke/etcd/server.key",'
        f'"sha256":"{hashlib.sha256(b"k").hexdigest()}"}}],"name":"etcd"}}'
    )
    assert spec.digest() == hashlib.sha256(canonical.encode()).hexdigest()
    # Pinned: a change of the format would make every running service look outdated.
    assert spec.digest() == "1c1a4b4c3d27553ab03305d13f900d343eec2f2b1d85e8228792915974037078"
    assert spec.digest() == dataclasses.replace(spec).digest()


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(SPEC, name="etcd2"),
        dataclasses.replace(SPEC, binary="/usr/bin/etcd"),
        dataclasses.replace(SPEC, args=SPEC.args[:-1]),
        dataclasses.replace(SPEC, args=(SPEC.args[1], SPEC.args[0], *SPEC.args[2:])),
        dataclasses.replace(SPEC, env=SPEC.env[:1]),
        dataclasses.replace(SPEC, env=(("ETCD_LOG_LEVEL", "debug"), SPEC.env[1])),
        dataclasses.replace(SPEC, files=(KEY_FILE,)),
        dataclasses.replace(SPEC, files=(dataclasses.replace(KEY_FILE, mode=0o640), CERT_FILE)),
        dataclasses.replace(SPEC, files=(dataclasses.replace(KEY_FILE, content=b"x"), CERT_FILE)),
        dataclasses.replace(
            SPEC, files=(dataclasses.replace(KEY_FILE, path="/etc/cke/k"), CERT_FILE)
        ),
    ],
)
def test_digest_changes_with_any_field(changed: ServiceSpec) -> None:
    assert changed.digest() != SPEC.digest()


def test_summary_has_paths_modes_and_digests_but_never_contents() -> None:
    summary = SPEC.summary()
    text = json.dumps(summary)
    for secret in (KEY, base64.b64encode(KEY), b"c2VjcmV0IGtleSBtYXRlcmlhbA=="):
        assert secret.decode() not in text
    assert "certificate" not in text
    assert summary["files"] == [
        {"path": KEY_FILE.path, "mode": "0600", "sha256": hashlib.sha256(KEY).hexdigest()},
        {"path": CERT_FILE.path, "mode": "0644", "sha256": CERT_FILE.digest},
    ]
    assert summary["digest"] == SPEC.digest()
    assert json.loads(SPEC.record_json()) == summary
    assert "c2VjcmV0" not in repr(SPEC) and "PRIVATE" not in repr(KEY_FILE)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ServiceSpec("etcd", "bin/etcd"),
        lambda: ServiceSpec("etcd", "/usr/bin/../bin/etcd"),
        lambda: ServiceSpec("etcd", "/usr/bin/my etcd"),
        lambda: ServiceSpec("../etcd", "/usr/bin/etcd"),
        lambda: ServiceSpec("et cd", "/usr/bin/etcd"),
        lambda: ServiceSpec("etcd", "/usr/bin/etcd", env=(("BAD-KEY", "v"),)),
        lambda: ServiceSpec("etcd", "/usr/bin/etcd", args=("a\0b",)),
        lambda: ServiceSpec("etcd", "/usr/bin/etcd", files=(KEY_FILE, KEY_FILE)),
        lambda: ServiceSpec("etcd", "/usr/bin/etcd", env=(("cke_log", "/etc/passwd"),)),
        lambda: ServiceSpec("etcd", "/usr/bin/etcd", env=(("cke_setsid", "/bin/sh"),)),
        lambda: ServiceSpec("etcd", "/usr/bin/etcd;touch /tmp/x"),
        lambda: ServiceSpec("etcd", "/opt/etcd/"),
        lambda: ServiceSpec("etcd", "/opt/my etcd"),
        lambda: NodeFile("etc/cke/k", b""),
        lambda: NodeFile("/etc/cke/../k", b""),
        lambda: NodeFile("/etc/cke/k", b"", mode=0o10000),
    ],
)
def test_invalid_specs_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_outdated_means_running_with_another_digest() -> None:
    other = dataclasses.replace(SPEC, args=())
    assert ServiceState("etcd", True, SPEC.digest(), 10).outdated(other)
    assert not ServiceState("etcd", True, SPEC.digest(), 10).outdated(SPEC)
    assert ServiceState("etcd", True, None, 10).outdated(SPEC)
    assert not ServiceState("etcd", False, SPEC.digest()).outdated(other)
    assert not ServiceState("etcd", False, None).outdated(SPEC)


def test_runtime_for() -> None:
    assert isinstance(runtime_for("process"), ProcessRuntime)
    assert isinstance(runtime_for("systemd"), SystemdRuntime)
    assert runtime_for("process").name == "process" and runtime_for("systemd").name == "systemd"
    with pytest.raises(ValueError):
        runtime_for("docker")


# -- scripts common to both runtimes --------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda r: r.name)
def test_all_scripts_pass_sh_syntax_check(runtime: Runtime) -> None:
    minimal = ServiceSpec("x", "/bin/true")
    for script in (
        runtime.start_script(SPEC),
        runtime.start_script(minimal),
        runtime.stop_script("etcd"),
        runtime.stop_script("etcd", timeout=0.05),
        runtime.status_script(["etcd", "rivers"]),
        runtime.status_script([]),
        runtime.remove_path_script("/var/lib/cke/etcd"),
    ):
        sh_syntax_ok(script)
        # Called only on the last line: a script cut short runs nothing.
        assert script.endswith(b"\n}\ncke_main </dev/null\n")


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda r: r.name)
def test_start_script_writes_files_with_modes_and_content_only_in_heredocs(
    runtime: Runtime,
) -> None:
    script = runtime.start_script(SPEC)
    assert KEY not in script and b"certificate" not in script
    written = heredocs(script)
    assert written[KEY_FILE.path] == KEY
    assert written[CERT_FILE.path] == b"certificate\n"
    assert json.loads(written["/var/lib/cke/specs/etcd.json"]) == SPEC.summary()
    text = script.decode()
    assert f"cke_write {KEY_FILE.path} 0600 'base64 -d'" in text
    assert f"cke_write {CERT_FILE.path} 0644 'base64 -d'" in text
    assert "cke_write /var/lib/cke/specs/etcd.json 0600 'base64 -d'" in text
    # The mode is set on the temporary file before any content is written into it.
    assert 'chmod "$2" "$cke_w_tmp" && $3 >"$cke_w_tmp" && mv -f -- "$cke_w_tmp" "$1"' in text
    assert f"cke_digest={SPEC.digest()}\n" in text


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/etc",
        "/var/lib/cke",
        "/var/lib/cke/",
        "/var/lib/cke/../x",
        "/var/lib/cke/./etcd",
        "/var/lib/cke//etcd",
        "var/lib/cke/etcd",
        "etcd",
        "",
        "/var/lib/ckeetcd",
        "/var/lib/cke/run",
        "/var/lib/cke/specs/etcd.json",
        "/var/lib/cke/log",
        "/var/lib/cke/etcd\nrm -rf /",
    ],
)
@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda r: r.name)
def test_remove_path_refuses_paths_outside_the_state_dir(runtime: Runtime, path: str) -> None:
    with pytest.raises(ValueError):
        runtime.remove_path_script(path)


def test_remove_path_script_removes_the_quoted_path_after_resolving_its_parent() -> None:
    text = ProcessRuntime().remove_path_script("/var/lib/cke/etcd data").decode()
    assert "cke_target='/var/lib/cke/etcd data'\n" in text
    assert 'rm -rf -- "$cke_target"' in text
    assert 'cke_parent=$(readlink -f -- "$(dirname -- "$cke_target")")' in text


# -- status parsing -------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda r: r.name)
def test_parse_status(runtime: Runtime) -> None:
    output = (
        b"some noise from a profile script\n"
        b'{"service":"etcd","running":true,"pid":1234,"digest":"' + DIGEST_A.encode() + b'"}\n'
        b'{"service":"rivers","running":false,"pid":null,"digest":null}\n'
        b'{"service":"stale","running":false,"pid":99,"digest":"not-a-digest"}\n'
        b'{"service":"other","running":true,"pid":1,"digest":null}\n'
        b"{broken json\n"
    )
    states = runtime.parse_status(output, ["etcd", "rivers", "stale"])
    assert states == {
        "etcd": ServiceState("etcd", True, DIGEST_A, 1234),
        "rivers": ServiceState("rivers", False, None, None),
        "stale": ServiceState("stale", False, None, None),
    }


def test_parse_status_refuses_output_without_a_named_service() -> None:
    output = b'{"service":"etcd","running":true,"pid":1,"digest":null}\n'
    with pytest.raises(ValueError, match="rivers"):
        ProcessRuntime().parse_status(output, ["etcd", "rivers"])
    with pytest.raises(ValueError):
        ProcessRuntime().parse_status(output[:30], ["etcd"])
    with pytest.raises(TypeError):
        ProcessRuntime().parse_status(output, "etcd")


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda r: r.name)
def test_status_script_names_each_service_once(runtime: Runtime) -> None:
    text = runtime.status_script(["etcd", "rivers"]).decode()
    calls = [line for line in text.splitlines() if line.startswith("cke_status ")]
    assert len(calls) == 2 and calls[0].startswith("cke_status etcd ")
    assert calls[1].startswith("cke_status rivers ")
    with pytest.raises(ValueError):
        runtime.status_script(["etcd; reboot"])


# -- process runtime ------------------------------------------------------------------------


def test_process_start_script_launch_line() -> None:
    rt = ProcessRuntime()
    assert rt.pidfile("etcd") == "/var/lib/cke/run/etcd.pid"
    assert rt.log_path("etcd") == "/var/lib/cke/log/etcd.log"
    text = rt.start_script(SPEC).decode()
    assert (
        "\tPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; export PATH\n"
        "\tETCD_LOG_LEVEL=info; export ETCD_LOG_LEVEL\n"
        "\tGREETING='a \"b\" $c 50% \\d'; export GREETING\n"
        "\texec \"$1\" /usr/local/bin/etcd --name 'node 1' 'say \"hi\"' "
        "'cost=$HOME' 100% 'back\\slash' 'it'\"'\"'s' 'line\nbreak' ';' ''\n) &\n"
    ) in text
    # The log and setsid are fixed before the spec's variables are set.
    launch = text[text.index("(\n\texec") :]
    assert launch.index('\texec >>"$cke_log" 2>&1 </dev/null\n\tset -- "$cke_setsid"\n') == 2
    assert launch.index('set -- "$cke_setsid"') < launch.index("ETCD_LOG_LEVEL=info")
    with_path = dataclasses.replace(SPEC, env=(("PATH", "/opt/bin"),))
    assert "PATH=/usr/local/sbin" not in rt.start_script(with_path).decode()


def test_process_stop_script_waits_the_timeout_in_tenths() -> None:
    text = ProcessRuntime().stop_script("etcd", timeout=2.5).decode()
    assert text.endswith('cke_stop "$cke_pidfile" 25\n}\ncke_main </dev/null\n')
    assert "cke_pidfile=/var/lib/cke/run/etcd.pid\n" in text


# -- systemd runtime ------------------------------------------------------------------------


def test_systemd_unit_text_is_exact() -> None:
    assert SystemdRuntime().unit_text(SPEC) == (
        "[Unit]\n"
        "Description=cke etcd\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        'Environment="ETCD_LOG_LEVEL=info"\n'
        'Environment="GREETING=a \\"b\\" $c 50%% \\\\d"\n'
        'ExecStart="/usr/local/bin/etcd" "--name" "node 1" "say \\"hi\\"" "cost=$$HOME" '
        '"100%%" "back\\\\slash" "it\'s" "line\\nbreak" \\; ""\n'
        "Restart=always\n"
        "RestartSec=1\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def test_systemd_quote() -> None:
    assert systemd_quote("a b", exec_line=True) == '"a b"'
    assert systemd_quote("$X%i", exec_line=True) == '"$$X%%i"'
    assert systemd_quote("$X%i", exec_line=False) == '"$X%%i"'
    assert systemd_quote('\\"\t\x01', exec_line=False) == '"\\\\\\"\\t\\x01"'


def test_systemd_start_script_commands_in_order() -> None:
    rt = SystemdRuntime()
    assert rt.unit_path("etcd") == "/etc/systemd/system/cke-etcd.service"
    script = rt.start_script(SPEC)
    written = heredocs(script)
    assert written["/etc/systemd/system/cke-etcd.service"] == rt.unit_text(SPEC).encode()
    text = script.decode()
    assert "cke_unit=cke-etcd.service\n" in text
    steps = [
        f"cke_write {KEY_FILE.path} 0600",
        'systemctl is-active --quiet "$cke_unit"',
        "cke_write /etc/systemd/system/cke-etcd.service 0644",
        "cke_write /var/lib/cke/specs/etcd.json 0600",
        'systemctl daemon-reload || cke_die "systemctl daemon-reload failed"\n',
        'systemctl enable --quiet "$cke_unit" || cke_die "cannot enable $cke_unit"\n',
        'systemctl restart "$cke_unit" || cke_die "cannot restart $cke_unit"\n',
        'cke_state=$(systemctl show --property=ActiveState --value "$cke_unit")\n',
        'journalctl --unit="$cke_unit" --lines=20 --no-pager >&2\n',
    ]
    positions = [text.index(step) for step in steps]
    assert positions == sorted(positions)


def test_systemd_stop_and_status_scripts() -> None:
    rt = SystemdRuntime()
    stop = rt.stop_script("etcd", timeout=7.2).decode()
    assert "cke_unit=cke-etcd.service\n" in stop and "cke_timeout=8\n" in stop
    for command in (
        '[ "$(systemctl show --property=LoadState --value "$cke_unit")" = not-found ] && exit 0',
        'systemctl disable --quiet "$cke_unit"',
        'if ! timeout "$cke_timeout" systemctl stop "$cke_unit"; then',
        'systemctl kill --signal=SIGKILL "$cke_unit"',
    ):
        assert command in stop
    status = rt.status_script(["etcd"]).decode()
    assert 'systemctl show --property=ActiveState,MainPID "$2"' in status
    assert "cke_status etcd cke-etcd.service /var/lib/cke/specs/etcd.json\n" in status


def test_start_args_are_passed_but_not_part_of_the_digest() -> None:
    plain = ServiceSpec("etcd", "/usr/local/bin/etcd", ("--name=a",))
    joining = dataclasses.replace(plain, start_args=("--initial-cluster-state=existing",))
    assert joining.digest() == plain.digest()
    assert b"--initial-cluster-state=existing" in ProcessRuntime().start_script(joining)
    unit = SystemdRuntime().unit_text(joining)
    assert 'ExecStart="/usr/local/bin/etcd" "--name=a" "--initial-cluster-state=existing"' in unit


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda r: r.name)
def test_write_files_script_writes_only_the_files(runtime: Runtime) -> None:
    script = runtime.write_files_script([KEY_FILE, CERT_FILE])
    sh_syntax_ok(script)
    assert KEY not in script  # contents travel base64-encoded in heredocs only
    assert base64.encodebytes(KEY) in script
    assert b"0600" in script
    assert b"systemctl" not in script and b"setsid" not in script
    with pytest.raises(ValueError, match="twice"):
        runtime.write_files_script([KEY_FILE, KEY_FILE])


def test_a_required_path_gates_systemd_starts_but_not_cke_first_start() -> None:
    rt = SystemdRuntime()
    spec = dataclasses.replace(SPEC, requires_path="/var/lib/cke/etcd/member")
    assert spec.digest() != SPEC.digest()  # running members get the guarded unit
    unit = rt.unit_text(spec)
    assert unit.startswith(
        "[Unit]\nDescription=cke etcd\n"
        "ConditionPathExists=|/var/lib/cke/etcd/member\n"
        "ConditionPathExists=|/var/lib/cke/run/etcd.first-start\n\n[Service]\n"
    )
    assert "ConditionPathExists" not in rt.unit_text(SPEC)
    text = rt.start_script(spec).decode()
    sh_syntax_ok(text.encode())
    steps = [
        "if [ ! -e /var/lib/cke/etcd/member ]; then\n",
        ': >"$cke_first"',
        'systemctl restart "$cke_unit"',
        'rm -f -- "$cke_first"\n',
        'if [ "$cke_state" != active ]; then',
    ]
    positions = [text.index(step) for step in steps]
    assert positions == sorted(positions)
    assert "cke_first=/var/lib/cke/run/etcd.first-start\n" in text
    with pytest.raises(ValueError, match="requires_path"):
        dataclasses.replace(SPEC, requires_path="relative/member")


@pytest.mark.parametrize(
    ("state", "settling"),
    [
        ("starting", "starting"),
        ("initializing", "initializing"),
        ("stopping", "stopping"),
        ("running", None),
        ("degraded", None),
        ("", None),
    ],
)
def test_systemd_status_says_when_the_node_boots_or_shuts_down(
    state: str, settling: str | None
) -> None:
    rt = SystemdRuntime()
    script = rt.status_script(["etcd"]).decode()
    assert 'echo "cke-system-state=$(systemctl is-system-running 2>/dev/null)"' in script
    output = f'cke-system-state={state}\n{{"service":"etcd","running":false}}\n'.encode()
    assert rt.settling(output) == settling
    assert rt.parse_status(output, ["etcd"])["etcd"].running is False
    assert ProcessRuntime().settling(output) is None  # no systemd: never settling


@pytest.mark.parametrize(
    ("line", "settling"),
    [
        ("cke-unit-transition=cke-etcd.service:deactivating", "cke-etcd.service deactivating"),
        ("cke-unit-transition=cke-etcd.service:activating", "cke-etcd.service activating"),
        ("cke-unit-transition=cke-etcd.service:active", None),
    ],
)
def test_a_unit_on_its_way_between_states_makes_the_node_settling(
    line: str, settling: str | None
) -> None:
    rt = SystemdRuntime()
    assert "cke-unit-transition=$2:$cke_a" in rt.status_script(["etcd"]).decode()
    output = f'cke-system-state=running\n{line}\n{{"service":"etcd","running":false}}\n'
    assert rt.settling(output.encode()) == settling
