"""The event-loop lag monitor sees a loop that is blocked."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Gauge, Histogram

from master_controller.looplag import LoopLagMonitor
from master_controller.metrics import LOOP_LAG_BUCKETS


def _monitor(window: float = 60.0) -> tuple[LoopLagMonitor, CollectorRegistry]:
    registry = CollectorRegistry()
    histogram = Histogram("lag", "", buckets=LOOP_LAG_BUCKETS, registry=registry)
    gauge = Gauge("lag_max", "", registry=registry)
    return LoopLagMonitor(0.02, window, histogram, gauge), registry


def test_a_blocked_loop_is_seen() -> None:
    monitor, registry = _monitor()

    async def go() -> None:
        monitor.start()
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # the stall: what a synchronous command in async code does
        await asyncio.sleep(0.1)
        await monitor.stop()

    asyncio.run(go())
    assert monitor.max_lag() >= 0.25
    assert (registry.get_sample_value("lag_max") or 0) >= 0.25
    count = registry.get_sample_value("lag_count") or 0
    under = registry.get_sample_value("lag_bucket", {"le": "0.25"}) or 0
    assert count >= 5 and count - under >= 1  # a sample saw the stall


def test_the_max_forgets_what_left_the_window() -> None:
    monitor, registry = _monitor(window=10)
    monitor.record(0.5, now=100)
    monitor.record(0.1, now=105)
    assert monitor.max_lag() == 0.5
    monitor.record(0.2, now=111)  # 0.5 is older than the window now
    assert monitor.max_lag() == 0.2
    assert registry.get_sample_value("lag_max") == 0.2
