"""Checks of the real viewer path, made from outside the guest.

A guest is ready when a viewer would see its screen: on the path the relay takes (TCP to
the guest's VNC server), an RFB 3.8 handshake with the guest's password succeeds and the
framebuffer is not blank. Image verification also asks the guest's websockify for a
WebSocket upgrade (101 with the right ``Sec-WebSocket-Accept``). No sleeps: every check is
polled with a deadline and a failure says what did not come up.

What a guest answers is bounded: reads and WebSocket messages (``guest_socket``), RFB sizes
(``rfb``), agent answers (``agent_client``), and each check's time (:func:`poll` cuts a
check that is still running past its deadline, so a guest dribbling bytes cannot hold it).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from master_controller.agent_client import request_json
from master_controller.errors import GuestAgentError, ProbeError
from master_controller.runtimes.base import GuestState, GuestStatus, Runtime
from master_controller.steps import StepRecord, StepSink
from master_controller.viewing.guest_socket import rfb_connect
from master_controller.viewing.rfb import Frame, ServerInfo

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RFC6455_SAMPLE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="

T = TypeVar("T")

# A check still running this long after its poll's deadline is cut (the grace lets a check
# that watches the deadline itself, like non_blank_frame, end with its own reason first).
CHECK_GRACE_SECONDS = 5.0


def websocket_accept(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer for ``key`` (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()  # noqa: S324


async def websocket_upgrade(
    host: str,
    port: int,
    path: str = "/",
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """Send the RFC 6455 sample handshake; require 101 and the correct accept value."""
    try:
        async with asyncio.timeout(timeout):  # not wait_for: see WebSocketStream
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        raise ProbeError(f"nothing accepts connections on {host}:{port} ({exc})") from exc
    try:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {RFC6455_SAMPLE_KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            + "\r\n"
        )
        writer.write(request.encode())
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        raise ProbeError(f"no WebSocket handshake answer from {host}:{port} ({exc!r})") from exc
    finally:
        writer.close()
    lines = head.decode(errors="replace").split("\r\n")
    status = lines[0]
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)
    }
    if " 101 " not in f"{status} ":
        raise ProbeError(f"WebSocket upgrade on {host}:{port} answered {status!r}, not 101")
    expected = websocket_accept(RFC6455_SAMPLE_KEY)
    if headers.get("sec-websocket-accept") != expected:
        raise ProbeError(
            f"wrong Sec-WebSocket-Accept {headers.get('sec-websocket-accept')!r} "
            f"(expected {expected})"
        )
    return {
        "status": status,
        "accept": expected,
        "protocol": headers.get("sec-websocket-protocol", ""),
    }


async def rfb_handshake(
    url: str, password: str | None, headers: dict[str, str] | None = None
) -> ServerInfo:
    """An RFB handshake at ``url`` (``vnc://`` or ``ws://``, see ``rfb_connect``)."""
    async with rfb_connect(url, password, headers=headers) as client:
        assert client.info is not None
        return client.info


async def non_blank_frame(
    url: str, password: str | None, deadline: float, headers: dict[str, str] | None = None
) -> Frame:
    """Fetch frames from ``url`` (``vnc://`` or ``ws://``) until one is not blank, or raise
    when the deadline passes. After the first, only changes are asked for (a VM under
    emulation spends its CPU on its boot, not on encoding whole screens four times a
    second)."""
    async with rfb_connect(url, password, headers=headers) as client:
        frame: Frame | None = None
        while True:
            frame = await client.frame(since=frame)
            # a pass over the pixels (tens of ms for a noisy screen): off the event loop
            if not await asyncio.to_thread(frame.is_blank):
                return frame
            if time.monotonic() >= deadline:
                colours, dominant = frame.stats()
                raise ProbeError(
                    f"the screen stayed blank ({dominant:.1%} one colour, {colours} colours)"
                )
            await asyncio.sleep(0.25)


async def agent_health(url: str, token: str, timeout: float = 5.0) -> dict[str, Any]:
    """The agent's /health answer (bounded in size and time, see ``agent_client``)."""
    try:
        status, answer = await request_json(
            "GET", f"{url}/health", {"Authorization": f"Bearer {token}"}, deadline=timeout
        )
    except GuestAgentError as exc:
        raise ProbeError(f"guest agent at {url}: {exc.reason}") from exc
    if status != 200:
        raise ProbeError(f"guest agent answered {status}: {str(answer.get('error', ''))[:200]}")
    return answer


async def poll(
    check: Callable[[], Awaitable[T]],
    deadline: float,
    interval: float = 0.2,
    give_up: Callable[[], Awaitable[str | None]] | None = None,
) -> T:
    """Run ``check`` until it returns without ProbeError or ``deadline`` (monotonic) passes.
    ``give_up`` may return a reason to stop early (the guest died, say). A check still
    running :data:`CHECK_GRACE_SECONDS` after the deadline is cut with a ProbeError."""
    while True:
        cut = asyncio.timeout_at(deadline + CHECK_GRACE_SECONDS)
        try:
            async with cut:
                return await check()
        except TimeoutError as exc:
            if not cut.expired():
                raise
            raise ProbeError(
                f"still waiting for an answer {CHECK_GRACE_SECONDS:g} s past the deadline"
            ) from exc
        except ProbeError as exc:
            reason = await give_up() if give_up is not None else None
            if reason:
                raise ProbeError(f"{exc.reason}; {reason}") from exc
            if time.monotonic() + interval >= deadline:
                raise
        await asyncio.sleep(interval)


def guest_give_up(runtime: Runtime, guest: GuestState) -> Callable[[], Awaitable[str | None]]:
    """A ``give_up`` for :func:`poll`: stop waiting when waiting cannot help, because the
    guest died or its agent reports a required service that is not installed."""
    endpoint = runtime.endpoint(guest)

    async def check() -> str | None:
        if runtime.status(guest) == GuestStatus.DEAD:
            return "the guest died:\n" + runtime.diagnostics(guest)
        try:
            health = await agent_health(endpoint.agent_url, guest.secrets.agent_token, 1.0)
        except ProbeError:
            return None
        services = health.get("services", {}).values()
        missing = [s["summary"] for s in services if s.get("load") == "not-found"]
        return "; ".join(missing) or None

    return check


class ViewerPath:
    """A guest's readiness, checked the way the relay reaches it: TCP straight to the
    guest's VNC server, an RFB handshake with the guest's own password, and a non-blank
    frame. Each check is a step sent to ``record``
    with its duration; the first that does not pass by ``deadline`` raises ProbeError
    naming it. Being no viewer, it takes no viewer slot and counts in no viewer metric."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, guest: GuestState, deadline: float, record: StepSink) -> None:
        endpoint = self.runtime.endpoint(guest)
        url, password = endpoint.vnc_url, guest.secrets.vnc_password
        give_up = guest_give_up(self.runtime, guest)
        checks: dict[str, Callable[[], Awaitable[object]]] = {
            "vnc handshake": lambda: rfb_handshake(url, password),
            "first frame": lambda: non_blank_frame(url, password, deadline),
        }
        for name, check in checks.items():
            started = time.monotonic()
            try:
                await poll(check, deadline, 0.2, give_up)
            except ProbeError as exc:
                seconds = time.monotonic() - started
                await record(StepRecord(name, seconds, False, exc.reason[:500]))
                raise ProbeError(f"{name}: {exc.reason}") from exc
            await record(StepRecord(name, time.monotonic() - started, True))
