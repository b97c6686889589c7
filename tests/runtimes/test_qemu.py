"""The QEMU runtime with the real golden image (root, QEMU with TCG here)."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time

import pytest

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
