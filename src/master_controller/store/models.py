"""The tables. Changing one means a new Alembic migration in ``migrations/versions``."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import ForeignKey, Index, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime, TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    provider: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    runtime: Mapped[str] = mapped_column(String(16))
    image_id: Mapped[str] = mapped_column(String(64))
    guest_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    browser_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    api_key_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_activity_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # when the person's sign-in time runs out (set when the guest is ready, pushed out by a
    # heartbeat, never past created_at + max_lifetime); None before it is first ready
    ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class EventRow(Base):
    __tablename__ = "session_events"
    __table_args__ = (Index("ix_session_events_session_id_id", "session_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # "state" | "step"
    name: Mapped[str] = mapped_column(String(64))
    ok: Mapped[bool] = mapped_column(default=True)
    seconds: Mapped[float | None] = mapped_column(nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class CredentialRow(Base):
    """A user's captured credentials for one provider, as captured through one API key
    (one record per key, user and provider), encrypted (see :mod:`..vault`). The ciphertext
    is bound to this row's id, user, provider and (``binding`` 2) API key by the AEAD's
    associated data; ``binding`` 1 rows, sealed before migration 0003, leave the key out."""

    __tablename__ = "credentials"
    __table_args__ = (
        Index("ux_credentials_key_user_provider", "api_key_id", "user_id", "provider", unique=True),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128))
    provider: Mapped[str] = mapped_column(String(32))
    session_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # None: captured without a key (before 0003, or by the controller itself): admin only
    api_key_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    key_id: Mapped[str] = mapped_column(String(32))
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    # what the associated data binds (vault.Binding.version); a writer that does not set
    # it is older code, which seals version 1
    binding: Mapped[int] = mapped_column(default=2, server_default="1")
    files: Mapped[str] = mapped_column(Text, default="")  # names only, comma-separated
    captured_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class AuditRow(Base):
    """Who did what to stored credentials (exports, deletions, rotations)."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    api_key_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    action: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(128), default="")
    provider: Mapped[str] = mapped_column(String(32), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class UsedTicketRow(Base):
    """A viewer ticket that opened the viewer (tickets are single-use). Kept until the
    ticket would have expired anyway, then pruned: an expired ticket is refused by its
    signature's age already."""

    __tablename__ = "used_tickets"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class EgressAssignmentRow(Base):
    """A user's sticky exit: the upstream their guests' traffic leaves through, and what its
    last check found (the exit address, or why it failed)."""

    __tablename__ = "egress_assignments"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    upstream: Mapped[str] = mapped_column(String(300), index=True)  # its URL, no credentials
    assigned_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    exit_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    check_ok: Mapped[bool] = mapped_column(default=False)
    # why the user's last upstream was left, or the last check failed ("" if none)
    last_error: Mapped[str] = mapped_column(Text, default="")


class UpstreamSecretRow(Base):
    """An upstream proxy's user name and password, sealed by the vault (bound to the
    upstream's URL)."""

    __tablename__ = "upstream_secrets"

    upstream: Mapped[str] = mapped_column(String(300), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32))
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
