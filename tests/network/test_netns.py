"""Guest networks on the real host (root): namespaces, veth pairs, address conflicts."""

from __future__ import annotations

import os
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from master_controller.errors import NetworkError
from master_controller.network import netns
from master_controller.network.ipam import AddressAllocator
from master_controller.network.netns import GuestLink

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")


def test_names_fit_and_differ() -> None:
    a = GuestLink.for_guest("verify-1234abcd-000001")
    b = GuestLink.for_guest("verify-1234abcd-000002")  # same prefix, other guest
    assert a != b and len(a.host_ifname) <= 15


def test_create_remove_and_refuse_a_used_address(tmp_path: Path) -> None:
    lease = AddressAllocator(IPv4Network("10.213.240.0/24"), tmp_path / "l.json").allocate("g")
    first, second = GuestLink.for_guest("net-a"), GuestLink.for_guest("net-b")
    try:
        netns.create(first, lease)
        assert first.namespace in netns.namespaces() and first.exists()
        with pytest.raises(NetworkError, match="already in use on this host"):
            netns.create(second, lease)  # another data dir with the same range, say
        assert not second.exists()
        with pytest.raises(NetworkError, match="exists already"):
            netns.create(first, lease)
    finally:
        netns.remove(first)
        netns.remove(second)
    assert not first.exists() and first.namespace not in netns.namespaces()
    netns.remove(first)  # removing what is gone is fine
