"""The controller's WebSocket to a guest's websockify, carrying RFB bytes (how noVNC talks to
it). Used by the readiness checks and by the relay; everything the guest sends through it is
bounded (message size, queue, close wait)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from master_controller.errors import ProbeError
from master_controller.viewing.rfb import RFBClient

# Largest WebSocket message taken from a guest's websockify. websockify (0.10, Debian's)
# sends what one recv() from the VNC server returns, at most its buffer_size of 64 KiB, as
# one message; 1 MiB leaves 16x margin and bounds what one message can make us hold.
MAX_GUEST_MESSAGE = 1024 * 1024
# Frames a WebSocket client buffers before it stops reading (flow control): with the size
# above, at most 4 MiB queued per connection to a guest.
MAX_GUEST_QUEUE = 4
# How long closing waits for a guest's answer to our close frame (a hostile one never
# answers; websockets would wait 10 s by default).
GUEST_CLOSE_SECONDS = 1.0


class WebSocketStream:
    """RFB bytes over WebSocket binary messages (how noVNC talks to websockify)."""

    def __init__(self, ws: ClientConnection, timeout: float) -> None:
        self.ws = ws
        self.timeout = timeout
        self.buffer = bytearray()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that arrives as a message does (an outer deadline would then be lost)
                async with asyncio.timeout(self.timeout):
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
