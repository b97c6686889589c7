import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import serve

from master_controller.agent_client import MAX_RESPONSE_BYTES
from master_controller.errors import ProbeError
from master_controller.viewing import readiness
from master_controller.viewing.guest_socket import MAX_GUEST_MESSAGE, READ_SIZE
from master_controller.viewing.readiness import (
    RFC6455_SAMPLE_KEY,
    agent_health,
    non_blank_frame,
    poll,
    rfb_handshake,
    websocket_accept,
    websocket_upgrade,
)
from master_controller.viewing.rfb import Frame
from tests.sessions import hostile


def test_accept_value_of_the_rfc_sample() -> None:
    assert websocket_accept(RFC6455_SAMPLE_KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.fixture
async def ws_server() -> AsyncIterator[int]:
    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, subprotocols=["binary"]) as server:  # type: ignore[list-item]
        yield server.sockets[0].getsockname()[1]


async def test_upgrade_against_a_real_websocket_server(ws_server: int) -> None:
    answer = await websocket_upgrade("127.0.0.1", ws_server)
    assert answer["accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert answer["protocol"] == "binary"


async def test_upgrade_refused_by_plain_http() -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ProbeError, match="not 101"):
            await websocket_upgrade("127.0.0.1", port)


async def test_upgrade_with_nothing_listening() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ProbeError, match="nothing accepts connections"):
        await websocket_upgrade("127.0.0.1", port, timeout=1)


def test_blank_and_non_blank_frames() -> None:
    black = Frame(64, 32, bytearray(64 * 32 * 4))
    assert black.is_blank()
    pixels = bytearray(64 * 32 * 4)
    pixels[: 64 * 4 * 8] = b"\xff\x80\x10\x00" * (64 * 8)  # a quarter of the screen coloured
    drawn = Frame(64, 32, pixels)
    assert not drawn.is_blank()
    png = drawn.png()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in png


# --- a hostile guest's VNC and agent (tests/sessions/hostile.py, on loopback) -----------


async def test_the_fake_vnc_serves_a_real_screen_over_tcp_and_websocket() -> None:
    """The hostile server's well-behaved mode, both ways the controller reads RFB: straight
    over TCP (the relay's path to a guest) and in WebSocket messages (websockify's)."""
    with hostile.running("vnc-ok") as port:
        frame = await non_blank_frame(f"vnc://127.0.0.1:{port}", "pw", time.monotonic() + 5)
    assert (frame.width, frame.height) == (64, 32)
    with hostile.running("vnc-ok", transport="ws") as port:
        frame = await non_blank_frame(f"ws://127.0.0.1:{port}/", "pw", time.monotonic() + 5)
    assert (frame.width, frame.height) == (64, 32)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:1/", "no RFB transport"),
        ("vnc://127.0.0.1", "vnc://host:port expected"),
        ("vnc://127.0.0.1:99999", "not a VNC address"),
    ],
)
async def test_a_url_without_a_transport_is_refused(url: str, words: str) -> None:
    with pytest.raises(ProbeError, match=words):
        await rfb_handshake(url, "pw")


async def test_a_16gib_screen_claim_fails_the_handshake() -> None:
    with (
        hostile.running("vnc-huge-screen") as port,
        pytest.raises(ProbeError, match="claims a 65535x65535 screen"),
    ):
        await rfb_handshake(f"vnc://127.0.0.1:{port}", "pw")


@pytest.mark.parametrize(
    ("transport", "url", "words", "bound"),
    [
        # one 100 MB WebSocket message: refused by its header (1009), never buffered
        ("ws", "ws://127.0.0.1:{}/", "1009", 4 * MAX_GUEST_MESSAGE),
        # over TCP no message to refuse: the flood is read as RFB, its first byte (not a
        # message type) ends the check, nothing buffered
        ("tcp", "vnc://127.0.0.1:{}", "unexpected RFB server message type", 4 * READ_SIZE),
    ],
)
async def test_a_100mb_flood_after_server_init_is_never_buffered(
    transport: str, url: str, words: str, bound: int
) -> None:
    tracemalloc.start()
    try:
        with (
            hostile.running("vnc-huge-message", transport=transport) as port,
            pytest.raises(ProbeError, match=words),
        ):
            await non_blank_frame(url.format(port), "pw", time.monotonic() + 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < bound, f"{peak} bytes allocated"


async def test_poll_cuts_a_check_a_guest_keeps_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VNC server dribbling its greeting a byte every 0.2 s never trips the 10 s silence
    timeout; poll still ends the check at its deadline (plus the grace, plus at most
    GUEST_CLOSE_SECONDS waiting for the guest to take our close)."""
    monkeypatch.setattr(readiness, "CHECK_GRACE_SECONDS", 0.5)
    for transport, url in (("tcp", "vnc://127.0.0.1:{}"), ("ws", "ws://127.0.0.1:{}/")):
        with hostile.running("vnc-dribble", seconds=0.2, transport=transport) as port:
            started = time.monotonic()
            with pytest.raises(ProbeError, match="still waiting"):
                await poll(lambda u=url.format(port): rfb_handshake(u, "pw"), started + 0.5)
        assert time.monotonic() - started < 3.0, transport


async def test_agent_health_refuses_a_100mb_answer() -> None:
    with (
        hostile.running("agent-huge") as port,
        pytest.raises(ProbeError, match=f"at most {MAX_RESPONSE_BYTES}"),
    ):
        await agent_health(f"http://127.0.0.1:{port}", "token")
