"""The controller's event loop never stalls while guests come and go: the one loop relays
every viewer, so a blocking call anywhere in a session's start or end freezes them all."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from master_controller.settings import Settings
from master_controller.viewing.guest_socket import rfb_over_websocket
from tests.servers import Controller, controller

pytestmark = pytest.mark.integration

STALL = 0.1  # seconds: a loop late by more than this is a stall a viewer sees


@pytest.fixture
def ctl(golden_image: str, integration_settings: Settings, tmp_path: Path) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        max_sessions="2",
        guest_network="10.213.216.0/22",
    ) as running:
        yield running


def loop_lag(ctl: Controller) -> tuple[float, float, float]:
    """From /metrics: samples so far, samples over STALL, and the max lag of the last minute."""
    text = ctl.request("GET", "/metrics", key=None).text
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("mc_event_loop_lag")
        for s in family.samples
    }
    count = samples[("mc_event_loop_lag_seconds_count", None)]
    within = samples[("mc_event_loop_lag_seconds_bucket", str(STALL))]
    return count, count - within, samples[("mc_event_loop_lag_max_seconds", None)]


def test_no_stall_while_a_session_starts_and_ends_beside_a_viewer(ctl: Controller) -> None:
    watched = ctl.ready_session("alice")
    url, headers = ctl.viewer(watched)
    count_before, stalls_before, _ = loop_lag(ctl)
    frames: list[float] = []

    async def view(stop: asyncio.Event) -> None:
        """Full frames back to back through the controller's relay until ``stop``."""
        async with rfb_over_websocket(url, None, headers=headers) as client:
            while not stop.is_set():
                await client.frame()
                frames.append(time.monotonic())

    def another_session() -> str:
        other = ctl.ready_session("carol")
        ended = ctl.request("POST", f"/api/auth/session/{other}/cancel").json()
        assert ended["status"] == "terminated", ended
        return other

    async def scenario() -> None:
        stop = asyncio.Event()
        viewer = asyncio.create_task(view(stop))
        try:
            await asyncio.to_thread(another_session)
        finally:
            stop.set()
            await asyncio.wait_for(viewer, 30)

    started = time.monotonic()
    asyncio.run(scenario())
    count, stalls, max_lag = loop_lag(ctl)
    gaps = [b - a for a, b in itertools.pairwise(frames)]
    print(
        f"\nloop lag over {time.monotonic() - started:.1f} s: {count - count_before:.0f} samples, "
        f"{stalls - stalls_before:.0f} over {STALL} s, max of the last minute {max_lag:.3f} s; "
        f"viewer: {len(frames)} frames, longest gap {max(gaps, default=0):.3f} s"
    )
    assert len(frames) > 10, "the viewer got (almost) no frames"
    assert count - count_before > 100, "the lag monitor did not sample"
    # the window of the scenario only: the max gauge looks back a minute, over the first
    # session's start too, which still has one-time stalls (see the issue note)
    assert stalls == stalls_before, f"the event loop stalled (max lag {max_lag:.3f} s)"
