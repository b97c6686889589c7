"""Housekeeping: sessions past their lifetime, without a viewer too long, whose start never
finished, or whose guest died; kept guests past ``hibernated_ttl``; and, at start-up, the
reconciliation of the database with the guests that outlived the controller.

The reaper never acts on a session an operation holds (a boot, a capture, a hibernate),
and re-checks its reason under the session's lock before it ends one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from master_controller.errors import MCError
from master_controller.runtimes.base import GuestStatus
from master_controller.sessions.ledger import session_fields
from master_controller.sessions.lifecycle import Lifecycle
from master_controller.sessions.signin import SignIn
from master_controller.sessions.states import ACTIVE, TERMINAL, TIMED_OUT, VIEWABLE, State
from master_controller.steps import StepRecord
from master_controller.store.models import SessionRow, utcnow

log = logging.getLogger("master_controller.sessions")
REAP_INTERVAL = 2.0


class Reaper:
    def __init__(self, lifecycle: Lifecycle, sign_in: SignIn) -> None:
        self.lifecycle = lifecycle
        self.sign_in = sign_in
        self.settings = lifecycle.settings
        self._task: asyncio.Task[None] | None = None

    async def reconcile(self) -> None:
        """At start-up: keep sessions whose guest still runs, fail the rest; finish the
        teardown of ended sessions whose guest is still there (a controller stopped while
        it destroyed one)."""
        lifecycle, runtime = self.lifecycle, self.lifecycle.runtime
        for row in await lifecycle.ledger.in_states(ACTIVE):
            if State(row.state) == State.AUTHENTICATING and await self.sign_in.finish_if_stored(
                row
            ):
                continue  # stopped during its capture, after the store: captured now
            try:
                alive = runtime.status(lifecycle.guest(row)) == GuestStatus.RUNNING
            except MCError:
                alive = False
            if alive and State(row.state) in VIEWABLE:
                log.info(
                    "session %s: guest still running, reattached", row.id, extra=session_fields(row)
                )
                try:
                    await lifecycle.choose_exit(row)
                except MCError as exc:
                    why = f"no egress identity after the restart: {exc.reason}"
                    await lifecycle.end(row.id, State.FAILED, why, only_from=ACTIVE)
                    continue
                lifecycle.follow_egress(row)
                if State(row.state) == State.AUTHENTICATING:
                    self.sign_in.watch(row)
                continue
            why = (
                "the controller restarted while it was starting"
                if alive
                else "its guest was gone when the controller restarted"
            )
            await lifecycle.end(row.id, State.FAILED, why, only_from=ACTIVE)
        for guest in runtime.guests():
            try:
                row = await lifecycle.ledger.get(guest.guest_id)
            except MCError:
                continue  # not a session's guest (an image verification's, say)
            if State(row.state) in TERMINAL:
                log.info(
                    "session %s: finishing the teardown of its guest",
                    row.id,
                    extra=session_fields(row),
                )
                with contextlib.suppress(MCError):
                    await runtime.destroy(guest)

    async def reap_once(self) -> None:
        now = utcnow()
        await self._expire_kept(now)
        for row in await self.lifecycle.ledger.in_states(ACTIVE):
            if self.lifecycle.work.busy(row.id):
                continue
            ending = self._ending(row, now)
            if ending is not None:  # read again: a heartbeat may have come while others ended
                ending = self._ending(await self.lifecycle.ledger.get(row.id), utcnow())
            if ending is not None:
                state, reason = ending
                await self.lifecycle.end(row.id, state, reason, only_from={State(row.state)})

    def _ending(self, row: SessionRow, now: datetime) -> tuple[State, str] | None:
        """Whether (and how) the session should end now, or None."""
        s, state = self.settings, State(row.state)
        if now - row.created_at > timedelta(seconds=s.max_lifetime):
            return (
                State.TERMINATED,
                f"{TIMED_OUT}: maximum lifetime of {s.max_lifetime:.0f}s reached",
            )
        if row.ends_at is not None and now > row.ends_at and state != State.HIBERNATING:
            return State.TERMINATED, f"{TIMED_OUT}: the sign-in time ran out"
        idle = now - row.last_activity_at > timedelta(seconds=s.idle_timeout)
        if state in VIEWABLE and idle and self.lifecycle.viewers.count(row.id) == 0:
            return State.TERMINATED, f"{TIMED_OUT}: no viewer for {s.idle_timeout:.0f}s"
        if state in (
            State.PROVISIONING,
            State.QUEUED,
            State.BOOTING,
        ) and now - row.created_at > timedelta(seconds=s.boot_timeout + 30):
            return State.FAILED, "its start never finished"
        if state in VIEWABLE:
            with contextlib.suppress(MCError):
                if self.lifecycle.runtime.status(self.lifecycle.guest(row)) == GuestStatus.DEAD:
                    return State.FAILED, "the guest stopped unexpectedly"
        return None

    async def _expire_kept(self, now: datetime) -> None:
        """Hibernated guests (and captured ones kept) are destroyed, their snapshots and
        disk layers with them, ``hibernated_ttl`` after their last activity. A captured
        session's guest is kept only hibernated: one left otherwise (the capture could not
        destroy it) is destroyed now."""
        lifecycle = self.lifecycle
        ttl = timedelta(seconds=self.settings.hibernated_ttl)
        kept = await lifecycle.ledger.in_states({State.HIBERNATED, State.CAPTURED})
        guests = {g.guest_id: g for g in lifecycle.runtime.guests()} if kept else {}
        for row in kept:
            if lifecycle.work.busy(row.id):
                continue
            expired = now - row.last_activity_at > ttl
            if State(row.state) == State.HIBERNATED:
                if expired:
                    why = f"{TIMED_OUT}: hibernated for over {self.settings.hibernated_ttl:.0f}s"
                    await lifecycle.end(row.id, State.TERMINATED, why, only_from={State.HIBERNATED})
                continue
            guest = guests.get(row.guest_id or "")
            if guest is None:
                continue
            with contextlib.suppress(MCError):
                if not expired and lifecycle.runtime.status(guest) == GuestStatus.HIBERNATED:
                    continue
            async with lifecycle.work.lock(row.id):  # not while it resumes
                if State((await lifecycle.ledger.get(row.id)).state) != State.CAPTURED:
                    continue
                with contextlib.suppress(MCError):
                    await lifecycle.runtime.destroy(lifecycle.guest(row))
            why = "expired" if expired else "left running after the capture"
            await lifecycle.ledger.record(
                row.id, StepRecord("kept guest destroyed", 0.0, True, why)
            )

    async def run(self, interval: float = REAP_INTERVAL) -> None:
        while True:
            try:
                await self.reap_once()
            except Exception:  # the reaper must outlive a bad row
                log.exception("reaper pass failed")
            await asyncio.sleep(interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
