"""What one API key or one user may hold: live plus hibernated sessions are capped per key
and per user, and hibernated guests expire (their snapshots and disk layers removed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from master_controller.settings import Settings
from tests.servers import Controller, controller

pytestmark = pytest.mark.integration


@pytest.fixture
def ctl(
    golden_image: str,
    integration_settings: Settings,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Controller]:
    ttl = request.node.get_closest_marker("hibernated_ttl")
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.208.0/22",
        max_sessions="4",
        max_sessions_per_key="2",
        max_sessions_per_user="1",
        hibernated_ttl=str(ttl.args[0] if ttl else 3600),
    ) as running:
        yield running


def _start(ctl: Controller, user: str, key: str = "alice") -> tuple[int, dict[str, object]]:
    answer = ctl.request(
        "POST", "/api/auth/start", key=key, json={"userId": user, "provider": "codex"}
    )
    return answer.status_code, answer.json()


def test_hibernated_sessions_count_against_the_key_and_the_user(
    ctl: Controller, integration_settings: Settings
) -> None:
    first = ctl.ready_session("u1")
    status, body = _start(ctl, "u1", key="bob")  # the same user through another key
    assert status == 429 and "'u1'" in str(body["error"]), body
    hibernated = ctl.request("POST", f"/api/auth/session/{first}/hibernate")
    assert hibernated.json()["status"] == "hibernated", hibernated.text
    status, body = _start(ctl, "u1")  # hibernated still holds the user's place
    assert status == 429, body

    second = ctl.ready_session("u2")
    status, body = _start(ctl, "u3")  # alice holds two (one live, one hibernated)
    assert status == 429 and "API key" in str(body["error"]), body
    status, body = _start(ctl, "u3", key="bob")  # another key is not affected
    assert status == 200, body
    ctl.request("POST", f"/api/auth/session/{second}/cancel")
    status, body = _start(ctl, "u3")
    assert status == 429 and "'u3'" in str(body["error"])  # bob's u3 holds the user's place


@pytest.mark.hibernated_ttl(3)
def test_a_hibernated_guest_expires_with_its_disk_layer(
    ctl: Controller, integration_settings: Settings
) -> None:
    session_id = ctl.ready_session("sleeper")
    body = ctl.request("POST", f"/api/auth/session/{session_id}/hibernate").json()
    assert body["status"] == "hibernated"
    folder = integration_settings.guests_dir / session_id
    assert folder.is_dir()
    body = ctl.wait_for(session_id, {"terminated", "failed"}, timeout=30)
    assert body["status"] == "terminated" and "hibernated for over 3s" in body["reason"], body
    deadline = time.monotonic() + 10
    while folder.exists():
        assert time.monotonic() < deadline, "the expired guest's folder is still there"
        time.sleep(0.2)
    resumed = ctl.request("POST", f"/api/auth/session/{session_id}/resume")
    assert resumed.status_code == 409
