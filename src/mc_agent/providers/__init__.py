"""The CLI tools people sign in to, one module each, and what they have in common.

A provider says how to start its login (an argument list, never a shell line), which
prompts of its CLI to answer, where its credential files are (relative to the browser
user's home) and how to tell valid credentials from a file that merely exists. Standard
library only: this runs in the guest, and the controller uses the same validators on the
credentials it stores.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_CREDENTIAL_BYTES = 256 * 1024
MAX_REASON = 300  # characters of a status's reason (validators quote the files' errors)


class ProviderError(ValueError):
    """Bad provider name or options (the message says which)."""


@dataclass(frozen=True)
class Prompt:
    """A question the CLI asks in its terminal, and the keys that answer it (tmux key
    names: "Enter", "Down", or literal text)."""

    name: str
    pattern: str
    keys: tuple[str, ...] = ("Enter",)


@dataclass(frozen=True)
class CredentialStatus:
    valid: bool
    reason: str
    expires_at: float | None = None  # unix seconds
    fields: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "reason": self.reason[:MAX_REASON],
            "expires_at": self.expires_at,
            "fields": list(self.fields),
        }


@dataclass(frozen=True)
class Provider:
    name: str
    title: str
    package: str  # the npm package (or "" for built-in clients)
    credential_files: tuple[str, ...]
    prompts: tuple[Prompt, ...] = ()
    # domains its sign-in pages and token endpoints live on (the egress allowlist)
    domains: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    # open the sign-in URL the CLI prints in Chromium (for CLIs that only print it)
    open_terminal_urls: bool = False
    # terminal URLs that are not the sign-in (documentation links in the TUI, say)
    ignored_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # the agent reads and hands out exactly these names, relative to the user's home:
        # each must stay inside it, so no absolute path, no "." or ".." component
        for relative in self.credential_files:
            parts = relative.split("/")
            if relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(f"{self.name}: credential file {relative!r} is not plain")

    def login_argv(self, options: dict[str, str]) -> list[str]:
        raise NotImplementedError

    def status_argv(self) -> list[str] | None:
        """A command that reports the login offline, if the CLI has one."""
        return None

    def home_files(self, options: dict[str, str]) -> dict[str, str]:
        """Files written into the user's home before the login starts (settings that
        skip first-run questions)."""
        return {}

    def validate(self, files: dict[str, str], now: float) -> CredentialStatus:
        raise NotImplementedError

    def sign_in_reach(self, options: dict[str, str]) -> tuple[tuple[str, ...], frozenset[int]]:
        """The domains (with their subdomains) and ports a guest may reach while it signs
        in to this provider: its egress allowance."""
        return self.domains, frozenset({443})

    def check_options(self, options: dict[str, str]) -> dict[str, str]:
        if options:
            raise ProviderError(f"{self.name} takes no options")
        return {}


# --- helpers for validators -------------------------------------------------------------


def load_json(files: dict[str, str], name: str) -> dict[str, Any]:
    text = files.get(name)
    if text is None:
        raise ProviderError(f"{name} is missing")
    if len(text) > MAX_CREDENTIAL_BYTES:
        raise ProviderError(f"{name} is larger than {MAX_CREDENTIAL_BYTES} bytes")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProviderError(f"{name} is not JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise ProviderError(f"{name} is not a JSON object")
    return data


def require(data: dict[str, Any], where: str, *keys: str) -> None:
    missing = [k for k in keys if not isinstance(data.get(k), str) or not data[k].strip()]
    if missing:
        raise ProviderError(f"{where} lacks {', '.join(missing)}")


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the issuer verifies)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, json.JSONDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


def expiry_status(
    expires_at: float | None, now: float, fields: tuple[str, ...]
) -> CredentialStatus:
    if expires_at is not None and expires_at <= now:
        return CredentialStatus(False, "the credentials have expired", expires_at, fields)
    return CredentialStatus(True, "valid", expires_at, fields)


def validated(check: Any) -> Any:
    """Turn a validator's ProviderError into an invalid status with its reason."""

    def wrapper(self: Provider, files: dict[str, str], now: float) -> CredentialStatus:
        try:
            status: CredentialStatus = check(self, files, now)
        except ProviderError as exc:
            return CredentialStatus(False, str(exc))
        return status

    return wrapper


HTTP_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s]*)?$")


def registry() -> dict[str, Provider]:
    from mc_agent.providers import claude_code, codex, gemini_cli, oauth2

    return {
        p.name: p
        for p in (claude_code.PROVIDER, codex.PROVIDER, gemini_cli.PROVIDER, oauth2.PROVIDER)
    }


def names() -> tuple[str, ...]:
    """Every provider's name, the one list the API and the CLI offer."""
    return tuple(registry())


def get(name: str) -> Provider:
    providers = registry()
    if name not in providers:
        raise ProviderError(
            f"unknown provider {name[:40]!r}; known: {', '.join(sorted(providers))}"
        )
    return providers[name]
