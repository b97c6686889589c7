"""The viewer WebSocket proxy: viewer <-> controller <-> the guest's websockify.

The proxy authenticates to the guest's VNC server with the guest's password, then offers
the viewer an RFB handshake without authentication (the viewer proved itself with its
ticket) and relays frames both ways as they arrive. Every way it can end closes the
viewer's socket with a code and a reason, never a bare drop:

    1011 guest VNC unreachable / guest VNC closed the connection
    4401 no or invalid viewer ticket       4403 origin not allowed
    4404 session not found                 4409 session not ready yet
    4410 session ended                     4412 session hibernated
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from master_controller.errors import ProbeError
from master_controller.readiness import WebSocketStream
from master_controller.rfb import RFBClient, accept_without_auth
from master_controller.web.metrics import PROXY_BYTES, PROXY_CONNECTIONS, PROXY_CONNECTIONS_TOTAL

GUEST_UNREACHABLE = (1011, "guest VNC unreachable")
GUEST_CLOSED = (1011, "guest VNC closed the connection")
GUEST_SILENT = (1011, "the guest stopped answering (network cut, or guest frozen)")
SESSION_ENDED = 4410
SESSION_HIBERNATED = 4412
GUEST_PING_SECONDS = 5.0
HANDSHAKE_SECONDS = 30.0  # a viewer must finish its RFB handshake within this
TOO_MANY_VIEWERS = 4429


class ViewerStream:
    """RFB bytes from a viewer's Starlette WebSocket (for the handshake)."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.buffer = bytearray()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            self.buffer += message.get("bytes") or (message.get("text") or "").encode()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def write(self, data: bytes) -> None:
        await self.ws.send_bytes(data)


@dataclass(eq=False)
class ViewerConnection:
    ws: WebSocket
    session_id: str
    closing: tuple[int, str] | None = None

    async def close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                await self.ws.close(code=code, reason=reason)


@dataclass
class ViewerRegistry:
    """The viewers connected to each session, so an ending session can close them."""

    viewers: dict[str, set[ViewerConnection]] = field(default_factory=lambda: defaultdict(set))

    def count(self, session_id: str) -> int:
        return len(self.viewers.get(session_id, ()))

    async def close_all(self, session_id: str, code: int, reason: str) -> None:
        for viewer in list(self.viewers.get(session_id, ())):
            await viewer.close(code, reason)


async def relay(
    viewer: ViewerConnection, registry: ViewerRegistry, guest_url: str, password: str
) -> None:
    """Connect ``viewer`` (accepted already) to the guest and relay until either side ends."""
    ws = viewer.ws
    registry.viewers[viewer.session_id].add(viewer)
    PROXY_CONNECTIONS.inc()
    try:
        try:
            upstream = await connect(
                guest_url,
                subprotocols=["binary"],  # type: ignore[list-item]
                proxy=None,
                open_timeout=10,
                max_size=None,
                # the guest is on this host: a silent link is noticed within ~10 s (a
                # cut network), and the viewer is told rather than left frozen
                ping_interval=GUEST_PING_SECONDS,
                ping_timeout=GUEST_PING_SECONDS,
            )
        except (OSError, TimeoutError, WebSocketException):
            PROXY_CONNECTIONS_TOTAL.labels("guest_unreachable").inc()
            await viewer.close(*GUEST_UNREACHABLE)
            return
        async with upstream:
            guest = WebSocketStream(upstream, timeout=10)
            viewer_stream = ViewerStream(ws)
            try:
                await RFBClient(guest).authenticate(password)
                await asyncio.wait_for(accept_without_auth(viewer_stream), HANDSHAKE_SECONDS)
            except TimeoutError:
                PROXY_CONNECTIONS_TOTAL.labels("handshake_failed").inc()
                await viewer.close(1008, "the viewer did not finish the VNC handshake in time")
                return
            except ProbeError as exc:
                PROXY_CONNECTIONS_TOTAL.labels("handshake_failed").inc()
                await viewer.close(1011, f"VNC handshake failed: {exc.reason}"[:120])
                return
            except WebSocketDisconnect:
                return
            PROXY_CONNECTIONS_TOTAL.labels("relaying").inc()
            # bytes read past the handshake on either side go first
            if viewer_stream.buffer:
                await upstream.send(bytes(viewer_stream.buffer))
            if guest.buffer:
                await ws.send_bytes(bytes(guest.buffer))
            ended = await _pump(ws, upstream)
            if ended == "guest" and viewer.closing is None:
                await viewer.close(*GUEST_CLOSED)
            elif ended == "guest-silent" and viewer.closing is None:
                PROXY_CONNECTIONS_TOTAL.labels("guest_silent").inc()
                await viewer.close(*GUEST_SILENT)
    finally:
        PROXY_CONNECTIONS.dec()
        registry.viewers[viewer.session_id].discard(viewer)
        if not registry.viewers[viewer.session_id]:
            registry.viewers.pop(viewer.session_id, None)


async def _pump(ws: WebSocket, upstream: ClientConnection) -> str:
    """Relay both ways as frames arrive; returns which side ended first."""

    async def viewer_to_guest() -> str:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return "viewer"
            data = message.get("bytes") or (message.get("text") or "").encode()
            PROXY_BYTES.labels("to_guest").inc(len(data))
            try:
                await upstream.send(data)
            except WebSocketException:
                return "guest"

    async def guest_to_viewer() -> str:
        try:
            async for message in upstream:
                data = message if isinstance(message, bytes) else message.encode()
                PROXY_BYTES.labels("to_viewer").inc(len(data))
                await ws.send_bytes(data)
        except ConnectionClosed as exc:
            if exc.sent is not None and "keepalive" in exc.sent.reason:
                return "guest-silent"  # no answer to our pings: network cut, or frozen
        except WebSocketException:
            pass
        except (RuntimeError, OSError):  # the viewer went away while we were sending
            return "viewer"
        return "guest"

    tasks = [asyncio.create_task(viewer_to_guest()), asyncio.create_task(guest_to_viewer())]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    first = done.pop()
    try:
        return first.result()
    except (WebSocketDisconnect, RuntimeError, OSError):
        return "viewer"
