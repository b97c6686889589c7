"""The Firecracker runtime. Its API client, probe and the files it prepares in the guest's
jail are tested everywhere; booting needs the ``firecracker`` binary (and its jailer) and
working KVM, and skips with that reason where they are missing (the one capability skip
allowed under CI). The jailer's command line and chroot are in test_jailer.py."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from master_controller.images.store import ImageInfo
from master_controller.runtimes import probe_all
from master_controller.runtimes.base import GuestSecrets
from master_controller.runtimes.firecracker import FirecrackerRuntime, guest_mac
from master_controller.runtimes.jailer import Jail
from master_controller.runtimes.vmm_user import vmm_uid
from master_controller.settings import Settings
from master_controller.steps import StepLog
from mc_agent.config import CONFIG_NAME, GuestConfig
from tests.conftest import require_tools
from tests.runtimes import vm_scenarios

NO_FIRECRACKER = (
    "the firecracker binary is not on PATH; Firecracker boots run where it is (allowed in CI)"
)


def test_probe_says_why_it_cannot_run(tmp_settings: Settings) -> None:
    settings = tmp_settings.model_copy(update={"firecracker_binary": "no-such-firecracker"})
    result = probe_all(settings)["firecracker"]
    assert not result.usable and "'no-such-firecracker' binary is not on PATH" in result.reason


def test_the_probe_wants_the_jailer_too(tmp_settings: Settings, tmp_path: Path) -> None:
    lone = tmp_path / "firecracker"  # a Firecracker without its jailer anywhere
    lone.write_bytes(b"\x7fELF")
    lone.chmod(0o755)
    if shutil.which("jailer"):
        pytest.skip("a jailer is on PATH here (allowed in CI)")
    settings = tmp_settings.model_copy(update={"firecracker_binary": str(lone)})
    result = FirecrackerRuntime.probe(settings)
    assert not result.usable and "jailer is not" in result.reason


def test_the_guests_disk_and_config_drive_are_prepared_inside_its_jail(
    tmp_settings: Settings, tmp_path: Path
) -> None:
    """What the jailed Firecracker will see as ``/``: the guest's own disk and config drive
    (0600), the plain guest.json gone; the guest folder 0700."""
    require_tools("mkfs.ext4", "debugfs")
    image = tmp_path / "image"
    image.mkdir()
    for name in ("vmlinux", "initrd.img"):
        (image / name).write_bytes(name.encode())
    with (image / "disk.ext4").open("wb") as disk:
        disk.truncate(2**20)
    binary = tmp_path / "firecracker"
    binary.write_bytes(b"\x7fELF")
    binary.chmod(0o755)
    settings = tmp_settings.model_copy(update={"firecracker_binary": str(binary)})
    runtime = FirecrackerRuntime(settings)
    folder = runtime.guest_dir("fcp-1a2b3c")
    folder.mkdir(parents=True)
    config = GuestConfig(guest_id="fcp-1a2b3c", vnc_password="fcpass00", agent_token="t0ken")
    resources = runtime.prepare(folder, ImageInfo("img", image, {}, None), config, StepLog())

    jail = Jail.of(folder, "fcp-1a2b3c", str(binary))
    assert sorted(p.name for p in jail.root.iterdir()) == ["config.img", "disk.ext4"]
    assert vm_scenarios.private_files(folder) == []
    assert not [p for p in folder.rglob("*") if p.name == CONFIG_NAME]
    inside = subprocess.run(
        ["debugfs", "-R", f"cat /{CONFIG_NAME}", str(jail.host("config.img"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"agent_token": "t0ken"' in inside.replace(":", ": ").replace(":  ", ": ")
    assert resources["kernel"] == str(image / "vmlinux")


def test_guest_macs_are_stable_unicast_and_local() -> None:
    mac = guest_mac("3f1d7a52-0000-4000-8000-000000000001")
    assert mac == guest_mac("3f1d7a52-0000-4000-8000-000000000001")
    assert mac != guest_mac("3f1d7a52-0000-4000-8000-000000000002")
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b01  # locally administered, unicast


def _jailed_firecracker(runtime: FirecrackerRuntime, booted: vm_scenarios.Booted) -> None:
    """The booted guest's Firecracker: the guest's own UID, chrooted in its jail, under
    Firecracker's seccomp filters, in the guest's network namespace."""
    pid = vm_scenarios.vmm_pid(runtime, booted.guest)
    status = vm_scenarios.assert_unprivileged(pid, vmm_uid(booted.guest.resources["lease"]))
    assert status["Seccomp"] == "2"
    assert os.readlink(f"/proc/{pid}/root") == str(runtime.jail(booted.guest).root)
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert vm_scenarios.private_files(runtime.guest_dir(booted.guest.guest_id)) == []


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
async def test_a_jailed_guest_boots_hibernates_resumes_and_goes(
    golden_image: str, firecracker: FirecrackerRuntime
) -> None:
    booted = await vm_scenarios.boot_with_page(firecracker, golden_image)
    try:
        _jailed_firecracker(firecracker, booted)
        await vm_scenarios.hibernate_and_resume(booted)
        _jailed_firecracker(firecracker, booted)
    finally:
        await vm_scenarios.destroy_leaving_nothing(booted)
