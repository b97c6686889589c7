"""Scenarios every VM runtime (QEMU, Firecracker) must pass with the real golden image, and
checks of how its VMM process is confined. A cold boot under TCG takes about a minute, so
the steps are separate: a test module boots one guest and runs several checks on it."""

from __future__ import annotations

import secrets
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from master_controller.errors import ProbeError
from master_controller.runtimes.base import GuestSecrets, GuestState, GuestStatus, Runtime
from master_controller.runtimes.hosted import HostedRuntime
from master_controller.viewing.readiness import agent_health, non_blank_frame, poll
from tests.runtimes.leaks import HostSnapshot

# TCG: software emulation boots in about a minute on an idle host, but took ten on a
# 2-core host shared with other test runs: a deadline, not a speed target (bench/ has those)
BOOT_SECONDS = 900
RESUME_SECONDS = 300
MARK = "mc-hibernate-mark"
PAGE = f"data:text/html,<title>{MARK}</title><body style='background:%23c000c0'></body>"
VNC_PASSWORD = "vmpass34"


def magenta_share(pixels: bytearray) -> float:
    hits = sum(
        1 for i in range(0, len(pixels), 4 * 101) if pixels[i + 2] == 0xC0 and pixels[i] == 0xC0
    )
    return hits / (len(pixels) / (4 * 101))


@dataclass
class Booted:
    """A started guest; once :func:`show_page` returned, booted to Chromium with the marked
    page open (``health`` is the agent's answer then)."""

    runtime: HostedRuntime
    guest: GuestState
    before: HostSnapshot
    started_at: float
    health: dict[str, Any] | None = None
    boot_seconds: float | None = None


async def start_guest(runtime: HostedRuntime, image: str) -> Booted:
    """Create and start a guest (its VMM runs; the guest boots on)."""
    before = HostSnapshot.take(runtime.settings)
    guest_secrets = GuestSecrets(vnc_password=VNC_PASSWORD, agent_token=secrets.token_hex(16))
    guest = await runtime.create(f"vmh-{secrets.token_hex(3)}", image, guest_secrets)
    started_at = time.monotonic()
    try:
        await runtime.start(guest)
    except BaseException:
        await runtime.destroy(guest)
        raise
    return Booted(runtime, guest, before, started_at)


async def show_page(booted: Booted) -> None:
    """Wait until the guest shows a 1280x800 screen, open the marked page through the agent
    and see it on screen."""
    runtime, guest = booted.runtime, booted.guest
    endpoint = runtime.endpoint(guest)
    deadline = booted.started_at + BOOT_SECONDS
    frame = await poll(
        lambda: non_blank_frame(endpoint.vnc_url, VNC_PASSWORD, deadline), deadline, 1.0
    )
    assert (frame.width, frame.height) == (1280, 800) and not frame.is_blank()
    booted.boot_seconds = time.monotonic() - booted.started_at
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        opened = await client.post(
            f"{endpoint.agent_url}/open-url",
            json={"url": PAGE},
            headers={"Authorization": f"Bearer {guest.secrets.agent_token}"},
        )
    assert opened.status_code == 200, opened.text
    deadline = time.monotonic() + RESUME_SECONDS
    health = await poll(lambda: _page_shown(runtime, guest), deadline)
    assert any(w["class"] == "Chromium" for w in health["windows"])
    frame = await non_blank_frame(endpoint.vnc_url, VNC_PASSWORD, deadline)
    assert magenta_share(frame.pixels) > 0.3
    booted.health = health


async def boot_with_page(runtime: HostedRuntime, image: str) -> Booted:
    """A guest started and booted to Chromium with the marked page on screen."""
    booted = await start_guest(runtime, image)
    try:
        await show_page(booted)
    except BaseException:
        await runtime.destroy(booted.guest)
        raise
    return booted


async def _page_shown(runtime: Runtime, guest: GuestState) -> dict[str, Any]:
    # the agent asks systemd about its services, which took over 5 s on a loaded host
    health: dict[str, Any] = await agent_health(
        runtime.endpoint(guest).agent_url, guest.secrets.agent_token, timeout=60
    )
    if not any(MARK in w["title"] for w in health["windows"]):
        raise ProbeError("the page is not open yet")
    return health


async def hibernate_and_resume(
    booted: Booted, while_hibernated: Callable[[], Awaitable[None]] | None = None
) -> float:
    """Hibernate a guest that shows the page (the VMM is gone, its memory saved), run
    ``while_hibernated``, resume: the page is still on screen, in the same running system
    (same boot id), restored from the saved memory. Returns the seconds resume took."""
    runtime, guest = booted.runtime, booted.guest
    assert booted.health is not None, "show_page first"
    vmm = runtime.process(guest)
    assert vmm is not None
    await runtime.hibernate(guest)
    assert runtime.status(guest) == GuestStatus.HIBERNATED
    assert guest.resources["snapshot"]["bytes"] > 50 * 2**20
    assert not vmm.alive()  # the VMM is gone: CPU and memory freed
    if while_hibernated is not None:
        await while_hibernated()

    started = time.monotonic()
    await runtime.resume(guest)
    resume_seconds = time.monotonic() - started
    assert runtime.status(guest) == GuestStatus.RUNNING and "snapshot" not in guest.resources
    endpoint = runtime.endpoint(guest)
    deadline = time.monotonic() + RESUME_SECONDS
    frame = await poll(
        lambda: non_blank_frame(endpoint.vnc_url, VNC_PASSWORD, deadline), deadline, 0.5
    )
    assert magenta_share(frame.pixels) > 0.3  # the page is still on screen
    after = await poll(lambda: _page_shown(runtime, guest), deadline)
    assert after["boot_id"] == booted.health["boot_id"]  # restored, not rebooted
    return resume_seconds


async def destroy_leaving_nothing(booted: Booted) -> None:
    """Destroying the guest leaves nothing of it: no VMM, network namespace, link, lease,
    mount or folder. Other test runs may share the host and start or end guests meanwhile,
    so what is compared is what this guest could have left."""
    runtime, guest = booted.runtime, booted.guest
    link, vmm = runtime.link(guest), runtime.process(guest)
    await runtime.destroy(guest)
    after = HostSnapshot.take(runtime.settings)
    assert vmm is None or not vmm.alive()
    assert link.namespace not in after.namespaces and link.host_ifname not in after.links
    before = booted.before
    assert (after.leases, after.guest_dirs, after.mounts) == (
        before.leases,
        before.guest_dirs,
        before.mounts,
    )
    assert not runtime.guest_dir(guest.guest_id).exists()


async def boot_hibernate_resume_destroy(runtime: HostedRuntime, image: str) -> None:
    """The whole life of a guest: boot with the page, hibernate, resume, destroy."""
    booted = await boot_with_page(runtime, image)
    try:
        await hibernate_and_resume(booted)
    finally:
        await destroy_leaving_nothing(booted)


# --- how the VMM process is confined ------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def vmm_pid(runtime: HostedRuntime, guest: GuestState) -> int:
    process = runtime.process(guest)
    assert process is not None and process.alive()
    return process.pid


def assert_unprivileged(pid: int, uid: int) -> dict[str, str]:
    """The process runs as ``uid`` (real, effective, saved, file system; the same GID), not
    root, with no capabilities and no way to gain any (no_new_privs)."""
    status = proc_status(pid)
    assert uid != 0
    assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(uid)] * 4, status["Gid"]
    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status["NoNewPrivs"] == "1"
    return status


def private_files(folder: Path) -> list[str]:
    """Every entry under ``folder`` that group or others could read, write or enter."""
    wide = []
    for path in [folder, *folder.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode) or stat.S_ISCHR(mode):
            continue
        if mode & 0o077:
            wide.append(f"{path} {stat.filemode(mode)}")
    return wide


def read_as(uid: int, path: Path) -> subprocess.CompletedProcess[str]:
    """Try to read ``path`` as ``uid`` (no groups): what a VMM taken over by its guest, or
    another local user, could do."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
