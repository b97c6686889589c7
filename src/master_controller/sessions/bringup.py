"""Bringing a session's guest up, from a fresh boot or from hibernation, until a viewer would
see its screen; then its login starts (when due). One path for both: they differ only in how
the guest starts.

A start first takes a boot slot (:mod:`sessions.admission`): a fresh boot waits for it as
``queued``, a resume in ``resuming``; its boot timeout starts once it has one. A fresh boot
that fails for a reason a new guest may not share (the guest died, a step of the runtime
failed, the viewer path never came up) is retried once on a fresh guest (its own folder,
address lease and namespace); a second failure fails the session with both reasons."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from master_controller.errors import (
    AddressPoolExhausted,
    ConfigError,
    ImageError,
    MCError,
    StorageFull,
)
from master_controller.metrics import START_RETRIES
from master_controller.runtimes.base import GuestSecrets, GuestState
from master_controller.sessions.admission import BootSlots
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

# failures a fresh guest would meet again: not worth a retry
LASTING = (ConfigError, ImageError, StorageFull, AddressPoolExhausted)


class _AttemptFailed(Exception):
    def __init__(self, step: str, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.why = f"{step} did not come up: {reason}"
        self.retry = retry


class GuestBringUp:
    def __init__(
        self,
        lifecycle: Lifecycle,
        sign_in: SignIn,
        viewer_path: ViewerPathCheck,
        slots: BootSlots,
    ) -> None:
        self.lifecycle = lifecycle
        self.sign_in = sign_in
        self.viewer_path = viewer_path
        self.slots = slots

    async def boot(self, row: SessionRow) -> None:
        """provisioning [-> queued] -> booting -> ready (-> authenticating)."""
        await self._bring_up(row, resuming=False)

    async def resume(self, row: SessionRow) -> None:
        """resuming -> ready (-> authenticating)."""
        await self._bring_up(row, resuming=True)

    async def _bring_up(self, row: SessionRow, resuming: bool) -> None:
        lifecycle = self.lifecycle
        session_id = row.id

        async def queued(ahead: int) -> None:
            detail = f"{ahead} ahead" if ahead else "next"
            if not resuming:
                await lifecycle.transition(
                    session_id, State.QUEUED, f"waiting for a boot slot ({detail})"
                )
            else:
                await lifecycle.ledger.record(
                    session_id, StepRecord("queued for a boot slot", 0.0, True, detail)
                )

        async with lifecycle.work.lock(session_id):
            try:
                await lifecycle.choose_exit(row)
            except MCError as exc:  # no working upstream: fail closed, before any boot
                why = f"no egress identity: {exc.reason}"
                await lifecycle.end_locked(session_id, State.FAILED, why)
                return
            try:
                async with self.slots.slot(session_id, queued) as waited:
                    if waited >= 0.01:
                        step = StepRecord("boot slot", waited, True, f"waited {waited:.1f}s")
                        await lifecycle.ledger.record(session_id, step)
                    if resuming:
                        await self._attempt(row, row.guest_id or session_id, resuming=True)
                    else:
                        await self._boot(row)
                row = await lifecycle.transition(session_id, State.READY)
            except _AttemptFailed as failed:
                await lifecycle.end_locked(session_id, State.FAILED, failed.why)
                return
            try:
                await self.sign_in.start_if_due(row)
            except Exception as exc:
                why = f"the login did not come up: {_reason(session_id, 'the login', exc)}"
                await lifecycle.end_locked(session_id, State.FAILED, why)

    async def _boot(self, row: SessionRow) -> None:
        """A fresh boot, retried once on a fresh guest after a transient failure."""
        try:
            await self._attempt(row, row.guest_id or row.id, resuming=False)
        except _AttemptFailed as first:
            if not first.retry:
                raise
            START_RETRIES.inc()
            await self.lifecycle.ledger.record(
                row.id, StepRecord("retry on a fresh guest", 0.0, False, first.why[:500])
            )
            try:
                await self._attempt(row, f"{row.id}-2", resuming=False)
            except _AttemptFailed as second:
                both = f"{first.why}; retried on a fresh guest: {second.why}"
                raise _AttemptFailed("the guest", both, retry=False) from second

    async def _attempt(self, row: SessionRow, guest_id: str, resuming: bool) -> GuestState:
        """One try at bringing the guest up to a non-blank frame. A failed fresh boot
        leaves nothing behind (its guest destroyed); raises _AttemptFailed."""
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

        step = "resume" if resuming else "allocate"
        started = time.monotonic()
        guest: GuestState | None = None
        try:
            if resuming:
                guest = lifecycle.guest(row)
                await runtime.resume(guest, steps)
            else:
                guest = await runtime.create(guest_id, row.image_id, _new_secrets(), steps)
                await flush()
                await ledger.set_guest(session_id, guest_id, guest.address)
                current = State((await ledger.get(session_id)).state)
                if current != State.BOOTING:
                    await lifecycle.transition(session_id, State.BOOTING)
                step = "boot"
                await runtime.start(guest, steps)
            await flush()
            step = "the viewer path"
            await self.viewer_path(guest, started + lifecycle.settings.boot_timeout, record)
            return guest
        except Exception as exc:
            await flush()
            reason = _reason(session_id, step, exc)
            if not resuming:
                with contextlib.suppress(MCError):
                    await runtime.destroy(guest or runtime.load(guest_id))
            retry = not resuming and isinstance(exc, MCError) and not _lasting(exc)
            raise _AttemptFailed(step, reason, retry) from exc


def _lasting(exc: BaseException) -> bool:
    """Whether a fresh guest would fail the same way: a lasting error, or one a runtime
    wrapped around it (a GuestStartFailed whose cause is a full disk, say)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, LASTING):
            return True
        seen = seen.__cause__
    return False


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
    log.error(
        "session %s: %s failed unexpectedly",
        session_id,
        step,
        exc_info=exc,
        extra={"session_id": session_id, "step": step},
    )
    return f"internal error ({type(exc).__name__}); see the controller's log"
