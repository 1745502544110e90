"""Pure helpers of cke's client of the managed etcd."""

from __future__ import annotations

import pytest

from cke.etcdadmin import endpoint, peer_address

pytestmark = pytest.mark.unit


def test_peer_address_of_what_a_member_reports() -> None:
    assert peer_address("https://10.0.0.1:2380") == "10.0.0.1"
    assert peer_address("https://[fd00::1]:2380") == "fd00::1"
    # A peer's answer that does not parse is an unknown address, not an exception that
    # would hide the whole membership (issue 10, item 5).
    assert peer_address("https://[::1:2380") == ""
    assert peer_address("") == ""


def test_endpoint_brackets_ipv6() -> None:
    assert endpoint("10.0.0.1") == "10.0.0.1:2379"
    assert endpoint("fd00::1", 12379) == "[fd00::1]:12379"
