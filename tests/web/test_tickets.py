"""Viewer tickets, attacked as someone who got hold of a viewer link (from an access log, a
proxy's log, a browser history, a shoulder): a used link does not open the viewer again, not
even after a restart, not by racing the first use; links expire after ``ticket_ttl``; and
no log line carries a ticket. Real uvicorn, real HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from master_controller.auth import REDACTED, redact_tickets
from master_controller.settings import Settings
from master_controller.store import repo
from master_controller.store.database import Database
from master_controller.store.models import SessionRow, utcnow
from master_controller.web.api import viewer_url
from master_controller.web.deps import Services
from tests.web.inprocess import NoGuestRuntime, app_settings, serving

USED = "This viewer link was used already"


async def _session(app: Any, state: str = "ready") -> str:
    """A session row as the manager records it (no guest: the viewer page needs none)."""
    svc: Services = app.state.services
    sid = str(uuid.uuid4())
    async with svc.db.session() as db:
        await repo.add_session(
            db,
            SessionRow(
                id=sid,
                user_id="alice",
                provider="codex",
                state=state,
                runtime="no-guest",
                image_id="none",
            ),
        )
    return sid


def _link(app: Any, base: str, sid: str) -> str:
    """A viewer link as the API hands it out (novncURL), on the test server's address."""
    svc: Services = app.state.services
    return base + viewer_url(svc, sid).removeprefix(svc.settings.base_url)


async def _open(url: str, cookies: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, cookies=cookies) as client:
        return await client.get(url, follow_redirects=False)


def test_tickets_live_five_minutes_by_default() -> None:
    assert Settings.model_fields["ticket_ttl"].default == 300


async def test_a_viewer_link_opens_the_viewer_once(tmp_path: Path, database_url: str) -> None:
    settings = app_settings(tmp_path, database_url)
    async with serving(settings, NoGuestRuntime(settings)) as (base, app):
        sid = await _session(app)
        link = _link(app, base, sid)
        first = await _open(link)
        assert first.status_code == 303 and first.headers["location"].endswith(f"{sid}/novnc")
        cookie = first.cookies["mc_viewer"]
        set_cookie = first.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert f"path=/api/auth/session/{sid}/novnc" in set_cookie

        # the attack: the same link again, from someone else's browser (no cookie)
        replay = await _open(link)
        assert replay.status_code == 401 and "mc_viewer" not in replay.cookies
        assert USED in replay.text and "opens the viewer only once" in replay.text
        assert "Ask for a new link" in replay.text
        # ... and the page itself stays closed to them
        assert (await _open(link.split("?")[0])).status_code == 401

        # the browser that used it holds the cookie: the link just brings it back
        again = await _open(link, cookies={"mc_viewer": cookie})
        assert again.status_code == 303 and "set-cookie" not in again.headers
        page = await _open(link.split("?")[0], cookies={"mc_viewer": cookie})
        assert page.status_code == 200 and 'data-state="loading"' in page.text

        # a fresh link (every GET of the session makes one) opens it again, once
        fresh = _link(app, base, sid)
        assert fresh != link
        assert (await _open(fresh)).status_code == 303
        assert (await _open(fresh)).status_code == 401


async def test_racing_the_first_use_opens_it_once(tmp_path: Path, database_url: str) -> None:
    """Twenty browsers open the same fresh link at once: exactly one gets a cookie."""
    settings = app_settings(tmp_path, database_url)
    async with serving(settings, NoGuestRuntime(settings)) as (base, app):
        sid = await _session(app)
        link = _link(app, base, sid)
        answers = await asyncio.gather(*(_open(link) for _ in range(20)))
        assert sorted(a.status_code for a in answers) == [303] + [401] * 19
        assert sum("mc_viewer" in a.cookies for a in answers) == 1


async def test_a_used_link_stays_used_after_a_restart(tmp_path: Path, database_url: str) -> None:
    settings = app_settings(tmp_path, database_url)
    async with serving(settings, NoGuestRuntime(settings)) as (base, app):
        # hibernated: a restart keeps the session (a running one would fail, guest gone)
        sid = await _session(app, "hibernated")
        link = _link(app, base, sid)
        assert (await _open(link)).status_code == 303
    # same database, same signing key, a new process's memory
    async with serving(settings, NoGuestRuntime(settings)) as (base2, _):
        replay = await _open(base2 + link.removeprefix(base))
        assert replay.status_code == 401 and USED in replay.text


async def test_links_expire_after_ticket_ttl(tmp_path: Path) -> None:
    settings = app_settings(tmp_path, f"sqlite:///{tmp_path / 'mc.db'}", ticket_ttl=1.0)
    async with serving(settings, NoGuestRuntime(settings)) as (base, app):
        sid = await _session(app)
        unused = _link(app, base, sid)
        await asyncio.sleep(2.2)  # signatures count whole seconds
        late = await _open(unused)
        assert late.status_code == 401 and "has expired" in late.text
        # a link for another session does not open this one either
        other = await _session(app)
        borrowed = base + f"/api/auth/session/{sid}/novnc?" + _link(app, base, other).split("?")[1]
        answer = await _open(borrowed)
        assert answer.status_code == 403 and "another session" in answer.text


async def test_used_tickets_are_forgotten_once_expired(database_url: str) -> None:
    """The record of used tickets does not grow without bound: a redemption prunes the
    records of tickets whose signatures no longer pass anyway."""
    database = Database(database_url)
    await asyncio.to_thread(database.migrate)
    try:
        async with database.session() as db:
            assert await repo.redeem_ticket(db, "old" * 8, utcnow() - timedelta(seconds=1))
            assert await repo.redeem_ticket(db, "live" * 6, utcnow() + timedelta(minutes=5))
            assert not await repo.redeem_ticket(db, "live" * 6, utcnow() + timedelta(minutes=5))
            assert await repo.used_tickets(db) == ["live" * 6]
    finally:
        await database.close()


def test_redaction_of_ticket_values() -> None:
    line = '127.0.0.1:5 - "GET /api/auth/session/x/novnc?ticket=eyJz.aw3.pQ-_9&a=1 HTTP/1.1" 303'
    assert redact_tickets(line) == line.replace("eyJz.aw3.pQ-_9", REDACTED)
    encoded = "next=%2Fnovnc%3Fticket%3DeyJz.aw3.pQ-_9%26x%3D1"
    assert "eyJz" not in redact_tickets(encoded)
    assert redact_tickets("ticket=abc def") == f"ticket={REDACTED} def"


async def test_no_log_line_carries_a_ticket(tmp_path: Path) -> None:
    """Requests with tickets (the viewer page, a WebSocket) and an app log line naming a
    viewer link, through the logging `serve` sets up: the tickets' values appear nowhere,
    the requests themselves do."""
    settings = app_settings(tmp_path, f"sqlite:///{tmp_path / 'mc.db'}")
    out = io.StringIO()
    async with serving(settings, NoGuestRuntime(settings), log_stream=out) as (base, app):
        sid = await _session(app)
        link = _link(app, base, sid)
        ticket = link.split("ticket=")[1]
        assert (await _open(link)).status_code == 303
        assert (await _open(link)).status_code == 401
        ws = base.replace("http", "ws") + f"/api/auth/session/{sid}/novnc/websock?ticket={ticket}"
        async with connect(ws, proxy=None) as socket:
            with pytest.raises(ConnectionClosed):
                await socket.recv()
        logging.getLogger("master_controller.sessions").info("viewer link for alice: %s", link)
        logging.getLogger("master_controller.sessions").warning(f"opened {link}")
    text = out.getvalue()
    assert ticket not in text and ticket[:20] not in text
    assert text.count(f'"GET /api/auth/session/{sid}/novnc?ticket={REDACTED} HTTP/1.1"') == 2
    assert f"/novnc/websock?ticket={REDACTED}" in text, text
    assert text.count(f"viewer link for alice: {base}") == 1
    assert f"opened {base}" in text


@pytest.mark.parametrize(
    ("state", "code", "words"),
    [
        ("provisioning", 4409, "not ready yet"),
        ("queued", 4409, "not ready yet"),
        ("booting", 4409, "not ready yet"),
        ("resuming", 4409, "not ready yet"),
        ("hibernated", 4412, "hibernated"),
        ("terminated", 4410, "session ended"),
    ],
)
async def test_a_viewer_is_let_in_only_once_the_session_is_ready(
    tmp_path: Path, state: str, code: int, words: str
) -> None:
    """Readiness is checked against the guest itself, so the viewer route admits no one
    before ``ready``: a starting session answers 4409 (the viewer page waits and retries)."""
    settings = app_settings(tmp_path, f"sqlite:///{tmp_path / 'mc.db'}")
    async with serving(settings, NoGuestRuntime(settings)) as (base, app):
        sid = await _session(app, state)
        svc: Services = app.state.services
        ws = base.replace("http", "ws") + f"/api/auth/session/{sid}/novnc/websock"
        headers = {"Cookie": f"mc_viewer={svc.tickets.cookie(sid)}", "Origin": base}
        async with connect(ws, proxy=None, additional_headers=headers) as socket:
            with pytest.raises(ConnectionClosed) as closed:
                await socket.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == code and words in closed.value.rcvd.reason
        assert svc.viewers.count(sid) == 0
