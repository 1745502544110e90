"""cke's view of the managed etcd survives a member that fails in a surprising way.

Issue 10, item 5: a node address like ``::ffff:127.0.1.3`` raised an uncaught error in
one member's status query and blinded cke to the whole etcd (phase ``etcd-wait``, no
repairs). Errors are per member: the others still give the membership.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from cke.devenv import TestBed
from cke.etcdadmin import EtcdAdmin, EtcdCredentials

pytestmark = pytest.mark.e2e


async def test_one_members_error_does_not_hide_the_others(bed: TestBed) -> None:
    etcd = bed.etcd
    assert etcd.root_client is not None
    url = urlsplit(etcd.endpoints[0])
    assert url.hostname is not None and url.port is not None
    creds = EtcdCredentials(
        etcd.ca.ca_path.read_bytes(),
        etcd.root_client.cert.read_bytes(),
        etcd.root_client.key.read_bytes(),
    )

    async def credentials() -> EtcdCredentials:
        return creds

    admin = EtcdAdmin(credentials, port=url.port)
    try:
        hostile = ["::ffff:127.0.1.3", "fe80::1%lo", "not an address", "", "[", "127.0.0.1:1"]
        status = await admin.status([url.hostname, *hostile])
        assert status.reachable
        assert [m.address for m in status.members] == [url.hostname]
        assert status.members[0].healthy and status.leader_id == status.members[0].id
    finally:
        await admin.close()
