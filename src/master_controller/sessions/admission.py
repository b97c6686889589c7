"""Admission: at most ``max_concurrent_boots`` guests boot (or resume) at once; further
starts wait for a slot in the order they came, and each can say how many are ahead of it.
A boot's timeout starts when it gets its slot, so a burst queues instead of pushing every
boot past its deadline."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from master_controller.metrics import BOOT_QUEUE, BOOT_QUEUE_WAIT, BOOT_SLOTS_IN_USE


class BootSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: set[str] = set()
        self._waiting: OrderedDict[str, asyncio.Future[None]] = OrderedDict()

    def ahead_of(self, session_id: str) -> int | None:
        """How many starts wait ahead of this one (None: it is not waiting)."""
        for position, waiting in enumerate(self._waiting):
            if waiting == session_id:
                return position
        return None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def slot(
        self, session_id: str, on_wait: Callable[[int], Awaitable[None]] | None = None
    ) -> AsyncIterator[float]:
        """Hold a boot slot for the block; yields the seconds waited for it. ``on_wait``
        runs (with the number ahead) once if the start has to wait."""
        started = time.monotonic()
        if len(self._running) < self.limit and not self._waiting:
            self._running.add(session_id)
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[session_id] = waiter
            self._gauge()
            try:
                if on_wait is not None:
                    await on_wait(len(self._waiting) - 1)
                await waiter
            except BaseException:
                if self._waiting.pop(session_id, None) is None:  # handed a slot meanwhile
                    self._release(session_id)
                self._gauge()
                raise
        waited = time.monotonic() - started
        BOOT_QUEUE_WAIT.observe(waited)
        self._gauge()
        try:
            yield waited
        finally:
            self._release(session_id)

    def _release(self, session_id: str) -> None:
        self._running.discard(session_id)
        while self._waiting and len(self._running) < self.limit:
            next_id, waiter = self._waiting.popitem(last=False)
            if waiter.done():  # cancelled while queued: its own handler cleans up
                continue
            self._running.add(next_id)
            waiter.set_result(None)
        self._gauge()

    def _gauge(self) -> None:
        BOOT_QUEUE.set(len(self._waiting))
        BOOT_SLOTS_IN_USE.set(len(self._running))
