"""The API's request and response bodies (camelCase on the wire, as the system we replace)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    computed_field,
)
from pydantic.alias_generators import to_camel

from master_controller.agent_client import MAX_SCREEN_SIDE
from master_controller.sessions.states import ACTIVE, State
from master_controller.store.models import CredentialRow, EventRow, SessionRow
from master_controller.web.original import OriginalStatus, original_status
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
    webrtc_offer: dict[str, Any] | None = Field(
        None,
        description="Accepted and ignored (the original dashboard sends one): the guest's "
        "screen is streamed with noVNC, never WebRTC; see GET /api/webrtc/ice-servers.",
    )


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


class OriginalSession(Camel):
    """A session as the original clients read it (in ``session``, and in user listings)."""

    session_id: str
    user_id: str
    provider: str
    status: OriginalStatus = Field(description="The original system's status vocabulary.")
    browser_ip: str | None = Field(alias="browserIP")
    browser_vm_id: str | None = Field(alias="browserVMId")
    novnc_url: str | None = Field(alias="novncURL")
    started_at: datetime
    created_at: datetime
    is_active: bool = Field(
        description="The sign-in is under way (not yet captured, saved or ended)."
    )

    @classmethod
    def of(cls, row: SessionRow, capturing: bool, novnc_url: str | None) -> OriginalSession:
        return cls(
            session_id=row.id,
            user_id=row.user_id,
            provider=row.provider,
            status=original_status(row.state, row.reason, capturing),
            browser_ip=row.browser_ip,
            browser_vm_id=row.guest_id,
            novnc_url=novnc_url,
            started_at=row.created_at,
            created_at=row.created_at,
            is_active=State(row.state) in ACTIVE,
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
    ends_at: datetime | None = Field(
        None, description="When the sign-in time runs out; POST .../heartbeat extends it."
    )
    viewers: int
    queue_position: int | None = Field(
        None, description="While queued for a boot slot: how many starts are ahead of it."
    )
    novnc_url: str | None = Field(None, alias="novncURL")
    session: OriginalSession = Field(description="The session as the original clients read it.")
    events: list[EventView] = []


class VmView(Camel):
    vm_id: str
    session_id: str
    user_id: str
    provider: str
    status: str
    session_status: str
    address: str | None
    runtime: str
    image_id: str
    snapshot_bytes: int | None = Field(
        None, description="Size of the saved memory state of a hibernated VM."
    )
    last_heartbeat: datetime = Field(alias="last_heartbeat", description="Last activity.")

    # the original's names for the same facts (its web app and dashboard read these)
    @computed_field(alias="id")  # type: ignore[prop-decorator]
    @property
    def original_id(self) -> str:
        return self.vm_id

    @computed_field(alias="vm_id")  # type: ignore[prop-decorator]
    @property
    def original_vm_id(self) -> str:
        return self.vm_id

    @computed_field(alias="user_id")  # type: ignore[prop-decorator]
    @property
    def original_user_id(self) -> str:
        return self.user_id

    @computed_field(alias="ip_address")  # type: ignore[prop-decorator]
    @property
    def ip_address(self) -> str | None:
        return self.address


class ViewerStatus(Camel):
    status: str
    reason: str
    ready: bool
    ended: bool
    queue_position: int | None = None
    provider: str
    provider_title: str = Field(description="The CLI tool's name, for people.")
    ends_at: datetime | None = Field(
        None, description="When the sign-in time runs out (a heartbeat extends it)."
    )
    seconds_left: float | None = Field(
        None, description="Until ends_at, by the controller's clock (None: not counting)."
    )
    latest_end: datetime = Field(description="created + max_lifetime: no extension passes it.")
    copy_out: bool = Field(False, description="Whether the page may copy text out of the guest.")
    events: list[EventView]


class PasteRequest(Camel):
    # a password, a code, an address: at most 1,024 characters, which stay within the agent's
    # 16 KiB body bound however they are JSON-escaped
    text: str = Field(min_length=1, max_length=1024, description="What the person pastes.")


class CopiedText(Camel):
    text: str = Field(description="The guest's clipboard text (empty: nothing copied).")


class ScreenSize(Camel):
    # what a window asks for; the guest clamps it to the sizes its display supports
    width: int = Field(ge=1, le=MAX_SCREEN_SIDE, description="Width in pixels.")
    height: int = Field(ge=1, le=MAX_SCREEN_SIDE, description="Height in pixels.")


class OkResponse(Camel):
    success: bool = True
    status: str


class OAuthUrlView(Camel):
    session_id: str
    provider: str
    url: str | None = Field(description="The sign-in URL (opened in the guest, or printed).")
    oauth_url: str | None = Field(description="The same (the original's name).")
    waiting: bool = Field(description="Not known yet (answered with 202): ask again.")
    opened_urls: list[str]
    terminal_urls: list[str]
    prompts_answered: list[str]


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


class CredentialStatusView(Camel):
    session_id: str
    provider: str
    authenticated: bool = Field(description="Valid credentials are there (the original's).")
    valid: bool
    reason: str
    expires_at: float | None = Field(description="Unix time the credentials expire, if known.")
    stored: bool = Field(description="Whether they are in the vault already.")
    credentials: CredentialView | None = Field(
        None, description="Once stored: the record's metadata (never its secrets)."
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


class UserSessions(Camel):
    sessions: list[OriginalSession]
    total_active: int


class VmList(Camel):
    vms: list[VmView]


class UsersVmView(Camel):
    vm: VmView


class ActionView(SessionView):
    """A session after an action (cancel, a user's VM hibernated...): the session, and
    the original's ``success`` and ``message``."""

    success: bool = True
    message: str


class EgressView(Camel):
    """A user's egress identity: the upstream their guests leave through (its URL, never
    its login), the exit address its last check found, and why it last moved or failed."""

    user_id: str
    direct: bool = Field(description="No upstreams are configured: traffic leaves this host.")
    upstream: str | None
    exit_address: str | None
    assigned_at: datetime | None
    checked_at: datetime | None
    check_ok: bool | None
    last_error: str
