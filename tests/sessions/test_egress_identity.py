"""The session core with upstreams configured: a session's egress is granted only through
its user's checked exit, never directly (a real tinyproxy on loopback stands in for the
upstream; the check URL is a loopback origin answering the caller's address)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from master_controller.network.egress import Allowance
from master_controller.sessions.states import State
from tests.servers import free_port
from tests.sessions.harness import USER, core


class Grants:
    """Stands in for the egress proxy: what the session layer granted and revoked."""

    def __init__(self) -> None:
        self.granted: dict[str, Allowance] = {}

    def grant(self, address: str, allowance: Allowance) -> None:
        self.granted[address] = allowance

    def revoke(self, address: str) -> int:
        self.granted.pop(address, None)
        return 0


async def _echo_address(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    peer = writer.get_extra_info("peername")[0].encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(peer), peer))
    await writer.drain()
    writer.close()


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """(upstream URL, check URL): tinyproxy on loopback, and an origin behind it."""
    if shutil.which("tinyproxy") is None:
        pytest.skip("tinyproxy is not installed (run scripts/setup.sh)")
    origin = await asyncio.start_server(_echo_address, "127.0.0.1", 0)
    port = free_port()
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(
        f"User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 30\n"
        "LogLevel Critical\n"
    )
    proxy = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)])
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        origin_port = origin.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{origin_port}/ip"
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        origin.close()


async def test_egress_is_granted_only_through_the_users_checked_exit(
    tmp_path: Path, upstream: tuple[str, str]
) -> None:
    url, check = upstream
    async with core(tmp_path, egress_upstreams=[url], egress_check_url=check) as c:
        c.egress = grants = Grants()
        service = await c.restart()  # built with the stand-in
        row = await c.start()
        ready = await c.wait_for(row.id, {State.AUTHENTICATING, State.FAILED})
        assert ready.state == State.AUTHENTICATING, ready.reason
        assert ready.browser_ip is not None
        allowance = grants.granted[ready.browser_ip]
        assert allowance.upstream is not None and allowance.upstream.name == url
        steps = {e.name: e.detail for e in await c.events(row.id)}
        assert steps["egress upstream"] == f"{url}, exit 127.0.0.1"

        # a new controller: the exit is checked again before egress is granted again
        c.settings.egress_check_interval = 0.0
        c.egress = grants = Grants()
        service = await c.restart()
        assert State(await c.state(row.id)) == State.AUTHENTICATING
        assert grants.granted[ready.browser_ip].upstream == allowance.upstream

        # ... and with its upstream gone, the reattached session fails rather than going
        # out directly
        c.settings.egress_upstreams = ["http://127.0.0.1:9"]
        c.egress = grants = Grants()
        service = await c.restart()
        ended = await c.wait_for(row.id, {State.FAILED})
        assert "no egress identity after the restart" in ended.reason
        assert grants.granted == {}
        assignment = await service.identities.assignment(USER)  # type: ignore[union-attr]
        assert assignment is not None and assignment.upstream == url
