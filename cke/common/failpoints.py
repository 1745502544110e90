"""Failpoints for end-to-end tests, in the spirit of etcd's gofail: hold a process at a
known point so that a test can do something to it there.

``CKE_FAILPOINT=stop-before-update:<node address>`` makes cke stop itself (SIGSTOP, as
a debugger, a long GC pause or a VM freeze would) at the last moment before it sends
its first changing command to that node: after every wait of the send, right before
the lease check. It fires once per process. Unset (always, in production), a check is
one environment lookup.
"""

from __future__ import annotations

import os
import signal

from cke.common.logs import get_logger

ENV = "CKE_FAILPOINT"
log = get_logger("cke.failpoint")
_fired: set[str] = set()


def stop_at(point: str) -> None:
    """Stop this process (once) if ``CKE_FAILPOINT`` names ``point``."""
    if os.environ.get(ENV) != point or point in _fired:
        return
    _fired.add(point)
    log.warning("failpoint: stopping this process", point=point)
    os.kill(os.getpid(), signal.SIGSTOP)
