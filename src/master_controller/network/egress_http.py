"""The egress proxy's wire: what a guest may send (one bounded request head), what it gets
back when refused, and the relay that carries a tunnel until both sides are done or it has
been silent too long.

Nothing here trusts the guest: the head is read with a size limit and a deadline, parsed
strictly (``CONNECT host:port`` or an absolute ``http://`` URL, a host name of the usual
characters or an IP literal), and everything relayed afterwards moves in bounded chunks
with back-pressure, so a guest that stops reading stalls only its own tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD = 16 * 1024
RELAY_CHUNK = 64 * 1024
# a DNS name (labels of letters, digits, '-' and '_'), at most 253 characters
HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*$")
PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class EgressRefused(Exception):
    """A request the proxy will not carry; ``reason`` is sent to the guest with ``status``.

    Internal to the proxy (it never leaves it), so it is not part of the package's error
    tree."""

    def __init__(self, status: int, reason: str, outcome: str = "refused") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.outcome = outcome  # a fixed metric label, never guest-chosen text


@dataclass(frozen=True)
class Request:
    """One parsed proxy request. ``host`` is lower case without a trailing dot (or an IP
    literal without brackets); ``forward`` is what goes upstream first (empty for CONNECT)."""

    method: str
    host: str
    port: int
    forward: bytes

    @property
    def tunnel(self) -> bool:
        return self.method == "CONNECT"


async def read_head(reader: asyncio.StreamReader, deadline: float) -> bytes:
    """The request head, up to and including the blank line. Raises EgressRefused (431)
    when it is larger than MAX_HEAD, TimeoutError when it takes longer than ``deadline``
    seconds, IncompleteReadError when the guest hangs up first."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), deadline)
    except asyncio.LimitOverrunError as exc:
        raise EgressRefused(431, "request head too large") from exc
    if len(head) > MAX_HEAD:
        raise EgressRefused(431, "request head too large")
    return head


def parse(head: bytes) -> Request:
    """A proxy request from its head. Raises EgressRefused (400) on anything else."""
    try:
        text = head.decode("latin-1")
        request_line, *header_lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError as exc:
        raise EgressRefused(400, "malformed request line") from exc
    if not version.startswith("HTTP/1."):
        raise EgressRefused(400, "unsupported protocol")
    if method == "CONNECT":
        host, _, port_text = target.rpartition(":")
        if not host or not port_text.isdigit():
            raise EgressRefused(400, "CONNECT needs host:port")
        return Request(method, _host(host.strip("[]")), _port(port_text), b"")
    try:
        url = urlsplit(target)
        url_port = url.port
    except ValueError as exc:
        raise EgressRefused(400, "malformed URL") from exc
    if url.scheme != "http" or not url.hostname:
        raise EgressRefused(400, "only absolute http:// requests and CONNECT are proxied")
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    kept = [
        line
        for line in header_lines
        if line and not line.lower().startswith(("proxy-", "connection:", "keep-alive:"))
    ]
    forward = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""])
    port = 80 if url_port is None else url_port
    return Request(method, _host(url.hostname), port, forward.encode("latin-1"))


def _host(text: str) -> str:
    host = text.lower().rstrip(".")
    if HOST_NAME.match(host):
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise EgressRefused(400, "malformed host name") from None


def _port(text: str) -> int:
    if len(text) > 5 or not 0 < int(text) < 65536:
        raise EgressRefused(400, "port out of range")
    return int(text)


def refusal(status: int, reason: str) -> bytes:
    """A complete HTTP response refusing a request with ``reason``."""
    body = f"master-controller egress proxy: {reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {PHRASES.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )


async def relay(
    guest: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    idle_timeout: float,
    moved: Callable[[int], None] | None = None,
) -> bool:
    """Carry bytes both ways until both directions have ended, or until no byte moved
    either way for ``idle_timeout`` seconds. Returns True when it stopped for silence.
    ``moved`` is told the size of every chunk carried, either way.

    A direction that ends is half-closed on the other side (the peer sees EOF), so
    request/response exchanges finish normally. Silence is counted across both directions:
    a long download with a quiet guest is not idle."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(RELAY_CHUNK):
                last[0] = loop.time()
                if moved is not None:
                    moved(len(chunk))
                sink.write(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if sink.can_write_eof():
                    sink.write_eof()

    pending = {
        asyncio.create_task(pipe(guest[0], upstream[1])),
        asyncio.create_task(pipe(upstream[0], guest[1])),
    }
    try:
        while pending:
            remaining = last[0] + idle_timeout - loop.time()
            if remaining <= 0:
                return True
            _, pending = await asyncio.wait(pending, timeout=remaining)
        return False
    finally:
        for task in pending:
            task.cancel()
        # the pipes end at once when cancelled; wait so none outlives its connection
        if pending:
            await asyncio.wait(pending)
