"""The QEMU runtime with the real golden image (root; KVM if a probe boot proves it, TCG
otherwise, which is what runs on the machines we develop on).

A cold boot under TCG takes a minute or more, so one guest (the module's ``booted``, started
once) serves the checks of a running guest, in file order: how QEMU is confined and what
its folder lets others read (right after start), then boot to the page, hibernate and
resume."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from master_controller.errors import GuestError
from master_controller.runtimes.base import GuestSecrets
from master_controller.runtimes.kvm import QEMU, SANDBOX
from master_controller.runtimes.qemu import STATE_FILE, QemuRuntime
from master_controller.runtimes.qmp import Qmp
from master_controller.runtimes.vmm_exec import VmmLaunch
from master_controller.runtimes.vmm_user import PROBE_UID, vmm_uid
from master_controller.settings import Settings
from tests.runtimes import vm_scenarios
from tests.runtimes.vm_scenarios import Booted

pytestmark = [pytest.mark.integration, pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]


def _qemu(settings: Settings) -> QemuRuntime:
    if shutil.which(QEMU) is None:
        pytest.skip("QEMU is not installed (run scripts/setup.sh)")
    return QemuRuntime(settings)


@pytest.fixture
def qemu(integration_settings: Settings) -> QemuRuntime:
    return _qemu(integration_settings)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def booted(golden_image: str, integration_settings: Settings) -> AsyncIterator[Booted]:
    """One guest, started; destroyed at the end (which must leave nothing behind)."""
    booted = await vm_scenarios.start_guest(_qemu(integration_settings), golden_image)
    yield booted
    await vm_scenarios.destroy_leaving_nothing(booted)


def _secrets() -> GuestSecrets:
    return GuestSecrets(vnc_password="vmpass00", agent_token=secrets.token_hex(16))


async def test_creating_a_guest_copies_nothing_and_shows_nothing(
    golden_image: str, qemu: QemuRuntime
) -> None:
    guest = await qemu.create(f"vmc-{secrets.token_hex(3)}", golden_image, _secrets())
    try:
        folder = qemu.guest_dir(guest.guest_id)
        assert (folder / "disk.qcow2").stat().st_size < 2**20  # an overlay on the image
        assert guest.resources["accel"] in ("kvm", "tcg")
        # the config drive (agent token, VNC password) and the disk are the controller's
        # alone, and the plain guest.json it was made from is gone
        assert vm_scenarios.private_files(folder) == []
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.img",
            "disk.qcow2",
            "state.json",
        ]
        nobody = 65534
        assert vm_scenarios.read_as(nobody, folder / "config.img").returncode != 0
    finally:
        await qemu.destroy(guest)


async def test_no_two_guests_share_a_vmm_user(golden_image: str, qemu: QemuRuntime) -> None:
    first = await qemu.create(f"vmu-{secrets.token_hex(3)}", golden_image, _secrets())
    second = await qemu.create(f"vmu-{secrets.token_hex(3)}", golden_image, _secrets())
    try:
        uids = {qemu.vmm_launch(g).uid for g in (first, second)}
        assert len(uids) == 2 and 0 not in uids and PROBE_UID not in uids
        assert qemu.vmm_launch(first).uid == vmm_uid(first.resources["lease"])
        for guest in (first, second):
            launch = qemu.vmm_launch(guest)
            assert launch.gid == launch.uid
            if guest.resources["accel"] == "tcg":
                assert list(launch.groups) == []  # not even the kvm group
    finally:
        await qemu.destroy(first)
        await qemu.destroy(second)


async def test_qemu_runs_as_the_guests_own_user_under_seccomp(booted: Booted) -> None:
    pid = vm_scenarios.vmm_pid(booted.runtime, booted.guest)
    assert Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")
    status = vm_scenarios.assert_unprivileged(pid, vmm_uid(booted.guest.resources["lease"]))
    assert status["Seccomp"] == "2"  # a filter: QEMU's -sandbox
    if booted.guest.resources["accel"] == "tcg":
        assert status["Groups"] == ""
    # it sits in the guest's network namespace, not the host's
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    # the guest's memory is not offered to the host's page merging (guest_memory_merging
    # is off): QEMU's own default would have marked it mergeable
    ram_kib = booted.runtime.settings.vm_memory_mib * 1024
    assert _large_mappings(pid, ram_kib), "the guest's RAM mapping was not found"
    assert not [flags for flags in _large_mappings(pid, ram_kib) if "mg" in flags.split()]


def _large_mappings(pid: int, at_least_kib: int) -> list[str]:
    """The VmFlags of each of ``pid``'s mappings of at least ``at_least_kib``."""
    found, size = [], 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("VmFlags:") and size >= at_least_kib:
            found.append(line.removeprefix("VmFlags:"))
    return found


async def test_the_guests_folder_is_private(booted: Booted) -> None:
    folder = booted.runtime.guest_dir(booted.guest.guest_id)
    assert vm_scenarios.private_files(folder) == []
    for path in folder.iterdir():
        assert path.stat().st_uid == 0, path  # QEMU got descriptors, owns nothing


async def test_qemu_cannot_open_its_guests_files_by_path(booted: Booted) -> None:
    """A guest that took over its QEMU has QEMU's UID: the config drive (agent token, VNC
    password), the disk and the QMP socket stay out of its reach; so does every other
    local user."""
    folder = booted.runtime.guest_dir(booted.guest.guest_id)
    uid = vmm_uid(booted.guest.resources["lease"])
    for name in ("config.img", "disk.qcow2", "console.log"):
        for who in (uid, 65534):
            attempt = vm_scenarios.read_as(who, folder / name)
            assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, (who, name)
    pid = vm_scenarios.vmm_pid(booted.runtime, booted.guest)
    # what QEMU holds open are descriptors, handed over at start
    held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert str(folder / "config.img") in held and str(folder / "disk.qcow2") in held


async def test_hibernate_and_resume_keep_the_running_system(booted: Booted) -> None:
    folder = booted.runtime.guest_dir(booted.guest.guest_id)
    await vm_scenarios.show_page(booted)
    print(f"QEMU guest booted to a non-blank frame in {booted.boot_seconds:.1f}s")

    async def while_hibernated() -> None:
        state = folder / STATE_FILE
        assert state.stat().st_mode & 0o777 == 0o600 and state.stat().st_uid == 0
        assert vm_scenarios.private_files(folder) == []

    seconds = await vm_scenarios.hibernate_and_resume(booted, while_hibernated)
    print(f"QEMU guest resumed in {seconds:.1f}s")
    assert not (folder / STATE_FILE).exists()
    # the restored QEMU is as confined as the booted one
    pid = vm_scenarios.vmm_pid(booted.runtime, booted.guest)
    status = vm_scenarios.assert_unprivileged(pid, vmm_uid(booted.guest.resources["lease"]))
    assert status["Seccomp"] == "2"


async def test_the_sandbox_kills_a_qemu_that_tries_to_run_a_program(tmp_path: Path) -> None:
    """QEMU as launched for guests (unprivileged, ``-sandbox`` with spawn=deny), told over
    QMP to migrate to ``exec:``, which forks a shell: seccomp kills it, nothing runs."""
    if shutil.which(QEMU) is None:
        pytest.skip("QEMU is not installed (run scripts/setup.sh)")
    tmp_path.chmod(0o700)
    witness = Path("/tmp") / f"mc-sandbox-{secrets.token_hex(4)}"
    launch = VmmLaunch(uid=PROBE_UID, gid=PROBE_UID)
    qmp = launch.fd("listen", tmp_path / "qmp.sock")
    argv = [
        shutil.which(QEMU) or QEMU,
        "-sandbox", SANDBOX,
        "-machine", "q35,accel=tcg", "-m", "64", "-nodefaults", "-display", "none", "-S",
        "-chardev", f"socket,id=qmp,fd={qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    process = subprocess.Popen(launch.argv(argv))
    try:
        async with Qmp(tmp_path / "qmp.sock") as monitor:
            assert await monitor.status() == "prelaunch"
            with pytest.raises(GuestError):  # the monitor went away with QEMU
                await monitor.command("migrate", uri=f"exec:touch {witness}")
        returncode = await asyncio.to_thread(process.wait, 10)
        assert returncode == -31  # SIGSYS: killed by its seccomp filter
        assert not witness.exists()
    finally:
        process.kill()
        process.wait()
        witness.unlink(missing_ok=True)
