"""Who may do what: API keys for API callers, signed tickets for viewers.

API keys are random 32-byte tokens shown once and stored as SHA-256 digests (they have full
entropy, so a slow hash adds nothing). A viewer ticket is signed (HMAC, itsdangerous), bound
to one session, and expires; the viewer page trades it for an HttpOnly cookie scoped to that
session's viewer path.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy.ext.asyncio import AsyncSession

from master_controller.errors import ConfigError, MCError
from master_controller.store import repo
from master_controller.store.models import ApiKeyRow, utcnow

KEY_PREFIX = "mc_"
# "export" is never implied by "admin": taking decrypted credentials needs it by name.
SCOPES = ("sessions", "admin", "export")
DEFAULT_SCOPES = ("sessions",)


class Unauthorized(MCError):
    status = 401


class Forbidden(MCError):
    status = 403


@dataclass(frozen=True)
class Caller:
    key_id: str
    name: str
    scopes: frozenset[str]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_api_key(
    db: AsyncSession, name: str, scopes: tuple[str, ...] = DEFAULT_SCOPES
) -> str:
    """Create a key called ``name``; returns the key, which is not stored anywhere."""
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError("an API key name is 1-64 letters, digits, '-' or '_'")
    if unknown := set(scopes) - set(SCOPES):
        raise ConfigError(f"unknown scopes {sorted(unknown)}; known: {', '.join(SCOPES)}")
    if await repo.api_key_by_name(db, name) is not None:
        raise ConfigError(f"an API key named {name!r} exists already")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    await repo.add_api_key(
        db,
        ApiKeyRow(
            id=str(uuid.uuid4()),
            name=name,
            prefix=key[:10],
            key_hash=hash_key(key),
            scopes=" ".join(sorted(set(scopes))),
        ),
    )
    return key


async def revoke_api_key(db: AsyncSession, name: str) -> None:
    row = await repo.api_key_by_name(db, name)
    if row is None:
        raise ConfigError(f"no API key named {name!r}")
    row.revoked_at = utcnow()
    await db.commit()


async def authenticate(db: AsyncSession, key: str | None) -> Caller:
    if not key:
        raise Unauthorized("an API key is required (Authorization: Bearer mc_...)")
    row = await repo.api_key_by_hash(db, hash_key(key))
    if row is None or row.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    return Caller(key_id=row.id, name=row.name, scopes=frozenset(row.scopes.split()))


def load_secret(path: Path) -> bytes:
    """The signing key, created with 0600 permissions on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


class Tickets:
    """Signed, expiring viewer tickets (in novncURL) and viewer cookies, per session."""

    def __init__(self, secret: bytes) -> None:
        self._tickets = URLSafeTimedSerializer(secret, salt="mc-viewer-ticket")
        self._cookies = URLSafeTimedSerializer(secret, salt="mc-viewer-cookie")

    def ticket(self, session_id: str) -> str:
        return self._tickets.dumps({"sid": session_id})

    def cookie(self, session_id: str) -> str:
        return self._cookies.dumps({"sid": session_id})

    def check_ticket(self, token: str, session_id: str, max_age: float) -> None:
        _check(self._tickets, token, session_id, max_age, "viewer link")

    def check_cookie(self, token: str | None, session_id: str, max_age: float) -> None:
        if not token:
            raise Unauthorized("no viewer ticket: open the viewer link you were given")
        _check(self._cookies, token, session_id, max_age, "viewer ticket")


def _check(
    serializer: URLSafeTimedSerializer, token: str, session_id: str, max_age: float, what: str
) -> None:
    try:
        data = serializer.loads(token, max_age=int(max_age))
    except SignatureExpired as exc:
        raise Unauthorized(f"the {what} has expired") from exc
    except BadSignature as exc:
        raise Unauthorized(f"the {what} is not valid") from exc
    if not isinstance(data, dict) or data.get("sid") != session_id:
        raise Forbidden(f"the {what} belongs to another session")
