"""The calls the original system's web app, dashboard and scripts make, replayed in their
order against a running controller (its real app, database, vault and session core; a fake
runtime and agent stand in for guests), checking every field those clients read.

Where we differ on purpose (an API key on every call, the viewer link taken from our
answers), MIGRATING.md says what a client changes; these calls carry the key and nothing
else new.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from master_controller.settings import Settings
from tests.sessions.fake_runtime import FakeAgent, FakeRuntime, credential_files
from tests.web.inprocess import fake_guest_controller

ORIGINAL_STATUSES = {
    "vm_created",
    "ready",
    "awaiting_user_auth",
    "authenticating",
    "completed",
    "failed",
    "timeout",
    "cancelled",
}
# what the dashboard sends with every start (an SDP offer; we stream with noVNC instead)
WEBRTC_OFFER = {"type": "offer", "sdp": "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\n"}


@dataclass
class Original:
    """A client of the original API: its base URL and the key the operator added."""

    base: str
    key: str
    admin_key: str
    agent: FakeAgent
    runtime: FakeRuntime
    http: httpx.AsyncClient
    settings: Settings

    async def call(
        self, method: str, path: str, user: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}", **kwargs.pop("headers", {})}
        if user is not None:
            headers["x-user-id"] = user
        return await self.http.request(method, self.base + path, headers=headers, **kwargs)

    async def session(self, session_id: str, user: str) -> dict[str, Any]:
        answer = await self.call("GET", f"/api/auth/session/{session_id}", user)
        assert answer.status_code == 200, answer.text
        session: dict[str, Any] = answer.json()["session"]
        return session

    async def poll(self, session_id: str, user: str, wanted: set[str]) -> list[str]:
        """The statuses seen, as the dashboard polls them, until one of ``wanted``."""
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while True:
            status = (await self.session(session_id, user))["status"]
            assert status in ORIGINAL_STATUSES, status
            if not seen or seen[-1] != status:
                seen.append(status)
            if status in wanted:
                return seen
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)

    async def guest_of(self, session_id: str, user: str) -> str:
        guest_id: str = (await self.session(session_id, user))["browserVMId"]
        return guest_id


@pytest.fixture
async def original(tmp_path: Path) -> AsyncIterator[Original]:
    keys = {"webapp": ("sessions",), "dashboard": ("sessions", "admin")}
    async with (
        fake_guest_controller(tmp_path, keys, max_sessions=4) as served,
        httpx.AsyncClient(trust_env=False, timeout=30) as http,
    ):
        served.app.state.services.sessions.sign_in.watch_interval = 0.02
        made = served.keys
        yield Original(
            served.base,
            made["webapp"],
            made["dashboard"],
            served.agent,
            served.runtime,
            http,
            served.app.state.services.settings,
        )


async def test_the_web_apps_sign_in_from_start_to_stored_credentials(original: Original) -> None:
    user = "user-7f3a"
    # the dashboard asks for ICE servers first: none, and it is told to use noVNC
    ice = await original.http.get(original.base + "/api/webrtc/ice-servers")
    assert ice.status_code == 200
    assert ice.json()["iceServers"] == [] and ice.json()["webrtc"] is False

    started = await original.call(
        "POST",
        "/api/auth/start",
        json={"userId": user, "provider": "claude_code", "webrtcOffer": WEBRTC_OFFER},
    )
    assert started.status_code == 200, started.text
    body = started.json()
    assert body["success"] is True and body["provider"] == "claude_code"
    session_id = body["sessionId"]
    assert f"/api/auth/session/{session_id}/novnc?ticket=" in body["novncURL"]
    assert "browserIP" in body

    # the CLI has not printed its sign-in URL yet: 202, waiting
    seen = await original.poll(session_id, user, {"awaiting_user_auth"})
    guest = original.agent.of(await original.guest_of(session_id, user))
    assert seen[0] in {"vm_created", "ready", "awaiting_user_auth"}
    url = guest.auth_url
    guest.auth_url = None
    waiting = await original.call("GET", f"/api/auth/session/{session_id}/oauth-url", user)
    assert waiting.status_code == 202 and waiting.json()["waiting"] is True
    guest.auth_url = url
    known = await original.call("GET", f"/api/auth/session/{session_id}/oauth-url", user)
    assert known.status_code == 200 and known.json()["oauthUrl"] == url

    session = await original.session(session_id, user)
    assert session["status"] == "awaiting_user_auth"  # the viewer stays shown
    assert session["userId"] == user and session["provider"] == "claude_code"
    assert session["novncURL"] and session["startedAt"] and "browserIP" in session
    pending = await original.call("GET", f"/api/auth/session/{session_id}/credentials/status", user)
    assert pending.json()["authenticated"] is False and pending.json()["credentials"] is None
    opened = await original.call(
        "POST",
        f"/api/auth/session/{session_id}/open-url",
        user,
        json={"url": "https://claude.ai/login"},
    )
    assert opened.status_code == 200 and opened.json()["success"] is True

    listed = (await original.call("GET", f"/api/auth/sessions/{user}", user)).json()
    assert listed["totalActive"] == 1
    item = listed["sessions"][0]
    assert item["sessionId"] == session_id and item["status"] == "awaiting_user_auth"
    assert item["isActive"] is True and item["browserVMId"] and item["novncURL"]
    assert {"provider", "browserIP", "createdAt"} <= item.keys()

    # the person signs in: credentials detected, then stored
    original.agent.sign_in(guest.guest_id)
    seen = await original.poll(session_id, user, {"completed", "failed"})
    assert seen[-1] == "completed", seen
    done = await original.call("GET", f"/api/auth/session/{session_id}/credentials/status", user)
    assert done.json()["authenticated"] is True
    metadata = done.json()["credentials"]
    assert metadata["provider"] == "claude_code" and metadata["files"]
    secrets = credential_files("claude_code", guest.guest_id[:8]).values()
    assert not any(secret in done.text for secret in secrets)  # metadata only

    stored = (await original.call("GET", f"/api/auth/credentials/{user}", user)).json()
    assert [c["provider"] for c in stored["credentials"]] == ["claude_code"]
    assert not any(secret in json.dumps(stored) for secret in secrets)
    valid = (await original.call("GET", f"/api/auth/validate/{user}/claude_code", user)).json()
    assert valid["valid"] is True
    none = await original.call("GET", f"/api/auth/validate/{user}/codex", user)
    assert none.status_code == 200
    assert none.json()["valid"] is False and none.json()["reason"] == "not_found"

    after = (await original.call("GET", f"/api/auth/sessions/{user}", user)).json()
    assert after["totalActive"] == 0 and after["sessions"][0]["isActive"] is False


async def test_rotate_then_cancel_with_an_empty_json_body(original: Original) -> None:
    user = "user-rot"
    rotated = await original.call(
        "POST", "/api/auth/rotate", json={"userId": user, "provider": "codex"}
    )
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["success"] is True and rotated.json()["provider"] == "codex"
    session_id = rotated.json()["sessionId"]
    await original.poll(session_id, user, {"awaiting_user_auth"})
    cancelled = await original.call(
        "POST",
        f"/api/auth/session/{session_id}/cancel",
        user,
        content=b"",
        headers={"Content-Type": "application/json"},
    )
    assert cancelled.status_code == 200, cancelled.text
    assert (await original.session(session_id, user))["status"] == "cancelled"


async def test_a_key_acting_for_one_user_cannot_touch_anothers(original: Original) -> None:
    started = await original.call(
        "POST", "/api/auth/start", json={"userId": "alice", "provider": "gemini_cli"}
    )
    session_id = started.json()["sessionId"]
    await original.poll(session_id, "alice", {"awaiting_user_auth"})
    for method, path in (
        ("GET", f"/api/auth/session/{session_id}"),
        ("GET", f"/api/auth/session/{session_id}/oauth-url"),
        ("GET", f"/api/auth/session/{session_id}/credentials/status"),
        ("POST", f"/api/auth/session/{session_id}/heartbeat"),
        ("POST", f"/api/auth/session/{session_id}/cancel"),
        ("GET", "/api/auth/sessions/alice"),
        ("GET", "/api/auth/credentials/alice"),
        ("GET", "/api/auth/validate/alice/gemini_cli"),
        ("GET", "/api/users/alice/vm"),
        ("DELETE", "/api/users/alice/vm"),
        ("POST", "/api/users/alice/vm/hibernate"),
    ):
        refused = await original.call(method, path, "mallory")
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["success"] is False and "another user" in refused.json()["error"]
    # listings filter to the user acted for: asking for another user's is refused
    refused = await original.call(
        "GET", "/api/auth/sessions", "mallory", params={"userId": "alice"}
    )
    assert refused.status_code == 403
    assert (await original.call("GET", "/api/auth/sessions", "mallory")).json() == []
    assert (await original.call("GET", "/api/vms", "mallory")).json()["vms"] == []
    vm_id = (await original.call("GET", "/api/vms", "alice")).json()["vms"][0]["vmId"]
    assert (await original.call("GET", f"/api/vms/{vm_id}", "mallory")).status_code == 404
    assert (await original.call("GET", f"/api/vms/{vm_id}", "alice")).status_code == 200
    start_for_other = await original.call(
        "POST",
        "/api/auth/start",
        "mallory",
        json={"userId": "alice", "provider": "codex"},
    )
    assert start_for_other.status_code == 403
    assert (await original.session(session_id, "alice"))["status"] == "awaiting_user_auth"


async def test_a_users_vm_by_user_id(original: Original) -> None:
    user = "vm-user"
    assert (await original.call("GET", f"/api/users/{user}/vm", user)).status_code == 404
    started = await original.call(
        "POST", "/api/vm/auth", json={"userId": user, "provider": "codex"}
    )
    assert started.status_code == 200
    session_id = started.json()["sessionId"]
    await original.poll(session_id, user, {"awaiting_user_auth"})

    vm = (await original.call("GET", f"/api/users/{user}/vm", user)).json()["vm"]
    assert vm["vm_id"] == await original.guest_of(session_id, user) and vm["status"] == "running"
    assert "ip_address" in vm
    assert vm["provider"] == "codex" and vm["last_heartbeat"]
    vms = (await original.call("GET", "/api/vms")).json()["vms"]
    assert [v["id"] for v in vms] == [vm["vm_id"]]  # the admin page's fields:
    assert vms[0]["user_id"] == user and vms[0]["provider"] == "codex"
    assert vms[0]["status"] == "running" and "ip_address" in vms[0]

    saved = await original.call("POST", f"/api/users/{user}/vm/hibernate", user)
    assert saved.status_code == 200 and saved.json()["success"] is True
    assert saved.json()["message"]
    assert (await original.call("GET", f"/api/users/{user}/vm", user)).json()["vm"][
        "status"
    ] == "hibernated"
    woke = await original.call("POST", f"/api/users/{user}/vm/resume", user)
    assert woke.status_code == 200 and woke.json()["success"] is True
    await original.poll(session_id, user, {"ready", "awaiting_user_auth"})

    deleted = await original.call("DELETE", f"/api/users/{user}/vm", user)
    assert deleted.status_code == 200 and deleted.json()["success"] is True
    assert (await original.session(session_id, user))["status"] == "cancelled"
    gone = await original.call("GET", f"/api/users/{user}/vm", user)
    assert gone.status_code == 404 and gone.json()["success"] is False
    assert isinstance(gone.json()["error"], str)


async def test_errors_are_a_string_with_success_false(original: Original) -> None:
    bad = await original.call("POST", "/api/auth/start", json={"userId": "u", "provider": "x"})
    assert bad.status_code == 422
    assert bad.json()["success"] is False and "provider" in bad.json()["error"]
    missing = await original.call("GET", "/api/auth/session/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)


async def test_health_and_the_dashboards_system_figures(original: Original) -> None:
    for path in ("/health", "/api/auth/health"):
        answer = await original.http.get(original.base + path)
        assert answer.status_code == 200 and "healthy" in answer.text, answer.text
    refused = await original.call("GET", "/api/admin/health/system")
    assert refused.status_code == 403  # a sessions key is no operator
    figures = (
        await original.http.get(
            original.base + "/api/admin/health/system",
            headers={"Authorization": f"Bearer {original.admin_key}"},
        )
    ).json()
    assert 0 <= figures["cpu"]["usage_percent"] <= 100
    memory = figures["memory"]
    assert memory["total_gb"] > 0 and 0 < memory["free_gb"] <= memory["total_gb"]
    assert abs(memory["used_gb"] + memory["free_gb"] - memory["total_gb"]) < 0.05
    root = next(m for m in figures["disk"]["all_mounts"] if m["mount_point"] == "/")
    assert 0 < root["available_gb"] <= root["total_gb"] and 0 <= root["usage_percent"] <= 100
    assert figures["cpu"]["cores"] >= 1 and "model" in figures["cpu"]
    assert figures["uptime"]["uptime_seconds"] > 0
    assert {"load_1min", "load_5min", "load_15min"} <= figures["load"].keys()
    assert "available" in figures["temperature"] and figures["network_health"]["status"]
    names = [i["interface"] for i in figures["network"]["interfaces"]]
    assert "lo" in names and not any(n.startswith("mcv") for n in names)


async def test_the_original_health_check_script_passes_without_a_key(original: Original) -> None:
    """scripts/health-check.sh of the original: curl URL | grep -q WORD, no key."""
    for path, word in (
        ("/health", "healthy"),
        ("/api/auth/health", "healthy"),
        ("/api/webrtc/ice-servers", "iceServers"),
        ("/api/webrtc/stats", "success"),
    ):
        answer = await original.http.get(original.base + path)
        assert answer.status_code == 200 and word in answer.text, (path, answer.text)


async def test_a_users_egress_without_upstreams_is_direct(original: Original) -> None:
    user = "egress-user"
    # a key that never started a session of this user learns nothing about it
    assert (await original.call("GET", f"/api/users/{user}/egress", user)).status_code == 404
    started = await original.call(
        "POST", "/api/auth/start", json={"userId": user, "provider": "codex"}
    )
    await original.poll(started.json()["sessionId"], user, {"awaiting_user_auth"})
    shown = (await original.call("GET", f"/api/users/{user}/egress", user)).json()
    assert shown["direct"] is True and shown["upstream"] is None
    refused = await original.call("POST", f"/api/users/{user}/egress/reassign", user)
    assert refused.status_code == 403  # admin keys only
    admin = {"Authorization": f"Bearer {original.admin_key}"}
    nothing = await original.http.post(
        original.base + f"/api/users/{user}/egress/reassign", headers=admin
    )
    assert nothing.status_code == 400 and "no egress upstreams" in nothing.json()["error"]
