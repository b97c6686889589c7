"""Gemini CLI (npm ``@google/gemini-cli``): ``gemini`` with Google sign-in selected opens
the Google OAuth page and keeps ``~/.gemini/oauth_creds.json`` (``access_token``,
``refresh_token``, ``expiry_date`` in milliseconds)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mc_agent.providers import (
    CredentialStatus,
    Prompt,
    Provider,
    expiry_status,
    load_json,
    require,
    validated,
)

CREDENTIALS = ".gemini/oauth_creds.json"


@dataclass(frozen=True)
class GeminiCli(Provider):
    def login_argv(self, options: dict[str, str]) -> list[str]:
        return ["gemini"]

    def home_files(self, options: dict[str, str]) -> dict[str, str]:
        settings = {"security": {"auth": {"selectedType": "oauth-personal"}}}
        return {".gemini/settings.json": json.dumps(settings) + "\n"}

    @validated
    def validate(self, files: dict[str, str], now: float) -> CredentialStatus:
        data = load_json(files, CREDENTIALS)
        require(data, CREDENTIALS, "access_token", "refresh_token")
        expiry = data.get("expiry_date")
        expires_at = float(expiry) / 1000 if isinstance(expiry, int | float) else None
        return expiry_status(expires_at, now, ("access_token", "refresh_token", "expiry_date"))


PROVIDER = GeminiCli(
    name="gemini_cli",
    title="Gemini CLI",
    package="@google/gemini-cli",
    credential_files=(CREDENTIALS,),
    prompts=(
        Prompt("trust folder", r"Do you trust this folder"),
        Prompt("auth method", r"How would you like to authenticate"),
    ),
    domains=("accounts.google.com", "oauth2.googleapis.com", "googleapis.com"),
)
