"""The controller's JSON logs over a whole sign-in (start, viewer link opened, sign-in,
credentials stored and exported): every line is one JSON object, every session event
carries the session id, the user and (for steps) the step, and none of the secrets the flow
handled appears anywhere: API keys, the viewer ticket, the guest's VNC password and agent
token, the credentials. The same flow shows in /metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from master_controller import __version__
from master_controller.web.logs import json_formatter, log_config
from tests.sessions.fake_runtime import credential_files
from tests.web.inprocess import fake_guest_controller


async def _until(check: Any, what: str) -> Any:
    deadline = time.monotonic() + 20
    while not (value := await check()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)
    return value


async def test_a_sign_in_logs_json_lines_with_session_fields_and_no_secret(
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    keys = {"app": ("sessions", "export")}
    user = "user-logs-1"
    async with (
        fake_guest_controller(tmp_path, keys, log_stream=out, log_format="json") as served,
        httpx.AsyncClient(trust_env=False, timeout=30) as http,
    ):
        served.app.state.services.sessions.sign_in.watch_interval = 0.02
        key = served.keys["app"]
        auth = {"Authorization": f"Bearer {key}"}
        started = await http.post(
            served.base + "/api/auth/start",
            headers=auth,
            json={"userId": user, "provider": "claude_code"},
        )
        assert started.status_code == 200, started.text
        sid = started.json()["sessionId"]
        link = started.json()["novncURL"]
        ticket = link.split("ticket=")[1]

        async def guest_secrets() -> Any:
            guests = served.runtime.guests()
            return guests[0].secrets if guests else None

        secrets = await _until(guest_secrets, "a guest")
        viewer = await http.get(served.base + link[link.index("/api/") :])  # the link, used
        assert viewer.status_code == 303, viewer.text

        async def session() -> dict[str, Any]:
            answer = await http.get(f"{served.base}/api/auth/session/{sid}", headers=auth)
            data: dict[str, Any] = answer.json()["session"]
            return data

        guest_id = (await _until(session, "the session"))["browserVMId"]
        served.agent.sign_in(guest_id)

        async def completed() -> bool:
            return (await session())["status"] in ("completed", "failed")

        await _until(completed, "the sign-in")
        assert (await session())["status"] == "completed"
        exported = await http.post(
            f"{served.base}/api/auth/credentials/{user}/claude_code/export", headers=auth
        )
        assert exported.status_code == 200, exported.text
        scraped = (await http.get(served.base + "/metrics")).text

    (content,) = credential_files("claude_code", guest_id[:8]).values()
    oauth = json.loads(content)["claudeAiOauth"]
    forbidden = {
        "API key": key,
        "ticket": ticket,
        "VNC password": secrets.vnc_password,
        "agent token": secrets.agent_token,
        "access token": oauth["accessToken"],
        "refresh token": oauth["refreshToken"],
    }
    # the same flow in the metrics: the states it passed, the scrape-time figures
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
    }
    for state in ("provisioning", "booting", "ready", "authenticating", "captured"):
        assert samples["mc_session_transitions_total", (("state", state),)] >= 1
    assert samples["mc_data_dir_size_bytes", ()] >= samples["mc_data_dir_free_bytes", ()] > 0
    assert samples["mc_build_info", (("version", __version__),)] == 1
    # the fake image is promoted, never built nor verified: not in the store
    assert samples["mc_current_image_verified", ()] == 0
    assert samples["mc_images", (("verification", "unverified"),)] == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) > 10
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    for name, value in forbidden.items():
        assert value not in text, f"the {name} is in the logs"
    for event in events:
        assert {"event", "level", "logger", "timestamp"} <= event.keys(), event
    session_events = [e for e in events if sid in e["event"]]
    assert session_events
    for event in session_events:
        if event["logger"].startswith("uvicorn"):
            continue  # request lines name the session in their path
        assert event["session_id"] == sid, event
        assert event["user_id"] == user, event
    steps = {e["step"] for e in session_events if "step" in e}
    assert {"allocate", "boot", "vnc handshake", "credentials stored"} <= steps, steps
    states = [e["state"] for e in session_events if "state" in e]
    assert states == ["provisioning", "booting", "ready", "authenticating", "captured"], states


def test_json_lines_take_only_the_known_fields_and_redact_tickets() -> None:
    """A record's other ``extra`` attributes stay out; a ticket in a field, the message or
    a traceback is redacted; the console format is uvicorn's own."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger("master_controller.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(
            "opened /novnc?ticket=abc.def-ghi",
            extra={"session_id": "s-1", "password": "hunter2-secret", "reason": "ticket=zzz9"},
        )
        try:
            raise ValueError("bad /x?ticket=qqq.rrr")
        except ValueError:
            logger.exception("failed", extra={"step": "boot"})
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["session_id"] == "s-1" and "password" not in first
    assert "hunter2" not in stream.getvalue()
    assert "abc.def" not in stream.getvalue() and "zzz9" not in stream.getvalue()
    assert "qqq.rrr" not in stream.getvalue() and "ValueError" in second["exception"]
    assert second["step"] == "boot" and second["level"] == "error"
    assert log_config("console")["handlers"]["default"]["formatter"] == "default"
    assert log_config("json")["handlers"]["access"]["formatter"] == "json"
