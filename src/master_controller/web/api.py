"""The JSON API for callers with an API key (compatible with the system we replace)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from master_controller.auth import Caller
from master_controller.errors import SessionNotFound
from master_controller.sessions.states import ACTIVE, VIEWABLE, State
from master_controller.store import repo
from master_controller.store.models import SessionRow
from master_controller.web.deps import (
    Services,
    caller,
    owned_session,
    require_scope,
    services,
)
from master_controller.web.paths import viewer_path
from master_controller.web.schemas import (
    USER_ID_PATTERN,
    EventView,
    OkResponse,
    OpenUrlRequest,
    SessionView,
    StartRequest,
    StartResponse,
    VmView,
)

router = APIRouter(prefix="/api", dependencies=[require_scope("sessions")])  # type: ignore[list-item]


def viewer_url(svc: Services, session_id: str) -> str:
    """The link the person signing in opens: the viewer page with a single-use ticket."""
    ticket = svc.tickets.ticket(session_id)
    return f"{svc.settings.base_url}{viewer_path(session_id)}?ticket={ticket}"


async def session_view(svc: Services, row: SessionRow, with_events: bool = True) -> SessionView:
    events: list[EventView] = []
    if with_events:
        async with svc.db.session() as db:
            events = [EventView.of(e) for e in await repo.events(db, row.id)]
    live = row.state in {s.value for s in ACTIVE}
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
        viewers=svc.viewers.count(row.id),
        queue_position=svc.sessions.queue_position(row.id),
        novnc_url=viewer_url(svc, row.id) if live else None,
        events=events,
    )


@router.post("/auth/start", status_code=201, response_model=StartResponse)
@router.post("/vm/auth", status_code=201, response_model=StartResponse, include_in_schema=False)
async def start_session(
    body: StartRequest, who: Caller = Depends(caller), svc: Services = Depends(services)
) -> StartResponse:
    """Start a sign-in session; the guest boots in the background."""
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


@router.post("/auth/session/{session_id}/cancel", response_model=SessionView)
async def cancel_session(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> SessionView:
    return await session_view(svc, await svc.sessions.cancel(row.id))


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


async def _users_session(svc: Services, who: Caller, user_id: str, states: set[str]) -> SessionRow:
    async with svc.db.session() as db:
        rows = await repo.list_sessions(db, user_id=user_id, states=sorted(states))
    mine = [r for r in rows if who.owns(r.api_key_id)]
    if not mine:
        raise SessionNotFound(f"user {user_id[:128]!r} has no VM that can do that")
    return mine[0]


@router.post("/users/{user_id}/vm/hibernate", response_model=SessionView)
async def hibernate_users_vm(
    user_id: str, who: Caller = Depends(caller), svc: Services = Depends(services)
) -> SessionView:
    """Hibernate the user's newest live session."""
    row = await _users_session(svc, who, user_id, {s.value for s in VIEWABLE})
    return await session_view(svc, await svc.sessions.hibernate(row.id))


@router.post("/users/{user_id}/vm/resume", response_model=SessionView)
async def resume_users_vm(
    user_id: str, who: Caller = Depends(caller), svc: Services = Depends(services)
) -> SessionView:
    """Resume the user's newest hibernated session."""
    row = await _users_session(svc, who, user_id, {State.HIBERNATED.value})
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


@router.get("/auth/sessions", response_model=list[SessionView])
async def list_sessions(
    user_id: str | None = Query(None, alias="userId", pattern=USER_ID_PATTERN),
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
) -> list[SessionView]:
    async with svc.db.session() as db:
        rows = await repo.list_sessions(db, user_id=user_id)
    visible = [r for r in rows if who.owns(r.api_key_id)]
    return [await session_view(svc, r, with_events=False) for r in visible[:200]]


async def _vms(svc: Services, who: Caller) -> list[VmView]:
    async with svc.db.session() as db:
        live = [s.value for s in ACTIVE | {State.HIBERNATED, State.CAPTURED}]
        rows = await repo.list_sessions(db, states=live)
    vms = []
    for row in rows:
        if not who.owns(row.api_key_id):
            continue
        facts = svc.sessions.guest_facts(row)
        vms.append(
            VmView(
                vm_id=row.guest_id or row.id,
                session_id=row.id,
                user_id=row.user_id,
                status=facts.status,
                session_status=row.state,
                address=row.browser_ip,
                runtime=row.runtime,
                image_id=row.image_id,
                snapshot_bytes=facts.snapshot_bytes,
            )
        )
    return vms


@router.get("/vms", response_model=list[VmView])
async def list_vms(
    who: Caller = Depends(caller), svc: Services = Depends(services)
) -> list[VmView]:
    return await _vms(svc, who)


@router.get("/vms/{vm_id}", response_model=VmView)
async def get_vm(
    vm_id: str, who: Caller = Depends(caller), svc: Services = Depends(services)
) -> VmView:
    for vm in await _vms(svc, who):
        if vm.vm_id == vm_id:
            return vm
    raise SessionNotFound(f"no VM {vm_id[:64]!r}")
