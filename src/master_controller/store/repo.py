"""The queries the controller makes, one function each."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from master_controller.store.models import ApiKeyRow, EventRow, SessionRow, UsedTicketRow, utcnow


async def add_session(db: AsyncSession, row: SessionRow) -> SessionRow:
    db.add(row)
    await db.commit()
    return row


async def get_session(db: AsyncSession, session_id: str) -> SessionRow | None:
    return await db.get(SessionRow, session_id)


async def list_sessions(
    db: AsyncSession, user_id: str | None = None, states: Sequence[str] | None = None
) -> list[SessionRow]:
    query = select(SessionRow).order_by(SessionRow.created_at.desc())
    if user_id is not None:
        query = query.where(SessionRow.user_id == user_id)
    if states is not None:
        query = query.where(SessionRow.state.in_(states))
    return list((await db.scalars(query)).all())


async def count_by_state(db: AsyncSession) -> dict[str, int]:
    rows = await db.execute(select(SessionRow.state, func.count()).group_by(SessionRow.state))
    return {state: count for state, count in rows}


def stage_event(
    db: AsyncSession,
    session_id: str,
    kind: str,
    name: str,
    ok: bool = True,
    seconds: float | None = None,
    detail: str = "",
) -> None:
    """Add an event to ``db``'s transaction (committed with whatever else it holds)."""
    db.add(
        EventRow(session_id=session_id, kind=kind, name=name, ok=ok, seconds=seconds, detail=detail)
    )


async def add_event(
    db: AsyncSession,
    session_id: str,
    kind: str,
    name: str,
    ok: bool = True,
    seconds: float | None = None,
    detail: str = "",
) -> None:
    stage_event(db, session_id, kind, name, ok, seconds, detail)
    await db.commit()


async def events(db: AsyncSession, session_id: str) -> list[EventRow]:
    query = select(EventRow).where(EventRow.session_id == session_id).order_by(EventRow.id)
    return list((await db.scalars(query)).all())


async def touch(db: AsyncSession, session_id: str, at: datetime | None = None) -> None:
    row = await db.get(SessionRow, session_id)
    if row is not None:
        row.last_activity_at = at or utcnow()
        await db.commit()


async def add_api_key(db: AsyncSession, row: ApiKeyRow) -> None:
    db.add(row)
    await db.commit()


async def api_key_by_hash(db: AsyncSession, key_hash: str) -> ApiKeyRow | None:
    return await db.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash))


async def api_key_by_name(db: AsyncSession, name: str) -> ApiKeyRow | None:
    return await db.scalar(select(ApiKeyRow).where(ApiKeyRow.name == name))


async def list_api_keys(db: AsyncSession) -> list[ApiKeyRow]:
    return list((await db.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))).all())


async def redeem_ticket(db: AsyncSession, jti: str, expires_at: datetime) -> bool:
    """Record the ticket ``jti`` as used; False if it was used before. The primary key makes
    this atomic across connections and processes: of two redemptions racing, one wins.
    Tickets past their expiry are forgotten on the way (their signature refuses them)."""
    await db.execute(delete(UsedTicketRow).where(UsedTicketRow.expires_at < utcnow()))
    db.add(UsedTicketRow(jti=jti, expires_at=expires_at))
    try:
        await db.commit()
    except IntegrityError:
        await db.rollback()
        return False
    return True


async def used_tickets(db: AsyncSession) -> list[str]:
    return list((await db.scalars(select(UsedTicketRow.jti))).all())
