"""The egress proxy: the only way out of a guest, per guest and per sign-in.

Guests reach it on their gateway address (``egress_port``; the firewall lets guest links
reach that port and nothing else on the host). Each connection is matched to its guest by
source address, and the guest's session decides which hosts it may reach: the provider's
sign-in domains (and their subdomains), or for ``oauth2`` the hosts of its configured
endpoints. Anything else gets a 403 naming the host. Two request forms are served: CONNECT
(HTTPS tunnels) and absolute-form HTTP requests, forwarded with ``Connection: close``.

``egress_hosts`` maps a host name to the address to connect to instead of resolving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client import Counter

from master_controller.settings import Settings

log = logging.getLogger("master_controller.egress")
MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
RELAY_CHUNK = 64 * 1024

EGRESS_REQUESTS = Counter(
    "mc_egress_requests_total", "Guest egress requests by outcome", ["outcome"]
)


@dataclass(frozen=True)
class Allowance:
    """What one guest may reach right now."""

    session_id: str
    domains: tuple[str, ...]

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in self.domains)


Policy = Callable[[str], Awaitable[Allowance | None]]


class EgressRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class EgressProxy:
    def __init__(self, settings: Settings, policy: Policy) -> None:
        self.settings = settings
        self.policy = policy
        self.network = settings.guest_network
        self.server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if not self.settings.egress_port:
            return
        # Bound to all addresses because guests' gateway addresses come and go; peers
        # outside the guest network are dropped at once, and the firewall admits this port
        # from guest links only.
        self.server = await asyncio.start_server(
            self._accept, host="0.0.0.0", port=self.settings.egress_port, reuse_address=True
        )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername")[0])
        if ipaddress.ip_address(peer) not in self.network:
            EGRESS_REQUESTS.labels("not_a_guest").inc()
            return
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            await _refuse(writer, 431, "request head too large")
            return
        if len(head) > MAX_HEAD:
            await _refuse(writer, 431, "request head too large")
            return
        try:
            method, host, port, forward = _parse(head)
            allowance = await self.policy(peer)
            if allowance is None:
                raise EgressRefused(403, "this guest has no sign-in that allows egress")
            if not allowance.allows(host):
                raise EgressRefused(403, f"egress to {host} is not allowed for this sign-in")
        except EgressRefused as exc:
            EGRESS_REQUESTS.labels("refused").inc()
            log.info("egress from %s refused: %s", peer, exc.reason)
            await _refuse(writer, exc.status, exc.reason)
            return
        address = self.settings.egress_hosts.get(host.lower(), host)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(address, port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            EGRESS_REQUESTS.labels("unreachable").inc()
            await _refuse(writer, 502, f"{host}:{port} is unreachable ({exc})")
            return
        EGRESS_REQUESTS.labels("allowed").inc()
        log.info("egress %s %s:%s for session %s", method, host, port, allowance.session_id)
        if method == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            up_writer.write(forward)
        await writer.drain()
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


def _parse(head: bytes) -> tuple[str, str, int, bytes]:
    """(method, host, port, the request to forward) from a proxy request's head."""
    try:
        text = head.decode("latin-1")
        request_line, *header_lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError as exc:
        raise EgressRefused(400, "malformed request line") from exc
    if not version.startswith("HTTP/1."):
        raise EgressRefused(400, f"unsupported protocol {version[:16]}")
    if method == "CONNECT":
        host, _, port_text = target.rpartition(":")
        if not host or not port_text.isdigit():
            raise EgressRefused(400, "CONNECT needs host:port")
        return method, host.strip("[]"), int(port_text), b""
    url = urlsplit(target)
    if url.scheme != "http" or not url.hostname:
        raise EgressRefused(400, "only absolute http:// requests and CONNECT are proxied")
    port = url.port or 80
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    kept = [
        line
        for line in header_lines
        if line and not line.lower().startswith(("proxy-", "connection:", "keep-alive:"))
    ]
    forward = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""])
    return method, url.hostname, port, forward.encode("latin-1")


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(RELAY_CHUNK):
            sink.write(chunk)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()


async def _refuse(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    body = f"master-controller egress proxy: {reason}\n".encode()
    phrase = {400: "Bad Request", 403: "Forbidden", 431: "Too Large", 502: "Bad Gateway"}
    writer.write(
        f"HTTP/1.1 {status} {phrase.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
