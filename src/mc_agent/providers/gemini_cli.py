"""Gemini CLI (npm ``@google/gemini-cli``). It has no login subcommand: sign-in happens when
it first needs credentials. Here it runs one prompt in headless mode with Google sign-in
selected: it asks for consent on the terminal (answered), then opens the Google sign-in
with a loopback redirect through ``xdg-open`` (which is ``mc-browser`` on a login's PATH).
``~/.gemini/oauth_creds.json`` then holds ``access_token``, ``refresh_token`` and
``expiry_date`` (milliseconds).

(Its interactive TUI asks for the browser consent through a dialog that is not listening
yet when sign-in starts, and fails with "Authentication consent could not be obtained".)
"""

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
        return ["gemini", "--prompt", "Reply with the single word: signed-in"]

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
    prompts=(Prompt("consent", r"Do you want to continue\? \[Y/n\]", keys=("y", "Enter")),),
    domains=("accounts.google.com", "oauth2.googleapis.com", "googleapis.com", "google.com"),
    open_terminal_urls=True,
    ignored_urls=("https://geminicli.com/docs",),
)
