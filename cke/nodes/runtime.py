"""How cke runs a managed service on a node: the spec, and the scripts that apply it.

A service is described by a ``ServiceSpec`` (binary, arguments, environment and the
files it needs). A runtime turns specs into POSIX ``sh`` scripts that are fed to
``sh -s`` on the node's standard input, so that file contents and environment values
never appear in any process's argv (and so in ``ps``). Every script wraps its body in
a function that is called only on the last line: a script cut short in transit is a
syntax error and runs nothing, instead of running half of its steps.

Two runtimes exist: ``systemd`` (production; one unit per service) and ``process``
(hosts without systemd, and the test bed; a detached process with a pidfile). Both
record the spec a service was started with in ``/var/lib/cke/specs/<name>.json``;
its ``digest`` is how the status tells a current service from an outdated one.

Status output is one JSON line per service::

    {"service":"etcd","running":true,"pid":1234,"digest":"<sha256 hex>"}

``pid`` and ``digest`` are ``null`` when unknown; lines that are not such objects
are ignored by ``parse_status``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import posixpath
import re
import shlex
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cke.common.fields import binary_path_problem, env_name_problem
from cke.nodes.ssh import CommandResult, NodeConnection

STATE_DIR = "/var/lib/cke"
SPEC_DIR = f"{STATE_DIR}/specs"
RUN_DIR = f"{STATE_DIR}/run"
LOG_DIR = f"{STATE_DIR}/log"
SYSTEMD_UNIT_DIR = "/etc/systemd/system"
# The PATH a process-runtime service gets unless its spec sets one (systemd's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Directories the runtime itself keeps under STATE_DIR; remove_path_script refuses them.
_RUNTIME_DIRS = frozenset({SPEC_DIR, RUN_DIR, LOG_DIR})

# Service names end up in paths, unit names and shell words: keep them plain.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# How long a started process must stay alive before start counts as a success.
_SETTLE_SECONDS = "0.3"
_HEREDOC_END = "CKE_EOF_7f3a"
# The systemd runtime's status line for the node itself, and the states in which units
# start and stop on their own (a boot, a shutdown): cke leaves such a node alone.
_SYSTEM_MARK = b"cke-system-state="
_SETTLING_STATES = frozenset({"initializing", "starting", "stopping"})
# A unit on its way between states (systemd's auto-restart wait, a stop in progress):
# an operation now would race systemd or cancel the job of whoever asked for it.
_UNIT_MARK = b"cke-unit-transition="
_UNIT_TRANSITIONS = frozenset({"activating", "deactivating", "reloading", "refreshing"})


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid service name {name!r}")


def _check_abs_path(path: str, what: str) -> None:
    if (
        not path.startswith("/")
        or posixpath.normpath(path) != path
        or path == "/"
        or "\n" in path
        or "\0" in path
    ):
        raise ValueError(f"{what} must be a normalised absolute path, got {path!r}")


@dataclass(frozen=True)
class NodeFile:
    """A file a service needs on the node, written atomically with ``mode``."""

    path: str  # absolute
    content: bytes = field(repr=False)  # may be a private key: never logged, never in argv
    mode: int = 0o644

    def __post_init__(self) -> None:
        _check_abs_path(self.path, "file path")
        if not 0 <= self.mode <= 0o7777:
            raise ValueError(f"invalid mode {self.mode:o} for {self.path}")

    @property
    def digest(self) -> str:
        """sha256 hex of the content."""
        return hashlib.sha256(self.content).hexdigest()

    def summary(self) -> dict[str, str]:
        return {"path": self.path, "mode": f"{self.mode:04o}", "sha256": self.digest}


@dataclass(frozen=True)
class ServiceSpec:
    """Everything that defines one managed service; equal specs have equal digests."""

    name: str  # "etcd"; the systemd unit is cke-<name>
    binary: str  # absolute
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    files: tuple[NodeFile, ...] = ()
    # Arguments that matter only when the service starts from nothing (etcd's
    # --initial-cluster flags, ignored once its data exists). They are passed at every
    # start but are not part of the digest: a change of them does not make a running
    # service outdated.
    start_args: tuple[str, ...] = ()
    # A path without which the service must not start on its own (systemd's Restart= or
    # a boot): etcd's member directory. A member whose data was lost must not come back
    # with its old identity; only cke starts it again (from nothing, with start_args).
    requires_path: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.requires_path is not None:
            _check_abs_path(self.requires_path, "requires_path")
        # The cluster validator applies the same checks (cke.common.fields), so a stored
        # cluster never gets here with a value that raises.
        problem = binary_path_problem(self.binary)
        if problem is not None:
            raise ValueError(f"{self.name}: binary {problem}")
        for arg in (*self.args, *self.start_args):
            if "\0" in arg:
                raise ValueError(f"{self.name}: argument contains NUL")
        for key, value in self.env:
            problem = env_name_problem(key)
            if problem is not None:
                raise ValueError(f"{self.name}: environment variable {problem}")
            if "\0" in value:
                raise ValueError(f"{self.name}: environment value of {key} contains NUL")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError(f"{self.name}: a file path is given twice")

    def _canonical(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "name": self.name,
            "binary": self.binary,
            "args": list(self.args),
            "env": [[k, v] for k, v in self.env],
            "files": [f.summary() for f in self.files],
        }
        if self.requires_path is not None:
            record["requires_path"] = self.requires_path
        return record

    def digest(self) -> str:
        """sha256 of the canonical JSON of the spec, with files as (path, mode, sha256)."""
        text = json.dumps(self._canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """The spec record written on the node: JSON-able, never any file content."""
        record = self._canonical()
        record["digest"] = self.digest()
        return record

    def record_json(self) -> bytes:
        """The spec record as written on the node (compact; the status scripts grep it)."""
        return json.dumps(self.summary(), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ServiceState:
    name: str
    running: bool
    # Digest of the spec the service was last started with (None: never started by cke,
    # or the spec record is missing).
    digest: str | None
    pid: int | None = None

    def outdated(self, spec: ServiceSpec) -> bool:
        """Running, but with another spec than ``spec``."""
        return self.running and self.digest != spec.digest()


# -- shell building blocks -----------------------------------------------------------------

# Shared helper functions. All take their arguments as positional parameters so that no
# value is ever spliced into code unquoted.
_SH_LIB = r"""
cke_die() {
	echo "cke: $*" >&2
	exit 1
}

# cke_write PATH MODE FILTER: atomically replace PATH by FILTER(stdin). The temporary file
# lives in the same directory (so mv is a rename) and gets its mode before any byte of
# content, so a key is never readable by others, not even for an instant.
cke_write() {
	cke_w_dir=$(dirname -- "$1") || return 1
	mkdir -p -- "$cke_w_dir" || return 1
	cke_w_tmp=$(mktemp "$cke_w_dir/.cke-tmp.XXXXXX") || return 1
	if chmod "$2" "$cke_w_tmp" && $3 >"$cke_w_tmp" && mv -f -- "$cke_w_tmp" "$1"; then
		return 0
	fi
	rm -f -- "$cke_w_tmp"
	return 1
}

# cke_recorded_digest SPECFILE: the digest of the spec record, or nothing.
cke_recorded_digest() {
	if [ -f "$1" ]; then
		sed -n 's/.*"digest":"\([0-9a-f]\{64\}\)".*/\1/p' "$1" | head -n 1
	fi
}

# cke_json_status NAME RUNNING PID DIGEST: one status line (all values are plain words).
cke_json_status() {
	cke_j_pid=null
	case $3 in '' | *[!0-9]*) ;; *) cke_j_pid=$3 ;; esac
	cke_j_digest=null
	[ -n "$4" ] && cke_j_digest="\"$4\""
	printf '{"service":"%s","running":%s,"pid":%s,"digest":%s}\n' \
		"$1" "$2" "$cke_j_pid" "$cke_j_digest"
}
"""

# Helpers of the process runtime. A pidfile holds three lines: PID, the process's start
# time (field 22 of /proc/PID/stat) and the boot id. Together they name one process
# exactly, so a PID reused by another process after a crash or a reboot is never taken for
# the service. (The executable is not compared: wrappers such as a venv's etcd script
# exec another binary, so /proc/PID/exe and cmdline legitimately differ from the spec's.)
_SH_PROCESS_LIB = r"""
cke_boot_id() {
	cat /proc/sys/kernel/random/boot_id 2>/dev/null
}

# cke_proc_stat PID: prints "STATE STARTTIME" of the process.
cke_proc_stat() {
	cke_s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	cke_s=${cke_s##*) }
	set -- $cke_s
	[ $# -ge 20 ] || return 1
	echo "$1 ${20}"
}

# cke_alive PIDFILE: succeeds (and sets cke_pid) while the recorded process runs.
cke_alive() {
	cke_pid=
	[ -f "$1" ] || return 1
	cke_a_pid=$(sed -n 1p "$1")
	cke_a_start=$(sed -n 2p "$1")
	cke_a_boot=$(sed -n 3p "$1")
	case $cke_a_pid in '' | *[!0-9]*) return 1 ;; esac
	[ -n "$cke_a_start" ] && [ "$cke_a_boot" = "$(cke_boot_id)" ] || return 1
	cke_a_stat=$(cke_proc_stat "$cke_a_pid") || return 1
	case $cke_a_stat in
	Z\ * | X\ * | x\ *) return 1 ;;
	*" $cke_a_start") cke_pid=$cke_a_pid ;;
	*) return 1 ;;
	esac
}

# cke_signal SIG PID: the service leads its own session and process group (setsid), so
# signal the whole group and take helpers it started along; fall back to the PID alone.
cke_signal() {
	kill -s "$1" -- "-$2" 2>/dev/null || kill -s "$1" "$2" 2>/dev/null || :
}

# cke_stop PIDFILE TICKS: SIGTERM, wait TICKS tenths of a second, then SIGKILL.
cke_stop() {
	if cke_alive "$1"; then
		cke_signal TERM "$cke_pid"
		cke_t=0
		while cke_alive "$1"; do
			if [ "$cke_t" -eq "$2" ]; then
				echo "cke: $1: process $cke_pid ignored SIGTERM; sending SIGKILL" >&2
				cke_signal KILL "$cke_pid"
			elif [ "$cke_t" -gt $(($2 + 100)) ]; then
				cke_die "process $cke_pid survives SIGKILL"
			fi
			sleep 0.1
			cke_t=$((cke_t + 1))
		done
	fi
	rm -f -- "$1"
}
"""


def _script(*parts: str) -> bytes:
    """Wrap the parts in a function called on the last line, with stdin from /dev/null.

    The body only runs once the whole script was read (see the module docstring), and no
    command in it can swallow the rest of the script from ``sh -s``'s standard input.
    """
    body = "\n".join(p.strip("\n") for p in parts if p)
    head = "cke_main() {\nset -u\numask 022\ncd / || exit 1\n"
    return f"{head}{body}\n}}\ncke_main </dev/null\n".encode()


def _q(value: str) -> str:
    return shlex.quote(value)


def _write_file_sh(path: str, mode: int, content: bytes) -> str:
    """Shell lines writing ``content`` to ``path`` atomically; content via a heredoc."""
    encoded = base64.encodebytes(content).decode()
    return (
        f"cke_write {_q(path)} {mode:04o} 'base64 -d' <<'{_HEREDOC_END}' ||"
        f" cke_die {_q('cannot write ' + path)}\n{encoded}{_HEREDOC_END}"
    )


def _files_sh(spec: ServiceSpec) -> str:
    return "\n".join(_write_file_sh(f.path, f.mode, f.content) for f in spec.files)


def _check_names(names: Sequence[str]) -> None:
    if isinstance(names, str):
        raise TypeError("names must be a sequence of names, not one string")
    for name in names:
        _check_name(name)


def spec_path(name: str) -> str:
    return f"{SPEC_DIR}/{name}.json"


class Runtime(ABC):
    """Turns specs into scripts for ``sh -s`` on a node, and reads their status output."""

    name: str

    @abstractmethod
    def start_script(self, spec: ServiceSpec) -> bytes:
        """Write the files and the spec record, then (re)start the service.

        Idempotent: running with the same digest is left alone; running with another
        digest is restarted. Exits non-zero, with a message on stderr, on failure.
        """

    def write_files_script(self, files: Sequence[NodeFile]) -> bytes:
        """Write ``files`` atomically (mode set before content), nothing else."""
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("a file path is given twice")
        return _script(_SH_LIB, "\n".join(_write_file_sh(f.path, f.mode, f.content) for f in files))

    @abstractmethod
    def stop_script(self, name: str, timeout: float = 20.0) -> bytes:
        """Stop the service; stopping a stopped or unknown service succeeds."""

    @abstractmethod
    def status_script(self, names: Sequence[str]) -> bytes:
        """Print one JSON status line per named service (see the module docstring)."""

    def parse_status(self, output: bytes, names: Sequence[str]) -> dict[str, ServiceState]:
        """The states of ``names`` from a status script's output.

        Raises ValueError if a named service has no line: a truncated output must not be
        read as "not running" (which could make the caller start a second instance).
        """
        _check_names(names)
        wanted = set(names)
        states: dict[str, ServiceState] = {}
        for line in output.decode(errors="replace").splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(item, dict) or item.get("service") not in wanted:
                continue
            pid = item.get("pid")
            digest = item.get("digest")
            running = item.get("running") is True
            states[item["service"]] = ServiceState(
                name=item["service"],
                running=running,
                digest=digest if isinstance(digest, str) and _DIGEST_RE.fullmatch(digest) else None,
                pid=pid if running and isinstance(pid, int) and pid > 0 else None,
            )
        missing = [n for n in names if n not in states]
        if missing:
            raise ValueError(f"status output has no line for {', '.join(missing)}")
        return states

    def settling(self, status_output: bytes) -> str | None:
        """Why the node's services are changing on their own right now (a boot, a
        shutdown, a unit starting or stopping), from a status script's output; None
        when they are settled."""
        return None

    def remove_path_script(self, path: str) -> bytes:
        """``rm -rf`` of a data directory under /var/lib/cke/ (ValueError for any other)."""
        if (
            not path.startswith(STATE_DIR + "/")
            or posixpath.normpath(path) != path
            or "\n" in path
            or "\0" in path
        ):
            raise ValueError(f"refusing to remove {path!r}: not a path under {STATE_DIR}/")
        if any(path == d or path.startswith(d + "/") for d in _RUNTIME_DIRS):
            raise ValueError(f"refusing to remove {path!r}: the runtime's own state")
        # The check above is textual; a symlinked parent could still point elsewhere, so
        # the script checks the resolved parent too before removing anything.
        return _script(
            _SH_LIB,
            f"cke_target={_q(path)}",
            r"""
[ -e "$cke_target" ] || [ -L "$cke_target" ] || exit 0
cke_root=$(readlink -f /var/lib/cke) || cke_die "cannot resolve /var/lib/cke"
cke_parent=$(readlink -f -- "$(dirname -- "$cke_target")") || cke_die "cannot resolve $cke_target"
case "$cke_parent/" in
"$cke_root"/*) ;;
*) cke_die "refusing to remove $cke_target: it resolves to $cke_parent, outside $cke_root" ;;
esac
rm -rf -- "$cke_target" || cke_die "cannot remove $cke_target"
""",
        )


class ProcessRuntime(Runtime):
    """Services as detached processes: for hosts without systemd, and the test bed.

    The process leads its own session (``setsid``), with stdin from /dev/null and output
    appended to its log, so it outlives the SSH session and sshd itself. Its environment
    is exactly the spec's, plus ``PATH=DEFAULT_PATH`` unless the spec sets PATH. Being
    started as a background job of ``sh``, it inherits SIGINT and SIGQUIT ignored (as
    with ``nohup`` for SIGHUP); stop uses SIGTERM. It must not daemonise itself (like
    systemd's Type=simple): a process that forks and exits counts as having died.
    """

    name = "process"

    @staticmethod
    def pidfile(name: str) -> str:
        return f"{RUN_DIR}/{name}.pid"

    @staticmethod
    def log_path(name: str) -> str:
        return f"{LOG_DIR}/{name}.log"

    def _names_sh(self, name: str) -> str:
        return (
            f"cke_name={_q(name)}\n"
            f"cke_pidfile={_q(self.pidfile(name))}\n"
            f"cke_log={_q(self.log_path(name))}\n"
            f"cke_spec={_q(spec_path(name))}"
        )

    def _launch_sh(self, spec: ServiceSpec) -> str:
        exports = []
        if not any(k == "PATH" for k, _ in spec.env):
            exports.append(f"PATH={_q(DEFAULT_PATH)}; export PATH")
        exports += [f"{k}={_q(v)}; export {k}" for k, v in spec.env]
        command = " ".join(_q(w) for w in (spec.binary, *spec.args, *spec.start_args))
        # In a subshell: drop every inherited variable (the SSH session's), export exactly
        # the spec's, and exec setsid, which execs the binary; so $! is the service's PID.
        # (Not `env -i K=V`: that would put the values in argv.) `command unset` keeps a
        # read-only variable from aborting the shell.
        return "\n".join(
            [
                'cke_setsid=$(command -v setsid) || cke_die "setsid not found on this node"',
                'mkdir -p -- "$(dirname -- "$cke_pidfile")" "$(dirname -- "$cke_log")" ||'
                ' cke_die "cannot create run and log directories"',
                "cke_size=0",
                '[ -f "$cke_log" ] && cke_size=$(wc -c <"$cke_log")',
                f'printf "%s cke: starting %s (spec %s)\\n" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"'
                f' "$cke_name" {_q(spec.digest())} >>"$cke_log"',
                "(",
                # Redirect and keep setsid's path in "$1" before any variable of the
                # spec is set: nothing the spec's environment names can change them.
                '\texec >>"$cke_log" 2>&1 </dev/null',
                '\tset -- "$cke_setsid"',
                "\tfor cke_v in $(env | sed -n 's/^\\([A-Za-z_][A-Za-z0-9_]*\\)=.*/\\1/p'); do",
                '\t\tcommand unset "$cke_v" 2>/dev/null',
                "\tdone",
                *[f"\t{line}" for line in exports],
                f'\texec "$1" {command}',
                ") &",
                "cke_new=$!",
                'cke_new_start=$(cke_proc_stat "$cke_new" | cut -d" " -f2)',
                'printf \'%s\\n%s\\n%s\\n\' "$cke_new" "$cke_new_start" "$(cke_boot_id)" |'
                ' cke_write "$cke_pidfile" 0644 cat || cke_die "cannot write $cke_pidfile"',
                f"sleep {_SETTLE_SECONDS}",
                'if ! cke_alive "$cke_pidfile"; then',
                f'\techo "cke: {spec.name} ({spec.binary}) exited right after start; log:" >&2',
                '\ttail -c +$((cke_size + 1)) "$cke_log" | tail -n 20 >&2',
                '\trm -f -- "$cke_pidfile"',
                "\texit 1",
                "fi",
            ]
        )

    def start_script(self, spec: ServiceSpec) -> bytes:
        digest = spec.digest()
        return _script(
            _SH_LIB,
            _SH_PROCESS_LIB,
            self._names_sh(spec.name),
            _files_sh(spec),
            f"cke_digest={digest}",
            r"""
if cke_alive "$cke_pidfile"; then
	[ "$(cke_recorded_digest "$cke_spec")" = "$cke_digest" ] && exit 0
	cke_stop "$cke_pidfile" 200
fi
""",
            _write_file_sh(spec_path(spec.name), 0o600, spec.record_json()),
            self._launch_sh(spec),
        )

    def stop_script(self, name: str, timeout: float = 20.0) -> bytes:
        _check_name(name)
        ticks = max(1, math.ceil(timeout * 10))
        return _script(
            _SH_LIB,
            _SH_PROCESS_LIB,
            self._names_sh(name),
            f'cke_stop "$cke_pidfile" {ticks}',
        )

    def status_script(self, names: Sequence[str]) -> bytes:
        _check_names(names)
        lines = [f"cke_status {_q(n)} {_q(self.pidfile(n))} {_q(spec_path(n))}" for n in names]
        return _script(
            _SH_LIB,
            _SH_PROCESS_LIB,
            r"""
cke_status() {
	if cke_alive "$2"; then cke_r=true; else cke_r=false; fi
	cke_json_status "$1" "$cke_r" "$cke_pid" "$(cke_recorded_digest "$3")"
}
""",
            "\n".join(lines),
        )


def systemd_quote(value: str, *, exec_line: bool) -> str:
    """``value`` as one double-quoted word of a unit file (systemd.syntax, systemd.service).

    Backslash and double quote are escaped, control characters become C escapes, ``%``
    becomes ``%%`` (no specifier expansion) and, on an Exec line, ``$`` becomes ``$$`` (no
    variable expansion; Environment= does not expand ``$``).
    """
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "%":
            out.append("%%")
        elif ch == "$" and exec_line:
            out.append("$$")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class SystemdRuntime(Runtime):
    """Services as systemd units ``cke-<name>.service`` (the production default)."""

    name = "systemd"

    @staticmethod
    def unit_name(name: str) -> str:
        return f"cke-{name}.service"

    @classmethod
    def unit_path(cls, name: str) -> str:
        return f"{SYSTEMD_UNIT_DIR}/{cls.unit_name(name)}"

    def unit_text(self, spec: ServiceSpec) -> str:
        # A lone ";" would separate commands on an Exec line; systemd reads "\;" as one.
        words = [
            "\\;" if arg == ";" else systemd_quote(arg, exec_line=True)
            for arg in (spec.binary, *spec.args, *spec.start_args)
        ]
        env = [f"Environment={systemd_quote(f'{k}={v}', exec_line=False)}" for k, v in spec.env]
        conditions = []
        if spec.requires_path is not None:
            # Either triggering condition ("|") lets it start: the path exists, or cke's
            # start script left its one-time permission for a start from nothing.
            conditions = [
                f"ConditionPathExists=|{path}"
                for path in (spec.requires_path, self.first_start_path(spec.name))
            ]
        return "\n".join(
            [
                "[Unit]",
                f"Description=cke {spec.name}",
                *conditions,
                "",
                "[Service]",
                "Type=simple",
                *env,
                f"ExecStart={' '.join(words)}",
                # systemd brings a crashed service back within a second, before cke's
                # next status round; after 5 quick failures it gives up (start limit) and
                # cke's next start reports the journal.
                "Restart=always",
                "RestartSec=1",
                "",
                "[Install]",
                "WantedBy=multi-user.target",
                "",
            ]
        )

    @staticmethod
    def first_start_path(name: str) -> str:
        return f"{RUN_DIR}/{name}.first-start"

    def _names_sh(self, name: str) -> str:
        return (
            f"cke_unit={_q(self.unit_name(name))}\ncke_spec={_q(spec_path(name))}\n"
            f"cke_first={_q(self.first_start_path(name))}"
        )

    def start_script(self, spec: ServiceSpec) -> bytes:
        return _script(
            _SH_LIB,
            self._names_sh(spec.name),
            _files_sh(spec),
            f"cke_digest={spec.digest()}",
            r"""
if [ "$(cke_recorded_digest "$cke_spec")" = "$cke_digest" ] &&
	systemctl is-active --quiet "$cke_unit"; then
	exit 0
fi
""",
            _write_file_sh(self.unit_path(spec.name), 0o644, self.unit_text(spec).encode()),
            _write_file_sh(spec_path(spec.name), 0o600, spec.record_json()),
            r"""
systemctl daemon-reload || cke_die "systemctl daemon-reload failed"
systemctl enable --quiet "$cke_unit" || cke_die "cannot enable $cke_unit"
# A unit that hit its start limit refuses to start until its failure is reset.
systemctl reset-failed "$cke_unit" 2>/dev/null
""",
            self._first_start_sh(spec),
            r"""
systemctl restart "$cke_unit" || cke_die "cannot restart $cke_unit"
sleep """
            + _SETTLE_SECONDS
            + r"""
cke_state=$(systemctl show --property=ActiveState --value "$cke_unit")
rm -f -- "$cke_first"
if [ "$cke_state" != active ]; then
	echo "cke: $cke_unit is $cke_state right after start; journal:" >&2
	journalctl --unit="$cke_unit" --lines=20 --no-pager >&2
	exit 1
fi
""",
        )

    def _first_start_sh(self, spec: ServiceSpec) -> str:
        """Permit this one start from nothing when the required path is missing."""
        if spec.requires_path is None:
            return ""
        return (
            f"if [ ! -e {_q(spec.requires_path)} ]; then\n"
            '\tmkdir -p -- "$(dirname -- "$cke_first")" && : >"$cke_first" ||'
            ' cke_die "cannot write $cke_first"\n'
            "fi"
        )

    def stop_script(self, name: str, timeout: float = 20.0) -> bytes:
        _check_name(name)
        seconds = max(1, math.ceil(timeout))
        return _script(
            _SH_LIB,
            self._names_sh(name),
            f"cke_timeout={seconds}",
            r"""
[ "$(systemctl show --property=LoadState --value "$cke_unit")" = not-found ] && exit 0
# Disabled too: a stopped service must not come back at the next boot before cke decides.
systemctl disable --quiet "$cke_unit" || cke_die "cannot disable $cke_unit"
if ! timeout "$cke_timeout" systemctl stop "$cke_unit"; then
	echo "cke: $cke_unit did not stop in ${cke_timeout}s; sending SIGKILL" >&2
	systemctl kill --signal=SIGKILL "$cke_unit"
	systemctl stop "$cke_unit" || cke_die "cannot stop $cke_unit"
fi
""",
        )

    def settling(self, status_output: bytes) -> str | None:
        for line in status_output.splitlines():
            if line.startswith(_SYSTEM_MARK):
                state = line[len(_SYSTEM_MARK) :].strip().decode(errors="replace")
                if state in _SETTLING_STATES:
                    return state
            elif line.startswith(_UNIT_MARK):
                unit, _, state = (
                    line[len(_UNIT_MARK) :].strip().decode(errors="replace").partition(":")
                )
                if state in _UNIT_TRANSITIONS:
                    return f"{unit} {state}"
        return None

    def status_script(self, names: Sequence[str]) -> bytes:
        _check_names(names)
        lines = [f"cke_status {_q(n)} {_q(self.unit_name(n))} {_q(spec_path(n))}" for n in names]
        return _script(
            _SH_LIB,
            # systemd's own view of the node: "starting" while it boots, "stopping" while
            # it shuts down (is-system-running exits non-zero for both: ignore that).
            f'echo "{_SYSTEM_MARK.decode()}$(systemctl is-system-running 2>/dev/null)"',
            r"""
cke_status() {
	cke_show=$(systemctl show --property=ActiveState,MainPID "$2" 2>/dev/null) || cke_show=
	cke_r=false
	cke_p=
	cke_a=$(echo "$cke_show" | sed -n 's/^ActiveState=//p')
	case $cke_a in
	activating | deactivating | reloading | refreshing) echo "cke-unit-transition=$2:$cke_a" ;;
	esac
	if [ "$cke_a" = active ]; then
		cke_r=true
		cke_p=$(echo "$cke_show" | sed -n 's/^MainPID=//p')
		[ "$cke_p" = 0 ] && cke_p=
	fi
	cke_json_status "$1" "$cke_r" "$cke_p" "$(cke_recorded_digest "$3")"
}
""",
            "\n".join(lines),
        )


def runtime_for(name: str) -> Runtime:
    """The runtime the cluster YAML names ("process" or "systemd")."""
    if name == "process":
        return ProcessRuntime()
    if name == "systemd":
        return SystemdRuntime()
    raise ValueError(f"unknown runtime {name!r} (expected 'process' or 'systemd')")


class ScriptError(RuntimeError):
    """A runtime script exited non-zero; ``result`` holds its full output."""

    def __init__(self, message: str, result: CommandResult) -> None:
        super().__init__(message)
        self.result = result


async def run_script(conn: NodeConnection, script: bytes, timeout: float = 60.0) -> CommandResult:
    """Run ``script`` with ``sh -s`` on the node, the script on stdin (never in argv).

    Raises ScriptError (a RuntimeError) whose first line is "<node>: <stderr first line>";
    further stderr lines (such as a log tail) follow on the next lines.
    """
    result = await conn.run("sh -s", input=script, timeout=timeout)
    if result.exit_status != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        first = lines[0] if lines else f"script exited with status {result.exit_status}"
        rest = "\n".join(lines[1:])[-4000:]
        message = f"{conn.target.address}: {first}" + (f"\n{rest}" if rest else "")
        raise ScriptError(message, result)
    return result
