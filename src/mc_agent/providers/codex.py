"""Codex CLI (npm ``@openai/codex``): ``codex login`` starts a loopback server and opens the
OpenAI sign-in; ``~/.codex/auth.json`` then holds the tokens (``tokens.id_token`` is a JWT
whose ``exp`` is checked). ``codex login status`` reports the login offline."""

from __future__ import annotations

from dataclasses import dataclass

from mc_agent.providers import (
    CredentialStatus,
    Provider,
    ProviderError,
    expiry_status,
    jwt_expiry,
    load_json,
    require,
    validated,
)

CREDENTIALS = ".codex/auth.json"


@dataclass(frozen=True)
class Codex(Provider):
    def login_argv(self, options: dict[str, str]) -> list[str]:
        return ["codex", "login"]

    def status_argv(self) -> list[str] | None:
        return ["codex", "login", "status"]

    @validated
    def validate(self, files: dict[str, str], now: float) -> CredentialStatus:
        data = load_json(files, CREDENTIALS)
        tokens = data.get("tokens")
        if isinstance(tokens, dict):
            require(tokens, f"{CREDENTIALS} tokens", "access_token", "refresh_token", "id_token")
            return expiry_status(
                jwt_expiry(tokens["id_token"]), now, ("access_token", "refresh_token", "id_token")
            )
        if isinstance(data.get("OPENAI_API_KEY"), str) and data["OPENAI_API_KEY"].strip():
            return CredentialStatus(True, "valid (API key)", None, ("OPENAI_API_KEY",))
        raise ProviderError(f"{CREDENTIALS} has neither tokens nor an API key")


PROVIDER = Codex(
    name="codex",
    title="Codex CLI",
    package="@openai/codex",
    credential_files=(CREDENTIALS,),
    domains=("auth.openai.com", "chatgpt.com", "openai.com"),
)
