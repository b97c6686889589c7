"""Where an egress request may connect: the name is mapped (``egress_hosts``) or resolved
once, every address is checked, and the connection goes to an address that passed, by
number, so nothing is resolved a second time (no DNS rebinding between check and use).

Refused, unless an operator mapped that exact host and port in ``egress_hosts``: loopback,
unspecified, multicast, link-local, private (RFC 1918, ULA and the other special-purpose
blocks), shared (CGNAT, RFC 6598), reserved, anything not globally routable, the guest
network, and every address this host owns (its interfaces' addresses, the guests' gateway
addresses, local routes). IPv4 addresses carried inside IPv6 (mapped, NAT64, 6to4) are
judged as the IPv4 address they lead to.

``egress_hosts`` keys are ``"name"`` or ``"name:port"``, values IP addresses. A mapped name
is never looked up in DNS: on ports no key names it has the address of its key without a
port (or else of its first key). The checks above are waived only for the exact
``name:port`` key, and a key without a port stands for port 443. So a local identity
provider on 127.0.0.1:8443 needs ``{"idp.test:8443": "127.0.0.1"}``, and with it the guest
still cannot reach ``idp.test:5432``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path

from master_controller.errors import ConfigError
from master_controller.network.egress_http import MAX_HEAD, EgressRefused

IPAddress = IPv4Address | IPv6Address
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
DEFAULT_PORT = 443
SHARED = ip_network("100.64.0.0/10")  # carrier-grade NAT; Python counts it neither way
NAT64 = ip_network("64:ff9b::/96")
LOCAL_NAT64 = ip_network("64:ff9b:1::/48")
# a name's addresses we try, at most (a hostile resolver could answer with hundreds)
MAX_CANDIDATES = 8
# lookups run on threads of their own, so a guest's slow names never take the threads the
# rest of the controller (asyncio.to_thread) relies on
RESOLVER_THREADS = 8


class HostMap:
    """``egress_hosts``, parsed once. Raises ConfigError naming a bad entry."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self._entries: dict[tuple[str, int | None], IPAddress] = {}
        # the address a mapped name has on ports no key names: the key without a port, or
        # else the first with one (a mapped name is never looked up in DNS)
        self._names: dict[str, IPAddress] = {}
        for key, value in mapping.items():
            name, port = _key(key)
            try:
                address = ip_address(value.strip())
            except ValueError:
                raise ConfigError(
                    f"egress_hosts[{key!r}] must be an IP address, not {value[:64]!r}"
                ) from None
            self._entries[(name, port)] = address
            if port is None or name not in self._names:
                self._names[name] = address

    def lookup(self, host: str, port: int) -> tuple[IPAddress | None, bool]:
        """The address ``host`` is mapped to on ``port`` (None: not mapped), and whether
        that exact host and port is mapped (which waives the address checks)."""
        for key in ((host, port), (host, None) if port == DEFAULT_PORT else None):
            if key in self._entries:
                return self._entries[key], True
        return self._names.get(host), False


def _key(key: str) -> tuple[str, int | None]:
    """("name", port or None) from an ``egress_hosts`` key, spelled as requests are parsed:
    lower case, no trailing dot, IP literals in their canonical form."""
    text = key.strip().lower()
    name, colon, port = text.rpartition(":")
    if _literal(text.strip("[]")) or not colon:
        name, port = text, ""
    elif not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536 or not name:
        raise ConfigError(f"egress_hosts key {key[:64]!r} is not 'name' or 'name:port'")
    name = name.strip("[]").rstrip(".")
    return (_literal(name) or name), (int(port) if port else None)


def _literal(text: str) -> str | None:
    try:
        return str(ip_address(text))
    except ValueError:
        return None


def forbidden(address: IPAddress, guest_network: IPv4Network | IPv6Network) -> str | None:
    """Why no guest may reach ``address`` (a few words), or None if it may."""
    if isinstance(address, IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            return forbidden(inner, guest_network)
        if address in LOCAL_NAT64:
            return "a private address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:
        return "a link-local address"
    if owned_by_this_host(address):
        return "an address of this host"
    if address.version == guest_network.version and address in guest_network:
        return "a guest address"
    if address in SHARED:
        return "a shared (CGNAT) address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved address"
    return None


def _embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def owned_by_this_host(address: IPAddress) -> bool:
    """Whether the kernel takes ``address`` as one of this host's own (an interface address,
    a guest's gateway, a local route, a broadcast address): it lets a socket bind to it.

    Fails closed: only "address not available" counts as not ours. (A host with
    ``ip_nonlocal_bind`` on lets a socket bind anywhere, so every address counts as its own
    and egress is refused: safe; :func:`nonlocal_bind` lets the proxy say so at start.)"""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        return family == socket.AF_INET  # no IPv6 on this host: it owns no IPv6 address
    with probe:
        try:
            probe.bind((str(address), 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


def nonlocal_bind() -> bool:
    """Whether this host lets sockets bind to addresses it does not own (which makes
    :func:`owned_by_this_host` true for every address)."""
    for family in ("ipv4", "ipv6"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/sys/net/{family}/ip_nonlocal_bind").read_text().strip() != "0":
                return True
    return False


class Destinations:
    """Resolves, checks and connects; one per proxy. ``close()`` stops its lookup threads."""

    def __init__(self, hosts: HostMap, guest_network: IPv4Network | IPv6Network) -> None:
        self.hosts = hosts
        self.guest_network = guest_network
        self._resolver = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="mc-egress-dns")

    def close(self) -> None:
        self._resolver.shutdown(wait=False, cancel_futures=True)

    async def connect(
        self, host: str, port: int, timeout: float, lookups: asyncio.Semaphore
    ) -> tuple[Streams, IPAddress]:
        """Open a connection to ``host:port`` through an address that passed the checks,
        within ``timeout`` seconds. ``lookups`` bounds the guest's concurrent DNS lookups.
        Raises EgressRefused: 403 for a forbidden address, 502 when nothing answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        mapped, exact = self.hosts.lookup(host, port)
        if mapped is not None:
            candidates: Sequence[IPAddress] = [mapped]
        else:
            async with lookups:
                candidates = await self._resolve(host, port, deadline - loop.time())
        if not exact:
            reasons = [forbidden(a, self.guest_network) for a in candidates]
            if all(reasons):  # there is always at least one candidate
                raise EgressRefused(
                    403, f"{host}:{port} leads to {reasons[0]}", outcome="forbidden_address"
                )
            candidates = [a for a, why in zip(candidates, reasons, strict=True) if why is None]
        failure: Exception | None = None
        for address in candidates:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                # by number: asyncio resolves nothing for an IP literal
                streams = await asyncio.wait_for(
                    asyncio.open_connection(str(address), port, limit=MAX_HEAD), remaining
                )
            except (OSError, TimeoutError) as exc:
                failure = exc
                continue
            return streams, address
        raise EgressRefused(
            502, f"{host}:{port} is unreachable ({failure or 'timed out'})", outcome="unreachable"
        )

    async def _resolve(self, host: str, port: int, timeout: float) -> list[IPAddress]:
        try:
            return [ip_address(host)]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        lookup = loop.run_in_executor(
            self._resolver, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM
        )
        try:
            infos = await asyncio.wait_for(lookup, max(timeout, 0.001))
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise EgressRefused(
                502, f"{host} does not resolve ({type(exc).__name__})", outcome="unreachable"
            ) from exc
        found: list[IPAddress] = []
        for *_, sockaddr in infos:
            address = ip_address(str(sockaddr[0]).split("%")[0])
            if address not in found:
                found.append(address)
        if not found:
            raise EgressRefused(502, f"{host} has no address", outcome="unreachable")
        return found[:MAX_CANDIDATES]
