"""What a guest's agent reports, checked before it becomes an event, a metric label, a
stored file or an export.

The guest is hostile by assumption (the person viewing it has a terminal there and may
become root), so nothing it says is used as it came: prompt names must be ones the provider
declares, URLs are reduced to a checked scheme and host, credential files must be the
provider's own files, strings of bounded size, and must pass the provider's own validator
here, on the controller, not only in the guest.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from master_controller.errors import GuestAgentError
from mc_agent import providers
from mc_agent.providers import CredentialStatus

HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
MAX_PROMPTS = 32
MAX_FILES_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LoginReport:
    """A login's progress as far as the controller believes it."""

    prompts_answered: tuple[str, ...]
    auth_origin: str | None
    credentials_valid: bool


def origin(url: str) -> str | None:
    """``scheme://host`` of an http(s) URL with a plain host name or address, else None
    (the path and query may carry secrets; anything odd is not worth recording)."""
    if len(url) > 4096 or any(c.isspace() or not c.isprintable() for c in url):
        return None  # urlsplit would quietly drop some of these
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not HOST_NAME.match(host):
        return None
    return f"{parts.scheme}://{host}"


def login_report(provider: str, answer: object) -> LoginReport:
    """The agent's ``GET /login`` answer, reduced to what the provider allows."""
    if not isinstance(answer, dict):
        raise GuestAgentError("the guest's agent answered /login with something not an object")
    known = {p.name for p in providers.get(provider).prompts}
    said = answer.get("prompts_answered")
    names = said[:MAX_PROMPTS] if isinstance(said, list) else []
    prompts = tuple(dict.fromkeys(n for n in names if isinstance(n, str) and n in known))
    url = answer.get("auth_url")
    credentials = answer.get("credentials")
    valid = isinstance(credentials, dict) and credentials.get("valid") is True
    return LoginReport(prompts, origin(url) if isinstance(url, str) else None, valid)


@dataclass(frozen=True)
class CheckedCredentials:
    files: dict[str, str]
    status: CredentialStatus


def credentials(provider: str, fetched: object) -> CheckedCredentials:
    """The agent's ``POST /credentials/fetch`` answer: only the provider's own files, as
    strings of bounded size, valid by the provider's validator run here."""
    if not isinstance(fetched, dict) or not isinstance(fetched.get("files"), dict):
        raise GuestAgentError("the guest's agent sent credentials that are not an object of files")
    spec = providers.get(provider)
    raw: dict[Any, Any] = fetched["files"]
    unknown = [str(name)[:64] for name in raw if name not in spec.credential_files]
    if unknown:
        raise GuestAgentError(
            f"the guest's agent sent files {provider} does not have: {', '.join(unknown[:5])}"
        )
    files = {str(name): text for name, text in raw.items()}
    if not all(isinstance(text, str) for text in files.values()):
        raise GuestAgentError("the guest's agent sent a credential file that is not text")
    if sum(len(text) for text in files.values()) > MAX_FILES_BYTES:
        raise GuestAgentError("the guest's agent sent credential files over 1 MiB")
    status = spec.validate(files, time.time())
    if not status.valid:
        raise GuestAgentError(f"the credentials from the guest are not valid: {status.reason}")
    return CheckedCredentials(files, status)
