"""Who may do what: API keys for API callers, signed tickets for viewers.

API keys are random 32-byte tokens shown once and stored as SHA-256 digests (they have full
entropy, so a slow hash adds nothing). A viewer ticket is signed (HMAC, itsdangerous), bound
to one session, carries a random id (``jti``) and expires after ``ticket_ttl``; the viewer page
trades it, once, for an HttpOnly cookie scoped to that session's viewer path. The ids of
redeemed tickets are kept in the database until the tickets would have expired anyway, so a
ticket copied from a log, a proxy or a browser history cannot be replayed, not even after a
restart. Tickets are also redacted from every log line (:class:`TicketRedaction`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
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


class TicketUsed(Unauthorized):
    """A viewer ticket that was redeemed before: tickets open the viewer once."""


@dataclass(frozen=True)
class Caller:
    """An authenticated API key, and the one authorization policy: a key acts on the
    sessions and credentials its own sessions made; ``admin`` reaches every key's and
    implies every scope except ``export`` (decrypted credentials are asked for by name)."""

    key_id: str
    name: str
    scopes: frozenset[str]

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def has(self, scope: str) -> bool:
        return scope in self.scopes or (self.admin and scope != "export")

    def require(self, scope: str) -> None:
        if not self.has(scope):
            raise Forbidden(f"this API key lacks the {scope!r} scope")

    def owns(self, api_key_id: str | None) -> bool:
        """Whether this key may act on what the key ``api_key_id`` made."""
        return self.admin or api_key_id == self.key_id


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


@dataclass(frozen=True)
class TicketClaim:
    """A ticket whose signature, age and session were checked; not yet redeemed."""

    session_id: str
    jti: str
    expires_at: datetime


class Tickets:
    """Signed, expiring, single-use viewer tickets (in novncURL) and viewer cookies, per
    session. Signing and checking only; redemption needs the database (:func:`redeem`)."""

    def __init__(self, secret: bytes) -> None:
        self._tickets = URLSafeTimedSerializer(secret, salt="mc-viewer-ticket")
        self._cookies = URLSafeTimedSerializer(secret, salt="mc-viewer-cookie")

    def ticket(self, session_id: str) -> str:
        return self._tickets.dumps({"sid": session_id, "jti": secrets.token_urlsafe(16)})

    def cookie(self, session_id: str) -> str:
        return self._cookies.dumps({"sid": session_id})

    def check_ticket(self, token: str, session_id: str, max_age: float) -> TicketClaim:
        """The ticket's claim if it is genuine, younger than ``max_age`` and for this
        session; Unauthorized / Forbidden otherwise. Does not redeem it."""
        data, signed = _check(self._tickets, token, session_id, max_age, "viewer link")
        jti = data.get("jti")
        if not isinstance(jti, str) or not 16 <= len(jti) <= 64:
            # signed by us but without an id (an older version): it cannot be made single-use
            raise Unauthorized("the viewer link is not valid: get a new one")
        # kept past the last second the signature accepts (whole seconds, inclusive), with a
        # margin for the time between this check and the redemption
        return TicketClaim(session_id, jti, signed + timedelta(seconds=int(max_age) + 60))

    def check_cookie(self, token: str | None, session_id: str, max_age: float) -> None:
        if not token:
            raise Unauthorized("no viewer ticket: open the viewer link you were given")
        _check(self._cookies, token, session_id, max_age, "viewer ticket")


async def redeem(db: AsyncSession, claim: TicketClaim) -> None:
    """Use the ticket up: the first call for a ticket returns, every later one (also from
    another process sharing the database, also after a restart) raises TicketUsed."""
    if not await repo.redeem_ticket(db, claim.jti, claim.expires_at):
        raise TicketUsed(
            "This viewer link was opened already, and a link opens the viewer only once. "
            "Ask for a new link: a fresh one comes with every look at the session "
            "(GET /api/auth/session/<id>)."
        )


def _check(
    serializer: URLSafeTimedSerializer, token: str, session_id: str, max_age: float, what: str
) -> tuple[dict[str, object], datetime]:
    try:
        data, signed = serializer.loads(token, max_age=int(max_age), return_timestamp=True)
    except SignatureExpired as exc:
        raise Unauthorized(f"the {what} has expired") from exc
    except BadSignature as exc:
        raise Unauthorized(f"the {what} is not valid") from exc
    if not isinstance(data, dict) or data.get("sid") != session_id:
        raise Forbidden(f"the {what} belongs to another session")
    return data, signed


# ``ticket=<value>`` in a query string, also URL-encoded (``ticket%3D``) as inside another
# URL; a value is URL-safe base64 and dots, so it ends at &, %, whitespace, a quote or #
_TICKET = re.compile(r"(ticket(?:=|%3D))[^&%\s\"'#]+", re.IGNORECASE)
REDACTED = "[redacted]"


def redact_tickets(text: str) -> str:
    return _TICKET.sub(r"\1" + REDACTED, text)


class TicketRedaction(logging.Filter):
    """Replaces ticket values in a record's message and arguments (uvicorn's access log
    passes the request path, query included, as an argument). Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_tickets(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redacted(v) for k, v in record.args.items()}
        return True


def _redacted(value: object) -> object:
    return redact_tickets(value) if isinstance(value, str) else value
