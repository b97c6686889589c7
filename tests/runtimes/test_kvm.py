"""KVM is used only where a probe boot proves it works, booted as guests are (unprivileged,
sandboxed); the probe's answer is cached."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from master_controller.images.store import ImageStore
from master_controller.runtimes.kvm import CACHE_NAME, kvm_groups, kvm_probe, probe_boot
from master_controller.runtimes.qemu import QemuRuntime
from master_controller.settings import Settings


@pytest.mark.parametrize(
    ("mode", "groups"),
    [(0o666, []), (0o606, []), (0o660, [4242]), (0o600, None), (0o640, None), (0o604, None)],
)
def test_a_vmm_gets_the_kvm_group_only_where_that_opens_dev_kvm(
    tmp_path: Path, mode: int, groups: list[int] | None
) -> None:
    """Guests' VMMs run unprivileged: they need /dev/kvm's group if the group may read and
    write it, nothing if everyone may, and cannot use a /dev/kvm only its owner may open."""
    device = tmp_path / "kvm"
    device.touch()
    device.chmod(mode)
    if os.geteuid() == 0:
        os.chown(device, 0, 4242)
    elif groups:
        groups = [device.stat().st_gid]
    assert kvm_groups(device) == groups
    assert kvm_groups(tmp_path / "missing") is None


def test_a_probe_boot_of_an_unreadable_kernel_fails(tmp_path: Path) -> None:
    """The probe runs QEMU unprivileged, reading the kernel it was handed: one only root may
    read fails the probe (as it would fail a guest), though root started it."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\x00" * 4096)
    kernel.chmod(0o600)
    if os.geteuid() != 0:
        pytest.skip("needs root: the probe drops to an unprivileged UID")
    result = probe_boot(kernel, kernel, "tcg", timeout=15)
    assert not result.usable and "Permission denied" in result.reason, result.reason


@pytest.mark.integration
@pytest.mark.vm
def test_a_probe_boot_reaches_the_initrds_userspace(
    golden_image: str, integration_settings: Settings
) -> None:
    image = ImageStore(integration_settings.images_dir).get(golden_image)
    result = probe_boot(image.path / "vmlinuz", image.path / "initrd.img", "tcg", timeout=60)
    assert result.usable, result.reason
    assert 0 < result.seconds < 60


@pytest.mark.integration
@pytest.mark.vm
def test_a_kernel_that_does_not_boot_fails_the_probe(
    golden_image: str, integration_settings: Settings, tmp_path: Path
) -> None:
    image = ImageStore(integration_settings.images_dir).get(golden_image)
    garbage = tmp_path / "vmlinuz"
    garbage.write_bytes(b"\x00" * 4096)
    result = probe_boot(garbage, image.path / "initrd.img", "tcg", timeout=15)
    assert not result.usable and "probe boot with tcg" in result.reason


@pytest.mark.integration
@pytest.mark.vm
def test_kvm_probe_is_cached_and_decides_the_accelerator(
    golden_image: str, integration_settings: Settings
) -> None:
    settings = integration_settings
    (settings.data_dir / CACHE_NAME).unlink(missing_ok=True)
    first = kvm_probe(settings)
    assert "probe boot with kvm" in first.reason or "/dev/kvm" in first.reason
    cached = json.loads((settings.data_dir / CACHE_NAME).read_text())
    assert cached["result"]["usable"] == first.usable
    assert (
        cached["key"]["guest_kernel"]
        == ImageStore(settings.images_dir).get(golden_image).manifest["kernel"]["sha256"]
    )
    started = time.monotonic()
    assert kvm_probe(settings) == first
    assert time.monotonic() - started < 0.5  # answered from the cache, no boot
    probe = QemuRuntime.probe(settings)
    assert probe.usable
    assert probe.fallback_only == (not first.usable)
    assert ("KVM" if first.usable else "TCG") in probe.reason
