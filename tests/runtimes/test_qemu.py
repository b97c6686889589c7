"""The QEMU runtime with the real golden image (root; KVM if a probe boot proves it, TCG
otherwise, which is what runs on the machines we develop on)."""

from __future__ import annotations

import secrets
import shutil

import pytest

from master_controller.runtimes.base import GuestSecrets
from master_controller.runtimes.qemu import QemuRuntime
from master_controller.settings import Settings
from tests.runtimes import vm_scenarios

pytestmark = [pytest.mark.integration, pytest.mark.vm]


@pytest.fixture
def qemu(integration_settings: Settings) -> QemuRuntime:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed (run scripts/setup.sh)")
    return QemuRuntime(integration_settings)


async def test_creating_a_guest_copies_nothing(golden_image: str, qemu: QemuRuntime) -> None:
    guest_secrets = GuestSecrets(vnc_password="vmpass00", agent_token=secrets.token_hex(16))
    guest = await qemu.create(f"vmc-{secrets.token_hex(3)}", golden_image, guest_secrets)
    try:
        overlay = qemu.guest_dir(guest.guest_id) / "disk.qcow2"
        assert overlay.stat().st_size < 2**20  # a qcow2 overlay backed by the image's disk
        assert guest.resources["accel"] in ("kvm", "tcg")
    finally:
        await qemu.destroy(guest)


async def test_boot_hibernate_resume_destroy(golden_image: str, qemu: QemuRuntime) -> None:
    await vm_scenarios.boot_hibernate_resume_destroy(qemu, golden_image)
