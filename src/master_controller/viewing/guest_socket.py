"""The byte streams RFB travels on between the controller and a VNC server.

- :class:`TCPStream`: straight to a guest's VNC server (x11vnc on the guest's address,
  ``vnc://host:port``): what the relay, the readiness checks and verification use. The
  guest's port is reachable from the host alone (the host firewall drops forwarding to and
  from guest links, ``network/firewall.py``).
- :class:`WebSocketStream`: RFB in WebSocket binary messages (``ws://``), how noVNC talks:
  to the controller's own viewer route, or to a guest's websockify.

Everything the guest sends is bounded: a TCP read takes at most :data:`READ_SIZE` bytes and
the stream buffers at most twice that before it stops reading (flow control); a WebSocket
message at most :data:`MAX_GUEST_MESSAGE`. A guest's TCP connection has keepalive and a
user timeout (:func:`guest_keepalive`), so a cut network or a frozen VM ends a read with
:class:`GuestSilent` within :data:`SILENT_SECONDS` plus the idle time, not never.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from master_controller.errors import ProbeError
from master_controller.viewing.rfb import RFBClient

# Largest WebSocket message taken from a websockify. websockify (0.10, Debian's) sends what
# one recv() from the VNC server returns, at most its buffer_size of 64 KiB, as one message;
# 1 MiB leaves 16x margin and bounds what one message can make us hold.
MAX_GUEST_MESSAGE = 1024 * 1024
# Frames a WebSocket client buffers before it stops reading (flow control): with the size
# above, at most 4 MiB queued per connection.
MAX_GUEST_QUEUE = 4
# How long closing waits for a guest's answer to our close frame (a hostile one never
# answers; websockets would wait 10 s by default).
GUEST_CLOSE_SECONDS = 1.0
# The largest read from a guest's VNC socket, and so the largest message the relay sends a
# viewer. A full 1280x800 Raw frame is 4 MiB: 256 KiB reads make 16 messages of it (each
# message costs the relay about the same CPU whatever its size, so fewer is cheaper); the
# kernel's socket buffers rarely hold more at once.
READ_SIZE = 256 * 1024
# A guest's TCP connection: idle this long, then probed every KEEPALIVE_INTERVAL; data or
# probes unanswered for SILENT_SECONDS end the connection (TCP_USER_TIMEOUT). A guest on this
# host answers at once, so this is a cut network or a frozen guest: the viewer hears of it
# within KEEPALIVE_IDLE + SILENT_SECONDS (about 15 s) instead of watching a still screen.
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
SILENT_SECONDS = 10


class GuestSilent(ProbeError):
    """The guest's side stopped answering (TCP keepalive or user timeout expired)."""


def guest_keepalive(sock: socket.socket) -> None:
    """Keepalive probes and a user timeout on a guest connection (see SILENT_SECONDS)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, SILENT_SECONDS // KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, SILENT_SECONDS * 1000)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # key presses go at once


def vnc_address(url: str) -> tuple[str, int]:
    """(host, port) of a ``vnc://host:port`` URL (an endpoint's ``vnc_url``)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ProbeError(f"not a VNC address: {url!r} ({exc})") from exc
    if parts.scheme != "vnc" or not parts.hostname or port is None:
        raise ProbeError(f"not a VNC address: {url!r} (vnc://host:port expected)")
    return parts.hostname, port


class TCPStream:
    """RFB bytes on a TCP connection to a guest's VNC server."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def read_exactly(self, n: int) -> bytes:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as data does (an outer deadline would then be lost)
            async with asyncio.timeout(self.timeout):
                return await self.reader.readexactly(n)
        except TimeoutError as exc:  # ours, or the kernel's (ETIMEDOUT)
            raise GuestSilent(f"the VNC server sent nothing for {self.timeout}s") from exc
        except asyncio.IncompleteReadError as exc:
            raise ProbeError("the VNC server closed the connection") from exc
        except OSError as exc:
            raise _closed(exc) from exc

    async def read_some(self) -> bytes:
        """What the guest has sent, at most READ_SIZE bytes, without a timeout (the relay:
        a still screen sends nothing); b"" when the guest closed."""
        try:
            return await self.reader.read(READ_SIZE)
        except OSError as exc:
            raise _closed(exc) from exc

    async def write(self, data: bytes) -> None:
        """Send ``data``; a guest that takes none of it for ``timeout`` is silent (one that
        answers TCP's window probes but never reads would otherwise hold us forever)."""
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except TimeoutError as exc:
            raise GuestSilent(f"the VNC server read nothing for {self.timeout}s") from exc
        except OSError as exc:
            raise _closed(exc) from exc

    async def close(self) -> None:
        self.writer.close()
        try:
            # the peer may never read what is still queued (a hostile or frozen guest)
            async with asyncio.timeout(GUEST_CLOSE_SECONDS):
                await self.writer.wait_closed()
        except (OSError, TimeoutError):
            self.writer.transport.abort()


# How the kernel ends a connection whose peer stopped answering: ETIMEDOUT, or the soft
# error it saw meanwhile (a cut link gives "unreachable" or "down")
SILENT_ERRNOS = frozenset(
    {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)


def _closed(exc: OSError) -> ProbeError:
    if exc.errno in SILENT_ERRNOS:  # keepalive or the user timeout expired
        return GuestSilent(f"the guest stopped answering ({exc})")
    return ProbeError(f"the VNC connection broke: {exc}")


async def open_vnc(url: str, timeout: float = 10.0) -> TCPStream:
    """A TCP connection to the VNC server at ``vnc://host:port``, with keepalive (reads
    through :meth:`TCPStream.read_exactly` time out after ``timeout``)."""
    host, port = vnc_address(url)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
    except (OSError, TimeoutError) as exc:
        raise ProbeError(f"nothing accepts connections on {host}:{port} ({exc!r})") from exc
    sock = writer.get_extra_info("socket")
    try:
        guest_keepalive(sock)
    except OSError as exc:
        writer.transport.abort()
        raise ProbeError(f"setting up the connection to {host}:{port}: {exc}") from exc
    return TCPStream(reader, writer, timeout)


class WebSocketStream:
    """RFB bytes over WebSocket binary messages (how noVNC talks to websockify)."""

    def __init__(self, ws: ClientConnection, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout
        self.buffer = bytearray()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            try:
                async with asyncio.timeout(self.timeout):  # not wait_for: see TCPStream
                    message = await self.ws.recv()
            except TimeoutError as exc:
                raise ProbeError(f"the VNC server sent nothing for {self.timeout}s") from exc
            except WebSocketException as exc:
                raise ProbeError(f"the WebSocket closed: {exc}") from exc
            self.buffer += message if isinstance(message, bytes) else message.encode()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def write(self, data: bytes) -> None:
        try:
            await self.ws.send(data)
        except WebSocketException as exc:
            raise ProbeError(f"the WebSocket closed: {exc}") from exc


@asynccontextmanager
async def rfb_over_websocket(
    url: str, password: str | None, timeout: float = 10.0, headers: dict[str, str] | None = None
) -> AsyncIterator[RFBClient]:
    """An RFB client, handshake done, over a WebSocket to ``url``."""
    try:
        async with connect(
            url,
            subprotocols=["binary"],  # type: ignore[list-item]
            proxy=None,
            open_timeout=timeout,
            max_size=MAX_GUEST_MESSAGE,
            max_queue=MAX_GUEST_QUEUE,
            compression=None,  # websockify never compresses; no inflating a guest's bomb
            close_timeout=GUEST_CLOSE_SECONDS,
            additional_headers=headers,
        ) as ws:
            client = RFBClient(WebSocketStream(ws, timeout))
            await client.handshake(password)
            yield client
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise ProbeError(f"WebSocket to {url} failed: {exc}") from exc


@asynccontextmanager
async def rfb_over_tcp(
    url: str, password: str | None, timeout: float = 10.0
) -> AsyncIterator[RFBClient]:
    """An RFB client, handshake done, straight to the VNC server at ``vnc://host:port``."""
    stream = await open_vnc(url, timeout)
    try:
        client = RFBClient(stream)
        await client.handshake(password)
        yield client
    finally:
        await stream.close()


def rfb_connect(
    url: str, password: str | None, timeout: float = 10.0, headers: dict[str, str] | None = None
) -> AbstractAsyncContextManager[RFBClient]:
    """An RFB client over the transport ``url`` names: ``vnc://`` (a guest's VNC server,
    TCP) or ``ws://``/``wss://`` (a WebSocket: the controller's viewer route)."""
    scheme = urlsplit(url).scheme
    if scheme == "vnc":
        if headers:
            raise ProbeError("HTTP headers make no sense on a vnc:// connection")
        return rfb_over_tcp(url, password, timeout)
    if scheme in ("ws", "wss"):
        return rfb_over_websocket(url, password, timeout, headers)
    raise ProbeError(f"no RFB transport for {url!r} (vnc://, ws:// or wss://)")
