"""A hostile guest's agent answers: only what the provider allows becomes an event, a
metric label or a stored file."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from master_controller.errors import GuestAgentError
from master_controller.sessions import guest_input
from mc_agent.providers import oauth2

TOKEN = json.dumps(
    {"access_token": "at-1", "token_type": "Bearer", "expires_at": time.time() + 3600}
)


def test_prompt_names_outside_the_providers_list_are_dropped() -> None:
    report = guest_input.login_report(
        "claude_code",
        {"prompts_answered": ["theme", "x" * 10_000, "'); DROP", 7, "theme"]},
    )
    assert all(len(p) < 64 for p in report.prompts_answered)
    assert "'); DROP" not in report.prompts_answered
    assert len(report.prompts_answered) == len(set(report.prompts_answered))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://claude.ai/oauth/authorize?code=secret", "https://claude.ai"),
        ("http://idp.mc.test:8080/authorize", "http://idp.mc.test"),
        ("javascript:alert(1)", None),
        ("file:///home/browser/.claude/.credentials.json", None),
        ("https://evil\nlabel/", None),
        ("https://" + "a" * 5000, None),
    ],
)
def test_auth_urls_become_a_checked_origin_or_nothing(url: str, expected: str | None) -> None:
    assert guest_input.login_report("oauth2", {"auth_url": url}).auth_origin == expected


@given(st.recursive(st.none() | st.booleans() | st.text() | st.integers(), st.lists))
def test_any_json_shape_is_survived(answer: object) -> None:
    try:
        report = guest_input.login_report("codex", answer)
    except GuestAgentError:
        return
    assert report.credentials_valid is False


def test_credentials_valid_only_if_the_agent_says_exactly_true() -> None:
    assert not guest_input.login_report(
        "codex", {"credentials": {"valid": "yes"}}
    ).credentials_valid
    assert guest_input.login_report("codex", {"credentials": {"valid": True}}).credentials_valid


def test_fetched_credentials_are_checked_here() -> None:
    checked = guest_input.credentials("oauth2", {"files": {oauth2.CREDENTIALS: TOKEN}})
    assert checked.status.valid and checked.files == {oauth2.CREDENTIALS: TOKEN}


@pytest.mark.parametrize(
    "files",
    [
        {"../../etc/passwd": "root:x:0:0"},  # a file name the provider does not have
        {oauth2.CREDENTIALS: TOKEN, ".ssh/id_rsa": "key"},
        {oauth2.CREDENTIALS: {"nested": True}},  # not text
        {oauth2.CREDENTIALS: "x" * (2 * 1024 * 1024)},  # too large
        {oauth2.CREDENTIALS: json.dumps({"token_type": "Bearer"})},  # not valid here
        {},
    ],
)
def test_fetched_credentials_that_the_provider_would_not_write_are_refused(
    files: dict[str, object],
) -> None:
    with pytest.raises(GuestAgentError):
        guest_input.credentials("oauth2", {"files": files})


def test_a_fetch_answer_that_is_not_an_object_is_refused() -> None:
    for answer in (None, [], "files", {"files": ["a"]}):
        with pytest.raises(GuestAgentError):
            guest_input.credentials("oauth2", answer)
