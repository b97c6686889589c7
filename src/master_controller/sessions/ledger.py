"""The sessions' record: rows and events in the database, and the only code that changes a
session's state. A transition is checked against the state machine and committed together
with its event, in one transaction, before anything acts on it: a restarted controller finds
the truth in the database."""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import timedelta

from master_controller.errors import SessionNotFound
from master_controller.metrics import SESSION_TRANSITIONS, STEP_SECONDS
from master_controller.sessions.states import TERMINAL, State, check_transition
from master_controller.steps import StepRecord
from master_controller.store import repo
from master_controller.store.database import Database
from master_controller.store.models import EventRow, SessionRow, utcnow

log = logging.getLogger("master_controller.sessions")


def session_fields(row: SessionRow) -> dict[str, str]:
    """A session's fields for a log line (``extra=``): which session, whose."""
    return {"session_id": row.id, "user_id": row.user_id, "provider": row.provider}


class SessionLedger:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, session_id: str) -> SessionRow:
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id)
        if row is None:
            raise SessionNotFound(f"no session {session_id}")
        return row

    async def in_states(
        self, states: Collection[State], user_id: str | None = None
    ) -> list[SessionRow]:
        """Sessions in ``states``, newest first."""
        async with self.db.session() as db:
            return await repo.list_sessions(db, user_id, [s.value for s in states])

    async def create(self, row: SessionRow) -> SessionRow:
        """Record a new session, with its first state's event, in one commit."""
        async with self.db.session() as db:
            db.add(row)
            # the row first: the event refers to it, and nothing (no relationship) tells the
            # unit of work to insert the session before its event
            await db.flush()
            repo.stage_event(db, row.id, "state", row.state)
            await db.commit()
        SESSION_TRANSITIONS.labels(str(row.state)).inc()
        log.info(
            "session %s for %s (%s): %s",
            row.id,
            row.user_id,
            row.provider,
            row.state,
            extra={**session_fields(row), "state": str(row.state)},
        )
        return row

    async def transition(self, session_id: str, new: State, reason: str = "") -> SessionRow:
        """Move the session to ``new`` (refused unless the state machine allows it): the
        row and its event in one commit."""
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id)
            if row is None:
                raise SessionNotFound(f"no session {session_id}")
            check_transition(State(row.state), new)
            now = utcnow()
            row.state, row.reason, row.last_activity_at = new, reason, now
            if new == State.READY and row.ready_at is None:
                row.ready_at = now
            if new in TERMINAL:
                row.ended_at = now
            repo.stage_event(db, session_id, "state", new, ok=new != State.FAILED, detail=reason)
            await db.commit()
        SESSION_TRANSITIONS.labels(str(new)).inc()
        log.info(
            "session %s -> %s %s",
            session_id,
            new,
            reason,
            extra={"session_id": session_id, "user_id": row.user_id, "state": str(new)},
        )
        return row

    async def record(self, session_id: str, step: StepRecord) -> None:
        """A step's outcome as an event (and in the step-duration metric)."""
        STEP_SECONDS.labels(step.name).observe(step.seconds)
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id)
            await repo.add_event(
                db, session_id, "step", step.name, step.ok, round(step.seconds, 3), step.detail
            )
        log.info(
            "session %s: step %s %s in %.2fs%s",
            session_id,
            step.name,
            "ok" if step.ok else "FAILED",
            step.seconds,
            f" ({step.detail})" if step.detail else "",
            extra={
                "session_id": session_id,
                "user_id": row.user_id if row is not None else None,
                "step": step.name,
                "ok": step.ok,
                "seconds": round(step.seconds, 3),
            },
        )

    async def set_guest(self, session_id: str, guest_id: str, address: str | None) -> None:
        """The session's guest (a retried start has a new one) and its address."""
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id)
            if row is not None:
                row.guest_id, row.browser_ip = guest_id, address
                await db.commit()

    async def extend(self, session_id: str, seconds: float, max_lifetime: float) -> SessionRow:
        """Give the session ``seconds`` of sign-in time from now (never past its
        ``max_lifetime``), as activity."""
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id)
            if row is None:
                raise SessionNotFound(f"no session {session_id}")
            now = utcnow()
            row.ends_at = min(
                now + timedelta(seconds=seconds),
                row.created_at + timedelta(seconds=max_lifetime),
            )
            row.last_activity_at = now
            await db.commit()
            await db.refresh(row)
            return row

    async def touch(self, session_id: str) -> None:
        async with self.db.session() as db:
            await repo.touch(db, session_id)

    async def events(self, session_id: str) -> list[EventRow]:
        async with self.db.session() as db:
            return await repo.events(db, session_id)
