"""The QEMU runtime with the real golden image (root, QEMU with TCG here)."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time

import httpx
import pytest

from master_controller.errors import ProbeError
from master_controller.readiness import agent_health, non_blank_frame, poll
from master_controller.runtimes.base import GuestSecrets, GuestStatus
from master_controller.runtimes.qemu import QemuRuntime
from master_controller.settings import Settings
from tests.runtimes.leaks import HostSnapshot

pytestmark = [pytest.mark.integration, pytest.mark.vm]


@pytest.fixture
def qemu(integration_settings: Settings) -> QemuRuntime:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed (run scripts/setup.sh)")
    return QemuRuntime(integration_settings)


async def test_vm_boots_to_a_viewable_browser_and_leaves_nothing(
    golden_image: str, qemu: QemuRuntime
) -> None:
    before = HostSnapshot.take(qemu.settings)
    guest_secrets = GuestSecrets(vnc_password="vmpass12", agent_token=secrets.token_hex(16))
    guest = await qemu.create(f"vm-{secrets.token_hex(3)}", golden_image, guest_secrets)
    overlay = qemu.guest_dir(guest.guest_id) / "disk.qcow2"
    assert overlay.stat().st_size < 2**20  # copy-on-write: the image's disk is not copied
    try:
        await qemu.start(guest)
        assert qemu.status(guest) == GuestStatus.RUNNING
        endpoint = qemu.endpoint(guest)
        deadline = time.monotonic() + 240  # TCG: software emulation boots in tens of seconds
        frame = await poll(
            lambda: non_blank_frame(endpoint.websocket_url, "vmpass12", deadline),
            deadline,
            interval=1.0,
        )
        assert (frame.width, frame.height) == (1280, 800) and not frame.is_blank()
        health = await poll(
            lambda: agent_health(endpoint.agent_url, guest_secrets.agent_token), deadline
        )
        assert any(w["class"] == "Chromium" for w in health["windows"])
    finally:
        await qemu.destroy(guest)
    await asyncio.sleep(0)
    assert HostSnapshot.take(qemu.settings) == before
    assert not qemu.guest_dir(guest.guest_id).exists()


MARK = "mc-hibernate-mark"
PAGE = f"data:text/html,<title>{MARK}</title><body style='background:%23c000c0'></body>"


def _magenta_share(pixels: bytearray) -> float:
    hits = sum(
        1 for i in range(0, len(pixels), 4 * 101) if pixels[i + 2] == 0xC0 and pixels[i] == 0xC0
    )
    return hits / (len(pixels) / (4 * 101))


async def test_hibernate_and_resume_keep_the_browser_as_it_was(
    golden_image: str, qemu: QemuRuntime
) -> None:
    """A page opened before hibernation is on screen after resume, in the same running
    system (same boot id), restored from the saved memory."""
    before = HostSnapshot.take(qemu.settings)
    guest_secrets = GuestSecrets(vnc_password="vmpass34", agent_token=secrets.token_hex(16))
    token = guest_secrets.agent_token
    guest = await qemu.create(f"vmh-{secrets.token_hex(3)}", golden_image, guest_secrets)
    try:
        await qemu.start(guest)
        endpoint = qemu.endpoint(guest)
        deadline = time.monotonic() + 240
        await poll(
            lambda: non_blank_frame(endpoint.websocket_url, "vmpass34", deadline), deadline, 1.0
        )
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
        frame = await non_blank_frame(endpoint.websocket_url, "vmpass34", deadline)
        assert _magenta_share(frame.pixels) > 0.3

        await qemu.hibernate(guest)
        assert qemu.status(guest) == GuestStatus.HIBERNATED
        assert guest.resources["snapshot"]["bytes"] > 50 * 2**20
        running = HostSnapshot.take(qemu.settings).processes
        assert not any(p.endswith("qemu-system-x86") for p in running)  # CPU and memory freed

        await qemu.resume(guest)
        assert qemu.status(guest) == GuestStatus.RUNNING and "snapshot" not in guest.resources
        frame = await poll(
            lambda: non_blank_frame(endpoint.websocket_url, "vmpass34", time.monotonic() + 30),
            time.monotonic() + 60,
            0.5,
        )
        assert _magenta_share(frame.pixels) > 0.3  # the page is still on screen
        after = await poll(page_shown, time.monotonic() + 60)
        assert after["boot_id"] == health["boot_id"]  # restored, not rebooted
    finally:
        await qemu.destroy(guest)
    assert HostSnapshot.take(qemu.settings) == before
