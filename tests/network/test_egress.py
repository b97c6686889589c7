"""The egress proxy on loopback (the guest network is set to 127.0.0.0/8 so that loopback
peers count as guests): allowed hosts pass for plain HTTP and CONNECT, others get a 403
naming the host, unknown guests and bad requests are refused, non-guests get nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from master_controller.network.egress import Allowance, EgressProxy
from master_controller.settings import Settings
from tests.servers import free_port


@asynccontextmanager
async def upstream() -> AsyncIterator[tuple[int, list[bytes]]]:
    """An HTTP origin that records each request head and echoes a body; on a raw
    connection that does not start with a request line it echoes bytes (for CONNECT)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(4096)
        if first.startswith((b"GET ", b"POST ")):
            seen.append(first)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        else:
            writer.write(b"echo:" + first)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], seen


@asynccontextmanager
async def proxy(network: str, allowance: Allowance | None) -> AsyncIterator[str]:
    port = free_port()
    settings = Settings(
        guest_network=network, egress_port=port, egress_hosts={"allowed.test": "127.0.0.1"}
    )

    async def policy(peer: str) -> Allowance | None:
        return allowance

    egress = EgressProxy(settings, policy)
    await egress.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await egress.stop()


ALLOWED = Allowance(session_id="s-1", domains=("allowed.test",))


async def test_plain_http_to_an_allowed_host_is_forwarded() -> None:
    async with (
        upstream() as (port, seen),
        proxy("127.0.0.0/8", ALLOWED) as url,
        httpx.AsyncClient(proxy=url, trust_env=False, timeout=5) as client,
    ):
        answer = await client.get(
            f"http://allowed.test:{port}/token?x=1", headers={"Proxy-Authorization": "x"}
        )
    assert answer.status_code == 200 and answer.text == "hello"
    head = seen[0].decode()
    assert head.startswith("GET /token?x=1 HTTP/1.1\r\n")  # origin-form upstream
    assert f"host: allowed.test:{port}" in head.lower()
    assert "proxy-authorization" not in head.lower() and "connection: close" in head.lower()


async def test_connect_tunnels_to_an_allowed_host() -> None:
    async with upstream() as (port, _), proxy("127.0.0.0/8", ALLOWED) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        writer.write(f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode())
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(b"tls bytes")
        await writer.drain()
        assert await reader.read(100) == b"echo:tls bytes"
        writer.close()


@pytest.mark.parametrize(
    ("allowance", "request_line", "status", "reason"),
    [
        (ALLOWED, "GET http://denied.test/ HTTP/1.1", 403, "egress to denied.test is not allowed"),
        (ALLOWED, "CONNECT notallowed.test:443 HTTP/1.1", 403, "notallowed.test"),
        (ALLOWED, "CONNECT evil-allowed.test:443 HTTP/1.1", 403, "evil-allowed.test"),
        (None, "GET http://allowed.test/ HTTP/1.1", 403, "no sign-in that allows egress"),
        (ALLOWED, "GET /relative HTTP/1.1", 400, "only absolute http://"),
        (ALLOWED, "BROKEN", 400, "malformed"),
        (ALLOWED, "CONNECT allowed.test HTTP/1.1", 400, "host:port"),
    ],
)
async def test_refusals_say_why(
    allowance: Allowance | None, request_line: str, status: int, reason: str
) -> None:
    async with proxy("127.0.0.0/8", allowance) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        writer.write(request_line.encode() + b"\r\nHost: x\r\n\r\n")
        await writer.drain()
        answer = (await reader.read(4096)).decode()
        writer.close()
    assert answer.startswith(f"HTTP/1.1 {status} ") and reason in answer


async def test_peers_outside_the_guest_network_get_nothing() -> None:
    async with proxy("10.213.0.0/16", ALLOWED) as url:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        writer.write(b"GET http://allowed.test/ HTTP/1.1\r\n\r\n")
        await writer.drain()
        try:
            answer = await reader.read(100)
        except ConnectionResetError:  # closed before it read the request
            answer = b""
        assert answer == b""  # closed without a word
        writer.close()


def test_allowance_covers_subdomains_only() -> None:
    allowance = Allowance(session_id="s", domains=("claude.com",))
    assert allowance.allows("claude.com") and allowance.allows("platform.claude.com")
    assert allowance.allows("CLAUDE.COM.")
    assert not allowance.allows("evilclaude.com") and not allowance.allows("claude.com.evil")
