"""The viewer page speaks the person's language (English and German, chosen from the
browser's languages), labels its controls, and says how a session ended, in a real
Chromium against the controller's app (in process; a fake runtime and agent stand in for
the guest, so the page never gets a screen: it keeps reconnecting, as it would to a guest
that cannot be reached)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.web.test_original_clients import Original, original
from tests.web.test_viewer_browser import CHROMIUM, QUIET

pytestmark = pytest.mark.browser
__all__ = ["original"]  # the fixture used here

SAYS = {
    "en-US": {
        "title": "Sign-in browser",
        "task": "Sign in to Codex CLI in the window below.",
        "more time": "More time",
        "cancelled": "This sign-in was cancelled. You can close this tab.",
        "left": " left",
    },
    "de-DE": {
        "title": "Anmelde-Browser",
        "task": "Melden Sie sich im Fenster unten bei Codex CLI an.",
        "more time": "Mehr Zeit",
        "cancelled": "Diese Anmeldung wurde abgebrochen. Sie können diesen Tab schließen.",
        "left": "noch ",
    },
}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Debian's chromium is not installed (run scripts/setup.sh)")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=QUIET)
        yield browser
        await browser.close()


async def _open(original: Original, browser: Browser, locale: str, user: str) -> tuple[Page, str]:
    started = await original.call(
        "POST", "/api/auth/start", json={"userId": user, "provider": "codex"}
    )
    session_id = started.json()["sessionId"]
    await original.poll(session_id, user, {"awaiting_user_auth"})
    context = await browser.new_context(locale=locale, viewport={"width": 1100, "height": 700})
    page = await context.new_page()
    link = urlsplit(started.json()["novncURL"])  # on this test's port, not base_url's
    await page.goto(f"{original.base}{link.path}?{link.query}")
    return page, session_id


@pytest.mark.parametrize("locale", sorted(SAYS))
async def test_the_page_speaks_the_browsers_language(
    original: Original, browser: Browser, locale: str
) -> None:
    says = SAYS[locale]
    page, session_id = await _open(original, browser, locale, f"lang-{locale.lower()}")
    # the page's script names its language once it runs (the HTML says "en" before)
    await page.wait_for_function(
        "lang => document.documentElement.lang === lang", arg=locale[:2], timeout=10000
    )
    assert await page.title() == says["title"]
    await page.wait_for_function(
        "t => document.querySelector('#task').textContent === t", arg=says["task"]
    )
    # the controls have names a screen reader says, in the same language, and take the focus
    extend = page.get_by_role("button", name=says["more time"])
    await extend.wait_for()
    await extend.focus()
    assert await page.evaluate("document.activeElement.id") == "extend"
    assert says["left"] in await page.locator("#time-left").inner_text()
    for region in ("#screen", "#progress"):
        assert await page.locator(region).get_attribute("aria-label")

    await original.call("POST", f"/api/auth/session/{session_id}/cancel", f"lang-{locale.lower()}")
    await page.wait_for_function("document.body.dataset.state === 'ended'", timeout=20000)
    assert await page.locator("#message").inner_text() == says["cancelled"]
    await page.context.close()
