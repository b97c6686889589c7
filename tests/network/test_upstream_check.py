"""The exit check against loopback stand-ins for an upstream (an HTTP CONNECT proxy that is
also the origin behind it): a chunked answer is read, a stalled one fails in time with the
upstream's name, never with a bare timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from master_controller.errors import UpstreamFailed
from master_controller.network.upstream import exit_address, parse

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def connect_proxy(answer: Answer) -> AsyncIterator[str]:
    """An upstream on loopback: it accepts any CONNECT, then answers the request inside the
    tunnel with ``answer``. Yields its URL."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")  # CONNECT host:port
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")  # the GET inside
            await answer(writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _chunked(writer: asyncio.StreamWriter) -> None:
    body = b'{"ip": "203.0.113.7"}'
    writer.write(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(body[:5]), body[:5])
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body[5:]), body[5:])
    )
    await writer.drain()


async def _stalls(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def test_a_chunked_answer_is_read() -> None:
    async with connect_proxy(_chunked) as url:
        assert await exit_address(parse(url), "http://check.test/ip") == "203.0.113.7"


async def test_a_stalled_check_fails_in_time_naming_the_upstream() -> None:
    async with connect_proxy(_stalls) as url:
        started = time.monotonic()
        with pytest.raises(UpstreamFailed) as failed:
            await exit_address(parse(url), "http://check.test/ip", timeout=0.5)
        assert time.monotonic() - started < 2
        assert failed.value.upstream == url and "took over 0.5 s" in failed.value.reason
