"""A controller that crashes (SIGKILL) and starts again: live guests are reattached and
stay viewable on the same screen; a guest that died while it was down is reported failed
with a reason and cleaned up. Also the per-key rate limit and the viewers-per-session
limit, as a caller and a viewer meet them."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from tests.runtimes.leaks import HostSnapshot, wait_until_back
from tests.servers import Controller, controller, same_share

pytestmark = pytest.mark.integration


@pytest.fixture
def ctl(golden_image: str, integration_settings: Settings, tmp_path: Path) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.200.0/22",
        max_viewers="2",
    ) as running:
        yield running


def test_a_crashed_controller_reattaches_live_guests_and_fails_dead_ones(
    ctl: Controller, integration_settings: Settings
) -> None:
    before = HostSnapshot.take(integration_settings)
    runtime = ContainerRuntime(integration_settings)
    survivor, victim = ctl.ready_session("survivor"), ctl.ready_session("victim")
    first = ctl.frame(survivor)
    url, headers = ctl.viewer(survivor)

    async def viewer_until_the_crash() -> int | None:
        async with connect(
            url, additional_headers=headers, proxy=None, subprotocols=["binary"]
        ) as ws:  # type: ignore[list-item]
            await ws.recv()  # the RFB version: the viewer is connected
            ctl.kill()  # SIGKILL: no shutdown code runs
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    assert asyncio.run(viewer_until_the_crash()) is None  # the socket just dropped (1006)
    # while the controller is down, the victim's guest dies
    victim_guest = runtime.load(victim)
    os.kill(victim_guest.resources["leader"]["pid"], signal.SIGKILL)  # its container's init
    deadline = time.monotonic() + 20
    while runtime.status(victim_guest).value != "dead":
        assert time.monotonic() < deadline, "the killed guest still looks alive"
        time.sleep(0.2)

    ctl.start()
    body = ctl.request("GET", f"/api/auth/session/{survivor}").json()
    assert body["status"] == "ready"
    again = ctl.frame(survivor)  # the viewer path works again, same guest
    assert (again.width, again.height) == (first.width, first.height)
    assert same_share(again, first) > 0.95
    dead = ctl.wait_for(victim, {"failed"}, timeout=30)
    assert dead["status"] == "failed" and "guest" in dead["reason"], dead["reason"]
    deadline = time.monotonic() + 30  # cleaned up from its recorded ids, after the state
    while runtime.guest_dir(victim).exists():
        assert time.monotonic() < deadline, "the dead guest's folder stayed"
        time.sleep(0.3)

    ctl.request("POST", f"/api/auth/session/{survivor}/cancel")
    assert ctl.wait_for(survivor, {"terminated"}, 30)["status"] == "terminated"
    wait_until_back(integration_settings, before)


def test_viewers_per_session_are_limited(ctl: Controller) -> None:
    session_id = ctl.ready_session("watched")
    url, headers = ctl.viewer(session_id)

    async def third_viewer() -> tuple[int, str]:
        async with (
            connect(url, additional_headers=headers, proxy=None, subprotocols=["binary"]) as one,  # type: ignore[list-item]
            connect(url, additional_headers=headers, proxy=None, subprotocols=["binary"]) as two,  # type: ignore[list-item]
        ):
            await one.recv()
            await two.recv()
            async with connect(
                url, additional_headers=headers, proxy=None, subprotocols=["binary"]
            ) as three:  # type: ignore[list-item]
                try:
                    await asyncio.wait_for(three.recv(), 10)
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None
                    return closed.rcvd.code, closed.rcvd.reason
        raise AssertionError("the third viewer was let in")

    code, reason = asyncio.run(third_viewer())
    assert code == 4429 and "2 viewers already" in reason


def test_a_key_over_its_rate_gets_429_with_retry_after(
    golden_image: str, integration_settings: Settings, tmp_path: Path
) -> None:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.200.0/22",
        rate_limit_per_minute="30",
        rate_limit_burst="10",
    ) as ctl:
        answers = [ctl.request("GET", "/api/auth/sessions", key="bob") for _ in range(15)]
        codes = [a.status_code for a in answers]
        assert codes[:10] == [200] * 10 and 429 in codes[10:], codes
        refused = next(a for a in answers if a.status_code == 429)
        assert 1 <= int(refused.headers["Retry-After"]) <= 2
        assert "30 requests a minute" in refused.json()["error"]
        # per key: another key is not affected
        assert ctl.request("GET", "/api/auth/sessions", key="alice").status_code == 200
        time.sleep(int(refused.headers["Retry-After"]))
        assert ctl.request("GET", "/api/auth/sessions", key="bob").status_code == 200
