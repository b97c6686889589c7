"""The API's request and response bodies (camelCase on the wire, as the system we replace)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from master_controller.store.models import CredentialRow, EventRow
from mc_agent import providers


def _known_provider(name: str) -> str:
    if name not in providers.names():
        raise ValueError(f"unknown provider; known: {', '.join(providers.names())}")
    return name


# the providers' names come from their registry (mc_agent.providers), declared once there
Provider = Annotated[
    str,
    AfterValidator(_known_provider),
    WithJsonSchema({"type": "string", "enum": list(providers.names())}),
]
USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"


class Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class StartRequest(Camel):
    user_id: str = Field(pattern=USER_ID_PATTERN, description="Whose sign-in this is.")
    provider: Provider = Field(description="The CLI tool to sign in to.")


class OpenUrlRequest(Camel):
    url: str = Field(
        min_length=8,
        max_length=8192,
        pattern=r"^https?://[^\s]+$",
        description="An http(s) URL to open in the guest's Chromium.",
    )


class StartResponse(Camel):
    success: bool = True
    session_id: str
    provider: str
    novnc_url: str = Field(alias="novncURL")
    browser_ip: str | None = Field(alias="browserIP")
    status: str


class EventView(Camel):
    at: datetime
    kind: str
    name: str
    ok: bool
    seconds: float | None
    detail: str

    @classmethod
    def of(cls, row: EventRow) -> EventView:
        return cls(
            at=row.at,
            kind=row.kind,
            name=row.name,
            ok=row.ok,
            seconds=row.seconds,
            detail=row.detail,
        )


class SessionView(Camel):
    session_id: str
    user_id: str
    provider: str
    status: str
    reason: str
    browser_ip: str | None = Field(alias="browserIP")
    runtime: str
    image_id: str
    created_at: datetime
    ready_at: datetime | None
    ended_at: datetime | None
    last_activity_at: datetime
    viewers: int
    queue_position: int | None = Field(
        None, description="While queued for a boot slot: how many starts are ahead of it."
    )
    novnc_url: str | None = Field(None, alias="novncURL")
    events: list[EventView] = []


class VmView(Camel):
    vm_id: str
    session_id: str
    user_id: str
    status: str
    session_status: str
    address: str | None
    runtime: str
    image_id: str
    snapshot_bytes: int | None = Field(
        None, description="Size of the saved memory state of a hibernated VM."
    )


class ViewerStatus(Camel):
    status: str
    reason: str
    ready: bool
    ended: bool
    queue_position: int | None = None
    events: list[EventView]


class OkResponse(Camel):
    success: bool = True
    status: str


class OAuthUrlView(Camel):
    session_id: str
    provider: str
    url: str | None = Field(description="The sign-in URL (opened in the guest, or printed).")
    opened_urls: list[str]
    terminal_urls: list[str]
    prompts_answered: list[str]


class CredentialStatusView(Camel):
    session_id: str
    provider: str
    valid: bool
    reason: str
    expires_at: float | None = Field(description="Unix time the credentials expire, if known.")
    stored: bool = Field(description="Whether they are in the vault already.")


class CredentialView(Camel):
    provider: str
    captured_at: datetime
    expires_at: datetime | None
    files: list[str]
    session_id: str | None

    @classmethod
    def of(cls, row: CredentialRow) -> CredentialView:
        return cls(
            provider=row.provider,
            captured_at=row.captured_at,
            expires_at=row.expires_at,
            files=[f for f in row.files.split(",") if f],
            session_id=row.session_id,
        )


class ValidationView(Camel):
    user_id: str
    provider: str
    valid: bool
    reason: str
    expires_at: float | None


class ExportView(Camel):
    user_id: str
    provider: str
    files: dict[str, str]
    captured_at: datetime
