"""``POST /credentials/wipe`` in a real guest (container runtime, golden image): after the
credentials were fetched, nothing in the guest grants the account any more: no credential
file, no browser profile, no login process (not even one the browser user planted to write
the file again), while Chromium is back on a fresh profile. Idempotent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from master_controller.errors import ProbeError
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from master_controller.viewing.readiness import agent_health, poll
from tests.guest.desk import Desk, booted_guest, until

pytestmark = pytest.mark.integration

HOME = "/home/browser"
TOKEN_FILE = ".config/mc-oauth2/token.json"
TOKEN = json.dumps({"access_token": "at-1", "token_type": "Bearer", "expires_at": 4102444800})
OAUTH2 = {
    "provider": "oauth2",
    "options": {
        "authorize_url": "http://idp.invalid:9/authorize",
        "token_url": "http://idp.invalid:9/token",
        "client_id": "mc-test",
    },
}
# planted by the browser user through the login's tmux server (theirs): it ignores SIGTERM
# and SIGHUP and writes the credentials again and again
REWRITER = (
    "trap '' TERM HUP INT; while :; do mkdir -p ~/.config/mc-oauth2; "
    f"echo '{TOKEN}' > ~/{TOKEN_FILE}.tmp && mv ~/{TOKEN_FILE}.tmp ~/{TOKEN_FILE}; "
    "sleep 0.1; done"
)


@pytest.fixture(scope="module")
def desk(golden_image: str, integration_settings: Settings) -> Iterator[Desk]:
    with booted_guest(ContainerRuntime(integration_settings), golden_image, "wipe") as desk:
        yield desk


def _exists(desk: Desk, path: str) -> bool:
    return desk.root("test", "-e", path).returncode == 0


async def test_wipe_removes_credentials_profile_and_login(desk: Desk) -> None:
    assert desk.call("POST", "/login", OAUTH2).status_code == 202
    deadline = time.monotonic() + 30
    while not desk.call("GET", "/login").json()["opened_urls"]:
        assert time.monotonic() < deadline, "the login opened no URL"
        await asyncio.sleep(0.5)
    desk.user(
        "tmux", "-S", "/run/mc/login/tmux.sock", "new-window", "-d", "--", "sh", "-c", REWRITER
    )
    await until(lambda: _exists(desk, f"{HOME}/{TOKEN_FILE}"), 20, "the planted writer")
    await until(
        lambda: {"tmux: server", "xterm", "sh"} <= set(desk.user_processes().values()),
        20,
        "the login's processes",
    )
    marker = f"{HOME}/.config/chromium/Default/mc-marker"  # stands for the session cookies
    desk.user("sh", "-c", f"mkdir -p {HOME}/.config/chromium/Default && echo session > {marker}")
    assert _exists(desk, marker)
    fetched = desk.call("POST", "/credentials/fetch")
    assert fetched.status_code == 200 and fetched.json()["files"] == {TOKEN_FILE: TOKEN + "\n"}

    started = time.monotonic()
    answer = desk.call("POST", "/credentials/wipe")
    seconds = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    wiped = answer.json()
    assert wiped["provider"] == "oauth2"
    assert wiped["credential_files_removed"] == [TOKEN_FILE]
    assert wiped["processes_killed"] >= 4  # tmux server, the CLI, xterm, the planted loop
    assert {"~/.config", "/run/mc/login/tmux.sock"} <= set(wiped["removed"])
    assert wiped["chromium"] == "active"
    print(f"wipe took {seconds:.2f} s")

    await asyncio.sleep(1.5)  # a survivor would have written the file again by now
    assert not _exists(desk, f"{HOME}/{TOKEN_FILE}")
    assert not _exists(desk, marker)
    left = set(desk.user_processes().values())
    assert not left & {"tmux: server", "tmux: client", "xterm", "sh", "python3"}, left

    async def chromium_back() -> None:
        health = await agent_health(desk.endpoint.agent_url, desk.token)
        if not any(w["class"] == "Chromium" for w in health["windows"]):
            raise ProbeError(f"no Chromium window: {health['windows']}")
        if health["services"]["chromium"]["active"] != "active":
            raise ProbeError("chromium.service is not active")

    await poll(chromium_back, time.monotonic() + 30, interval=0.5)
    status = desk.call("GET", "/credentials/status").json()
    assert status["valid"] is False and status["reason"] == "no credential file yet"
    assert desk.call("GET", "/login").json()["state"] == "wiped"
    assert desk.call("POST", "/credentials/fetch").status_code == 410

    again = desk.call("POST", "/credentials/wipe")
    assert again.status_code == 200
    assert again.json()["credential_files_removed"] == []
    assert again.json()["processes_killed"] == 0


def test_wipe_needs_the_token(desk: Desk) -> None:
    desk.token = "not-the-token"
    try:
        assert desk.call("POST", "/credentials/wipe").status_code == 401
    finally:
        desk.token = desk.guest.secrets.agent_token
