"""Faults while sessions run, as users meet them: a guest killed under a connected viewer
(the session fails with a reason, the viewer is told why, the guest's resources go, the
other session is untouched), and a service stopped inside a guest (the agent's health
names it; systemd brings a crashed one back)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from master_controller.viewing.readiness import websocket_upgrade
from tests.servers import Controller, controller, guest_health

pytestmark = pytest.mark.integration


@pytest.fixture
def ctl(golden_image: str, integration_settings: Settings, tmp_path: Path) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.208.0/22",
    ) as running:
        yield running


def test_a_guest_killed_under_its_viewer(ctl: Controller, integration_settings: Settings) -> None:
    runtime = ContainerRuntime(integration_settings)
    doomed, other = ctl.ready_session("doomed"), ctl.ready_session("bystander")
    url, headers = ctl.viewer(doomed)

    async def watch_and_kill() -> tuple[int, str]:
        async with connect(
            url, additional_headers=headers, proxy=None, subprotocols=["binary"]
        ) as ws:  # type: ignore[list-item]
            await ws.recv()
            leader = runtime.load(doomed).resources["leader"]["pid"]
            os.kill(leader, signal.SIGKILL)
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None, "closed without a code"
                return closed.rcvd.code, closed.rcvd.reason

    code, reason = asyncio.run(watch_and_kill())
    assert code in (1011, 4410), (code, reason)
    body = ctl.wait_for(doomed, {"failed"}, timeout=30)
    assert body["status"] == "failed" and "guest stopped unexpectedly" in body["reason"]
    deadline = time.monotonic() + 30  # the state is recorded first, then the guest goes
    while runtime.guest_dir(doomed).exists():
        assert time.monotonic() < deadline, "the dead guest's folder stayed"
        time.sleep(0.3)
    # the other session is untouched and still viewable
    assert ctl.request("GET", f"/api/auth/session/{other}").json()["status"] == "ready"
    assert not ctl.frame(other).is_blank()
    health = ctl.request("GET", "/api/health", key=None).json()
    assert health["image"]["current"] and health["status"] == "ok"


def _in_guest(pid: int, *argv: str) -> str:
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-a", *argv], capture_output=True, text=True, timeout=30
    ).stdout


def test_a_stopped_service_is_named_and_a_crashed_one_comes_back(
    ctl: Controller, integration_settings: Settings
) -> None:
    runtime = ContainerRuntime(integration_settings)
    session_id = ctl.ready_session("faulty")
    leader = runtime.load(session_id).resources["leader"]["pid"]

    _in_guest(leader, "systemctl", "stop", "x11vnc.service")
    health = guest_health(runtime, session_id)
    assert health["status"] == "degraded"
    x11vnc = health["services"]["x11vnc"]  # type: ignore[index]
    assert x11vnc["active"] != "active" and "x11vnc.service" in x11vnc["summary"]
    _in_guest(leader, "systemctl", "start", "x11vnc.service")

    # a crash (SIGKILL) is restarted by systemd (Restart=always)
    deadline = time.monotonic() + 20
    while True:  # started again above: wait for it to run before killing it
        before = _in_guest(leader, "systemctl", "show", "-p", "MainPID", "x11vnc.service")
        if before.strip() != "MainPID=0":
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    _in_guest(leader, "systemctl", "kill", "-s", "KILL", "x11vnc.service")
    while True:
        health = guest_health(runtime, session_id)
        after = _in_guest(leader, "systemctl", "show", "-p", "MainPID", "x11vnc.service")
        if health["status"] == "ok" and after != before and after.strip() != "MainPID=0":
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert not ctl.frame(session_id).is_blank()  # the viewer path works again

    # websockify (noVNC's bridge in the guest) costs nothing until used: it does not run,
    # the health watches its socket and says ok; the first connection starts it
    def websockify_state() -> str:
        return _in_guest(leader, "systemctl", "show", "-p", "ActiveState", "websockify.service")

    assert websockify_state().strip() == "ActiveState=inactive"
    websockify = health["services"]["websockify"]  # type: ignore[index]
    assert websockify["active"] == "active" and websockify["sub"] == "listening", websockify
    address = runtime.endpoint(runtime.load(session_id)).address
    assert asyncio.run(websocket_upgrade(address, 6080))["accept"]
    assert websockify_state().strip() == "ActiveState=active"
    # killed, it is started again by the next connection (the socket keeps listening)
    _in_guest(leader, "systemctl", "kill", "-s", "KILL", "websockify.service")
    assert asyncio.run(websocket_upgrade(address, 6080))["accept"]
    assert guest_health(runtime, session_id)["status"] == "ok"


async def _rfb_handshake(ws: ClientConnection) -> None:
    """A viewer's side of the RFB 3.8 handshake the proxy offers (no authentication)."""
    assert (await ws.recv()) == b"RFB 003.008\n"
    await ws.send(b"RFB 003.008\n")
    assert (await ws.recv()) == b"\x01\x01"  # one security type: None
    await ws.send(b"\x01")
    assert (await ws.recv()) == b"\x00\x00\x00\x00"  # security result: ok
    await ws.send(b"\x01")  # ClientInit, shared
    await ws.recv()  # ServerInit


def test_a_cut_network_tells_the_viewer_and_recovers(
    ctl: Controller, integration_settings: Settings
) -> None:
    runtime = ContainerRuntime(integration_settings)
    session_id = ctl.ready_session("cut")
    link = runtime.load(session_id).resources["host_ifname"]
    url, headers = ctl.viewer(session_id)

    async def watch_while_cut() -> tuple[int, str, float]:
        async with connect(
            url, additional_headers=headers, proxy=None, subprotocols=["binary"]
        ) as ws:  # type: ignore[list-item]
            await _rfb_handshake(ws)  # a real viewer: now the proxy relays
            subprocess.run(["ip", "link", "set", link, "down"], check=True)
            cut = time.monotonic()
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 40)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None, "closed without a code"
                return closed.rcvd.code, closed.rcvd.reason, time.monotonic() - cut

    try:
        code, reason, seconds = asyncio.run(watch_while_cut())
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    assert code == 1011 and "stopped answering" in reason and seconds < 20, (code, reason)
    # the network is back: the session is still ready and a viewer gets the screen again
    assert ctl.request("GET", f"/api/auth/session/{session_id}").json()["status"] == "ready"
    deadline = time.monotonic() + 30
    while True:
        try:
            assert not ctl.frame(session_id).is_blank()
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(1)
