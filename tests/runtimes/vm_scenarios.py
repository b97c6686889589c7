"""Scenarios every VM runtime (QEMU, Firecracker) must pass with the real golden image."""

from __future__ import annotations

import secrets
import time

import httpx

from master_controller.errors import ProbeError
from master_controller.readiness import agent_health, non_blank_frame, poll
from master_controller.runtimes.base import GuestSecrets, GuestStatus, Runtime
from tests.runtimes.leaks import HostSnapshot

BOOT_SECONDS = 240  # TCG: software emulation boots in tens of seconds
MARK = "mc-hibernate-mark"
PAGE = f"data:text/html,<title>{MARK}</title><body style='background:%23c000c0'></body>"


def magenta_share(pixels: bytearray) -> float:
    hits = sum(
        1 for i in range(0, len(pixels), 4 * 101) if pixels[i + 2] == 0xC0 and pixels[i] == 0xC0
    )
    return hits / (len(pixels) / (4 * 101))


async def boot_hibernate_resume_destroy(runtime: Runtime, image: str) -> None:
    """The guest boots to Chromium on a 1280x800 screen. A page opened before hibernation
    is on screen after resume, in the same running system (same boot id), restored from
    the saved memory. Destroying it leaves nothing behind."""
    before = HostSnapshot.take(runtime.settings)
    guest_secrets = GuestSecrets(vnc_password="vmpass34", agent_token=secrets.token_hex(16))
    token = guest_secrets.agent_token
    guest = await runtime.create(f"vmh-{secrets.token_hex(3)}", image, guest_secrets)
    try:
        await runtime.start(guest)
        endpoint = runtime.endpoint(guest)
        deadline = time.monotonic() + BOOT_SECONDS
        frame = await poll(
            lambda: non_blank_frame(endpoint.websocket_url, "vmpass34", deadline), deadline, 1.0
        )
        assert (frame.width, frame.height) == (1280, 800) and not frame.is_blank()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            opened = await client.post(
                f"{endpoint.agent_url}/open-url",
                json={"url": PAGE},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert opened.status_code == 200, opened.text

        async def page_shown() -> dict[str, object]:
            health = await agent_health(endpoint.agent_url, token)
            if not any(MARK in w["title"] for w in health["windows"]):
                raise ProbeError("the page is not open yet")
            return health

        health = await poll(page_shown, deadline)
        assert any(w["class"] == "Chromium" for w in health["windows"])  # type: ignore[attr-defined]
        frame = await non_blank_frame(endpoint.websocket_url, "vmpass34", deadline)
        assert magenta_share(frame.pixels) > 0.3

        await runtime.hibernate(guest)
        assert runtime.status(guest) == GuestStatus.HIBERNATED
        assert guest.resources["snapshot"]["bytes"] > 50 * 2**20
        running = HostSnapshot.take(runtime.settings).processes
        assert running <= before.processes  # the VMM is gone: CPU and memory freed

        await runtime.resume(guest)
        assert runtime.status(guest) == GuestStatus.RUNNING and "snapshot" not in guest.resources
        frame = await poll(
            lambda: non_blank_frame(endpoint.websocket_url, "vmpass34", time.monotonic() + 30),
            time.monotonic() + 60,
            0.5,
        )
        assert magenta_share(frame.pixels) > 0.3  # the page is still on screen
        after = await poll(page_shown, time.monotonic() + 60)
        assert after["boot_id"] == health["boot_id"]  # restored, not rebooted
    finally:
        await runtime.destroy(guest)
    assert HostSnapshot.take(runtime.settings) == before
    assert not runtime.guest_dir(guest.guest_id).exists()
