"""A hostile guest against a real controller: as guest root (nsenter into the guest, as a
viewer with a terminal there could become), x11vnc on 5900 (what the relay connects to) and
the agent on 8080 are replaced by tests/sessions/hostile.py, which claims a 16 GiB screen,
a 4 GiB desktop name, floods 100 MB, answers the agent's API with 100 MB, and dribbles it a
byte at a time (slowloris).

What must hold: every viewer is told why (a close code and a reason) or, for the flood, gets
it in bounded messages at its own pace, every agent call fails within its deadline with 502
and a reason, the controller's memory stays bounded (resident set measured before and
after, peak included), and a second session on the same controller stays ready and
viewable.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from master_controller.agent_client import CALL_SECONDS, MAX_RESPONSE_BYTES
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from master_controller.viewing.guest_socket import READ_SIZE
from mc_agent import VNC_PORT
from tests.servers import Controller, controller
from tests.sessions import hostile

pytestmark = pytest.mark.integration

# What the attacks may add to the controller's resident set, at its peak. Without the
# bounds, one 100 MB message or agent answer alone added about 200 MiB (measured).
RSS_ALLOWANCE_KIB = 64 * 1024
DRIBBLE_SECONDS = 2.0


@pytest.fixture
def ctl(golden_image: str, integration_settings: Settings, tmp_path: Path) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.236.0/22",
    ) as running:
        yield running


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


class GuestRoot:
    """Root inside one guest: commands run in all its namespaces."""

    def __init__(self, leader: int, address: str) -> None:
        self.leader = leader
        self.address = address

    def run(self, *argv: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, (argv, done.stderr)
        return done.stdout

    def replace(self, service: str, port: int, mode: str) -> None:
        """Stop ``service`` (or the hostile server before it) and serve ``mode`` on
        ``port`` instead, as a transient unit of the guest's own systemd."""
        self.run("systemctl", "stop", service, "hostile-*.service")
        unit = f"hostile-{mode}"
        self.run(
            "systemd-run", f"--unit={unit}", "--collect", "python3", "/root/hostile.py",
            mode, "0.0.0.0", str(port), str(DRIBBLE_SECONDS),
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while True:  # listening?
            try:
                socket.create_connection((self.address, port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"{unit} did not come up"
                time.sleep(0.1)


async def viewer_flooded(url: str, headers: dict[str, str], mib: int) -> int:
    """Relay ``mib`` MiB of a guest's flood as a slow viewer; the largest message seen."""
    async with connect(
        url,
        additional_headers=headers,
        proxy=None,
        subprotocols=["binary"],  # type: ignore[list-item]
        max_size=READ_SIZE,  # a larger message fails the test (1009)
        max_queue=1,
    ) as ws:
        await rfb_viewer_handshake(ws)
        received, largest = 0, 0
        async with asyncio.timeout(60):
            while received < mib * 2**20:
                message = await ws.recv()
                received += len(message)
                largest = max(largest, len(message))
                await asyncio.sleep(0.001)
        return largest


async def rfb_viewer_handshake(ws: ClientConnection) -> None:
    assert await ws.recv() == b"RFB 003.008\n"
    await ws.send(b"RFB 003.008\n")
    assert await ws.recv() == b"\x01\x01"
    await ws.send(b"\x01")
    assert await ws.recv() == b"\x00\x00\x00\x00"
    await ws.send(b"\x01")
    await ws.recv()  # ServerInit


async def viewer_close(url: str, headers: dict[str, str], handshake: bool) -> tuple[int, str]:
    """Connect as a viewer (optionally through the RFB handshake) and wait for the close."""
    async with connect(url, additional_headers=headers, proxy=None, subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        try:
            async with asyncio.timeout(30):
                if handshake:
                    await rfb_viewer_handshake(ws)
                while True:
                    await ws.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a code"
            return closed.rcvd.code, closed.rcvd.reason


def test_a_hostile_guest_cannot_take_the_controller(
    ctl: Controller, integration_settings: Settings
) -> None:
    runtime = ContainerRuntime(integration_settings)
    started = {}
    for user in ("mallory", "bystander"):  # both boot at once
        answer = ctl.request("POST", "/api/auth/start", json={"userId": user, "provider": "codex"})
        assert answer.status_code == 200, answer.text
        started[user] = answer.json()["sessionId"]
    for session_id in started.values():
        body = ctl.wait_for(session_id, {"ready", "failed"})
        assert body["status"] == "ready", body["reason"]
    mallory, bystander = started["mallory"], started["bystander"]
    assert not ctl.frame(bystander).is_blank()

    guest = runtime.load(mallory)
    root = GuestRoot(guest.resources["leader"]["pid"], runtime.endpoint(guest).address)
    root.run("sh", "-c", "cat > /root/hostile.py", stdin=Path(hostile.__file__).read_text())
    assert ctl.process is not None
    before = memory_kib(ctl.process.pid)
    url, headers = ctl.viewer(mallory)

    # the guest's VNC lies in ServerInit: refused before the viewer sees it
    root.replace("x11vnc.service", VNC_PORT, "vnc-huge-screen")
    code, reason = asyncio.run(viewer_close(url, headers, handshake=False))
    assert code == 1011 and "claims a 65535x65535 screen" in reason, (code, reason)
    root.replace("x11vnc.service", VNC_PORT, "vnc-huge-name")
    code, reason = asyncio.run(viewer_close(url, headers, handshake=False))
    assert code == 1011 and "desktop name of 4294967295 bytes" in reason, (code, reason)
    # 100 MB at once once the viewer is relaying: passed on in bounded reads, at the
    # viewer's pace (the viewer is the guest's own person: the flood is theirs to read)
    root.replace("x11vnc.service", VNC_PORT, "vnc-huge-message")
    largest = asyncio.run(viewer_flooded(url, headers, mib=32))
    assert largest <= READ_SIZE

    # the agent answers 100 MB, then dribbles: the API says 502 with a reason, in time
    oauth_url = f"/api/auth/session/{mallory}/oauth-url"
    root.replace("mc-agent.service", 8080, "agent-huge")
    asked = time.monotonic()
    answer = ctl.request("GET", oauth_url)
    huge_seconds = time.monotonic() - asked
    assert answer.status_code == 502 and f"at most {MAX_RESPONSE_BYTES}" in answer.text
    root.replace("mc-agent.service", 8080, "agent-dribble")
    asked = time.monotonic()
    answer = ctl.request("GET", oauth_url)
    dribble_seconds = time.monotonic() - asked
    assert answer.status_code == 502 and f"within {CALL_SECONDS:g} s" in answer.text
    assert dribble_seconds < CALL_SECONDS + 5

    after = memory_kib(ctl.process.pid)
    print(
        f"controller memory: VmRSS {before['VmRSS']} KiB before, {after['VmRSS']} KiB after; "
        f"peak (VmHWM) {before['VmHWM']} -> {after['VmHWM']} KiB; agent refused in "
        f"{huge_seconds:.2f} s (100 MB) and {dribble_seconds:.2f} s (slowloris)"
    )
    assert after["VmHWM"] - before["VmRSS"] < RSS_ALLOWANCE_KIB, (before, after)

    # the other session never noticed
    assert ctl.request("GET", f"/api/auth/session/{bystander}").json()["status"] == "ready"
    assert not ctl.frame(bystander).is_blank()
    health = ctl.request("GET", "/api/health", key=None).json()
    assert health["status"] == "ok", health
