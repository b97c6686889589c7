"""Bringing a session's guest up, from a fresh boot or from hibernation, until a viewer would
see its screen; then its login starts (when due). One path for both: they differ only in how
the guest starts."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from master_controller.errors import MCError
from master_controller.runtimes.base import GuestSecrets, GuestState
from master_controller.sessions.lifecycle import Lifecycle
from master_controller.sessions.signin import SignIn
from master_controller.sessions.states import State
from master_controller.steps import StepLog, StepRecord, StepSink
from master_controller.store.models import SessionRow

log = logging.getLogger("master_controller.sessions")

# Checks a guest's viewer path until ``deadline`` (monotonic), each check sent to the sink
# as a step; raises ProbeError naming the check that did not pass. The real one is
# ``viewing.readiness.ViewerPath``; injected, so the session layer needs no viewer.
ViewerPathCheck = Callable[[GuestState, float, StepSink], Awaitable[None]]


class GuestBringUp:
    def __init__(self, lifecycle: Lifecycle, sign_in: SignIn, viewer_path: ViewerPathCheck) -> None:
        self.lifecycle = lifecycle
        self.sign_in = sign_in
        self.viewer_path = viewer_path

    async def boot(self, row: SessionRow) -> None:
        """provisioning -> booting -> ready (-> authenticating)."""
        await self._bring_up(row, resuming=False)

    async def resume(self, row: SessionRow) -> None:
        """resuming -> ready (-> authenticating)."""
        await self._bring_up(row, resuming=True)

    async def _bring_up(self, row: SessionRow, resuming: bool) -> None:
        lifecycle, runtime, ledger = self.lifecycle, self.lifecycle.runtime, self.lifecycle.ledger
        session_id = row.id
        records: list[StepRecord] = []
        steps = StepLog(on_record=records.append)

        async def flush() -> None:
            while records:
                await ledger.record(session_id, records.pop(0))

        async def record(step: StepRecord) -> None:
            await flush()
            await ledger.record(session_id, step)

        async with lifecycle.work.lock(session_id):
            step = "resume" if resuming else "allocate"
            started = time.monotonic()
            try:
                if resuming:
                    guest = lifecycle.guest(row)
                    await runtime.resume(guest, steps)
                else:
                    guest = await runtime.create(
                        row.guest_id or session_id, row.image_id, _new_secrets(), steps
                    )
                    await flush()
                    await ledger.set_address(session_id, guest.address)
                    await lifecycle.transition(session_id, State.BOOTING)
                    step = "boot"
                    await runtime.start(guest, steps)
                await flush()
                step = "the viewer path"
                await self.viewer_path(guest, started + lifecycle.settings.boot_timeout, record)
                row = await lifecycle.transition(session_id, State.READY)
                step = "the login"
                await self.sign_in.start_if_due(row)
            except Exception as exc:
                await flush()
                await lifecycle.end_locked(
                    session_id,
                    State.FAILED,
                    f"{step} did not come up: {_reason(session_id, step, exc)}",
                )


def _new_secrets() -> GuestSecrets:
    return GuestSecrets(
        vnc_password=secrets.token_urlsafe(6)[:8], agent_token=secrets.token_urlsafe(24)
    )


def _reason(session_id: str, step: str, exc: Exception) -> str:
    if isinstance(exc, MCError):
        return exc.reason
    if isinstance(exc, OSError):
        return str(exc)
    # a bug: fail the session with a reason rather than leave it starting
    log.error("session %s: %s failed unexpectedly", session_id, step, exc_info=exc)
    return f"internal error ({type(exc).__name__}); see the controller's log"
