"""What runs for each session in the background, and the lock that orders it.

Every operation that changes a session's guest (boot, resume, hibernate, capture, end) holds
the session's lock from its first check to its last transition, so no two of them ever
interleave: the reaper cannot end a session while it is being captured or hibernated, and
a cancel waits for a capture to finish rather than cut it in half. Work that runs for long
(a boot, a resume) runs in a task that holds the lock; a login is *watched* without it (the
person may take minutes) and takes it only to capture."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


class SessionWork:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # a boot or a resume
        self._watchers: dict[str, asyncio.Task[None]] = {}  # a login being followed
        self._capturing: set[str] = set()

    def lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    def busy(self, session_id: str) -> bool:
        """Whether an operation runs on the session now (the reaper leaves it alone)."""
        lock = self._locks.get(session_id)
        return session_id in self._tasks or (lock is not None and lock.locked())

    def spawn(self, session_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (a boot or a resume) in the background."""
        self._tasks[session_id] = asyncio.create_task(self._run(session_id, work))

    async def _run(self, session_id: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            if self._tasks.get(session_id) is asyncio.current_task():
                del self._tasks[session_id]

    def watch(self, session_id: str, watcher: Coroutine[Any, Any, None]) -> None:
        """Follow a login in the background (replacing an older watcher)."""
        old = self._watchers.pop(session_id, None)
        if old is not None:
            old.cancel()
        self._watchers[session_id] = asyncio.create_task(self._follow(session_id, watcher))

    async def _follow(self, session_id: str, watcher: Coroutine[Any, Any, None]) -> None:
        try:
            await watcher
        finally:
            if self._watchers.get(session_id) is asyncio.current_task():
                del self._watchers[session_id]

    def watching(self, session_id: str) -> bool:
        return session_id in self._watchers

    def is_capturing(self, session_id: str) -> bool:
        return session_id in self._capturing

    @contextlib.asynccontextmanager
    async def capturing(self, session_id: str) -> Any:
        """Held by a watcher while it captures: stopping the watcher then waits for it."""
        self._capturing.add(session_id)
        try:
            async with self.lock(session_id):
                yield
        finally:
            self._capturing.discard(session_id)

    async def stop_watcher(self, session_id: str) -> None:
        """Stop following the session's login; a capture under way is waited for, never
        cut. Call without holding the session's lock."""
        watcher = self._watchers.get(session_id)
        if watcher is None or watcher is asyncio.current_task():
            return
        if session_id in self._capturing:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(watcher)
            return
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher

    def drop_watcher(self, session_id: str) -> None:
        """Stop following the session's login, for a caller that holds the session's lock
        and takes the session out of ``authenticating``: a watcher cannot be capturing
        then (a capture holds the lock), at most waiting to, and it must not follow a login
        that is no longer there (a boot that held the lock may have started it after the
        caller's :meth:`stop_watcher`)."""
        watcher = self._watchers.pop(session_id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()

    async def stop(self, session_id: str) -> None:
        """Cancel the session's boot or resume and stop its watcher (waiting for a
        capture). Call without holding the session's lock."""
        task = self._tasks.get(session_id)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.stop_watcher(session_id)

    def forget(self, session_id: str) -> None:
        """Drop an ended session's lock (nothing waits on it any more)."""
        lock = self._locks.get(session_id)
        if lock is not None and not lock.locked() and session_id not in self._tasks:
            del self._locks[session_id]

    async def shutdown(self) -> None:
        """Cancel everything (the controller stops; guests run on)."""
        tasks = [*self._tasks.values(), *self._watchers.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
