"""The viewer: the page a person opens (novncURL), its status feed, and its WebSocket.

These routes take a viewer ticket, not an API key: the ticket in novncURL is traded, once,
for an HttpOnly cookie scoped to the session's viewer path, then dropped from the address bar.
A second use of the same ticket is refused with a page saying so (unless the browser already
holds this session's cookie: then it is simply the viewer again).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.requests import HTTPConnection

from master_controller.auth import Forbidden, TicketUsed, Unauthorized, redeem
from master_controller.errors import MCError, SessionNotFound
from master_controller.sessions.states import TERMINAL, VIEWABLE, State
from master_controller.store.models import SessionRow, utcnow
from master_controller.viewing.close_codes import CloseCode
from master_controller.viewing.relay import ViewerConnection, relay
from master_controller.web.deps import Services, check_session_id, services
from master_controller.web.paths import VIEWER_COOKIE, viewer_path
from master_controller.web.schemas import (
    CopiedText,
    EventView,
    OkResponse,
    PasteRequest,
    ScreenSize,
    ViewerStatus,
)
from mc_agent import providers

STATIC = Path(__file__).parent / "static"
router = APIRouter(prefix="/api/auth/session/{session_id}/novnc")


def _refusal(status: int, title: str, reason: str) -> HTMLResponse:
    page = (STATIC / "refused.html").read_text()
    page = page.replace("{{title}}", _escape(title)).replace("{{reason}}", _escape(reason))
    return HTMLResponse(page, status_code=status)


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


@router.get("", response_class=HTMLResponse, include_in_schema=False)
async def viewer_page(
    session_id: str, request: Request, ticket: str | None = None, svc: Services = Depends(services)
) -> Response:
    """The viewer page. With a valid ?ticket=, sets the viewer cookie and reloads without it."""
    try:
        row = await svc.sessions.get(check_session_id(session_id))
        if State(row.state) in TERMINAL:
            return _refusal(410, "This sign-in session has ended", row.reason or row.state)
        if ticket is not None:
            claim = svc.tickets.check_ticket(ticket, session_id, svc.settings.ticket_ttl)
            try:
                async with svc.db.session() as db:
                    await redeem(db, claim)
            except TicketUsed:
                if _has_cookie(svc, request, session_id):  # the same browser, again
                    return RedirectResponse(viewer_path(session_id), status_code=303)
                raise
            response = RedirectResponse(viewer_path(session_id), status_code=303)
            response.set_cookie(
                VIEWER_COOKIE,
                svc.tickets.cookie(session_id),
                max_age=int(svc.settings.max_lifetime),
                path=viewer_path(session_id),
                httponly=True,
                samesite="strict",
                secure=_over_tls(svc, request),
            )
            return response
        svc.tickets.check_cookie(
            request.cookies.get(VIEWER_COOKIE), session_id, svc.settings.max_lifetime
        )
    except SessionNotFound:
        return _refusal(404, "No such sign-in session", "Check the link you were given.")
    except TicketUsed as exc:
        return _refusal(exc.status, "This viewer link was used already", exc.reason)
    except (Unauthorized, Forbidden) as exc:
        return _refusal(exc.status, "This viewer link cannot be used", exc.reason)
    return HTMLResponse((STATIC / "viewer.html").read_text(), headers={"Cache-Control": "no-store"})


def _over_tls(svc: Services, request: Request) -> bool:
    """https: public_url says so, or a trusted proxy did (forwarded_allow_ips)."""
    return svc.settings.base_url.startswith("https://") or request.url.scheme == "https"


def _has_cookie(svc: Services, request: Request, session_id: str) -> bool:
    try:
        svc.tickets.check_cookie(
            request.cookies.get(VIEWER_COOKIE), session_id, svc.settings.max_lifetime
        )
    except (Unauthorized, Forbidden):
        return False
    return True


async def viewed_session(
    session_id: str, request: Request, svc: Services = Depends(services)
) -> SessionRow:
    """The session, for a browser holding its viewer cookie (no API key)."""
    row = await svc.sessions.get(check_session_id(session_id))
    svc.tickets.check_cookie(
        request.cookies.get(VIEWER_COOKIE), session_id, svc.settings.max_lifetime
    )
    return row


async def _status(svc: Services, row: SessionRow) -> ViewerStatus:
    events = await svc.sessions.ledger.events(row.id)
    counting = row.ends_at is not None and State(row.state) in VIEWABLE
    left = (row.ends_at - utcnow()).total_seconds() if counting and row.ends_at else None
    return ViewerStatus(
        status=row.state,
        reason=row.reason,
        ready=State(row.state) in VIEWABLE and not svc.sessions.is_capturing(row.id),
        ended=State(row.state) in TERMINAL,
        queue_position=svc.sessions.queue_position(row.id),
        provider=row.provider,
        provider_title=providers.get(row.provider).title,
        ends_at=row.ends_at,
        seconds_left=None if left is None else max(0.0, left),
        latest_end=row.created_at + timedelta(seconds=svc.settings.max_lifetime),
        copy_out=svc.settings.viewer_copy_out,
        events=[EventView.of(e) for e in events],
    )


@router.get("/status", response_model=ViewerStatus, include_in_schema=False)
async def viewer_status(
    row: SessionRow = Depends(viewed_session), svc: Services = Depends(services)
) -> ViewerStatus:
    """Progress and state for the viewer page."""
    return await _status(svc, row)


async def page_session(
    request: Request,
    row: SessionRow = Depends(viewed_session),
    svc: Services = Depends(services),
) -> SessionRow:
    """The session, for a call the viewer page itself makes: its cookie, from its own origin
    (the cookie is SameSite=Strict too). Another site's page gets 403."""
    if not origin_allowed(request, svc):
        raise Forbidden("only the viewer page itself may act on the session")
    return row


@router.post("/heartbeat", response_model=ViewerStatus, include_in_schema=False)
async def viewer_heartbeat(
    row: SessionRow = Depends(page_session), svc: Services = Depends(services)
) -> ViewerStatus:
    """The person asks for more time (the page's button): ``signin_time`` from now, never
    past ``max_lifetime``."""
    return await _status(svc, await svc.sessions.heartbeat(row.id))


@router.post("/clipboard", response_model=OkResponse, include_in_schema=False)
async def viewer_clipboard(
    body: PasteRequest,
    row: SessionRow = Depends(page_session),
    svc: Services = Depends(services),
) -> OkResponse:
    """The person's pasted text, onto the guest's clipboard (the page then sends Ctrl+V).
    Nothing goes the other way: the guest's clipboard never leaves it."""
    await svc.sessions.paste(row.id, body.text)
    return OkResponse(status=row.state)


@router.post("/copy", response_model=CopiedText, include_in_schema=False)
async def viewer_copy(
    row: SessionRow = Depends(page_session), svc: Services = Depends(services)
) -> CopiedText:
    """The guest's clipboard text, for the person to paste on their side (the page's Copy
    button). Only where the operator allows it (setting ``viewer_copy_out``)."""
    if not svc.settings.viewer_copy_out:
        raise Forbidden("copying out of the guest is off (setting viewer_copy_out)")
    return CopiedText(text=await svc.sessions.copy(row.id))


@router.post("/display", response_model=ScreenSize, include_in_schema=False)
async def viewer_display(
    body: ScreenSize,
    row: SessionRow = Depends(page_session),
    svc: Services = Depends(services),
) -> ScreenSize:
    """Fit the guest's screen to the viewer's window (the page's "Fit to window"); answers
    the size the screen has now (the guest clamps it to 800x600 .. 1920x1200). Every viewer
    of the session sees the new size."""
    width, height = await svc.sessions.fit_screen(row.id, body.width, body.height)
    return ScreenSize(width=width, height=height)


def origin_allowed(connection: HTTPConnection, services: Services) -> bool:
    """Whether the page that sent this request may act on the viewer: its Origin is
    public_url, one of allowed_origins, or this request's own Host over this request's
    scheme. Behind a TLS proxy the scheme is https only when the proxy said so and is one
    of forwarded_allow_ips; so a plain-http page under the same name never passes."""
    origin = connection.headers.get("origin")
    if origin is None:
        return False
    allowed = {services.settings.base_url, *services.settings.allowed_origins}
    if origin.rstrip("/") in allowed:
        return True
    scheme = "https" if connection.url.scheme in ("https", "wss") else "http"
    parts = urlsplit(origin)
    return parts.scheme == scheme and parts.netloc == connection.headers.get("host", "")


@router.websocket("/websock")
async def viewer_socket(session_id: str, websocket: WebSocket) -> None:
    """The noVNC WebSocket. Accepted first, so that a refusal reaches the viewer as a close
    code and reason instead of a failed handshake (which browsers report as 1006)."""
    svc: Services = websocket.app.state.services
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)
    viewer = ViewerConnection(websocket, session_id)
    try:
        row = await svc.sessions.get(check_session_id(session_id))
    except SessionNotFound:
        await viewer.close(CloseCode.NOT_FOUND, "session not found")
        return
    try:
        svc.tickets.check_cookie(
            websocket.cookies.get(VIEWER_COOKIE), session_id, svc.settings.max_lifetime
        )
    except (Unauthorized, Forbidden) as exc:
        await viewer.close(CloseCode.NO_TICKET, exc.reason[:120])
        return
    if not origin_allowed(websocket, svc):
        await viewer.close(CloseCode.ORIGIN_REFUSED, "origin not allowed")
        return
    state = State(row.state)
    if state in TERMINAL:
        await viewer.close(CloseCode.ENDED, f"session ended: {row.reason or state}"[:120])
        return
    if state in (State.HIBERNATING, State.HIBERNATED):
        await viewer.close(CloseCode.HIBERNATED, "session hibernated")
        return
    if state not in VIEWABLE:
        await viewer.close(CloseCode.NOT_READY, f"session is {state}, not ready yet")
        return
    if svc.sessions.is_capturing(session_id):  # its viewers were closed for the capture
        await viewer.close(CloseCode.ENDED, "credentials captured")
        return
    try:
        target = svc.sessions.viewer_target(row)
    except MCError:
        await viewer.close(CloseCode.GUEST_FAILED, "guest VNC unreachable")
        return
    await svc.sessions.viewer_activity(session_id)
    try:
        # relay() takes the viewer's slot before its first await, so N viewers racing in
        # cannot all pass a count checked here
        await relay(
            viewer,
            svc.viewers,
            target.vnc_url,
            target.vnc_password,
            max_viewers=svc.settings.max_viewers,
        )
    finally:
        await svc.sessions.viewer_activity(session_id)
