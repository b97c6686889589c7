"""The controller's API, against a running `master-controller serve` with real guests, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from master_controller.settings import Settings
from master_controller.viewing.readiness import non_blank_frame
from tests.runtimes.leaks import HostSnapshot
from tests.servers import Controller, controller

pytestmark = pytest.mark.integration


@pytest.fixture
def ctl(
    golden_image: str, integration_settings: Settings, database_url: str, tmp_path: Path
) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        database_url,
        tmp_path,
        max_sessions="2",
        guest_network="10.213.144.0/20",
    ) as running:
        yield running


def test_health_without_key(ctl: Controller, golden_image: str) -> None:
    assert ctl.request("GET", "/health", key=None).json()["status"] == "healthy"
    health = ctl.request("GET", "/api/health", key=None).json()
    assert health["status"] == "ok" and health["image"]["current"] == golden_image
    assert health["runtime"]["name"] == "container" and health["database"] == "ok"
    assert health["capacity"] == {"max": 2, "active": 0, "free": 2}
    assert "/api/auth/start" in ctl.request("GET", "/openapi.json", key=None).json()["paths"]


@pytest.mark.parametrize(
    ("path", "method"),
    [("/api/auth/sessions", "GET"), ("/api/auth/start", "POST"), ("/api/vms", "GET")],
)
def test_api_needs_a_valid_key(ctl: Controller, path: str, method: str) -> None:
    response = ctl.request(method, path, key=None, json={"userId": "a", "provider": "codex"})
    assert response.status_code == 401 and "API key is required" in response.json()["error"]
    response = ctl.request(method, path, key=None, headers={"Authorization": "Bearer mc_nope"})
    assert response.status_code == 401 and "invalid" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 422, "userId: Field required"),
        ({"userId": "alice"}, 422, "provider: Field required"),
        ({"userId": "alice", "provider": "emacs"}, 422, "provider"),
        ({"userId": "../etc", "provider": "codex"}, 422, "userId"),
        ({"userId": "alice", "provider": "codex", "extra": 1}, 422, "extra"),
        ("not json", 422, ""),
    ],
)
def test_bad_start_requests(ctl: Controller, body: object, status: int, message: str) -> None:
    before = ctl.request("GET", "/api/auth/sessions").json()
    if isinstance(body, str):
        response = ctl.request(
            "POST", "/api/auth/start", content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = ctl.request("POST", "/api/auth/start", json=body)
    assert response.status_code == status
    assert response.json()["success"] is False and message in response.json()["error"]
    assert ctl.request("GET", "/api/auth/sessions").json() == before  # nothing left behind


def test_oversized_body_and_unknown_session(ctl: Controller) -> None:
    response = ctl.request(
        "POST",
        "/api/auth/start",
        content=b"x" * 200_000,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413 and "request body over" in response.json()["error"]
    for sid in ("00000000-0000-0000-0000-000000000000", "not-a-session", "x" * 300):
        response = ctl.request("GET", f"/api/auth/session/{sid}")
        assert response.status_code == 404 and "no session" in response.json()["error"]
        assert ctl.request("POST", f"/api/auth/session/{sid}/cancel").status_code == 404


def test_session_lifecycle(ctl: Controller, integration_settings: Settings) -> None:
    before = HostSnapshot.take(integration_settings)
    start = ctl.request("POST", "/api/auth/start", json={"userId": "alice", "provider": "codex"})
    assert start.status_code == 200, start.text
    body = start.json()
    assert body["success"] and body["provider"] == "codex" and body["status"] == "provisioning"
    assert "/novnc?ticket=" in body["novncURL"]
    sid = body["sessionId"]

    session = ctl.wait_for(sid, {"ready", "failed"})
    assert session["status"] == "ready", session
    steps = [e["name"] for e in session["events"] if e["kind"] == "step"]
    assert steps[:4] == ["allocate", "network", "disk layer", "boot"]
    assert steps[-2:] == ["vnc handshake", "first frame"]
    assert all(e["seconds"] is not None for e in session["events"] if e["kind"] == "step")
    assert session["browserIP"] and session["readyAt"]

    # another caller's key sees nothing of it; an admin key does
    assert ctl.request("GET", f"/api/auth/session/{sid}", key="bob").status_code == 404
    assert ctl.request("POST", f"/api/auth/session/{sid}/cancel", key="bob").status_code == 404
    assert ctl.request("GET", "/api/auth/sessions", key="bob").json() == []
    assert ctl.request("GET", f"/api/auth/session/{sid}", key="ops").status_code == 200

    assert ctl.request("POST", f"/api/auth/session/{sid}/heartbeat").json()["status"] == "ready"
    listed = ctl.request("GET", "/api/auth/sessions", params={"userId": "alice"}).json()
    assert [s["sessionId"] for s in listed] == [sid]
    vms = ctl.request("GET", "/api/vms").json()["vms"]
    assert [(v["sessionId"], v["status"]) for v in vms] == [(sid, "running")]
    assert (
        ctl.request("GET", f"/api/vms/{vms[0]['vmId']}").json()["address"] == session["browserIP"]
    )
    # nor another caller's key its VM, its hibernation, its browser or its sign-in URL
    assert ctl.request("GET", "/api/vms", key="bob").json()["vms"] == []
    assert ctl.request("GET", f"/api/vms/{vms[0]['vmId']}", key="bob").status_code == 404
    for path in ("hibernate", "open-url", "oauth-url", "credentials/status"):
        method = "GET" if path in ("oauth-url", "credentials/status") else "POST"
        body = {"url": "https://example.org/"} if path == "open-url" else None
        answer = ctl.request(method, f"/api/auth/session/{sid}/{path}", key="bob", json=body)
        assert answer.status_code == 404, (path, answer.text)
    assert ctl.request("POST", "/api/users/alice/vm/hibernate", key="bob").status_code == 404

    metrics = ctl.request("GET", "/metrics", key=None).text
    assert 'mc_sessions{state="ready"} 1.0' in metrics
    assert 'mc_session_step_seconds_count{step="first frame"}' in metrics
    assert "mc_proxy_bytes_total" in metrics

    cancelled = ctl.request("POST", f"/api/auth/session/{sid}/cancel").json()
    assert cancelled["status"] == "terminated" and cancelled["reason"] == "cancelled"
    assert cancelled["novncURL"] is None
    again = ctl.request("POST", f"/api/auth/session/{sid}/cancel")
    assert again.status_code == 409 and "ended" in again.json()["error"]
    assert ctl.request("POST", f"/api/auth/session/{sid}/heartbeat").status_code == 409
    assert HostSnapshot.take(integration_settings) == before


def test_session_limit_is_enforced(ctl: Controller) -> None:
    started = [
        ctl.request("POST", "/api/vm/auth", json={"userId": f"u{i}", "provider": "gemini_cli"})
        for i in range(3)
    ]
    assert [r.status_code for r in started] == [200, 200, 429]
    assert "maximum of 2 sessions" in started[2].json()["error"]
    for response in started[:2]:
        sid = response.json()["sessionId"]
        assert ctl.wait_for(sid, {"ready", "failed"})["status"] == "ready"
        ctl.request("POST", f"/api/auth/session/{sid}/cancel")


def test_websocket_refusals_carry_codes_and_reasons(ctl: Controller) -> None:
    sid = ctl.request("POST", "/api/auth/start", json={"userId": "ws", "provider": "codex"}).json()[
        "sessionId"
    ]
    ws_url = ctl.url.replace("http", "ws") + f"/api/auth/session/{sid}/novnc/websock"

    async def close_of(url: str, headers: dict[str, str]) -> tuple[int, str]:
        async with connect(
            url, additional_headers=headers, proxy=None, subprotocols=["binary"]
        ) as ws:  # type: ignore[list-item]
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        return closed.value.rcvd.code, closed.value.rcvd.reason

    unknown = ctl.url.replace("http", "ws") + (
        "/api/auth/session/00000000-0000-0000-0000-000000000000/novnc/websock"
    )
    assert asyncio.run(close_of(unknown, {"Origin": ctl.url})) == (4404, "session not found")
    code, reason = asyncio.run(close_of(ws_url, {"Origin": ctl.url}))
    assert code == 4401 and "viewer ticket" in reason
    ctl.request("POST", f"/api/auth/session/{sid}/cancel")


def _viewer_headers(ctl: Controller, novnc_url: str) -> dict[str, str]:
    """What a browser holds after opening novncURL: the viewer cookie, and its Origin."""
    response = httpx.get(novnc_url, trust_env=False, follow_redirects=False)
    assert response.status_code == 303
    return {"Cookie": f"mc_viewer={response.cookies['mc_viewer']}", "Origin": ctl.url}


def test_several_viewers_on_one_session(ctl: Controller) -> None:
    body = ctl.request(
        "POST", "/api/auth/start", json={"userId": "many", "provider": "codex"}
    ).json()
    sid = body["sessionId"]
    assert ctl.wait_for(sid, {"ready", "failed"})["status"] == "ready"
    headers = _viewer_headers(ctl, body["novncURL"])
    ws_url = ctl.url.replace("http", "ws") + f"/api/auth/session/{sid}/novnc/websock"

    async def three_viewers() -> list[int]:
        deadline = time.monotonic() + 30
        frames = await asyncio.gather(
            *(non_blank_frame(ws_url, None, deadline, headers) for _ in range(3))
        )
        return [f.width for f in frames]

    assert asyncio.run(three_viewers()) == [1280, 1280, 1280]

    # the wrong Origin is refused with a reason
    async def wrong_origin() -> tuple[int, str]:
        bad = {**headers, "Origin": "http://evil.invalid"}
        async with connect(ws_url, additional_headers=bad, proxy=None) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        return closed.value.rcvd.code, closed.value.rcvd.reason

    assert asyncio.run(wrong_origin()) == (4403, "origin not allowed")
    ctl.request("POST", f"/api/auth/session/{sid}/cancel")


@pytest.fixture
def short_lived(
    golden_image: str, integration_settings: Settings, tmp_path: Path
) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        idle_timeout="2",
        guest_network="10.213.176.0/20",
    ) as running:
        yield running


def test_idle_sessions_end_by_themselves(
    short_lived: Controller, integration_settings: Settings
) -> None:
    before = HostSnapshot.take(integration_settings)
    sid = short_lived.request(
        "POST", "/api/auth/start", json={"userId": "idle", "provider": "codex"}
    ).json()["sessionId"]
    assert short_lived.wait_for(sid, {"ready", "failed"})["status"] == "ready"
    ended = short_lived.wait_for(sid, {"terminated", "failed"}, timeout=30)
    assert ended["status"] == "terminated" and ended["reason"] == "timed out: no viewer for 2s"
    deadline = time.monotonic() + 10
    while HostSnapshot.take(integration_settings) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert HostSnapshot.take(integration_settings) == before


def test_cli_sessions(ctl: Controller) -> None:
    env_key = {**ctl.env, "MC_API_KEY": ctl.keys["alice"], "MC_PUBLIC_URL": ctl.url}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "master_controller.cli",
            "session",
            "start",
            "--user",
            "cli",
            "--provider",
            "codex",
        ],
        capture_output=True,
        text=True,
        env=env_key,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    sid = json.loads(done.stdout)["sessionId"]
    listed = json.loads(ctl.cli("session", "list", "--user", "cli", "--json").stdout)
    assert [s["sessionId"] for s in listed] == [sid]
    done = subprocess.run(
        [sys.executable, "-m", "master_controller.cli", "session", "cancel", sid],
        capture_output=True,
        text=True,
        env=env_key,
        timeout=60,
    )
    assert done.returncode == 0 and "terminated" in done.stdout
    keys = json.loads(ctl.cli("apikey", "list", "--json").stdout)
    assert {k["name"] for k in keys} == {"alice", "bob", "ops"}
    assert all("key" not in k for k in keys)
    assert ctl.cli("apikey", "revoke", "bob").returncode == 0
    assert ctl.request("GET", "/api/auth/sessions", key="bob").status_code == 401


def test_hibernate_and_resume_through_the_api(ctl: Controller) -> None:
    body = ctl.request(
        "POST", "/api/auth/start", json={"userId": "sleepy", "provider": "codex"}
    ).json()
    sid = body["sessionId"]
    assert ctl.wait_for(sid, {"ready", "failed"})["status"] == "ready"
    assert ctl.request("POST", f"/api/auth/session/{sid}/resume").status_code == 409

    hibernated = ctl.request("POST", "/api/users/sleepy/vm/hibernate")
    assert hibernated.status_code == 200 and hibernated.json()["status"] == "hibernated"
    vms = ctl.request("GET", "/api/vms").json()["vms"]
    assert [(v["sessionId"], v["status"], v["sessionStatus"]) for v in vms] == [
        (sid, "hibernated", "hibernated")
    ]
    assert ctl.request("GET", "/api/health", key=None).json()["capacity"]["active"] == 0
    assert ctl.request("POST", "/api/users/sleepy/vm/hibernate").status_code == 404
    assert ctl.request("POST", "/api/users/sleepy/vm/resume", key="bob").status_code == 404

    resumed = ctl.request("POST", f"/api/auth/session/{sid}/resume").json()
    assert resumed["status"] == "resuming"
    session = ctl.wait_for(sid, {"ready", "failed"})
    assert session["status"] == "ready", session["reason"]
    states = [e["name"] for e in session["events"] if e["kind"] == "state"]
    assert states[-4:] == ["hibernating", "hibernated", "resuming", "ready"]
    ctl.request("POST", f"/api/auth/session/{sid}/cancel")


def test_a_viewer_link_opens_once_and_never_reaches_the_log(ctl: Controller) -> None:
    """Someone who read novncURL (in the access log, say) after its owner opened it: the
    link is spent, and the log never had the ticket anyway."""
    body = ctl.request("POST", "/api/auth/start", json={"userId": "once", "provider": "codex"})
    sid, link = body.json()["sessionId"], body.json()["novncURL"]
    ticket = link.split("ticket=")[1]
    first = httpx.get(link, trust_env=False, follow_redirects=False)
    assert first.status_code == 303 and first.cookies["mc_viewer"]
    replay = httpx.get(link, trust_env=False, follow_redirects=False)
    assert replay.status_code == 401 and "mc_viewer" not in replay.cookies
    assert "This viewer link was used already" in replay.text
    fresh = ctl.request("GET", f"/api/auth/session/{sid}").json()["novncURL"]
    assert httpx.get(fresh, trust_env=False, follow_redirects=False).status_code == 303
    ctl.request("POST", f"/api/auth/session/{sid}/cancel")
    assert ctl.log is not None
    log = ctl.log.read_text()
    assert f"/api/auth/session/{sid}/novnc?ticket=[redacted]" in log  # the requests are there
    assert ticket not in log and fresh.split("ticket=")[1] not in log
