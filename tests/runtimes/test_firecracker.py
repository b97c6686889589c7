"""The Firecracker runtime. Its API client and probe are tested everywhere; booting needs
the ``firecracker`` binary and working KVM, and skips with that reason where they are
missing (the one capability skip allowed under CI)."""

from __future__ import annotations

import secrets
import shutil

import pytest

from master_controller.runtimes import probe_all
from master_controller.runtimes.base import GuestSecrets
from master_controller.runtimes.firecracker import FirecrackerRuntime, guest_mac
from master_controller.settings import Settings
from tests.runtimes import vm_scenarios

NO_FIRECRACKER = (
    "the firecracker binary is not on PATH; Firecracker boots run where it is (allowed in CI)"
)


def test_probe_says_why_it_cannot_run(tmp_settings: Settings) -> None:
    settings = tmp_settings.model_copy(update={"firecracker_binary": "no-such-firecracker"})
    result = probe_all(settings)["firecracker"]
    assert not result.usable and "'no-such-firecracker' binary is not on PATH" in result.reason


def test_guest_macs_are_stable_unicast_and_local() -> None:
    mac = guest_mac("3f1d7a52-0000-4000-8000-000000000001")
    assert mac == guest_mac("3f1d7a52-0000-4000-8000-000000000001")
    assert mac != guest_mac("3f1d7a52-0000-4000-8000-000000000002")
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b01  # locally administered, unicast


@pytest.fixture
def firecracker(integration_settings: Settings) -> FirecrackerRuntime:
    if shutil.which(integration_settings.firecracker_binary) is None:
        pytest.skip(NO_FIRECRACKER)
    probe = FirecrackerRuntime.probe(integration_settings)
    if not probe.usable:
        pytest.skip(f"Firecracker cannot run here: {probe.reason} (allowed in CI)")
    return FirecrackerRuntime(integration_settings)


@pytest.mark.integration
@pytest.mark.vm
async def test_creating_a_guest_copies_sparsely(
    golden_image: str, firecracker: FirecrackerRuntime
) -> None:
    guest_secrets = GuestSecrets(vnc_password="fcpass00", agent_token=secrets.token_hex(16))
    guest = await firecracker.create(f"fcc-{secrets.token_hex(3)}", golden_image, guest_secrets)
    try:
        disk = firecracker.guest_dir(guest.guest_id) / "disk.ext4"
        image_disk = firecracker.images.get(golden_image).disk
        assert disk.stat().st_size == image_disk.stat().st_size
        assert disk.stat().st_blocks <= image_disk.stat().st_blocks  # holes stay holes
    finally:
        await firecracker.destroy(guest)


@pytest.mark.integration
@pytest.mark.vm
async def test_boot_hibernate_resume_destroy(
    golden_image: str, firecracker: FirecrackerRuntime
) -> None:
    await vm_scenarios.boot_hibernate_resume_destroy(firecracker, golden_image)
