"""Churn: many sessions started, viewed and cancelled through the controller (containers),
and QEMU guests started and destroyed mid-boot; afterwards processes, the controller's
file descriptors, mounts, namespaces, links, leases and guest folders are back where they
started."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from master_controller.runtimes.base import GuestSecrets
from master_controller.runtimes.qemu import QemuRuntime
from master_controller.settings import Settings
from tests.runtimes.leaks import HostSnapshot, wait_until_back
from tests.servers import Controller, controller

pytestmark = pytest.mark.integration
WAVES, PER_WAVE = 4, 3


@pytest.fixture
def ctl(golden_image: str, integration_settings: Settings, tmp_path: Path) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.212.0/22",
        max_sessions=str(PER_WAVE),
        rate_limit_per_minute="0",
    ) as running:
        yield running


def _fds(ctl: Controller) -> int:
    assert ctl.process is not None
    return len(os.listdir(f"/proc/{ctl.process.pid}/fd"))


def test_session_churn_leaves_nothing(ctl: Controller, integration_settings: Settings) -> None:
    before = HostSnapshot.take(integration_settings)
    fds: list[int] = []
    for wave in range(WAVES):
        with ThreadPoolExecutor(PER_WAVE) as pool:
            users = [f"churn-{wave}-{i}" for i in range(PER_WAVE)]
            sids = list(pool.map(lambda user: ctl.ready_session(user), users))
        for sid in sids:
            assert not ctl.frame(sid).is_blank()
            ctl.request("POST", f"/api/auth/session/{sid}/cancel")
        for sid in sids:
            assert ctl.wait_for(sid, {"terminated"}, 30)["status"] == "terminated"
        wait_until_back(integration_settings, before)
        fds.append(_fds(ctl))
    # after the first wave warmed things up, descriptors do not grow with sessions
    assert max(fds[1:]) <= fds[0] + 3, fds
    health = ctl.request("GET", "/api/health", key=None).json()
    assert health["capacity"]["active"] == 0


@pytest.mark.vm
async def test_qemu_guests_destroyed_mid_boot_leave_nothing(
    golden_image: str, integration_settings: Settings
) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed (run scripts/setup.sh)")
    runtime = QemuRuntime(integration_settings)
    before = HostSnapshot.take(integration_settings)
    for _ in range(2):
        guests = []
        for _ in range(2):
            secrets_ = GuestSecrets(vnc_password="churnvm1", agent_token=secrets.token_hex(16))
            guest = await runtime.create(f"churnvm-{secrets.token_hex(3)}", golden_image, secrets_)
            await runtime.start(guest)
            guests.append(guest)
        await asyncio.sleep(3)  # booting: QEMU, its tap and namespace are all there
        await asyncio.gather(*(runtime.destroy(g) for g in guests))
        assert HostSnapshot.take(integration_settings) == before
