"""The viewer WebSocket proxy: viewer --WebSocket--> controller --TCP--> the guest's VNC.

The proxy connects to the guest's VNC server (x11vnc on the guest's address; only the host
reaches it, see ``network/firewall.py``), authenticates with the guest's password, sends its
ClientInit (always shared) and checks the guest's ServerInit, then offers the viewer an RFB
handshake without authentication (the viewer proved itself with its ticket), hands it the
checked ServerInit and relays bytes both ways as they arrive: what one read from the guest
returns (up to ``READ_SIZE``) becomes one WebSocket message to the viewer, nothing is parsed
or framed twice. Every way it can end closes the viewer's socket with a code and a reason
(:class:`CloseCode`), never a bare drop.

The guest is hostile by assumption: its ServerInit and its handshake time are bounded, each
read from it is bounded and flow-controlled by the viewer's pace (the relay reads the next
only once the last was sent), a guest gone silent is noticed by TCP keepalive and a user
timeout (``guest_socket``), and a viewer slot is taken atomically (no await between the
count and the registration), so concurrent connects cannot exceed the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from master_controller.errors import ProbeError
from master_controller.metrics import PROXY_BYTES, PROXY_CONNECTIONS, PROXY_CONNECTIONS_TOTAL
from master_controller.viewing.close_codes import CloseCode
from master_controller.viewing.guest_socket import SILENT_SECONDS, GuestSilent, TCPStream, open_vnc
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
# noVNC's own messages (keys, pointer, update requests) are a few bytes; the largest is a
# clipboard paste (ClientCutText). 256 KiB of pasted text is plenty.
MAX_VIEWER_MESSAGE = 256 * 1024
VIEWER_TOO_BIG = (CloseCode.MESSAGE_TOO_BIG, f"a viewer message over {MAX_VIEWER_MESSAGE} bytes")
HANDSHAKE_SECONDS = 30.0  # a viewer must finish its RFB handshake within this
GUEST_HANDSHAKE_SECONDS = 15.0  # and the guest its side, through to ServerInit
# a guest that takes none of a viewer's bytes for this long is silent (as TCP's own timeout)
GUEST_SILENT_SECONDS = float(SILENT_SECONDS)
# how the relay ended on the guest's side -> what the viewer is told
GUEST_ENDINGS = {
    "guest": GUEST_CLOSED,
    "guest-silent": GUEST_SILENT,
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
    """Connect ``viewer`` (accepted already) to the guest's VNC server at ``guest_url``
    (``vnc://host:port``) and relay until either side ends. With ``max_viewers``, the
    viewer is refused (4429) when its session has that many already; the slot is taken
    before anything else happens, so the limit holds however many viewers connect at once."""
    ws = viewer.ws
    # no await before this: the check and the registration are one step
    if not registry.reserve(viewer, max_viewers):
        PROXY_CONNECTIONS_TOTAL.labels("too_many_viewers").inc()
        await viewer.close(
            CloseCode.TOO_MANY_VIEWERS, f"this session has {max_viewers} viewers already"
        )
        return
    PROXY_CONNECTIONS.inc()
    guest: TCPStream | None = None
    try:
        try:
            guest = await open_vnc(guest_url, timeout=GUEST_SILENT_SECONDS)
        except ProbeError:
            PROXY_CONNECTIONS_TOTAL.labels("guest_unreachable").inc()
            await viewer.close(*GUEST_UNREACHABLE)
            return
        try:
            init = await _guest_handshake(guest, password)
        except ProbeError as exc:
            PROXY_CONNECTIONS_TOTAL.labels("handshake_failed").inc()
            await viewer.close(CloseCode.GUEST_FAILED, f"VNC handshake failed: {exc.reason}"[:120])
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
        # what the viewer sent past its handshake goes first (what the guest sent past
        # ServerInit waits in the stream's buffer: the pump's first read returns it)
        ended = await _pump(ws, guest, bytes(viewer_stream.buffer))
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
        if guest is not None:
            await guest.close()


async def _guest_handshake(guest: TCPStream, password: str) -> ServerInit:
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


def _guest_ending(exc: ProbeError) -> str:
    return "guest-silent" if isinstance(exc, GuestSilent) else "guest"


async def _pump(ws: WebSocket, guest: TCPStream, first: bytes) -> str:
    """Relay both ways as bytes arrive; returns which side ended first."""
    to_guest = PROXY_BYTES.labels("to_guest")
    to_viewer = PROXY_BYTES.labels("to_viewer")

    async def viewer_to_guest() -> str:
        data = first
        while True:
            if data:
                to_guest.inc(len(data))
                try:
                    await guest.write(data)
                except ProbeError as exc:
                    return _guest_ending(exc)
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return "viewer"
            try:
                data = viewer_bytes(message)
            except ViewerMessageTooBig:
                return "viewer-too-big"

    async def guest_to_viewer() -> str:
        while True:
            try:
                data = await guest.read_some()
            except ProbeError as exc:
                return _guest_ending(exc)
            if not data:
                return "guest"
            to_viewer.inc(len(data))
            # the next read waits for this send: a slow viewer slows the guest's socket
            # (its buffers fill, x11vnc waits), nothing piles up here
            await ws.send_bytes(data)

    tasks = [
        asyncio.create_task(viewer_to_guest()),
        asyncio.create_task(guest_to_viewer()),
    ]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    endings = []
    for task in done:  # both may have ended at once: every result is retrieved
        try:
            endings.append(task.result())
        except (WebSocketDisconnect, RuntimeError, OSError):
            endings.append("viewer")
    # a viewer that went away hears nothing more; otherwise say what happened
    return next((e for e in endings if e != "viewer"), "viewer")
