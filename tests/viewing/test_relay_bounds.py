"""The viewer proxy against hostile guests and viewers, on loopback: the real relay() served
by a real uvicorn, in front of the hostile fake VNC server of tests/sessions/hostile.py (RFB
over TCP, as x11vnc serves it).

A guest claiming a 16 GiB screen or a 4 GiB desktop name, dribbling its handshake, or
reading nothing more, is cut off and the viewer told why (1011 and a reason); a guest
flooding 100 MB is relayed in bounded reads at the viewer's pace, never buffered; a viewer
sending an oversized message is closed with 1009; and many viewers connecting at once never
get past max_viewers.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from master_controller.viewing import relay as proxy
from master_controller.viewing.close_codes import CloseCode
from master_controller.viewing.guest_socket import READ_SIZE
from master_controller.viewing.relay import (
    MAX_VIEWER_MESSAGE,
    ViewerConnection,
    ViewerRegistry,
    relay,
)
from tests.servers import free_port
from tests.sessions import hostile

SESSION = "s-hostile"
LIMIT = 2


@dataclass
class Proxy:
    """The relay behind a WebSocket route, as web/viewer.py uses it."""

    url: str
    registry: ViewerRegistry
    guest_port: int = 0


@pytest.fixture
async def served() -> AsyncIterator[Proxy]:
    registry = ViewerRegistry()
    port = free_port()
    state = Proxy(f"ws://127.0.0.1:{port}/websock", registry)

    async def websock(ws: WebSocket) -> None:
        await ws.accept(subprotocol="binary")
        viewer = ViewerConnection(ws, SESSION)
        await asyncio.sleep(0.01)  # viewer.py awaits the database here: others run meanwhile
        guest = f"vnc://127.0.0.1:{state.guest_port}"
        await relay(viewer, registry, guest, "guestpw", max_viewers=LIMIT)

    app = Starlette(routes=[WebSocketRoute("/websock", websock)])
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            ws_per_message_deflate=False,  # as `serve` runs it
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield state
    finally:
        server.should_exit = True
        await task


async def rfb_viewer(ws: ClientConnection) -> bytes:
    """A viewer's side of the handshake the proxy offers (no authentication); the
    ServerInit it gets."""
    assert await ws.recv() == b"RFB 003.008\n"
    await ws.send(b"RFB 003.008\n")
    assert await ws.recv() == b"\x01\x01"
    await ws.send(b"\x01")
    assert await ws.recv() == b"\x00\x00\x00\x00"
    await ws.send(b"\x01")  # ClientInit
    init = await ws.recv()
    assert isinstance(init, bytes)
    return init


async def closed_with(ws: ClientConnection, timeout: float = 10) -> tuple[int, str]:
    """Read until the proxy closes; its code and reason."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        return closed.rcvd.code, closed.rcvd.reason


async def released(registry: ViewerRegistry) -> None:
    """Wait until the relays have ended (closing the guest's side may wait for it a while:
    GUEST_CLOSE_SECONDS) and given their viewer slots back."""
    for _ in range(100):
        if registry.count(SESSION) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{registry.count(SESSION)} viewer slots still taken")


def viewer(proxy_url: str) -> connect:
    return connect(proxy_url, subprotocols=["binary"], proxy=None)  # type: ignore[list-item]


async def test_a_well_behaved_guest_is_relayed(served: Proxy) -> None:
    with hostile.running("vnc-ok") as served.guest_port:
        async with viewer(served.url) as ws:
            init = await rfb_viewer(ws)
            assert struct.unpack(">HH", init[:4]) == (64, 32) and init.endswith(b"hostile:ok")
            await ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 32))
            update = bytearray()
            while len(update) < 4 + 12 + 64 * 32 * 4:
                update += await ws.recv()  # type: ignore[operator]
            assert update[:4] == b"\x00\x00\x00\x01"


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("vnc-huge-screen", "claims a 65535x65535 screen"),
        ("vnc-huge-name", "desktop name of 4294967295 bytes"),
    ],
)
async def test_a_lying_server_init_is_refused(served: Proxy, mode: str, words: str) -> None:
    """Checked in the proxy before the viewer sees it (noVNC would size its canvas by it),
    and before the proxy reads a byte of the name."""
    with hostile.running(mode) as served.guest_port:
        async with viewer(served.url) as ws:
            code, reason = await closed_with(ws)
    assert code == 1011 and reason.startswith("VNC handshake failed: ") and words in reason
    await released(served.registry)


async def test_a_100mb_flood_is_relayed_in_bounded_reads(served: Proxy) -> None:
    """After ServerInit the guest sends 100 MB at once: the proxy passes it on in messages of
    at most READ_SIZE, reading the next only when the viewer took the last, so the flood is
    never held (the viewer reads 16 MiB of it, slowly, then leaves)."""
    tracemalloc.start()
    try:
        with hostile.running("vnc-huge-message") as served.guest_port:
            async with connect(
                served.url,
                subprotocols=["binary"],  # type: ignore[list-item]
                proxy=None,
                max_size=READ_SIZE,  # a bigger message fails the test with 1009
                max_queue=1,
            ) as ws:
                await rfb_viewer(ws)
                received, largest = 0, 0
                while received < 16 * 2**20:
                    message = await ws.recv()
                    received += len(message)
                    largest = max(largest, len(message))
                    await asyncio.sleep(0.001)  # a slow viewer
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert largest <= READ_SIZE
    assert peak < 24 * READ_SIZE, f"{peak} bytes allocated while relaying it"
    await released(served.registry)


async def test_a_guest_that_reads_nothing_is_called_silent(
    served: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest stops reading after ServerInit; a viewer keeps pasting: once the guest's
    socket is full and takes nothing for GUEST_SILENT_SECONDS, the viewer is told the guest
    stopped answering (not left hanging with a frozen screen)."""
    monkeypatch.setattr(proxy, "GUEST_SILENT_SECONDS", 1.0)
    paste = b"\x06\x00\x00\x00" + struct.pack(">I", 200_000) + b"p" * 200_000

    async def keep_pasting(ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(paste)

    with hostile.running("vnc-silent") as served.guest_port:
        async with viewer(served.url) as ws:
            await rfb_viewer(ws)
            pasting = asyncio.create_task(keep_pasting(ws))
            try:
                code, reason = await closed_with(ws, timeout=30)
            finally:
                pasting.cancel()
    assert (code, reason) == proxy.GUEST_SILENT
    await released(served.registry)


async def test_a_guest_dribbling_its_handshake_is_cut(
    served: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy, "GUEST_HANDSHAKE_SECONDS", 1.0)
    with hostile.running("vnc-dribble", seconds=0.2) as served.guest_port:
        async with viewer(served.url) as ws:
            code, reason = await closed_with(ws)
    assert code == 1011 and "did not finish its handshake in 1 s" in reason


async def test_an_oversized_viewer_message_is_closed_with_1009(served: Proxy) -> None:
    with hostile.running("vnc-ok") as served.guest_port:
        async with viewer(served.url) as ws:  # while relaying
            await rfb_viewer(ws)
            await ws.send(b"\x06" + b"x" * (MAX_VIEWER_MESSAGE + 1))
            assert await closed_with(ws) == proxy.VIEWER_TOO_BIG
        async with viewer(served.url) as ws:  # during the handshake
            await ws.recv()
            await ws.send(b"R" * (MAX_VIEWER_MESSAGE + 1))
            code, reason = await closed_with(ws)
    assert (code, reason) == proxy.VIEWER_TOO_BIG
    assert reason == f"a viewer message over {MAX_VIEWER_MESSAGE} bytes"


async def test_concurrent_viewers_never_exceed_the_limit(served: Proxy) -> None:
    """Ten viewers connect at once to a session allowing two: exactly two relay, the others
    are refused with 4429, and the registry never counts more than two."""
    seen: list[int] = []

    async def one() -> tuple[str, object]:
        async with viewer(served.url) as ws:
            try:
                await rfb_viewer(ws)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None
                return "refused", (closed.rcvd.code, closed.rcvd.reason)
            seen.append(served.registry.count(SESSION))
            await relaying.wait()  # hold the slot until every viewer has its answer
            return "relaying", None

    relaying = asyncio.Event()
    with hostile.running("vnc-ok") as served.guest_port:
        tasks = [asyncio.create_task(one()) for _ in range(10)]
        async with asyncio.timeout(30):
            while sum(t.done() for t in tasks) < 10 - LIMIT or len(seen) < LIMIT:
                assert served.registry.count(SESSION) <= LIMIT
                await asyncio.sleep(0.01)
            relaying.set()
            outcomes = await asyncio.gather(*tasks)
    relayed = [o for o in outcomes if o[0] == "relaying"]
    refused = [o[1] for o in outcomes if o[0] == "refused"]
    assert len(relayed) == LIMIT and max(seen) == LIMIT
    assert (
        refused == [(CloseCode.TOO_MANY_VIEWERS, f"this session has {LIMIT} viewers already")] * 8
    )
    await released(served.registry)
