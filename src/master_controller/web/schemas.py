"""The API's request and response bodies (camelCase on the wire, as the system we replace)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from master_controller.store.models import EventRow

Provider = Literal["claude_code", "codex", "gemini_cli"]
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
    events: list[EventView]


class OkResponse(Camel):
    success: bool = True
    status: str
