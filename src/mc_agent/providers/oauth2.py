"""Any OAuth 2.0 authorization-code sign-in with PKCE and a loopback redirect, configured by
its authorize URL, token URL, client id and scope. The client is ``mc_agent.oauth2_login``
(standard library), run in the terminal like the CLIs; it writes
``~/.config/mc-oauth2/token.json``."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

from mc_agent.providers import (
    HTTP_URL,
    CredentialStatus,
    Provider,
    ProviderError,
    expiry_status,
    load_json,
    require,
    validated,
)

CREDENTIALS = ".config/mc-oauth2/token.json"
CLIENT_ID = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")
SCOPE = re.compile(r"^[A-Za-z0-9._:/ -]{0,256}$")
OPTIONS = ("authorize_url", "token_url", "client_id", "scope")


@dataclass(frozen=True)
class OAuth2(Provider):
    def check_options(self, options: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ProviderError(f"unknown oauth2 options: {', '.join(unknown)}")
        for key in ("authorize_url", "token_url"):
            if not HTTP_URL.match(options.get(key, "")) or len(options[key]) > 2048:
                raise ProviderError(f"oauth2 {key} must be an http(s) URL")
        if not CLIENT_ID.match(options.get("client_id", "")):
            raise ProviderError("oauth2 client_id must be 1-128 of A-Z a-z 0-9 . _ ~ -")
        if not SCOPE.match(options.get("scope", "")):
            raise ProviderError("oauth2 scope has characters other than A-Z a-z 0-9 . _ : / -")
        return {k: options.get(k, "") for k in OPTIONS}

    def login_argv(self, options: dict[str, str]) -> list[str]:
        options = self.check_options(options)
        return [
            sys.executable or "/usr/bin/python3",
            "-m",
            "mc_agent.oauth2_login",
            "--authorize-url",
            options["authorize_url"],
            "--token-url",
            options["token_url"],
            "--client-id",
            options["client_id"],
            "--scope",
            options["scope"],
        ]

    def sign_in_reach(self, options: dict[str, str]) -> tuple[tuple[str, ...], frozenset[int]]:
        """The hosts and ports of the configured endpoints (a local identity provider may
        listen anywhere)."""
        endpoints = [urlsplit(options[k]) for k in ("authorize_url", "token_url")]
        hosts = tuple(sorted({u.hostname or "" for u in endpoints}))
        ports = frozenset(u.port or (443 if u.scheme == "https" else 80) for u in endpoints)
        return hosts, ports

    @validated
    def validate(self, files: dict[str, str], now: float) -> CredentialStatus:
        data = load_json(files, CREDENTIALS)
        require(data, CREDENTIALS, "access_token", "token_type")
        if data["token_type"].lower() != "bearer":
            raise ProviderError(f"{CREDENTIALS} token_type is {data['token_type']!r}, not bearer")
        expires = data.get("expires_at")
        expires_at = float(expires) if isinstance(expires, int | float) else None
        return expiry_status(expires_at, now, ("access_token", "token_type", "expires_at"))


PROVIDER = OAuth2(
    name="oauth2",
    title="OAuth 2.0 (authorization code + PKCE)",
    package="",
    credential_files=(CREDENTIALS,),
)
