"""What a request handler needs: the app's services, and the caller."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import Depends, Header, Path, Request

from master_controller.auth import Caller, Forbidden, Tickets, authenticate
from master_controller.credentials import CredentialStore
from master_controller.errors import SessionNotFound
from master_controller.runtimes.base import Runtime
from master_controller.sessions.service import SessionService
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.store.models import SessionRow
from master_controller.viewing.relay import ViewerRegistry
from master_controller.web.ratelimit import RateLimiter
from master_controller.web.schemas import USER_ID_PATTERN

SESSION_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Services:
    settings: Settings
    db: Database
    runtime: Runtime
    tickets: Tickets
    viewers: ViewerRegistry
    sessions: SessionService
    credentials: CredentialStore
    limiter: RateLimiter


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def caller(
    svc: Services = Depends(services),
    authorization: str | None = Header(None),
    x_api_key: str | None = Header(None),
) -> Caller:
    key = x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    async with svc.db.session() as db:
        who = await authenticate(db, key)
    svc.limiter.check(who.key_id)
    return who


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.match(session_id):
        raise SessionNotFound(f"no session {session_id[:64]!r}")
    return session_id


# a path's user id (the same rule as a start's userId)
UserId = Path(pattern=USER_ID_PATTERN)


def acting_user(
    x_user_id: str | None = Header(
        None,
        description="The end user the calling app acts for: a session or user of anyone "
        "else is refused (403). Optional.",
    ),
) -> str | None:
    return x_user_id


def check_acting_user(acting_for: str | None, user_id: str) -> None:
    """Refuse a caller acting for one end user (``x-user-id``) that names another's."""
    if acting_for is not None and acting_for != user_id:
        raise Forbidden("x-user-id names another user than the one this concerns")


async def owned_session(
    session_id: str,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> SessionRow:
    """The session, if the caller's key started it (or the caller is an admin) and, when
    the caller says whom it acts for, it is that user's."""
    row = await svc.sessions.get(check_session_id(session_id))
    if not who.owns(row.api_key_id):
        raise SessionNotFound(f"no session {session_id}")  # not 403: don't confirm it exists
    check_acting_user(acting_for, row.user_id)
    return row


def require_scope(scope: str) -> object:
    async def check(who: Caller = Depends(caller)) -> Caller:
        who.require(scope)
        return who

    return Depends(check)
