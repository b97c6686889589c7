"""The egress proxy: the only way out of a guest, per guest and per sign-in.

Guests reach it on their gateway address (``egress_port``; the firewall lets guest links
reach that port and nothing else on the host). Each connection is matched to its guest by
source address. What a guest may reach is an :class:`Allowance` the session layer grants
while the guest's session is ready or signing in (:meth:`EgressProxy.grant`) and revokes
when it leaves those states (:meth:`EgressProxy.revoke`, which also closes the guest's
open tunnels); the proxy looks it up in memory, never in the database.

A request passes when its host is one of the allowance's domains (or a subdomain), its port
is allowed (CONNECT: the allowance's ports, 443 by default; absolute-form ``http://``: 80
or the allowance's ports), and the address it leads to is not one guests may not reach
(see :mod:`.egress_destination`: loopback, private, this host's own addresses ... unless an
operator mapped that exact host and port in ``egress_hosts``). Anything else gets a status
and a reason. Two request forms are served: CONNECT (tunnels) and absolute-form HTTP
requests, forwarded with ``Connection: close``.

Bounds, so that one guest cannot take the proxy from the others: ``egress_max_connections``
open connections per guest (more are answered 429 and closed at once), a total cap derived
from the process's file-descriptor limit (503 beyond it), a deadline and a size limit for the
request head, at most a few concurrent DNS lookups per guest on threads of the proxy's own,
and ``egress_idle_timeout``: a tunnel with no byte either way for that long is closed.

Metric labels are fixed outcome words; nothing a guest sends becomes a label.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import resource
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from master_controller.errors import UpstreamFailed
from master_controller.network.egress_destination import Destinations, HostMap, nonlocal_bind
from master_controller.network.egress_http import (
    MAX_HEAD,
    EgressRefused,
    Request,
    parse,
    read_head,
    refusal,
    relay,
)
from master_controller.network.identities import UPSTREAM_BYTES, UPSTREAM_FAILURES
from master_controller.network.upstream import Upstream
from master_controller.settings import Settings

__all__ = ["Allowance", "EgressProxy"]

log = logging.getLogger("master_controller.egress")
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
# concurrent DNS lookups one guest may have (its other connections wait their turn)
LOOKUPS_PER_GUEST = 2
# the accept queue is shared by all guests: deep enough that one guest's burst does not
# push another's connection attempts into SYN retries
BACKLOG = 1024
# seconds a finished connection may take to hand its last bytes to a slow reader
CLOSE_LINGER = 5.0

OVER_GUEST_CAP = refusal(429, "too many connections from this guest")
OVER_TOTAL_CAP = refusal(503, "the egress proxy is busy")

EGRESS_REQUESTS = Counter(
    "mc_egress_requests_total", "Guest egress requests by outcome", ["outcome"]
)
EGRESS_OPEN = Gauge("mc_egress_open_connections", "Open guest connections to the egress proxy")


@dataclass(frozen=True)
class Allowance:
    """What one guest may reach right now: ``domains`` and their subdomains, on ``ports``
    (CONNECT; plain ``http://`` may also use 80)."""

    session_id: str
    domains: tuple[str, ...]
    ports: frozenset[int] = frozenset({443})
    # the user's exit: every request leaves through it, named by host (it resolves them);
    # None: from this host
    upstream: Upstream | None = None

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in self.domains)

    def allows_port(self, port: int, tunnel: bool) -> bool:
        return port in self.ports or (not tunnel and port == 80)


@dataclass(eq=False)
class _Connection:
    """One admitted guest connection, from accept to close."""

    guest: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None
    upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        """Close both sides now; bytes not yet sent are dropped."""
        self.guest.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()

    def close(self) -> None:
        """Abort both sides and stop the connection's task (revocation, shutdown)."""
        self.abort()
        if self.task is not None:
            self.task.cancel()

    async def finish(self) -> None:
        """Close both sides once what was written has gone out, waiting at most
        CLOSE_LINGER seconds for a peer that does not read; then abort."""
        writers = [w for w in (self.guest, self.upstream) if w is not None]
        try:
            for writer in writers:
                writer.close()
            await asyncio.wait_for(
                asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True),
                CLOSE_LINGER,
            )
        except TimeoutError:
            pass
        finally:
            self.abort()


@dataclass(eq=False)
class _Guest:
    """A guest address with connections open."""

    connections: set[_Connection] = field(default_factory=set)
    lookups: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(LOOKUPS_PER_GUEST))


class _Gate(asyncio.Protocol):
    """Every accepted connection starts here: the proxy admits it (handing the transport to
    a stream protocol and a task of its own) or refuses it on the spot, so a refused
    connection never costs a task, a stream reader or a buffer."""

    def __init__(self, proxy: EgressProxy) -> None:
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.proxy._admit(transport)


def total_cap() -> int:
    """Connections the proxy holds at once, all guests together: each takes up to two file
    descriptors, and half of the process's limit stays for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(16, soft // 4)


class EgressProxy:
    """The proxy. ``start()`` listens on ``egress_port`` (0: no egress, nothing listens);
    ``stop()`` closes every connection. Raises ConfigError for a bad ``egress_hosts``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.network = settings.guest_network
        self.per_guest = settings.egress_max_connections
        self.idle_timeout = settings.egress_idle_timeout
        self.head_timeout = HEAD_TIMEOUT
        self.total = total_cap()
        self.destinations = Destinations(HostMap(settings.egress_hosts), settings.guest_network)
        self.server: asyncio.Server | None = None
        self._allowances: dict[str, Allowance] = {}
        self._guests: dict[str, _Guest] = {}
        self._open = 0

    # --- the session layer's side ----------------------------------------------------------

    def grant(self, address: str, allowance: Allowance) -> None:
        """Let the guest at ``address`` reach what ``allowance`` names, from its next request
        on. A grant for another session than the one holding ``address`` closes the
        connections that session's guest left open."""
        key = _normal(address)
        held = self._allowances.get(key)
        if held is not None and held.session_id != allowance.session_id:
            self._close_guest(key)
        self._allowances[key] = allowance

    def revoke(self, address: str) -> int:
        """Take the guest at ``address`` its egress, and close its open connections at once.
        Returns how many were closed. Revoking what was never granted is fine."""
        key = _normal(address)
        self._allowances.pop(key, None)
        return self._close_guest(key)

    def open_connections(self, address: str | None = None) -> int:
        """Open connections of the guest at ``address``, or of all guests."""
        if address is None:
            return self._open
        guest = self._guests.get(_normal(address))
        return 0 if guest is None else len(guest.connections)

    def _close_guest(self, key: str) -> int:
        guest = self._guests.get(key)
        if guest is None:
            return 0
        closing = list(guest.connections)
        for connection in closing:
            connection.close()
        return len(closing)

    # --- serving ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.settings.egress_port:
            return
        self.total = total_cap()  # the limit may have been raised since construction
        if nonlocal_bind():
            log.warning(
                "net.ipv4/ipv6.ip_nonlocal_bind is on: the egress proxy cannot tell this "
                "host's own addresses from others and refuses every destination not mapped "
                "exactly in egress_hosts"
            )
        # Bound to all addresses because guests' gateway addresses come and go; peers
        # outside the guest network are dropped at once, and the firewall admits this port
        # from guest links only.
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Gate(self),
            host="0.0.0.0",
            port=self.settings.egress_port,
            reuse_address=True,
            backlog=BACKLOG,
        )

    async def stop(self) -> None:
        """Stop listening and close every connection; returns once their tasks are done."""
        if self.server is not None:
            self.server.close()
            tasks = [
                c.task for g in self._guests.values() for c in g.connections if c.task is not None
            ]
            for key in list(self._guests):
                self._close_guest(key)
            if tasks:
                await asyncio.wait(tasks, timeout=CLOSE_LINGER)
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        self.destinations.close()

    def _admit(self, transport: asyncio.Transport) -> None:
        """Refuse a connection at once (not a guest: closed without a word; over a cap: 429
        or 503), or count it and start its task. Counted before anything awaits, so a burst
        cannot slip past the caps."""
        peer = _peer(transport.get_extra_info("peername"))
        if peer is None or ipaddress.ip_address(peer) not in self.network:
            EGRESS_REQUESTS.labels("not_a_guest").inc()
            transport.abort()
            return
        guest = self._guests.get(peer)
        held = 0 if guest is None else len(guest.connections)
        if held >= self.per_guest or self._open >= self.total:
            over_guest = held >= self.per_guest
            EGRESS_REQUESTS.labels("over_guest_cap" if over_guest else "over_total_cap").inc()
            transport.write(OVER_GUEST_CAP if over_guest else OVER_TOTAL_CAP)
            transport.close()  # what was written still goes out
            return
        if guest is None:
            guest = self._guests[peer] = _Guest()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        connection = _Connection(asyncio.StreamWriter(transport, protocol, reader, loop))
        guest.connections.add(connection)
        self._open += 1
        EGRESS_OPEN.inc()
        connection.task = loop.create_task(self._handle(peer, guest, connection, reader))

    async def _handle(
        self, peer: str, guest: _Guest, connection: _Connection, reader: asyncio.StreamReader
    ) -> None:
        """One admitted connection, to its end; it stops being counted once its sockets
        are closed (so connections still handing out their last bytes hold the cap too)."""
        try:
            await self._serve(peer, guest, connection, reader)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        except Exception:  # a bug: say so, and still release the connection
            log.exception("egress connection from %s failed", peer)
        finally:
            try:
                await connection.finish()
            finally:
                guest.connections.discard(connection)
                if not guest.connections and self._guests.get(peer) is guest:
                    del self._guests[peer]
                self._open -= 1
                EGRESS_OPEN.dec()

    async def _serve(
        self, peer: str, guest: _Guest, connection: _Connection, reader: asyncio.StreamReader
    ) -> None:
        writer = connection.guest
        try:
            request = parse(await read_head(reader, self.head_timeout))
            allowance = self._check(peer, request)
            streams, address = await self._connect(allowance, request, guest)
        except EgressRefused as exc:
            EGRESS_REQUESTS.labels(exc.outcome).inc()
            log.info("egress from %s refused: %s", peer, exc.reason)
            writer.write(refusal(exc.status, exc.reason))
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            return
        up_reader, connection.upstream = streams
        EGRESS_REQUESTS.labels("allowed").inc()
        log.info(
            "egress %s %s:%s (%s) for session %s",
            request.method,
            request.host,
            request.port,
            address,
            allowance.session_id,
        )
        if request.tunnel:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            connection.upstream.write(request.forward)
        await writer.drain()
        moved = None
        if allowance.upstream is not None:
            moved = UPSTREAM_BYTES.labels(allowance.upstream.name).inc
        if await relay(
            (reader, writer), (up_reader, connection.upstream), self.idle_timeout, moved
        ):
            EGRESS_REQUESTS.labels("idle_closed").inc()
            log.info("egress %s:%s from %s closed: idle", request.host, request.port, peer)

    async def _connect(
        self, allowance: Allowance, request: Request, guest: _Guest
    ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], str]:
        """Streams to the request's destination and what to log it as: through the user's
        upstream by name (nothing resolved here), or from this host to a checked address."""
        upstream = allowance.upstream
        if upstream is None:
            streams, address = await self.destinations.connect(
                request.host, request.port, CONNECT_TIMEOUT, guest.lookups
            )
            return streams, str(address)
        try:
            streams = await upstream.open(request.host, request.port, CONNECT_TIMEOUT)
        except UpstreamFailed as exc:
            UPSTREAM_FAILURES.labels(upstream.name).inc()
            raise EgressRefused(502, exc.reason, outcome="upstream_failed") from exc
        return streams, f"via {upstream.name}"

    def _check(self, peer: str, request: Request) -> Allowance:
        """The guest's allowance, if it lets this request through. Raises EgressRefused."""
        allowance = self._allowances.get(peer)
        if allowance is None:
            raise EgressRefused(403, "this guest has no sign-in that allows egress")
        if not allowance.allows(request.host):
            raise EgressRefused(403, f"egress to {request.host} is not allowed for this sign-in")
        if not allowance.allows_port(request.port, request.tunnel):
            raise EgressRefused(
                403,
                f"port {request.port} is not allowed for this sign-in",
                outcome="forbidden_port",
            )
        return allowance


def _normal(address: str) -> str:
    return str(ipaddress.ip_address(address))


def _peer(peer: object) -> str | None:
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        return _normal(str(peer[0]))
    except ValueError:
        return None
