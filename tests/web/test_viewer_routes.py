"""The viewer page's own calls (its cookie, never an API key): more time, and paste. Tried
as another site, another session's viewer and a careless page would: each is refused."""

from __future__ import annotations

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.web.test_original_clients import Original, original

__all__ = ["original"]  # the fixture used here


async def _viewer(original: Original, user: str) -> tuple[str, str, dict[str, str]]:
    """A started session's (id, viewer path) and the cookie its ticket is traded for."""
    started = await original.call(
        "POST", "/api/auth/start", json={"userId": user, "provider": "codex"}
    )
    session_id = started.json()["sessionId"]
    await original.poll(session_id, user, {"awaiting_user_auth"})
    link = httpx.URL(started.json()["novncURL"])
    traded = await original.http.get(
        original.base + link.path, params=dict(link.params), follow_redirects=False
    )
    assert traded.status_code == 303, traded.text
    cookie = "; ".join(f"{name}={value}" for name, value in traded.cookies.items())
    original.http.cookies.clear()  # each call below says which cookie it sends
    return session_id, link.path, {"Cookie": cookie}


async def test_paste_reaches_the_guests_clipboard_from_the_page_only(original: Original) -> None:
    session_id, path, cookies = await _viewer(original, "paster")
    guest = original.agent.of(await original.guest_of(session_id, "paster"))
    origin = {"Origin": original.base}
    url = original.base + path + "/clipboard"

    pasted = await original.http.post(
        url, json={"text": "hunter2 ü"}, headers={**cookies, **origin}
    )
    assert pasted.status_code == 200, pasted.text
    assert guest.clipboard == "hunter2 ü"

    # another site (or none said) cannot paste into the person's guest
    for headers in ({"Origin": "https://evil.example"}, {}):
        refused = await original.http.post(url, json={"text": "x"}, headers={**cookies, **headers})
        assert refused.status_code == 403
    # without the viewer cookie (an API key is no viewer), or with too much text
    assert (await original.http.post(url, json={"text": "x"}, headers=origin)).status_code == 401
    huge = await original.http.post(url, json={"text": "x" * 1025}, headers={**cookies, **origin})
    assert huge.status_code == 422
    assert guest.clipboard == "hunter2 ü"

    # one session's viewer cookie does not reach another session
    other, other_path, _ = await _viewer(original, "someone-else")
    crossed = await original.http.post(
        original.base + other_path + "/clipboard",
        json={"text": "x"},
        headers={**cookies, **origin},
    )
    assert crossed.status_code in (401, 403)
    assert original.agent.of(await original.guest_of(other, "someone-else")).clipboard is None


async def test_the_page_fits_the_guests_screen_to_its_window(original: Original) -> None:
    session_id, path, cookies = await _viewer(original, "fitter")
    guest = original.agent.of(await original.guest_of(session_id, "fitter"))
    origin = {"Origin": original.base}
    url = original.base + path + "/display"

    async def fit(width: object, height: object, headers: dict[str, str]) -> httpx.Response:
        return await original.http.post(
            url, json={"width": width, "height": height}, headers=headers
        )

    fitted = await fit(1024, 700, {**cookies, **origin})
    assert fitted.status_code == 200, fitted.text
    assert fitted.json() == {"width": 1024, "height": 700} and guest.screen == (1024, 700)
    # a phone's window or a huge one: the guest's limits, and the page scales the rest
    assert (await fit(390, 500, {**cookies, **origin})).json() == {"width": 800, "height": 1026}
    assert (await fit(5000, 3000, {**cookies, **origin})).json() == {"width": 1920, "height": 1200}
    assert (await fit(1025, 700, {**cookies, **origin})).json()["width"] == 1024  # even widths
    # nonsense is refused before it reaches the guest
    for width, height in ((0, 700), (-5, 700), (1024, 99999), ("wide", 700), (1024.5, 700)):
        assert (await fit(width, height, {**cookies, **origin})).status_code == 422
    # another site, no cookie, another session's cookie: refused; the screen is unchanged
    for headers in ({**cookies, "Origin": "https://evil.example"}, cookies, origin):
        assert (await fit(800, 600, headers)).status_code in (401, 403)
    other, other_path, _ = await _viewer(original, "someone-else")
    crossed = await original.http.post(
        original.base + other_path + "/display",
        json={"width": 800, "height": 600},
        headers={**cookies, **origin},
    )
    assert crossed.status_code in (401, 403)
    assert guest.screen == (1024, 700)
    assert original.agent.of(await original.guest_of(other, "someone-else")).screen == (1280, 800)


async def test_copy_out_of_the_guest_only_where_the_operator_allows_it(
    original: Original,
) -> None:
    session_id, path, cookies = await _viewer(original, "copier")
    guest = original.agent.of(await original.guest_of(session_id, "copier"))
    guest.copied = "the guest's text ü"
    origin = {"Origin": original.base}
    url = original.base + path + "/copy"
    status = await original.http.get(original.base + path + "/status", headers=cookies)
    assert status.json()["copyOut"] is False
    # off by default: credentials live in the guest
    refused = await original.http.post(url, headers={**cookies, **origin})
    assert refused.status_code == 403 and "viewer_copy_out" in refused.text

    original.settings.viewer_copy_out = True
    status = await original.http.get(original.base + path + "/status", headers=cookies)
    assert status.json()["copyOut"] is True
    copied = await original.http.post(url, headers={**cookies, **origin})
    assert copied.status_code == 200 and copied.json() == {"text": "the guest's text ü"}
    # a hostile guest's clipboard is bounded
    guest.copied = "x" * 100_000
    copied = await original.http.post(url, headers={**cookies, **origin})
    assert copied.json()["text"] == "x" * 1024
    # still the page's own call only: another site, or no cookie, gets nothing
    for headers in ({**cookies, "Origin": "https://evil.example"}, cookies, origin):
        assert (await original.http.post(url, headers=headers)).status_code in (401, 403)


async def test_more_time_from_the_page(original: Original) -> None:
    _, path, cookies = await _viewer(original, "waiter")
    status = (await original.http.get(original.base + path + "/status", headers=cookies)).json()
    assert status["providerTitle"] == "Codex CLI" and status["secondsLeft"] > 0
    url = original.base + path + "/heartbeat"
    refused = await original.http.post(url, headers={**cookies, "Origin": "https://x.example"})
    assert refused.status_code == 403
    extended = await original.http.post(url, headers={**cookies, "Origin": original.base})
    assert extended.status_code == 200
    assert extended.json()["secondsLeft"] >= status["secondsLeft"] - 1
    assert extended.json()["endsAt"] <= extended.json()["latestEnd"]


async def test_no_viewer_reconnects_while_the_credentials_are_captured(
    original: Original,
) -> None:
    """A capture closes the session's viewers first; one that comes back before the guest
    is gone (the page reconnects, or a second tab) is refused, and the page is not told
    the guest is ready."""
    session_id, path, cookies = await _viewer(original, "capturer")
    guest_id = await original.guest_of(session_id, "capturer")
    gate = original.runtime.hold("destroy")  # the capture's last step waits here
    original.agent.sign_in(guest_id)
    await gate.wait_entered(timeout=10)
    try:
        status = await original.http.get(original.base + path + "/status", headers=cookies)
        assert status.json()["status"] == "authenticating" and status.json()["ready"] is False
        socket_url = original.base.replace("http://", "ws://") + path + "/websock"
        async with connect(
            socket_url,
            additional_headers={**cookies, "Origin": original.base},
            proxy=None,
            subprotocols=["binary"],  # type: ignore[list-item]
        ) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4410, "credentials captured")
    finally:
        gate.open()
    assert (await original.poll(session_id, "capturer", {"completed"}))[-1] == "completed"
