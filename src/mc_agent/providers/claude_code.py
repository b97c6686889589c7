"""Claude Code (npm ``@anthropic-ai/claude-code``): ``claude /login`` in its terminal UI;
the OAuth sign-in opens in the browser, credentials land in ``~/.claude/.credentials.json``
(``claudeAiOauth``: access and refresh token, expiry in milliseconds)."""

from __future__ import annotations

from dataclasses import dataclass

from mc_agent.providers import (
    CredentialStatus,
    Prompt,
    Provider,
    ProviderError,
    expiry_status,
    load_json,
    require,
    validated,
)

CREDENTIALS = ".claude/.credentials.json"


@dataclass(frozen=True)
class ClaudeCode(Provider):
    def login_argv(self, options: dict[str, str]) -> list[str]:
        return ["claude", "/login"]

    def home_files(self, options: dict[str, str]) -> dict[str, str]:
        # first-run questions answered ahead: theme chosen, onboarding done
        return {".claude.json": '{"theme": "dark", "hasCompletedOnboarding": true}\n'}

    @validated
    def validate(self, files: dict[str, str], now: float) -> CredentialStatus:
        data = load_json(files, CREDENTIALS)
        oauth = data.get("claudeAiOauth")
        if not isinstance(oauth, dict):
            raise ProviderError(f"{CREDENTIALS} lacks claudeAiOauth")
        require(oauth, f"{CREDENTIALS} claudeAiOauth", "accessToken", "refreshToken")
        expires = oauth.get("expiresAt")
        expires_at = float(expires) / 1000 if isinstance(expires, int | float) else None
        return expiry_status(expires_at, now, ("accessToken", "refreshToken", "expiresAt"))


PROVIDER = ClaudeCode(
    name="claude_code",
    title="Claude Code",
    package="@anthropic-ai/claude-code",
    credential_files=(CREDENTIALS,),
    prompts=(
        Prompt("text style", r"Choose the text style"),
        Prompt("login method", r"Select login method"),
        Prompt("trust folder", r"Do you trust the files in this folder|Yes, I trust this folder"),
        Prompt("continue", r"Press Enter to continue"),
    ),
    domains=("claude.ai", "claude.com", "anthropic.com"),
)
