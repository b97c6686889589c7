"""Many container guests at once (issue 18), and what a guest that died says.

Every guest's inotify use counts against host root's ``fs.inotify.max_user_instances``
(128 by default): forty guests starting together used to exhaust it, and the guest that
asked next died with nothing but nspawn's clean-up line to show. The runtime now raises
the limit for ``max_sessions`` guests before a start (``hostlimits``) and a dead guest's
reason quotes its console's errors (``guestlog``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from master_controller.errors import ProbeError
from master_controller.runtimes import hostlimits
from master_controller.runtimes.base import GuestSecrets, GuestState, GuestStatus
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from master_controller.viewing.readiness import (
    guest_give_up,
    non_blank_frame,
    poll,
    websocket_upgrade,
)
from tests.runtimes.leaks import HostSnapshot

pytestmark = pytest.mark.integration

GUESTS = 40
# guests booting at once: 2 cores boot about 20 together inside the 120 s boot timeout
# (bench/results/container-burst-*.json); the controller queues boots the same way
# (max_concurrent_boots)
CONCURRENCY = 10
BOOT_TIMEOUT = 120.0


def _secrets() -> GuestSecrets:
    return GuestSecrets(
        vnc_password=secrets.token_urlsafe(6)[:8], agent_token=secrets.token_hex(16)
    )


def _in_guest(leader: int, *argv: str, namespaces: str = "-a", check: bool = True) -> None:
    subprocess.run(["nsenter", "-t", str(leader), namespaces, "--", *argv], check=check)


async def test_a_guest_that_dies_says_why(
    golden_image: str, container_runtime: ContainerRuntime
) -> None:
    """The real cause, cheaply: the guest's own user namespace gets no more inotify
    instances (what a host-wide exhaustion looks like to one guest), and its systemd is made
    to start over (daemon-reexec), which needs one: it exits, nspawn with it."""
    runtime = container_runtime
    before = HostSnapshot.take(runtime.settings)
    guest = await runtime.create(f"dies-{secrets.token_hex(3)}", golden_image, _secrets())
    try:
        await runtime.start(guest)
        endpoint = runtime.endpoint(guest)
        await poll(lambda: websocket_upgrade(endpoint.address, 6080), time.monotonic() + 90)
        leader = guest.resources["leader"]["pid"]
        # a write to /proc/sys/user/* sets the writer's own user namespace's limit
        _in_guest(
            leader, "sh", "-c", "echo 0 > /proc/sys/user/max_inotify_instances", namespaces="-U"
        )
        # not checked: the guest (and systemctl in it) may be gone before it answers
        _in_guest(leader, "systemctl", "daemon-reexec", "--no-block", check=False)
        with pytest.raises(ProbeError) as failed:
            await poll(
                lambda: _never_ready(),
                time.monotonic() + 30,
                give_up=guest_give_up(runtime, guest),
            )
        reason = failed.value.reason
        print(reason)
        assert runtime.status(guest) == GuestStatus.DEAD
        assert "the guest died" in reason
        assert "Too many open files" in reason, reason  # the guest's systemd's own words
        assert "Attempted to remove disk file system" not in reason  # nspawn's clean-up
    finally:
        await runtime.destroy(guest)
    assert HostSnapshot.take(runtime.settings) == before


async def _never_ready() -> None:
    raise ProbeError("waiting for the guest to die")


async def test_a_killed_guest_names_the_signal(
    golden_image: str, container_runtime: ContainerRuntime
) -> None:
    runtime = container_runtime
    guest = await runtime.create(f"killed-{secrets.token_hex(3)}", golden_image, _secrets())
    try:
        await runtime.start(guest)
        os.kill(guest.resources["leader"]["pid"], signal.SIGKILL)
        process = runtime.process(guest)
        assert process is not None and await process.wait(10)
        assert runtime.status(guest) == GuestStatus.DEAD
        said = runtime.diagnostics(guest)
        print(said)
        assert "terminated by signal KILL" in said
    finally:
        await runtime.destroy(guest)


@pytest.fixture
def burst_runtime(integration_settings: Settings) -> Iterator[ContainerRuntime]:
    settings = integration_settings.model_copy(
        # forty mounted disk layers must fit the data dir's file system (a start is refused
        # unless all could fill up): small ones, the burst is about starting together
        update={"max_sessions": GUESTS, "guest_disk_mib": 512}
    )
    runtime = ContainerRuntime(settings)
    yield runtime
    for guest in runtime.guests():  # a test that failed half-way leaves none behind
        asyncio.run(runtime.destroy(guest))


async def test_forty_guests_at_once_all_show_a_frame(
    golden_image: str, burst_runtime: ContainerRuntime
) -> None:
    runtime = burst_runtime
    before = HostSnapshot.take(runtime.settings)
    gate = asyncio.Semaphore(CONCURRENCY)
    guests: list[GuestState] = []
    began = time.monotonic()

    async def boot(n: int) -> float:
        async with gate:
            guest = await runtime.create(
                f"burst{n:02d}-{secrets.token_hex(3)}", golden_image, _secrets()
            )
            guests.append(guest)
            started = time.monotonic()
            await runtime.start(guest)
            url, password = runtime.endpoint(guest).vnc_url, guest.secrets.vnc_password
            deadline = started + BOOT_TIMEOUT
            await poll(
                lambda: non_blank_frame(url, password, deadline),
                deadline,
                0.5,
                give_up=guest_give_up(runtime, guest),
            )
            return time.monotonic() - started

    try:
        # every boot runs to its end (a failed one must not leave others starting unseen)
        outcomes = await asyncio.gather(*(boot(n) for n in range(GUESTS)), return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert not failed, f"{len(failed)} of {GUESTS} did not come up: {failed}"
        seconds = [o for o in outcomes if isinstance(o, float)]
        print(
            f"{GUESTS} guests, {CONCURRENCY} at a time: all showed a frame after "
            f"{time.monotonic() - began:.0f} s (each {min(seconds):.0f}-{max(seconds):.0f} s)"
        )
        # all still there with all forty up
        assert [runtime.status(g) for g in guests] == [GuestStatus.RUNNING] * GUESTS
        assert all(limit.enough for limit in hostlimits.check(GUESTS))
    finally:
        destroying = time.monotonic()
        gate = asyncio.Semaphore(8)

        async def destroy(guest: GuestState) -> None:
            async with gate:
                await runtime.destroy(guest)

        await asyncio.gather(*(destroy(g) for g in guests))
        print(f"destroyed in {time.monotonic() - destroying:.0f} s")
    assert HostSnapshot.take(runtime.settings) == before
