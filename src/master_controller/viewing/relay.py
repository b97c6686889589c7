"""The viewer WebSocket proxy: viewer <-> controller <-> the guest's websockify.

The proxy authenticates to the guest's VNC server with the guest's password, sends its
ClientInit (always shared) and checks the guest's ServerInit, then offers the viewer an RFB
handshake without authentication (the viewer proved itself with its ticket), hands it the
checked ServerInit and relays frames both ways as they arrive. Every way it can end closes
the viewer's socket with a code and a reason (:class:`CloseCode`), never a bare drop.

The guest is hostile by assumption: its messages, its ServerInit and its handshake time are
bounded, and a viewer slot is taken atomically (no await between the count and the
registration), so concurrent connects cannot exceed the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from master_controller.errors import ProbeError
from master_controller.metrics import PROXY_BYTES, PROXY_CONNECTIONS, PROXY_CONNECTIONS_TOTAL
from master_controller.viewing.close_codes import CloseCode
from master_controller.viewing.guest_socket import (
    GUEST_CLOSE_SECONDS,
    MAX_GUEST_MESSAGE,
    MAX_GUEST_QUEUE,
    WebSocketStream,
)
from master_controller.viewing.rfb import (
    RFBClient,
    ServerInit,
    accept_without_auth,
    read_server_init,
)

GUEST_UNREACHABLE = (CloseCode.GUEST_FAILED, "guest VNC unreachable")
GUEST_CLOSED = (CloseCode.GUEST_FAILED, "guest VNC closed the connection")
GUEST_SILENT = (
    CloseCode.GUEST_FAILED,
    "the guest stopped answering (network cut, or guest frozen)",
)
GUEST_TOO_BIG = (
    CloseCode.GUEST_FAILED,
    f"the guest's VNC sent a message over {MAX_GUEST_MESSAGE} bytes",
)
# noVNC's own messages (keys, pointer, update requests) are a few bytes; the largest is a
# clipboard paste (ClientCutText). 256 KiB of pasted text is plenty.
MAX_VIEWER_MESSAGE = 256 * 1024
VIEWER_TOO_BIG = (CloseCode.MESSAGE_TOO_BIG, f"a viewer message over {MAX_VIEWER_MESSAGE} bytes")
GUEST_PING_SECONDS = 5.0
HANDSHAKE_SECONDS = 30.0  # a viewer must finish its RFB handshake within this
GUEST_HANDSHAKE_SECONDS = 15.0  # and the guest its side, through to ServerInit
# how the relay ended on the guest's side -> what the viewer is told
GUEST_ENDINGS = {
    "guest": GUEST_CLOSED,
    "guest-silent": GUEST_SILENT,
    "guest-too-big": GUEST_TOO_BIG,
}


class ViewerMessageTooBig(ProbeError):
    """A viewer sent a message larger than MAX_VIEWER_MESSAGE (closed with 1009)."""


def viewer_bytes(message: Message) -> bytes:
    """The payload of a viewer's ``websocket.receive`` message, refused past the bound."""
    data: bytes = message.get("bytes") or (message.get("text") or "").encode()
    if len(data) > MAX_VIEWER_MESSAGE:
        raise ViewerMessageTooBig(f"a viewer message of {len(data)} bytes")
    return data


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
            self.buffer += viewer_bytes(message)
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

    def reserve(self, viewer: ViewerConnection, limit: int | None) -> bool:
        """Register ``viewer`` unless its session has ``limit`` viewers already. Checking
        and registering in one synchronous step is what makes the limit hold under
        concurrent connects: no other task runs in between."""
        viewers = self.viewers[viewer.session_id]
        if limit is not None and len(viewers) >= limit:
            if not viewers:
                self.viewers.pop(viewer.session_id, None)
            return False
        viewers.add(viewer)
        return True

    def release(self, viewer: ViewerConnection) -> None:
        viewers = self.viewers.get(viewer.session_id)
        if viewers is not None:
            viewers.discard(viewer)
            if not viewers:
                self.viewers.pop(viewer.session_id, None)

    async def close_all(self, session_id: str, code: CloseCode, reason: str) -> None:
        for viewer in list(self.viewers.get(session_id, ())):
            await viewer.close(code, reason[:120])

    async def session_ended(self, session_id: str, reason: str) -> None:
        """Tell the session's viewers it ended, and why (they stop reconnecting)."""
        await self.close_all(session_id, CloseCode.ENDED, reason)

    async def session_hibernated(self, session_id: str) -> None:
        await self.close_all(session_id, CloseCode.HIBERNATED, "session hibernated")


async def relay(
    viewer: ViewerConnection,
    registry: ViewerRegistry,
    guest_url: str,
    password: str,
    max_viewers: int | None = None,
) -> None:
    """Connect ``viewer`` (accepted already) to the guest and relay until either side ends.
    With ``max_viewers``, the viewer is refused (4429) when its session has that many
    already; the slot is taken before anything else happens, so the limit holds however
    many viewers connect at once."""
    ws = viewer.ws
    # no await before this: the check and the registration are one step
    if not registry.reserve(viewer, max_viewers):
        PROXY_CONNECTIONS_TOTAL.labels("too_many_viewers").inc()
        await viewer.close(
            CloseCode.TOO_MANY_VIEWERS, f"this session has {max_viewers} viewers already"
        )
        return
    PROXY_CONNECTIONS.inc()
    try:
        try:
            upstream = await connect(
                guest_url,
                subprotocols=["binary"],  # type: ignore[list-item]
                proxy=None,
                open_timeout=10,
                max_size=MAX_GUEST_MESSAGE,
                max_queue=MAX_GUEST_QUEUE,
                compression=None,  # websockify never compresses; no inflating a guest's bomb
                close_timeout=GUEST_CLOSE_SECONDS,
                ping_interval=None,  # our own keepalive (_pump) says when the guest went silent
            )
        except (OSError, TimeoutError, WebSocketException):
            PROXY_CONNECTIONS_TOTAL.labels("guest_unreachable").inc()
            await viewer.close(*GUEST_UNREACHABLE)
            return
        async with upstream:
            guest = WebSocketStream(upstream, timeout=10)
            try:
                init = await _guest_handshake(guest, password)
            except ProbeError as exc:
                PROXY_CONNECTIONS_TOTAL.labels("handshake_failed").inc()
                await viewer.close(
                    CloseCode.GUEST_FAILED, f"VNC handshake failed: {exc.reason}"[:120]
                )
                return
            viewer_stream = ViewerStream(ws)
            try:
                async with asyncio.timeout(HANDSHAKE_SECONDS):
                    await accept_without_auth(viewer_stream)
                    await viewer_stream.read_exactly(1)  # ClientInit: the guest's went already
            except TimeoutError:
                PROXY_CONNECTIONS_TOTAL.labels("handshake_failed").inc()
                await viewer.close(
                    CloseCode.VIEWER_PROTOCOL, "the viewer did not finish the VNC handshake in time"
                )
                return
            except ViewerMessageTooBig:
                PROXY_CONNECTIONS_TOTAL.labels("viewer_too_big").inc()
                await viewer.close(*VIEWER_TOO_BIG)
                return
            except ProbeError as exc:
                PROXY_CONNECTIONS_TOTAL.labels("handshake_failed").inc()
                await viewer.close(
                    CloseCode.VIEWER_PROTOCOL, f"VNC handshake failed: {exc.reason}"[:120]
                )
                return
            except WebSocketDisconnect:
                return
            PROXY_CONNECTIONS_TOTAL.labels("relaying").inc()
            await ws.send_bytes(init.encode())
            # bytes read past the handshake on either side go first
            if viewer_stream.buffer:
                await upstream.send(bytes(viewer_stream.buffer))
            if guest.buffer:
                await ws.send_bytes(bytes(guest.buffer))
            ended = await _pump(ws, upstream)
            if viewer.closing is None and ended in GUEST_ENDINGS:
                if ended != "guest":
                    PROXY_CONNECTIONS_TOTAL.labels(ended.replace("-", "_")).inc()
                await viewer.close(*GUEST_ENDINGS[ended])
            elif ended == "viewer-too-big":
                PROXY_CONNECTIONS_TOTAL.labels("viewer_too_big").inc()
                await viewer.close(*VIEWER_TOO_BIG)
    finally:
        PROXY_CONNECTIONS.dec()
        registry.release(viewer)


async def _guest_handshake(guest: WebSocketStream, password: str) -> ServerInit:
    """Our side of the guest's handshake, through ServerInit: authenticate with the guest's
    password, ClientInit (shared: a viewer never disconnects the others), and a ServerInit
    within the bounds of ``rfb``, all within GUEST_HANDSHAKE_SECONDS."""
    try:
        async with asyncio.timeout(GUEST_HANDSHAKE_SECONDS):
            await RFBClient(guest).authenticate(password)
            await guest.write(b"\x01")
            return await read_server_init(guest)
    except TimeoutError as exc:
        raise ProbeError(
            f"the guest's VNC did not finish its handshake in {GUEST_HANDSHAKE_SECONDS:g} s"
        ) from exc


async def _pump(ws: WebSocket, upstream: ClientConnection) -> str:
    """Relay both ways as frames arrive; returns which side ended first."""

    async def viewer_to_guest() -> str:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return "viewer"
            try:
                data = viewer_bytes(message)
            except ViewerMessageTooBig:
                return "viewer-too-big"
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
            if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                return "guest-too-big"  # refused by max_size before it was read
        except WebSocketException:
            pass
        except (RuntimeError, OSError):  # the viewer went away while we were sending
            return "viewer"
        return "guest"

    async def guest_keepalive() -> str:
        """A guest on this host answers a ping at once: one unanswered for
        GUEST_PING_SECONDS means a cut network or a frozen guest, and the viewer is told
        rather than left looking at a still screen."""
        while True:
            await asyncio.sleep(GUEST_PING_SECONDS)
            try:
                pong = await upstream.ping()
                async with asyncio.timeout(GUEST_PING_SECONDS):
                    await pong
            except TimeoutError:
                return "guest-silent"
            except (WebSocketException, RuntimeError):  # closed: the guest's side ended
                return "guest"

    tasks = [
        asyncio.create_task(viewer_to_guest()),
        asyncio.create_task(guest_to_viewer()),
        asyncio.create_task(guest_keepalive()),
    ]
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
