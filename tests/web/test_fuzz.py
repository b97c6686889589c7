"""The controller's OpenAPI schema, fuzzed with schemathesis against a running controller:
every operation, with valid (positive) and invalid (negative) bodies and parameters. No
answer is a 5xx, none takes longer than the limit, and once the sessions it started are
cancelled the host is as it was (processes, mounts, namespaces, links, leases, guest
folders)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from master_controller.settings import Settings
from tests.runtimes.leaks import HostSnapshot, wait_until_back
from tests.servers import Controller, controller

pytestmark = pytest.mark.integration
EXAMPLES = 25  # per operation
SLOWEST = 10.0  # seconds any single answer may take


@pytest.fixture
def ctl(golden_image: str, integration_settings: Settings, tmp_path: Path) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        f"sqlite:///{tmp_path / 'mc.db'}",
        tmp_path,
        guest_network="10.213.204.0/22",
        max_sessions="2",
        rate_limit_per_minute="0",
    ) as running:
        yield running


def test_no_operation_fails_or_hangs(ctl: Controller, integration_settings: Settings) -> None:
    before = HostSnapshot.take(integration_settings)
    schema = schemathesis.openapi.from_url(ctl.url + "/openapi.json")
    problems: list[str] = []
    calls: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for operation, mode in ((o, m) for o in operations for m in modes):
        try:
            _fuzz(operation, mode, ctl, problems, calls)
        except Unsatisfiable:
            continue  # no invalid input exists for it (no parameters, no body)
    assert len(calls) > EXAMPLES * len(operations) and not problems, problems[:20]

    # cancel whatever the fuzzing started; then nothing is left
    for session in ctl.request("GET", "/api/auth/sessions", key="ops").json():
        if session["status"] not in ("terminated", "failed"):
            ctl.request("POST", f"/api/auth/session/{session['sessionId']}/cancel", key="ops")
    wait_until_back(integration_settings, before, seconds=60)
    assert httpx.get(ctl.url + "/health", trust_env=False).status_code == 200


def _fuzz(
    operation: Any,
    mode: schemathesis.GenerationMode,
    ctl: Controller,
    problems: list[str],
    calls: list[str],
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        started = time.monotonic()
        response = case.call(
            base_url=ctl.url,
            headers={"Authorization": f"Bearer {ctl.keys['ops']}"},
            timeout=SLOWEST + 5,
        )
        seconds = time.monotonic() - started
        label = f"{mode.value} {case.method} {case.formatted_path}"
        calls.append(label)
        if response.status_code >= 500:
            problems.append(f"{label}: {response.status_code} {response.text[:200]}")
        if seconds > SLOWEST:
            problems.append(f"{label}: took {seconds:.1f}s")

    check()
