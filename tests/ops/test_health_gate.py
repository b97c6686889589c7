"""The deploy health gate against a real controller with real container guests: it passes
when a session reaches ready and its viewer shows a frame, and fails, naming why, when the
service is not the release or sessions cannot become ready."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from master_controller.errors import DeployError
from master_controller.ops.health import Gate
from master_controller.settings import Settings
from tests.servers import Controller, controller

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "master-controller"


def _gate(ctl: Controller, monkeypatch: pytest.MonkeyPatch, release: Path | None = None) -> Gate:
    # the gate makes its API key with the release's CLI, which reads the service's settings
    for name, value in ctl.env.items():
        if name.startswith("MC_"):
            monkeypatch.setenv(name, value)
    assert ctl.process is not None
    pid = ctl.process.pid
    return Gate(
        url=ctl.url,
        release=release or Path(os.readlink(f"/proc/{pid}/cwd")),
        main_pid=lambda: pid,
        cli=CLI,
        timeout=120.0,
    )


@pytest.fixture
def running(
    golden_image: str, integration_settings: Settings, tmp_path: Path
) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.204.0/22",
    ) as ctl:
        yield ctl


def test_the_gate_passes_when_a_session_shows_a_frame(
    running: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    timings = _gate(running, monkeypatch).check()
    assert set(timings) == {"live", "session"}
    sessions = running.request("GET", "/api/auth/sessions", key="ops").json()
    gate_sessions = [s for s in sessions if s["userId"] == "deploy-health-check"]
    assert [s["status"] for s in gate_sessions] == ["terminated"]  # it cleans up after itself
    keys = json.loads(running.cli("apikey", "list", "--json").stdout)
    gate_keys = [k for k in keys if k["name"].startswith("deploy-gate-")]
    assert len(gate_keys) == 1 and gate_keys[0]["revoked"]


def test_the_gate_fails_when_the_service_runs_another_release(
    running: Controller, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(DeployError, match="not from"):
        _gate(running, monkeypatch, release=tmp_path).check()


def test_the_gate_fails_when_sessions_do_not_become_ready(
    golden_image: str,
    integration_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with (
        controller(
            integration_settings.data_dir,
            f"sqlite:///{tmp_path / 'mc.db'}",
            tmp_path,
            guest_network="10.213.204.0/22",
            boot_timeout="0.5",  # no guest's viewer path works that fast
        ) as ctl,
        pytest.raises(DeployError, match="the session failed"),
    ):
        _gate(ctl, monkeypatch).check()
