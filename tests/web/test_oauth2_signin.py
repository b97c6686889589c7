"""The whole sign-in, end to end: a local OAuth 2.0 identity provider (Authlib, with a login
form) on the host, reachable from the guest only through the controller's egress proxy; a
session with the ``oauth2`` provider; Playwright typing the username and password into the
guest's Chromium through the noVNC viewer and approving; the guest-side client exchanging
the code; the agent validating the token file; the controller storing it encrypted, wiping
it out of the guest and hibernating the guest."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from tests.idp import CLIENT_ID, IdentityProvider, identity_provider
from tests.servers import Controller, controller, guest_display, guest_health
from tests.web.test_viewer_browser import browser, page, screenshot, wait_for_state

pytestmark = [pytest.mark.integration, pytest.mark.browser]
__all__ = ["browser", "page"]  # fixtures used here

IDP_HOST = "idp.mc.test"  # resolved by the egress proxy (setting egress_hosts), nowhere else
PASSWORD = "correct horse battery"


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    with identity_provider({"alice": PASSWORD}) as running:
        yield running


@pytest.fixture
def ctl(
    golden_image: str, integration_settings: Settings, tmp_path: Path, idp: IdentityProvider
) -> Iterator[Controller]:
    port = idp.url.rsplit(":", 1)[1]
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.184.0/21",
        runtime="container",
        auto_login="true",
        after_capture="hibernate",
        oauth2_authorize_url=f"http://{IDP_HOST}:{port}/authorize",
        oauth2_token_url=f"http://{IDP_HOST}:{port}/token",
        oauth2_client_id=CLIENT_ID,
        oauth2_scope="profile",
        egress_hosts=json.dumps({f"{IDP_HOST}:{port}": "127.0.0.1"}),
        vault_key_file=str(tmp_path / "vault.keys"),
        signin_time="300",
    ) as running:
        yield running


def _window_titles(settings: Settings, session_id: str) -> list[str]:
    health = guest_health(ContainerRuntime(settings), session_id)
    return [w["title"] for w in health["windows"]]


def _wait_for_title(settings: Settings, session_id: str, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not any(text in t for t in _window_titles(settings, session_id)):
        assert time.monotonic() < deadline, _window_titles(settings, session_id)
        time.sleep(0.5)


def _sign_in(
    ctl: Controller, page: Page, settings: Settings, password: str, paste: bool = False
) -> str:
    """Start an oauth2 session, open its viewer and type the credentials into the IdP's
    form in the guest's Chromium (the password pasted from the clipboard with ``paste``).
    Returns the session id."""
    started = ctl.request("POST", "/api/auth/start", json={"userId": "alice", "provider": "oauth2"})
    assert started.status_code == 200, started.text
    session_id = started.json()["sessionId"]
    page.goto(started.json()["novncURL"])
    wait_for_state(page, ctl, "connected", 90)
    body = ctl.wait_for(session_id, {"authenticating", "failed"}, timeout=60)
    assert body["status"] == "authenticating", body
    # the client opened the IdP's authorization URL; the login form is on screen
    deadline = time.monotonic() + 30
    while not (url := ctl.request("GET", f"/api/auth/session/{session_id}/oauth-url").json())[
        "url"
    ]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert url["url"].startswith(f"http://{IDP_HOST}:") and "code_challenge=" in url["url"]
    _wait_for_title(settings, session_id, "Sign in to the test IdP", 30)
    time.sleep(2)  # the terminal is raised over Chromium after the page opens; let it settle
    # the username field has the focus (autofocus); keys go through noVNC's canvas
    page.locator("#screen canvas").focus()
    page.keyboard.type("alice", delay=30)
    page.keyboard.press("Tab")
    if paste:  # as from a password manager: the clipboard, then Ctrl+V on the page
        page.evaluate("text => navigator.clipboard.writeText(text)", password)
        page.keyboard.press("Control+V")
        time.sleep(1)  # the text reaches the guest's clipboard, then its own Ctrl+V
    else:
        page.keyboard.type(password, delay=30)
    page.keyboard.press("Enter")
    return str(session_id)


def test_sign_in_through_the_viewer_stores_the_token_encrypted(
    ctl: Controller,
    page: Page,
    idp: IdentityProvider,
    integration_settings: Settings,
    tmp_path: Path,
) -> None:
    session_id = _sign_in(ctl, page, integration_settings, PASSWORD)
    _wait_for_title(integration_settings, session_id, "Allow access", 30)
    page.locator("#screen canvas").focus()
    page.keyboard.press("Enter")  # the Approve button has the focus

    body = ctl.wait_for(session_id, {"captured", "failed"}, timeout=60)
    assert body["status"] == "captured", (body["reason"], body["events"][-5:])
    assert "guest hibernated" in body["reason"]
    steps = [e["name"] for e in body["events"]]
    assert "auth url" in steps and "credentials stored" in steps
    assert idp.tokens and idp.tokens[-1]["user"] == "alice"
    token = idp.tokens[-1]["access_token"]

    # the guest is hibernated; its viewer was told why
    vms = ctl.request("GET", "/api/vms").json()["vms"]
    assert next(v for v in vms if v["sessionId"] == session_id)["status"] == "hibernated"
    wait_for_state(page, ctl, "signed-in", 15)
    assert page.locator("#message").inner_text() == "Signed in. You can close this tab."
    screenshot(page, "desktop-signed-in")

    # metadata without secrets; validation decrypts and checks expiry
    listed = ctl.request("GET", "/api/auth/credentials/alice").json()["credentials"]
    assert [c["provider"] for c in listed] == ["oauth2"] and token not in json.dumps(listed)
    valid = ctl.request("GET", "/api/auth/validate/alice/oauth2").json()
    assert valid["valid"] is True and valid["expiresAt"] > time.time() + 3000
    status = ctl.request("GET", f"/api/auth/session/{session_id}/credentials/status").json()
    assert status["stored"] is True and status["valid"] is True

    # the database holds no plaintext token: not in any table, not in the file
    raw = (tmp_path / "mc.db").read_bytes()
    assert token.encode() not in raw
    with sqlite3.connect(tmp_path / "mc.db") as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            assert token not in json.dumps(
                db.execute(f"SELECT * FROM {table}").fetchall(), default=repr
            )
    assert token not in (ctl.log.read_text() if ctl.log else "")

    # export needs the export scope, and is audited
    refused = ctl.request("POST", "/api/auth/credentials/alice/oauth2/export")
    assert refused.status_code == 403
    # ...and ownership: another key with only `export` does not find them; admin+export does
    exporter = ctl.cli("apikey", "create", "exporter", "--scope", "export")
    assert exporter.returncode == 0, exporter.stderr
    ctl.keys["exporter"] = exporter.stdout.strip()
    stranger = ctl.request("POST", "/api/auth/credentials/alice/oauth2/export", key="exporter")
    assert stranger.status_code == 404, stranger.text
    auditor = ctl.cli("apikey", "create", "auditor", "--scope", "admin", "--scope", "export")
    assert auditor.returncode == 0, auditor.stderr
    ctl.keys["auditor"] = auditor.stdout.strip()
    exported = ctl.request("POST", "/api/auth/credentials/alice/oauth2/export", key="auditor")
    assert exported.status_code == 200, exported.text
    files = exported.json()["files"]
    assert json.loads(files[".config/mc-oauth2/token.json"])["access_token"] == token
    with sqlite3.connect(tmp_path / "mc.db") as db:
        actions = [r[0] for r in db.execute("SELECT action FROM audit")]
    assert actions == ["export"]

    # the kept guest holds no credentials: before it was hibernated its agent killed the
    # login, emptied the home (token file, browser profile with the IdP's session)
    resumed = ctl.request("POST", f"/api/auth/session/{session_id}/resume")
    assert resumed.status_code == 200, resumed.text
    body = ctl.wait_for(session_id, {"ready", "failed"}, timeout=90)
    assert body["status"] == "ready", body["reason"]
    home = integration_settings.guests_dir / session_id / "rootfs" / "home" / "browser"
    assert home.is_dir() and not (home / ".config" / "mc-oauth2" / "token.json").exists()
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert token.encode() not in path.read_bytes(), path


def test_a_wrong_password_stores_nothing(
    ctl: Controller, page: Page, idp: IdentityProvider, integration_settings: Settings
) -> None:
    session_id = _sign_in(ctl, page, integration_settings, "not the password")
    deadline = time.monotonic() + 20
    while idp.failed_logins == 0:
        assert time.monotonic() < deadline, "the IdP never saw the login"
        time.sleep(0.3)
    time.sleep(5)
    body = ctl.request("GET", f"/api/auth/session/{session_id}").json()
    assert body["status"] == "authenticating"
    assert not idp.tokens and not idp.codes
    assert ctl.request("GET", "/api/auth/credentials/alice").json()["credentials"] == []
    status = ctl.request("GET", f"/api/auth/session/{session_id}/credentials/status").json()
    assert status["valid"] is False and status["stored"] is False
    assert any(
        "Sign in to the test IdP" in t for t in _window_titles(integration_settings, session_id)
    )


def test_a_pasted_password_signs_in_and_the_page_says_what_to_do(
    ctl: Controller, browser: Browser, idp: IdentityProvider, integration_settings: Settings
) -> None:
    context = browser.new_context(
        viewport={"width": 1100, "height": 760},
        permissions=["clipboard-read", "clipboard-write"],
    )
    page = context.new_page()
    try:
        session_id = _sign_in(ctl, page, integration_settings, PASSWORD, paste=True)
        task = page.locator("#task").inner_text()
        assert task == "Sign in to OAuth 2.0 (authorization code + PKCE) in the window below."
        _wait_for_title(integration_settings, session_id, "Allow access", 30)
        assert int(page.evaluate("document.body.dataset.pastes")) == 1
        page.locator("#type-open").click()
        screenshot(page, "desktop-type-text")
        page.locator("#type-close").click()

        # time left, counting down from signin_time; "More time" gives it all again
        before = _seconds_left(page)
        assert 200 < before <= 300
        time.sleep(2)
        page.locator("#extend").click()
        page.wait_for_function(f"({SECONDS_LEFT})() > {before}", timeout=10000)
        assert page.locator("#latency").inner_text().endswith(" ms")

        page.locator("#screen canvas").focus()
        page.keyboard.press("Enter")  # approve
        body = ctl.wait_for(session_id, {"captured", "failed"}, timeout=60)
        assert body["status"] == "captured", (body["reason"], body["events"][-5:])
        assert idp.tokens and idp.tokens[-1]["user"] == "alice"
        wait_for_state(page, ctl, "signed-in", 15)
        assert page.locator("#message").inner_text() == "Signed in. You can close this tab."
        assert page.locator("#time-left").inner_text() == ""
        assert page.locator("#paste").is_hidden()
    finally:
        context.close()


# the viewer's "M:SS left", in seconds (-1 while it shows none)
SECONDS_LEFT = """() => {
  const m = document.querySelector("#time-left").textContent.match(/(\\d+):(\\d+)/);
  return m ? Number(m[1]) * 60 + Number(m[2]) : -1;
}"""


def _seconds_left(page: Page) -> int:
    page.wait_for_function(f"({SECONDS_LEFT})() >= 0")
    return int(page.evaluate(f"({SECONDS_LEFT})()"))


# a phone: 390x844 CSS pixels at 3x, touch, a mobile browser's viewport handling
PHONE = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 3,
    "is_mobile": True,
    "has_touch": True,
}


def _guest_pointer(settings: Settings, session_id: str) -> tuple[int, int]:
    """Where the guest's X pointer is."""
    shown = guest_display(
        ContainerRuntime(settings), session_id, "xdotool", "getmouselocation", "--shell"
    )
    found = dict(line.split("=", 1) for line in shown.split())
    return int(found["X"]), int(found["Y"])


def test_a_phone_signs_in_with_taps_and_its_on_screen_keyboard(
    ctl: Controller, browser: Browser, idp: IdentityProvider, integration_settings: Settings
) -> None:
    context = browser.new_context(**PHONE)  # type: ignore[arg-type]
    page = context.new_page()
    try:
        started = ctl.request(
            "POST", "/api/auth/start", json={"userId": "alice", "provider": "oauth2"}
        )
        session_id = started.json()["sessionId"]
        page.goto(started.json()["novncURL"])
        wait_for_state(page, ctl, "connected", 90)
        # the page fits the phone: nothing wider than the screen, the guest's screen as
        # narrow as it goes (800), tall in the phone's shape, scaled to the width; the
        # keyboard button offered
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.wait_for_function("(document.body.dataset.guestScreen || '').startsWith('800x')")
        guest_height = int(page.evaluate("document.body.dataset.guestScreen").split("x")[1])
        assert guest_height > 1000
        assert page.locator("#keyboard").is_visible()
        _wait_for_title(integration_settings, session_id, "Sign in to the test IdP", 60)
        time.sleep(2)  # the terminal is raised over Chromium after the page opens
        box = page.locator("#screen canvas").bounding_box()
        assert box is not None and box["width"] <= 390
        scale = box["width"] / int(page.evaluate("document.querySelector('#screen canvas').width"))
        screenshot(page, "phone-connected")

        # the on-screen keyboard types into the username field (it has the focus)
        page.locator("#keyboard").tap()
        assert page.evaluate("document.activeElement.id") == "keyboard-input"
        page.keyboard.type("alice", delay=30)
        page.keyboard.press("Tab")
        page.keyboard.type(PASSWORD, delay=30)
        page.keyboard.press("Enter")
        _wait_for_title(integration_settings, session_id, "Allow access", 30)
        time.sleep(1)

        # a tap is a click where the finger was, in the guest's own coordinates
        tap = (box["x"] + 300, box["y"] + box["height"] - 40)
        page.touchscreen.tap(*tap)
        time.sleep(1)
        expected = ((tap[0] - box["x"]) / scale, (tap[1] - box["y"]) / scale)
        pointer = _guest_pointer(integration_settings, session_id)
        assert abs(pointer[0] - expected[0]) <= 3 and abs(pointer[1] - expected[1]) <= 3, (
            pointer,
            expected,
        )
        screenshot(page, "phone-approve")
        # the tap (below the form) took the focus off the Approve button: Shift+Tab goes
        # back to it, Enter approves
        page.locator("#keyboard").tap()
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Enter")
        body = ctl.wait_for(session_id, {"captured", "failed"}, timeout=60)
        assert body["status"] == "captured", (body["reason"], body["events"][-5:])
        assert idp.tokens and idp.tokens[-1]["user"] == "alice"
        wait_for_state(page, ctl, "signed-in", 15)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        screenshot(page, "phone-signed-in")
    finally:
        context.close()


# A German keyboard, as Chromium on Linux reports it: (key, code) per key press; "AltGraph"
# is held for "@" (AltGr+Q); "Dead" is the acute accent dead key, whose next key comes composed.
GERMAN = {
    "ü": "BracketLeft",
    "ö": "Semicolon",
    "ä": "Quote",
    "Ä": "Quote",
    "ß": "Minus",
    ".": "Period",
    "-": "Slash",
    "+": "BracketRight",
    "é": "KeyE",
}


def _german_keys(cdp: Any, text: str) -> None:
    """Press the keys a person with a German layout presses for ``text`` (CDP key events with
    that layout's key and code values, as the host browser would send them)."""

    def press(key: str, code: str, modifiers: int = 0, text: str | None = None) -> None:
        down = {"type": "keyDown" if text else "rawKeyDown", "key": key, "code": code}
        cdp.send("Input.dispatchKeyEvent", {**down, "modifiers": modifiers, "text": text or ""})
        cdp.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "code": code})

    for char in text:
        if char == "@":
            cdp.send(
                "Input.dispatchKeyEvent",
                {"type": "rawKeyDown", "key": "AltGraph", "code": "AltRight", "location": 2},
            )
            press("@", "KeyQ", text="@")
            cdp.send(
                "Input.dispatchKeyEvent",
                {"type": "keyUp", "key": "AltGraph", "code": "AltRight", "location": 2},
            )
            continue
        if char == "é":  # the dead key first: nothing yet, then the composed letter
            press("Dead", "Equal")
        shifted = char != char.lower()
        if shifted:
            cdp.send(
                "Input.dispatchKeyEvent",
                {"type": "rawKeyDown", "key": "Shift", "code": "ShiftLeft", "modifiers": 8},
            )
        code = GERMAN.get(char) or f"Key{char.upper()}"
        press(char, code, modifiers=8 if shifted else 0, text=char)
        if shifted:
            cdp.send(
                "Input.dispatchKeyEvent", {"type": "keyUp", "key": "Shift", "code": "ShiftLeft"}
            )


def test_a_german_keyboard_types_what_the_person_typed(
    ctl: Controller, page: Page, idp: IdentityProvider, integration_settings: Settings
) -> None:
    """Umlauts, ß, AltGr+Q for @ and a dead key reach the guest's field as typed; the
    shortcuts that would close or add the guest's tabs are kept from it."""
    started = ctl.request("POST", "/api/auth/start", json={"userId": "alice", "provider": "oauth2"})
    session_id = started.json()["sessionId"]
    page.goto(started.json()["novncURL"])
    wait_for_state(page, ctl, "connected", 90)
    _wait_for_title(integration_settings, session_id, "Sign in to the test IdP", 60)
    time.sleep(2)  # the terminal is raised over Chromium after the page opens
    page.locator("#screen canvas").focus()
    cdp = page.context.new_cdp_session(page)
    typed = "jürgen.öß@straße-ä.de+Ärenée"
    _german_keys(cdp, typed)
    # Ctrl+T and Ctrl+W on the page: neither a new tab nor a closed one in the guest
    for key in ("t", "w"):
        cdp.send(
            "Input.dispatchKeyEvent",
            {"type": "rawKeyDown", "key": "Control", "code": "ControlLeft", "modifiers": 2},
        )
        cdp.send(
            "Input.dispatchKeyEvent",
            {"type": "rawKeyDown", "key": key, "code": f"Key{key.upper()}", "modifiers": 2},
        )
        cdp.send(
            "Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "code": f"Key{key.upper()}"}
        )
        cdp.send(
            "Input.dispatchKeyEvent", {"type": "keyUp", "key": "Control", "code": "ControlLeft"}
        )
    assert page.evaluate("document.body.dataset.blockedShortcuts") == "2"
    page.keyboard.press("Tab")
    page.keyboard.type("wrong", delay=30)
    page.keyboard.press("Enter")
    deadline = time.monotonic() + 20
    while not idp.usernames:
        assert time.monotonic() < deadline, "the IdP never saw the login"
        time.sleep(0.3)
    assert idp.usernames == [typed]
    time.sleep(1)
    titles = _window_titles(integration_settings, session_id)
    assert any("Sign in to the test IdP" in t for t in titles), titles
