# ruff: noqa: E501  (credential fixtures read best on one line)
"""The guest's OAuth 2.0 client (``mc_agent.oauth2_login``) against the test IdP, with a
scripted browser standing in for Chromium: PKCE, state, the loopback redirect, the code
exchange, and the token file the oauth2 provider then validates."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mc_agent.providers import get
from mc_agent.providers.oauth2 import CREDENTIALS
from tests.idp import CLIENT_ID, IdentityProvider, identity_provider

BROWSER = """#!{python}
import sys, httpx
from urllib.parse import urlsplit
url = sys.argv[1]
with httpx.Client(trust_env=False, follow_redirects=False, timeout=10) as web:
    query = urlsplit(url).query
    base = url.split("/authorize")[0]
    web.get(url)
    answer = web.post(f"{{base}}/login?{{query}}", data={{"username": "alice", "password": "{password}"}})
    if answer.status_code != 302:
        sys.exit(0)  # the form again: wrong password, nothing more happens
    web.get(base + answer.headers["location"])
    answer = web.post(f"{{base}}/authorize?{{query}}", data={{"confirm": "yes"}})
    web.get(answer.headers["location"])  # the loopback redirect to the waiting client
"""


def _login(
    idp: IdentityProvider, tmp_path: Path, password: str, wait: float
) -> tuple[subprocess.Popen[str], Path]:
    browser = tmp_path / "browser"
    browser.write_text(BROWSER.format(python=sys.executable, password=password))
    browser.chmod(0o755)
    output = tmp_path / "home" / CREDENTIALS
    env = {**os.environ, "BROWSER": str(browser), "no_proxy": "*"}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mc_agent.oauth2_login",
            "--authorize-url", idp.authorize_url, "--token-url", idp.token_url,
            "--client-id", CLIENT_ID, "--scope", "profile", "--output", str(output),
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + wait
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return process, output


def test_sign_in_with_pkce_writes_a_token_the_provider_accepts(tmp_path: Path) -> None:
    with identity_provider({"alice": "correct horse"}) as idp:
        process, output = _login(idp, tmp_path, "correct horse", wait=30)
        out = process.stdout.read() if process.stdout else ""
        assert process.returncode == 0, out
        assert idp.tokens and idp.tokens[0]["user"] == "alice"
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    token = json.loads(output.read_text())
    assert token["access_token"] == idp.tokens[0]["access_token"]
    assert token["expires_at"] > time.time() + 3000
    status = get("oauth2").validate({CREDENTIALS: output.read_text()}, time.time())
    assert status.valid, status.reason
    assert "Signed in" in out and "access_token" not in out  # the token is never printed


def test_a_wrong_password_gets_no_token(tmp_path: Path) -> None:
    with identity_provider({"alice": "correct horse"}) as idp:
        process, output = _login(idp, tmp_path, "wrong", wait=5)
        try:
            assert process.returncode is None  # still waiting for a sign-in
            assert idp.failed_logins == 1 and not idp.tokens and not idp.codes
            assert not output.exists()
        finally:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("name", "text", "valid", "reason"),
    [
        (
            "oauth2",
            '{"access_token": "a", "token_type": "Bearer", "expires_at": 4102444800}',
            True,
            "valid",
        ),
        (
            "oauth2",
            '{"access_token": "a", "token_type": "Bearer", "expires_at": 1000}',
            False,
            "expired",
        ),
        ("oauth2", '{"access_token": "", "token_type": "Bearer"}', False, "lacks access_token"),
        ("oauth2", "not json", False, "not JSON"),
        (
            "claude_code",
            '{"claudeAiOauth": {"accessToken": "a", "refreshToken": "r", "expiresAt": 4102444800000}}',
            True,
            "valid",
        ),
        ("claude_code", '{"claudeAiOauth": {"accessToken": "a"}}', False, "lacks refreshToken"),
        (
            "gemini_cli",
            '{"access_token": "a", "refresh_token": "r", "expiry_date": 1000}',
            False,
            "expired",
        ),
        (
            "codex",
            '{"tokens": {"access_token": "a", "refresh_token": "r", "id_token": "x.eyJleHAiOiAxMDAwfQ.y"}}',
            False,
            "expired",
        ),
        (
            "codex",
            '{"tokens": {"access_token": "a", "refresh_token": "r", "id_token": "x.eyJleHAiOiA0MTAyNDQ0ODAwfQ.y"}}',
            True,
            "valid",
        ),
        ("codex", "{}", False, "neither tokens nor an API key"),
    ],
)
def test_validators_judge_content_not_existence(
    name: str, text: str, valid: bool, reason: str
) -> None:
    provider = get(name)
    status = provider.validate({provider.credential_files[0]: text}, time.time())
    assert status.valid is valid and reason in status.reason


def test_a_missing_file_is_not_valid() -> None:
    for name in ("oauth2", "claude_code", "codex", "gemini_cli"):
        status = get(name).validate({}, time.time())
        assert not status.valid and "missing" in status.reason
