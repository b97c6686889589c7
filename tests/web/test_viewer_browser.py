"""The viewer in a real browser: Playwright driving Debian's Chromium, noVNC from npm."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from tests.servers import Controller, chromium_geometry, controller

pytestmark = [pytest.mark.integration, pytest.mark.browser]
CHROMIUM = "/usr/bin/chromium"
QUIET = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
    "--no-sandbox",
]

# distinct colours in a sample of the noVNC canvas (a blank canvas has one)
CANVAS_COLOURS = """() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || !canvas.width) return 0;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let i = 0; i < data.length; i += 388) seen.add(data[i] << 16 | data[i+1] << 8 | data[i+2]);
  return seen.size;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Debian's chromium is not installed (run scripts/setup.sh)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=QUIET)
        yield browser
        browser.close()


@pytest.fixture
def ctl(golden_image: str, integration_settings: Settings, tmp_path: Path) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.160.0/20",
    ) as running:
        yield running


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}"))
    page.problems = problems  # type: ignore[attr-defined]
    yield page
    context.close()


def wait_for_state(page: Page, ctl: Controller, state: str, seconds: float) -> None:
    """Wait for the viewer's state; on timeout, say what the page and controller saw."""
    try:
        page.wait_for_function(
            f"document.body.dataset.state === '{state}'", timeout=seconds * 1000, polling=250
        )
    except PlaywrightTimeout:
        seen = page.evaluate("document.body.dataset.state")
        message = page.locator("#message").inner_text()
        log = ctl.log.read_text()[-2000:] if ctl.log else ""
        problems = "\n".join(page.problems[-20:])  # type: ignore[attr-defined]
        pytest.fail(f"viewer stayed {seen!r} ({message}), not {state!r}\n{problems}\n{log}")


def _start(ctl: Controller) -> dict[str, str]:
    response = ctl.request(
        "POST", "/api/auth/start", json={"userId": "viewer", "provider": "codex"}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_viewer_shows_the_guest_browser(ctl: Controller, page: Page) -> None:
    started = _start(ctl)
    page.goto(started["novncURL"])  # opened at once: the page shows progress while it boots
    assert "ticket=" not in page.url  # traded for a cookie and dropped from the address bar
    screenshot(page, "desktop-starting")
    wait_for_state(page, ctl, "connected", 90)
    page.wait_for_function(f"({CANVAS_COLOURS})() > 50", timeout=30_000)
    assert page.locator("#state").inner_text() == "Connected"
    cookies = page.context.cookies()
    viewer_cookie = next(c for c in cookies if c["name"] == "mc_viewer")
    assert viewer_cookie["httpOnly"] and viewer_cookie["path"].endswith("/novnc")
    # the guest's VNC password never reaches the page
    guest_config = ctl.request("GET", f"/api/auth/session/{started['sessionId']}").json()
    assert guest_config["status"] == "ready"
    assert "vnc_password" not in page.content()
    # copying in the guest (all of its start page) sends nothing to the page
    page.locator("#screen canvas").focus()
    page.keyboard.press("Control+A")
    page.keyboard.press("Control+C")
    time.sleep(1)
    assert page.evaluate("document.body.dataset.guestCopies") is None

    # cancelling closes the viewer with a reason the page shows in words
    ctl.request("POST", f"/api/auth/session/{started['sessionId']}/cancel")
    wait_for_state(page, ctl, "ended", 15)
    screenshot(page, "desktop-cancelled")
    assert page.evaluate("document.body.dataset.closeCode") == "4410"
    assert (
        page.locator("#message").inner_text()
        == "This sign-in was cancelled. You can close this tab."
    )


# the framebuffer noVNC shows (the guest's screen size, as its VNC server sent it)
CANVAS_SIZE = """() => {
  const c = document.querySelector('#screen canvas');
  return c ? `${c.width}x${c.height}` : '';
}"""
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "viewer"


def screenshot(page: Page, name: str) -> None:
    """Keep what the person sees in this state under docs/viewer/ (for reviewers)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def wait_for_canvas(page: Page, size: str, seconds: float = 20) -> None:
    """Wait until noVNC shows a framebuffer of ``size`` (WxH); on timeout, say what it saw."""
    try:
        page.wait_for_function(f"({CANVAS_SIZE})() === '{size}'", timeout=seconds * 1000)
    except PlaywrightTimeout:
        seen = page.evaluate(f"({CANVAS_SIZE})()")
        asked = page.evaluate("document.body.dataset.guestScreen")
        problems = "\n".join(page.problems[-20:]) if hasattr(page, "problems") else ""
        pytest.fail(f"the canvas is {seen}, not {size} (the guest answered {asked})\n{problems}")


def test_the_guest_screen_fits_the_window(
    ctl: Controller, browser: Browser, integration_settings: Settings
) -> None:
    """The guest's display is resized to the viewer's area (RandR in Xvfb, x11vnc -xrandr,
    noVNC follows), so a 1024x700 viewer area shows a 1024x700 guest screen unscaled; with
    "Fit to window" off the screen keeps its size and is scaled."""
    context = browser.new_context(viewport={"width": 1024, "height": 760})
    page = context.new_page()
    try:
        started = _start(ctl)
        page.goto(started["novncURL"])
        wait_for_state(page, ctl, "connected", 90)
        # what the header takes: the viewer's area is the window less that
        above = math.ceil(
            760 - page.evaluate("document.getElementById('screen').getBoundingClientRect().height")
        )
        page.set_viewport_size({"width": 1024, "height": 700 + above})
        wait_for_canvas(page, "1024x700")
        page.wait_for_function("document.body.dataset.guestScreen === '1024x700'")
        page.wait_for_function(f"({CANVAS_COLOURS})() > 50", timeout=20_000)
        # nothing scaled: the canvas is drawn at its own size
        shown = page.evaluate(
            "(() => { const r = document.querySelector('#screen canvas')"
            ".getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; })()"
        )
        assert shown == [1024, 700]
        # the guest's Chromium (maximized) follows its screen
        runtime = ContainerRuntime(integration_settings)
        assert chromium_geometry(runtime, started["sessionId"]) == ["1024x700"]
        screenshot(page, "desktop-connected")
        # a window larger than the guest allows: the guest's largest screen, scaled down
        page.set_viewport_size({"width": 2400, "height": 1300 + above})
        wait_for_canvas(page, "1920x1200")
        page.wait_for_function(f"({CANVAS_COLOURS})() > 50", timeout=20_000)
        assert chromium_geometry(runtime, started["sessionId"]) == ["1920x1200"]
        # fit off: the screen keeps its size when the window changes, and is scaled
        page.locator("#fit").click()
        assert page.locator("#fit").get_attribute("aria-pressed") == "false"
        page.set_viewport_size({"width": 900, "height": 640 + above})
        time.sleep(2)
        assert page.evaluate(f"({CANVAS_SIZE})()") == "1920x1200"
        page.locator("#fit").click()  # on again: fitted at once
        area = page.evaluate(
            "(() => { const r = document.getElementById('screen').getBoundingClientRect();"
            " return `${Math.floor(r.width)}x${Math.floor(r.height)}`; })()"
        )
        assert area == "900x640"  # the header stays one line high
        wait_for_canvas(page, area)
        # another viewer (a reload, say) sees the size the screen has now
        second = context.new_page()
        fresh = ctl.request("GET", f"/api/auth/session/{started['sessionId']}").json()
        second.goto(fresh["novncURL"])
        wait_for_state(second, ctl, "connected", 30)
        second.wait_for_function(f"({CANVAS_COLOURS})() > 50", timeout=20_000)
    finally:
        context.close()


def test_viewer_without_a_valid_ticket_is_refused(ctl: Controller, page: Page) -> None:
    started = _start(ctl)
    plain = started["novncURL"].split("?")[0]
    response = page.goto(plain)
    assert response is not None and response.status == 401
    assert "open the viewer link you were given" in page.locator("#message").inner_text()
    response = page.goto(plain + "?ticket=forged.ticket.value")
    assert response is not None and response.status == 401
    assert "not valid" in page.locator("#message").inner_text()
    # a ticket for another session does not open this one
    other = _start(ctl)
    response = page.goto(plain + "?" + other["novncURL"].split("?")[1])
    assert response is not None and response.status == 403
    assert "another session" in page.locator("#message").inner_text()
    screenshot(page, "desktop-refused")


def test_viewer_reconnects_after_the_guest_vnc_drops(
    ctl: Controller, page: Page, integration_settings: Settings
) -> None:
    started = _start(ctl)
    page.goto(started["novncURL"])
    wait_for_state(page, ctl, "connected", 90)
    # x11vnc crashes inside the guest (systemd restarts it): the viewer is told why, then
    # reconnects by itself
    state = json.loads(
        (integration_settings.guests_dir / started["sessionId"] / "state.json").read_text()
    )
    leader = str(state["resources"]["leader"]["pid"])
    subprocess.run(
        [
            "nsenter",
            "-t",
            leader,
            "-a",
            "systemctl",
            "kill",
            "--signal=KILL",
            "x11vnc.service",
        ],
        check=True,
        timeout=30,
    )
    wait_for_state(page, ctl, "reconnecting", 15)
    assert page.evaluate("document.body.dataset.closeCode") == "1011"
    assert "display could not be reached" in page.locator("#message").inner_text()
    wait_for_state(page, ctl, "connected", 30)
    page.wait_for_function(f"({CANVAS_COLOURS})() > 50", timeout=30_000)


def test_operator_page_starts_and_lists_sessions(ctl: Controller, page: Page) -> None:
    page.goto(ctl.url + "/")
    page.wait_for_function(
        "document.getElementById('health').textContent.includes('Runtime container')"
    )
    assert "image " in page.locator("#health").inner_text()
    page.fill("#key", ctl.keys["alice"])
    page.click("#key-form button")
    page.fill("#user", "operator-test")
    page.select_option("#provider", "gemini_cli")
    page.click("#start-form button")
    row = page.locator("#sessions tr", has_text="operator-test")
    row.wait_for(timeout=10_000)
    assert "gemini_cli" in row.inner_text()
    page.wait_for_function(
        "[...document.querySelectorAll('#sessions tr')].some(r => r.textContent.includes('ready'))",
        timeout=60_000,
    )
    assert page.locator("#error").inner_text() == ""
    row.get_by_role("button", name="cancel").click()
    page.wait_for_function(
        "[...document.querySelectorAll('#sessions tr')]"
        ".some(r => r.textContent.includes('terminated'))",
        timeout=15_000,
    )


def _message(page: Page) -> str:
    return page.locator("#message").inner_text()


def test_viewer_says_why_in_words_for_each_fault(
    ctl: Controller, browser: Browser, page: Page, integration_settings: Settings
) -> None:
    """What a person signing in sees when something goes wrong: hibernated and back, too many
    viewers, the guest's network cut, the guest killed. Each in words, with the reason."""
    started = _start(ctl)
    session_id = started["sessionId"]
    page.goto(started["novncURL"])
    wait_for_state(page, ctl, "connected", 90)

    # hibernated: the page says so, waits, and is back when the session resumes
    assert ctl.request("POST", f"/api/auth/session/{session_id}/hibernate").status_code == 200
    wait_for_state(page, ctl, "hibernated", 15)
    assert "put to sleep (hibernated)" in _message(page)
    screenshot(page, "desktop-hibernated")
    assert ctl.request("POST", f"/api/auth/session/{session_id}/resume").status_code == 200
    wait_for_state(page, ctl, "connected", 60)

    # one viewer more than the session allows: that one is told why (the others stay)
    others = [browser.new_context() for _ in range(integration_settings.max_viewers)]
    try:
        extra = []
        for context in others:
            viewer = context.new_page()
            # a link opens once: each viewer gets a fresh one, as each person would
            fresh = ctl.request("GET", f"/api/auth/session/{session_id}").json()["novncURL"]
            viewer.goto(fresh)
            extra.append(viewer)
        last = extra[-1]
        wait_for_state(last, ctl, "reconnecting", 30)
        assert last.evaluate("document.body.dataset.closeCode") == "4429"
        assert "as many viewers as it allows" in _message(last)
        assert f"{integration_settings.max_viewers} viewers already" in _message(last)
    finally:
        for context in others:
            context.close()

    # the guest's network is cut: the viewer hears within seconds, and is back after
    runtime = ContainerRuntime(integration_settings)
    link = runtime.load(session_id).resources["host_ifname"]
    wait_for_state(page, ctl, "connected", 60)
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        wait_for_state(page, ctl, "reconnecting", 30)
        assert page.evaluate("document.body.dataset.closeCode") == "1011"
        assert "the guest stopped answering" in _message(page)
        screenshot(page, "desktop-reconnecting")
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    wait_for_state(page, ctl, "connected", 60)

    # the guest dies: the session has ended, and the page says why
    os.kill(runtime.load(session_id).resources["leader"]["pid"], signal.SIGKILL)
    wait_for_state(page, ctl, "ended", 60)
    assert "The sign-in failed" in _message(page)
    assert "the guest stopped unexpectedly" in _message(page)
    screenshot(page, "desktop-failed")
