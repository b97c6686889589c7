"""The viewer: the page a person opens (novncURL), its status feed, and its WebSocket.

These routes take a viewer ticket, not an API key: the ticket in novncURL is traded, once,
for an HttpOnly cookie scoped to the session's viewer path, then dropped from the address bar.
A second use of the same ticket is refused with a page saying so (unless the browser already
holds this session's cookie: then it is simply the viewer again).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from master_controller.auth import Forbidden, TicketUsed, Unauthorized, redeem
from master_controller.errors import MCError, SessionNotFound
from master_controller.sessions.states import TERMINAL, VIEWABLE, State
from master_controller.viewing.close_codes import CloseCode
from master_controller.viewing.relay import ViewerConnection, relay
from master_controller.web.deps import Services, check_session_id, services
from master_controller.web.paths import VIEWER_COOKIE, viewer_path
from master_controller.web.schemas import EventView, ViewerStatus

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
                secure=svc.settings.base_url.startswith("https://"),
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


def _has_cookie(svc: Services, request: Request, session_id: str) -> bool:
    try:
        svc.tickets.check_cookie(
            request.cookies.get(VIEWER_COOKIE), session_id, svc.settings.max_lifetime
        )
    except (Unauthorized, Forbidden):
        return False
    return True


@router.get("/status", response_model=ViewerStatus, include_in_schema=False)
async def viewer_status(
    session_id: str, request: Request, svc: Services = Depends(services)
) -> ViewerStatus:
    """Progress and state for the viewer page (viewer cookie, no API key)."""
    row = await svc.sessions.get(check_session_id(session_id))
    svc.tickets.check_cookie(
        request.cookies.get(VIEWER_COOKIE), session_id, svc.settings.max_lifetime
    )
    events = await svc.sessions.ledger.events(session_id)
    return ViewerStatus(
        status=row.state,
        reason=row.reason,
        ready=State(row.state) in VIEWABLE,
        ended=State(row.state) in TERMINAL,
        queue_position=svc.sessions.queue_position(session_id),
        events=[EventView.of(e) for e in events],
    )


def origin_allowed(websocket: WebSocket, services: Services) -> bool:
    origin = websocket.headers.get("origin")
    if origin is None:
        return False
    allowed = {services.settings.base_url, *services.settings.allowed_origins}
    if origin.rstrip("/") in allowed:
        return True
    host = websocket.headers.get("host", "")
    return urlsplit(origin).netloc == host and urlsplit(origin).scheme in ("http", "https")


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
            target.websocket_url,
            target.vnc_password,
            max_viewers=svc.settings.max_viewers,
        )
    finally:
        await svc.sessions.viewer_activity(session_id)
