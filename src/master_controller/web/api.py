"""The JSON API for callers with an API key (compatible with the system we replace)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from master_controller.auth import Caller
from master_controller.errors import SessionNotFound
from master_controller.sessions.states import ACTIVE, HOLDING
from master_controller.store import repo
from master_controller.store.models import SessionRow
from master_controller.web.deps import (
    Services,
    UserId,
    acting_user,
    caller,
    check_acting_user,
    owned_session,
    require_scope,
    services,
)
from master_controller.web.paths import viewer_path
from master_controller.web.schemas import (
    USER_ID_PATTERN,
    ActionView,
    EventView,
    OkResponse,
    OpenUrlRequest,
    OriginalSession,
    SessionView,
    StartRequest,
    StartResponse,
    UserSessions,
    VmList,
    VmView,
)

router = APIRouter(prefix="/api", dependencies=[require_scope("sessions")])  # type: ignore[list-item]


def viewer_url(svc: Services, session_id: str) -> str:
    """The link the person signing in opens: the viewer page with a single-use ticket."""
    ticket = svc.tickets.ticket(session_id)
    return f"{svc.settings.base_url}{viewer_path(session_id)}?ticket={ticket}"


def original_session(svc: Services, row: SessionRow) -> OriginalSession:
    """The session as the original clients read it (its viewer link while it is live)."""
    live = row.state in {s.value for s in ACTIVE}
    novnc_url = viewer_url(svc, row.id) if live else None
    return OriginalSession.of(row, svc.sessions.is_capturing(row.id), novnc_url)


async def session_view(svc: Services, row: SessionRow, with_events: bool = True) -> SessionView:
    events: list[EventView] = []
    if with_events:
        async with svc.db.session() as db:
            events = [EventView.of(e) for e in await repo.events(db, row.id)]
    original = original_session(svc, row)
    return SessionView(
        session_id=row.id,
        user_id=row.user_id,
        provider=row.provider,
        status=row.state,
        reason=row.reason,
        browser_ip=row.browser_ip,
        runtime=row.runtime,
        image_id=row.image_id,
        created_at=row.created_at,
        ready_at=row.ready_at,
        ended_at=row.ended_at,
        last_activity_at=row.last_activity_at,
        ends_at=row.ends_at,
        viewers=svc.viewers.count(row.id),
        queue_position=svc.sessions.queue_position(row.id),
        novnc_url=original.novnc_url,
        session=original,
        events=events,
    )


async def action_view(svc: Services, row: SessionRow, message: str) -> ActionView:
    """The session after an action, with the original's ``success`` and ``message``."""
    return ActionView(**(await session_view(svc, row)).model_dump(), message=message)


@router.post("/auth/start", response_model=StartResponse)
@router.post("/vm/auth", response_model=StartResponse, include_in_schema=False)
@router.post("/auth/rotate", response_model=StartResponse)
async def start_session(
    body: StartRequest,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> StartResponse:
    """Start a sign-in session; the guest boots in the background. (``/auth/rotate``, for
    credentials that need renewing, is the same: a fresh sign-in whose capture replaces
    the stored record.)"""
    check_acting_user(acting_for, body.user_id)
    row = await svc.sessions.start(body.user_id, body.provider, who.key_id)
    return StartResponse(
        session_id=row.id,
        provider=row.provider,
        novnc_url=viewer_url(svc, row.id),
        browser_ip=row.browser_ip,
        status=row.state,
    )


@router.get("/auth/session/{session_id}", response_model=SessionView)
async def get_session(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> SessionView:
    return await session_view(svc, row)


@router.post("/auth/session/{session_id}/cancel", response_model=ActionView)
async def cancel_session(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> ActionView:
    """End the session; its guest is destroyed."""
    return await action_view(svc, await svc.sessions.cancel(row.id), "Session cancelled")


@router.post("/auth/session/{session_id}/hibernate", response_model=SessionView)
async def hibernate_session(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> SessionView:
    """Save the guest and free its CPU and memory. VMs keep memory and disk; containers keep
    their disk only (resume boots them again)."""
    return await session_view(svc, await svc.sessions.hibernate(row.id))


@router.post("/auth/session/{session_id}/resume", response_model=SessionView)
async def resume_session(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> SessionView:
    """Start a hibernated session again; it is ready when the viewer path works."""
    return await session_view(svc, await svc.sessions.resume(row.id))


@router.post("/auth/session/{session_id}/open-url", response_model=OkResponse)
async def open_url(
    body: OpenUrlRequest,
    row: SessionRow = Depends(owned_session),
    svc: Services = Depends(services),
) -> OkResponse:
    """Open an http(s) URL in a new tab of the session's guest Chromium."""
    await svc.sessions.open_url(row.id, body.url)
    return OkResponse(status=(await svc.sessions.get(row.id)).state)


@router.post("/auth/session/{session_id}/heartbeat", response_model=OkResponse)
async def heartbeat(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> OkResponse:
    row = await svc.sessions.heartbeat(row.id)
    return OkResponse(status=row.state)


@router.get("/auth/sessions/{user_id}", response_model=UserSessions)
async def list_users_sessions(
    user_id: str = UserId,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> UserSessions:
    """The user's sessions this key started, newest first, as the original clients read
    them."""
    check_acting_user(acting_for, user_id)
    async with svc.db.session() as db:
        rows = await repo.list_sessions(db, user_id=user_id)
    mine = [original_session(svc, r) for r in rows if who.owns(r.api_key_id)][:200]
    return UserSessions(sessions=mine, total_active=sum(s.is_active for s in mine))


@router.get("/auth/sessions", response_model=list[SessionView])
async def list_sessions(
    user_id: str | None = Query(None, alias="userId", pattern=USER_ID_PATTERN),
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> list[SessionView]:
    """This key's sessions, newest first (one user's with ``userId``; a caller acting for
    an end user sees only that user's)."""
    if acting_for is not None:
        check_acting_user(acting_for, user_id or acting_for)
        user_id = acting_for
    async with svc.db.session() as db:
        rows = await repo.list_sessions(db, user_id=user_id)
    visible = [r for r in rows if who.owns(r.api_key_id)]
    return [await session_view(svc, r, with_events=False) for r in visible[:200]]


def vm_view(svc: Services, row: SessionRow) -> VmView:
    facts = svc.sessions.guest_facts(row)
    vm_id = row.guest_id or row.id
    return VmView(
        vm_id=vm_id,
        session_id=row.id,
        user_id=row.user_id,
        provider=row.provider,
        status=facts.status,
        session_status=row.state,
        address=row.browser_ip,
        runtime=row.runtime,
        image_id=row.image_id,
        snapshot_bytes=facts.snapshot_bytes,
        last_heartbeat=row.last_activity_at,
    )


async def _vms(svc: Services, who: Caller, acting_for: str | None) -> list[VmView]:
    """The guests of this key's sessions (of the end user the caller acts for, if it says)."""
    async with svc.db.session() as db:
        rows = await repo.list_sessions(db, user_id=acting_for, states=sorted(HOLDING))
    return [vm_view(svc, row) for row in rows if who.owns(row.api_key_id)]


@router.get("/vms", response_model=VmList)
async def list_vms(
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> VmList:
    """The guests of this key's sessions that are running or kept (hibernated)."""
    return VmList(vms=await _vms(svc, who, acting_for))


@router.get("/vms/{vm_id}", response_model=VmView)
async def get_vm(
    vm_id: str,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> VmView:
    for vm in await _vms(svc, who, acting_for):
        if vm.vm_id == vm_id:
            return vm
    raise SessionNotFound(f"no VM {vm_id[:64]!r}")
