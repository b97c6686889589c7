"""What the egress tests share: a real proxy on loopback whose guest network is 127.0.0.0/8
(so loopback source addresses are guests: 127.0.0.2 is guest A, 127.0.0.3 guest B), an
origin server on 127.0.0.1, and guest-side helpers that speak to the proxy over real
sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from master_controller.network.egress import Allowance, EgressProxy
from master_controller.settings import Settings
from tests.servers import free_port

GUEST_A = "127.0.0.2"
GUEST_B = "127.0.0.3"
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Origin:
    """An origin server on 127.0.0.1. A request line gets ``hello`` back (the head is kept
    in ``seen``); ``drip`` gets ten dots, one every 0.1 s; anything else is echoed
    (``echo:`` + bytes) until the peer hangs up, as a TLS server would keep a tunnel."""

    port: int = 0
    seen: list[bytes] = field(default_factory=list)
    accepted: int = 0
    open: int = 0


@asynccontextmanager
async def origin() -> AsyncIterator[Origin]:
    state = Origin()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.accepted += 1
        state.open += 1
        try:
            first = await reader.read(4096)
            if first.startswith((b"GET ", b"POST ")):
                state.seen.append(first)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
                writer.write(b"hello")
            elif first == b"drip":
                for _ in range(10):
                    writer.write(b".")
                    await writer.drain()
                    await asyncio.sleep(0.1)
            else:
                data = first
                while data:
                    writer.write(b"echo:" + data)
                    await writer.drain()
                    data = await reader.read(65536)
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            # cancelled at the end of a test; Python 3.11's start_server logs a cancelled
            # handler as an error, so it ends quietly instead
            pass
        finally:
            state.open -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield state


@asynccontextmanager
async def running_proxy(**overrides: Any) -> AsyncIterator[tuple[EgressProxy, int]]:
    """A started proxy whose guests are loopback peers; ``overrides`` are settings."""
    port = free_port()
    settings = Settings(guest_network="127.0.0.0/8", egress_port=port, **overrides)
    egress = EgressProxy(settings)
    await egress.start()
    try:
        yield egress, port
    finally:
        await egress.stop()


def allowance(*domains: str, ports: set[int] | None = None, session: str = "s-1") -> Allowance:
    return Allowance(session_id=session, domains=domains, ports=frozenset(ports or {443}))


async def connect(port: int, source: str = GUEST_A) -> Streams:
    """A connection to the proxy from the guest at ``source``."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def ask(port: int, head: str, source: str = GUEST_A) -> str:
    """Send one request head and read the whole answer."""
    reader, writer = await connect(port, source)
    try:
        writer.write(head.encode("latin-1"))
        await writer.drain()
        return (await asyncio.wait_for(reader.read(), 5)).decode("latin-1")
    finally:
        writer.close()


async def tunnel(port: int, target: str, source: str = GUEST_A) -> Streams:
    """A CONNECT tunnel to ``target`` ("host:port"), established (200) and checked by one
    echo through it."""
    reader, writer = await connect(port, source)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    await echo(reader, writer, b"hi")
    return reader, writer


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send ``data`` through a tunnel to the echoing origin and check the answer."""
    writer.write(data)
    await writer.drain()
    expected = b"echo:" + data
    assert await asyncio.wait_for(reader.readexactly(len(expected)), 5) == expected


async def closed(reader: asyncio.StreamReader, within: float = 2.0) -> bool:
    """Whether the proxy closed this connection within ``within`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
