"""One check per field, shared by the cluster validator and the code that uses the field.

A value that ``ckecli cluster set`` accepts reaches the runtime's scripts, the unit
files and the etcd clients; if the runtime were stricter than the validator, a stored
value would crash every replica (issue 10). So each rule lives here once: the
validator reports ``path: problem``, the runtime raises ``ValueError(problem)``.

Each ``*_problem`` function returns why a value is unusable, or None.  Messages never
echo the value (it may be long or hostile); the caller names the field.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "CONTROL_RE",
    "MAX_PATH_LENGTH",
    "RESERVED_ENV_PREFIX",
    "absolute_path_problem",
    "binary_path_problem",
    "env_name_problem",
    "node_address_problem",
]

CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# PATH_MAX and NAME_MAX of Linux.
MAX_PATH_LENGTH = 4096
_MAX_NAME_LENGTH = 255
# A program path goes into ExecStart's first word, into a shell command line and into
# paths: plain ASCII words only, so that no quoting rule of any of them matters.
_PATH_PART_RE = re.compile(r"[A-Za-z0-9_.+@-]+", re.ASCII)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# The runtime's launch script keeps its own variables under this prefix; a service
# environment variable with it could redirect the script (its log file, its setsid).
RESERVED_ENV_PREFIX = "cke_"
_MAX_ENV_NAME_LENGTH = 255


def absolute_path_problem(path: str) -> str | None:
    """Why ``path`` is not a usable absolute path on a node, or None."""
    if CONTROL_RE.search(path):
        return "must not contain control characters"
    if not path.startswith("/"):
        return "must be an absolute path"
    if len(path) > MAX_PATH_LENGTH:
        return f"must be at most {MAX_PATH_LENGTH} characters"
    return None


def binary_path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a program cke runs, or None.

    Absolute, normalised (no empty, ``.`` or ``..`` part, no trailing ``/``) and made of
    ASCII letters, digits and ``_ . + @ -`` between the slashes.
    """
    if not path.startswith("/"):
        return "must be an absolute path"
    if len(path) > MAX_PATH_LENGTH:
        return f"must be at most {MAX_PATH_LENGTH} characters"
    parts = path[1:].split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "must be a normalised path: no '//', '.', '..' or trailing '/'"
    if not all(_PATH_PART_RE.fullmatch(part) for part in parts):
        return (
            "may contain only ASCII letters, digits and '_', '.', '+', '@', '-' between "
            "the slashes (no spaces, quotes or shell characters)"
        )
    if any(len(part) > _MAX_NAME_LENGTH for part in parts):
        return f"each part must be at most {_MAX_NAME_LENGTH} characters"
    return None


def env_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an environment variable of a managed service, or None."""
    if len(name) > _MAX_ENV_NAME_LENGTH:
        return f"name must be at most {_MAX_ENV_NAME_LENGTH} characters"
    if not _ENV_NAME_RE.fullmatch(name):
        return "name must be letters, digits and '_', not starting with a digit"
    if name.startswith(RESERVED_ENV_PREFIX):  # shell names are case-sensitive
        return f"names starting with {RESERVED_ENV_PREFIX!r} are reserved for cke's scripts"
    return None


def node_address_problem(address: str) -> str | None:
    """Why ``address`` cannot be a node's address, or None.

    The address is a key everywhere (status, pinned host keys, etcd peer URLs), so it
    must be one unicast IP written in its one canonical form: ``::ffff:10.0.0.1`` and
    ``10.0.0.1`` would otherwise be two nodes that are one machine.
    """
    if len(address) > 45:  # the longest textual IPv6 address
        return "must be an IPv4 or IPv6 address (too long)"
    if "%" in address:
        return "must not have an IPv6 zone ID ('%...'): use a global or unique local address"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "must be an IPv4 or IPv6 address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"must not be an IPv4-mapped IPv6 address: write {ip.ipv4_mapped}"
    if ip.is_unspecified:
        return "must not be the unspecified address"
    if ip.is_multicast:
        return "must not be a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "must not be the broadcast address"
    if str(ip) != address:
        return f"must be written in canonical form: {ip}"
    return None
