"""How late the event loop runs what is due: the controller's one loop relays every viewer's
frames, so anything that blocks it (a command run synchronously, a long file operation)
freezes every viewer at once. A task sleeps :data:`INTERVAL` over and over and measures how
much later than asked it wakes; that lateness is the loop's lag.

Each sample goes to a histogram (``mc_event_loop_lag_seconds``) and the largest in the last
:data:`WINDOW` seconds to a gauge (``mc_event_loop_lag_max_seconds``). A stall long enough
to be felt is logged as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from prometheus_client import Gauge, Histogram

from master_controller.metrics import LOOP_LAG, LOOP_LAG_MAX

INTERVAL = 0.02  # seconds between samples
WINDOW = 60.0  # seconds the max gauge looks back
LOG_OVER = 0.5  # a lag this long (seconds) is logged as a warning

log = logging.getLogger(__name__)


class LoopLagMonitor:
    """Samples the running loop's lag every ``interval`` seconds between :meth:`start` and
    :meth:`stop`, into ``histogram`` and (the max over the last ``window`` seconds)
    ``gauge``."""

    def __init__(
        self,
        interval: float = INTERVAL,
        window: float = WINDOW,
        histogram: Histogram = LOOP_LAG,
        gauge: Gauge = LOOP_LAG_MAX,
    ) -> None:
        self.interval = interval
        self.window = window
        self.histogram = histogram
        self.gauge = gauge
        # (loop time, lag) with lags strictly decreasing: the head is the window's max
        self._peaks: deque[tuple[float, float]] = deque()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling on the running loop."""
        self._task = asyncio.create_task(self._run(), name="loop lag monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def record(self, lag: float, now: float) -> None:
        """Take one sample ``lag`` seen at loop time ``now``."""
        self.histogram.observe(lag)
        while self._peaks and self._peaks[-1][1] <= lag:
            self._peaks.pop()
        self._peaks.append((now, lag))
        while self._peaks[0][0] < now - self.window:
            self._peaks.popleft()
        self.gauge.set(self._peaks[0][1])
        if lag >= LOG_OVER:
            log.warning("the event loop was blocked for %.2f s", lag)

    def max_lag(self) -> float:
        """The largest lag sampled in the last ``window`` seconds (0 before any)."""
        return self._peaks[0][1] if self._peaks else 0.0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.record(max(0.0, now - asked), now)
