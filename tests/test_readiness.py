import asyncio
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import serve

from master_controller.errors import ProbeError
from master_controller.readiness import RFC6455_SAMPLE_KEY, websocket_accept, websocket_upgrade
from master_controller.rfb import Frame


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
