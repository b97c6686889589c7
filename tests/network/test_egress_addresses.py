"""Where a guest may not go through the egress proxy, whatever name leads there: loopback,
the cloud metadata address, private and shared ranges, multicast, and this host's own
addresses (its interfaces, the guests' gateways), reached through an ``egress_hosts``
mapping that is not exact, through DNS, or as an IP literal. Nothing refused is ever
connected to (the addresses here are only checked, never dialled)."""

from __future__ import annotations

import asyncio
import os
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from master_controller.network import netns
from master_controller.network.egress_destination import forbidden, owned_by_this_host
from master_controller.network.ipam import AddressAllocator
from master_controller.network.netns import GuestLink
from tests.network.egress_helpers import GUEST_A, allowance, ask, running_proxy

GUESTS = ip_network("10.213.0.0/16")


def host_address() -> str:
    """An address of this host that is not loopback or link-local (its uplink's)."""
    with IPRoute() as ipr:
        for message in ipr.get_addr():
            address = ip_address(message.get_attr("IFA_ADDRESS"))
            if not (address.is_loopback or address.is_link_local):
                return str(address)
    pytest.skip("this host has no address but loopback and link-local ones")


@pytest.mark.parametrize(
    ("mapped_to", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.9.9.9", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),  # IPv4 inside IPv6
        ("64:ff9b::7f00:1", "a loopback address"),  # NAT64 of 127.0.0.1
        ("2002:7f00:1::1", "a loopback address"),  # 6to4 of 127.0.0.1
        ("169.254.169.254", "a link-local address"),  # cloud metadata
        ("fe80::1", "a link-local address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd12:3456::1", "a private address"),  # ULA
        ("100.64.0.1", "a shared (CGNAT) address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("240.0.0.1", "a reserved address"),
    ],
)
async def test_a_name_mapped_without_its_port_does_not_lead_to_forbidden_addresses(
    mapped_to: str, reason: str
) -> None:
    """``egress_hosts = {"idp.test": address}`` (no port): the guest asks for idp.test on a
    port its sign-in allows but the mapping does not name."""
    async with running_proxy(egress_hosts={"idp.test": mapped_to}) as (egress, port):
        egress.grant(GUEST_A, allowance("idp.test", ports={443, 8443}))
        answer = await ask(port, "CONNECT idp.test:8443 HTTP/1.1\r\n\r\n")
        assert answer.startswith("HTTP/1.1 403 ") and f"leads to {reason}" in answer
        plain = await ask(port, "GET http://idp.test/token HTTP/1.1\r\n\r\n")  # port 80
        assert plain.startswith("HTTP/1.1 403 ") and f"leads to {reason}" in plain


@pytest.mark.parametrize(
    ("literal", "reason"),
    [
        ("[::1]", "a loopback address"),
        ("127.0.0.1", "a loopback address"),
        ("169.254.169.254", "a link-local address"),
        ("10.0.0.1", "a private address"),
    ],
)
async def test_ip_literals_are_checked_too(literal: str, reason: str) -> None:
    """An oauth2 endpoint configured by address puts the address in the allowance."""
    async with running_proxy() as (egress, port):
        egress.grant(GUEST_A, allowance(literal.strip("[]")))
        answer = await ask(port, f"CONNECT {literal}:443 HTTP/1.1\r\n\r\n")
        assert answer.startswith("HTTP/1.1 403 ") and f"leads to {reason}" in answer


async def test_names_resolved_through_dns_are_checked() -> None:
    """``localhost`` resolves (hosts file) to loopback: refused after resolving."""
    async with running_proxy() as (egress, port):
        egress.grant(GUEST_A, allowance("localhost"))
        answer = await ask(port, "CONNECT localhost:443 HTTP/1.1\r\n\r\n")
        assert answer.startswith("HTTP/1.1 403 ") and "leads to a loopback address" in answer


async def test_this_hosts_own_address_is_refused() -> None:
    own = await asyncio.to_thread(host_address)  # pyroute2's IPRoute runs its own loop
    async with running_proxy(egress_hosts={"own.test": own}) as (egress, port):
        egress.grant(GUEST_A, allowance("own.test", own, ports={443, 8000}))
        for target in ("own.test:8000", f"[{own}]:443" if ":" in own else f"{own}:443"):
            answer = await ask(port, f"CONNECT {target} HTTP/1.1\r\n\r\n")
            assert answer.startswith("HTTP/1.1 403 ") and "an address of this host" in answer


def test_the_address_rules() -> None:
    own = ip_address(host_address())
    assert forbidden(own, GUESTS) == "an address of this host"
    assert owned_by_this_host(ip_address("127.0.0.1")) and owned_by_this_host(own)
    assert forbidden(ip_address("10.213.7.2"), GUESTS) in ("a guest address", "a private address")
    # public addresses pass (checked only: nothing here connects to them)
    assert forbidden(ip_address("8.8.8.8"), GUESTS) is None
    assert forbidden(ip_address("2606:4700::1111"), GUESTS) is None
    assert forbidden(ip_address("64:ff9b::808:808"), GUESTS) is None  # NAT64 of a public one
    # a guest network in public space is still no destination
    assert forbidden(ip_address("8.8.8.8"), ip_network("8.8.8.0/24")) == "a guest address"


@pytest.mark.integration
async def test_a_guests_gateway_address_is_refused(tmp_path: Path) -> None:
    """A real guest link (root): its gateway address on the host is the host's own."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    lease = AddressAllocator(ip_network("10.213.244.0/24"), tmp_path / "l.json").allocate("g")
    link = GuestLink.for_guest("egress-gateway-test")
    await asyncio.to_thread(netns.create, link, lease)
    try:
        gateway = lease.host_address
        assert forbidden(ip_address(gateway), ip_network("10.99.0.0/16")) == (
            "an address of this host"
        )
        async with running_proxy(egress_hosts={"gw.test": gateway}) as (egress, port):
            egress.grant(GUEST_A, allowance("gw.test", ports={443, 3180}))
            answer = await ask(port, "CONNECT gw.test:3180 HTTP/1.1\r\n\r\n")
            assert answer.startswith("HTTP/1.1 403 ") and "an address of this host" in answer
    finally:
        await asyncio.to_thread(netns.remove, link)
    assert not await asyncio.to_thread(link.exists)
