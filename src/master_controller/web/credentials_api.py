"""Sign-in progress and captured credentials: the OAuth URL, credential status, stored
credentials' metadata, validation, deletion, and the audited export of decrypted files
(for keys with the ``export`` scope only).

Stored credentials belong to the API key whose session captured them: a key lists,
validates, deletes and exports only its own records (another key's are "not found"). An
admin key reaches every key's records; if a user's credentials for a provider were captured
through several keys, it says which with ``?apiKeyId=`` and gets 409 with the candidates
otherwise (acting on all of them at once, or on one picked for it, would export or delete
what the caller did not name). Export also needs the ``export`` scope, which ``admin`` does
not imply."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse
from pydantic import Field

from master_controller.auth import Caller
from master_controller.credentials import NO_KEY
from master_controller.errors import CredentialsNotFound
from master_controller.sessions.states import State
from master_controller.store.models import CredentialRow, SessionRow
from master_controller.web.deps import (
    Services,
    UserId,
    acting_user,
    caller,
    check_acting_user,
    owned_session,
    services,
)
from master_controller.web.schemas import (
    Camel,
    CredentialStatusView,
    CredentialView,
    ExportView,
    OAuthUrlView,
    OkResponse,
    ValidationView,
)
from mc_agent.providers import CredentialStatus

router = APIRouter(prefix="/api/auth")
NOT_FOUND = "not_found"  # validation's reason when there is no record (as the original said)
PROVIDER_PATTERN = r"^[a-z0-9_]{1,32}$"
ProviderName = Path(pattern=PROVIDER_PATTERN)
OfKey = Query(
    None,
    alias="apiKeyId",
    pattern=rf"^([0-9a-f-]{{36}}|{NO_KEY})$",
    description="Whose record (admin keys, when a user's credentials for the provider were "
    f"captured through several API keys): an API key id, or {NO_KEY!r} for a record "
    "captured without one. A non-admin key may name only itself.",
)


class StoredCredentialView(CredentialView):
    api_key_id: str | None = Field(
        description="The API key whose session captured them (null: captured without one)."
    )

    @classmethod
    def of_row(cls, row: CredentialRow) -> StoredCredentialView:
        return cls(**CredentialView.of(row).model_dump(), api_key_id=row.api_key_id)


@router.get(
    "/session/{session_id}/oauth-url",
    response_model=OAuthUrlView,
    responses={202: {"description": "Not known yet (``waiting: true``): ask again."}},
)
async def oauth_url(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> OAuthUrlView | JSONResponse:
    """The sign-in URL the provider's CLI opened (or printed) in the guest: 200 with
    ``oauthUrl`` once known, 202 with ``waiting: true`` until then."""
    login = await svc.sessions.agent(row).login()
    url = login.get("auth_url")
    view = OAuthUrlView(
        session_id=row.id,
        provider=row.provider,
        url=url,
        oauth_url=url,
        waiting=url is None,
        opened_urls=login.get("opened_urls", []),
        terminal_urls=login.get("terminal_urls", []),
        prompts_answered=login.get("prompts_answered", []),
    )
    if view.url is None:
        return JSONResponse(view.model_dump(mode="json", by_alias=True), status_code=202)
    return view


@router.get("/session/{session_id}/credentials/status", response_model=CredentialStatusView)
async def credential_status(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> CredentialStatusView:
    """Whether the session's sign-in produced valid credentials (and whether they are
    stored already)."""
    stored = row.state == State.CAPTURED
    record = None
    if stored:
        # the record this session's key holds, not another key's record of the same user
        status = await svc.credentials.validate(row.user_id, row.provider, row.api_key_id)
        record = await svc.credentials.get(row.user_id, row.provider, row.api_key_id)
    else:
        data = await svc.sessions.agent(row).credential_status()
        status = CredentialStatus(data["valid"], data["reason"], data.get("expires_at"))
    return CredentialStatusView(
        session_id=row.id,
        provider=row.provider,
        authenticated=status.valid,
        valid=status.valid,
        reason=status.reason,
        expires_at=status.expires_at,
        stored=stored,
        credentials=None if record is None else CredentialView.of(record),
    )


class StoredCredentials(Camel):
    credentials: list[StoredCredentialView]


@router.get("/credentials/{user_id}", response_model=StoredCredentials)
async def list_credentials(
    user_id: str = UserId,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> StoredCredentials:
    """The user's stored credentials that this key's sessions captured (every key's, for an
    admin key): provider, when captured, expiry, which key. No secrets."""
    who.require("sessions")
    check_acting_user(acting_for, user_id)
    rows = await svc.credentials.for_user(user_id, who.key_id, admin=who.admin)
    return StoredCredentials(credentials=[StoredCredentialView.of_row(r) for r in rows])


@router.get("/validate/{user_id}/{provider}", response_model=ValidationView)
async def validate(
    user_id: str = UserId,
    provider: str = ProviderName,
    of_key: str | None = OfKey,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> ValidationView:
    """Whether the stored credentials decrypt and pass the provider's checks (fields,
    expiry); ``valid: false, reason: "not_found"`` when there are none."""
    who.require("sessions")
    check_acting_user(acting_for, user_id)
    try:
        status = await svc.credentials.validate(
            user_id, provider, who.key_id, admin=who.admin, of_key=of_key
        )
    except CredentialsNotFound:
        status = CredentialStatus(False, NOT_FOUND)
    return ValidationView(
        user_id=user_id,
        provider=provider,
        valid=status.valid,
        reason=status.reason,
        expires_at=status.expires_at,
    )


@router.delete("/credentials/{user_id}/{provider}", response_model=OkResponse)
async def delete_credentials(
    user_id: str = UserId,
    provider: str = ProviderName,
    of_key: str | None = OfKey,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> OkResponse:
    """Delete the stored credentials (audited)."""
    who.require("sessions")
    check_acting_user(acting_for, user_id)
    await svc.credentials.delete(user_id, provider, who.key_id, admin=who.admin, of_key=of_key)
    return OkResponse(status="deleted")


@router.post("/credentials/{user_id}/{provider}/export", response_model=ExportView)
async def export_credentials(
    user_id: str = UserId,
    provider: str = ProviderName,
    of_key: str | None = OfKey,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> ExportView:
    """The decrypted credential files, for keys with the ``export`` scope, of a record this
    key's sessions captured (any key's, if the key is also ``admin``); every export is
    written to the audit log."""
    who.require("export")
    check_acting_user(acting_for, user_id)
    exported = await svc.credentials.export(
        user_id, provider, who.key_id, admin=who.admin, of_key=of_key
    )
    return ExportView(
        user_id=user_id,
        provider=provider,
        files=exported["files"],
        captured_at=exported["captured_at"],
    )
