from ipaddress import IPv4Network
from pathlib import Path

import pytest

from master_controller.errors import AddressPoolExhausted, NetworkError
from master_controller.network.ipam import AddressAllocator


def test_leases_persist_and_are_reused(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    alloc = AddressAllocator(IPv4Network("10.99.0.0/28"), path)
    a = alloc.allocate("a")
    b = alloc.allocate("b")
    assert (a.host_address, a.guest_address) == ("10.99.0.1", "10.99.0.2")
    assert (b.host_address, b.guest_address) == ("10.99.0.5", "10.99.0.6")
    again = AddressAllocator(IPv4Network("10.99.0.0/28"), path)  # a restarted controller
    assert again.allocate("a") == a
    again.release("a")
    assert again.allocate("c").guest_address == "10.99.0.2"  # lowest free block
    assert [lease.guest_id for lease in again.leases()] == ["b", "c"]


def test_exhaustion_is_a_clear_error(tmp_path: Path) -> None:
    alloc = AddressAllocator(IPv4Network("10.99.0.0/29"), tmp_path / "l.json")
    alloc.allocate("a")
    alloc.allocate("b")
    with pytest.raises(AddressPoolExhausted, match="all 2 guest addresses"):
        alloc.allocate("c")


def test_network_too_small(tmp_path: Path) -> None:
    with pytest.raises(NetworkError):
        AddressAllocator(IPv4Network("10.99.0.0/31"), tmp_path / "l.json")
