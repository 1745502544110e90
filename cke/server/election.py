"""cke's leader election: the shared :mod:`cke.common.election` on ``<prefix>leader/``.

Each replica puts ``leader/<lease id>`` (value: its name) under its lease; the
candidate with the oldest key leads, the others watch their predecessor. The
leader keeps its lease alive every TTL/3 and declares itself *lost* as soon as a
renewal is refused or no renewal succeeded for a whole TTL (a paused process
notices this the moment it runs again). Its writes are fenced on the key anyway
(see ``Storage.fenced``), so even a late notice changes nothing.
"""

from __future__ import annotations

from etcd3aio import Etcd3Client

from cke.common import election as common
from cke.common.election import LeadershipLost
from cke.storage import KEY_LEADER_PREFIX, Storage

__all__ = ["Election", "LeadershipLost"]


class Election(common.Election):
    def __init__(self, client: Etcd3Client, storage: Storage, name: str, ttl: int) -> None:
        super().__init__(
            client,
            storage.key(KEY_LEADER_PREFIX),
            name,
            ttl,
            timeout=storage.timeout,
            logger="cke.election",
        )
        self.storage = storage
