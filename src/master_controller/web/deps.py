"""What a request handler needs: the app's services, and the caller."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import Depends, Header, Request

from master_controller.auth import Caller, Tickets, authenticate
from master_controller.credentials import CredentialStore
from master_controller.errors import SessionNotFound
from master_controller.runtimes.base import Runtime
from master_controller.sessions.service import SessionService
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.store.models import SessionRow
from master_controller.viewing.relay import ViewerRegistry
from master_controller.web.ratelimit import RateLimiter

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


async def owned_session(
    session_id: str, who: Caller = Depends(caller), svc: Services = Depends(services)
) -> SessionRow:
    """The session, if the caller's key started it (or the caller is an admin)."""
    row = await svc.sessions.get(check_session_id(session_id))
    if not who.owns(row.api_key_id):
        raise SessionNotFound(f"no session {session_id}")  # not 403: don't confirm it exists
    return row


def require_scope(scope: str) -> object:
    async def check(who: Caller = Depends(caller)) -> Caller:
        who.require(scope)
        return who

    return Depends(check)
