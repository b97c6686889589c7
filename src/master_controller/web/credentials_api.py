"""Sign-in progress and captured credentials: the OAuth URL, credential status, stored
credentials' metadata, validation, deletion, and the audited export of decrypted files
(for keys with the ``export`` scope only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path

from master_controller.auth import Caller, Forbidden
from master_controller.errors import CredentialsNotFound, SessionStateError
from master_controller.sessions.agent import GuestAgent
from master_controller.sessions.states import VIEWABLE, State
from master_controller.store.models import CredentialRow, SessionRow
from master_controller.web.deps import Services, caller, owned_session, services
from master_controller.web.schemas import (
    USER_ID_PATTERN,
    CredentialStatusView,
    CredentialView,
    ExportView,
    OAuthUrlView,
    OkResponse,
    ValidationView,
)
from mc_agent.providers import CredentialStatus

router = APIRouter(prefix="/api/auth")
PROVIDER_PATTERN = r"^[a-z0-9_]{1,32}$"
UserId = Path(pattern=USER_ID_PATTERN)
ProviderName = Path(pattern=PROVIDER_PATTERN)


def _visible(row: CredentialRow, who: Caller) -> bool:
    return row.api_key_id == who.key_id or "admin" in who.scopes


def _require(who: Caller, scope: str) -> None:
    if scope not in who.scopes and not (scope == "sessions" and "admin" in who.scopes):
        raise Forbidden(f"this API key lacks the {scope!r} scope")


async def _agent(svc: Services, row: SessionRow) -> GuestAgent:
    if State(row.state) not in VIEWABLE:
        raise SessionStateError(f"session {row.id} is {row.state}; its guest is not running")
    return GuestAgent(svc.runtime, svc.sessions.guest(row))


@router.get("/session/{session_id}/oauth-url", response_model=OAuthUrlView)
async def oauth_url(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> OAuthUrlView:
    """The sign-in URL the provider's CLI opened (or printed) in the guest."""
    login = await (await _agent(svc, row)).login()
    return OAuthUrlView(
        session_id=row.id,
        provider=row.provider,
        url=login.get("auth_url"),
        opened_urls=login.get("opened_urls", []),
        terminal_urls=login.get("terminal_urls", []),
        prompts_answered=login.get("prompts_answered", []),
    )


@router.get("/session/{session_id}/credentials/status", response_model=CredentialStatusView)
async def credential_status(
    row: SessionRow = Depends(owned_session), svc: Services = Depends(services)
) -> CredentialStatusView:
    """Whether the session's sign-in produced valid credentials (and whether they are
    stored already)."""
    stored = row.state == State.CAPTURED
    if stored:
        status = await svc.credentials.validate(row.user_id, row.provider)
    else:
        data = await (await _agent(svc, row)).credential_status()
        status = CredentialStatus(data["valid"], data["reason"], data.get("expires_at"))
    return CredentialStatusView(
        session_id=row.id,
        provider=row.provider,
        valid=status.valid,
        reason=status.reason,
        expires_at=status.expires_at,
        stored=stored,
    )


@router.get("/credentials/{user_id}", response_model=list[CredentialView])
async def list_credentials(
    user_id: str = UserId, who: Caller = Depends(caller), svc: Services = Depends(services)
) -> list[CredentialView]:
    """The user's stored credentials: provider, when captured, expiry. No secrets."""
    _require(who, "sessions")
    rows = [r for r in await svc.credentials.for_user(user_id) if _visible(r, who)]
    return [CredentialView.of(r) for r in rows]


async def _owned(svc: Services, who: Caller, user_id: str, provider: str) -> CredentialRow:
    row = await svc.credentials.get(user_id, provider)
    if not _visible(row, who):
        raise CredentialsNotFound(f"no {provider} credentials for {user_id!r}")
    return row


@router.get("/validate/{user_id}/{provider}", response_model=ValidationView)
async def validate(
    user_id: str = UserId,
    provider: str = ProviderName,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
) -> ValidationView:
    """Whether the stored credentials decrypt and pass the provider's checks (fields,
    expiry)."""
    _require(who, "sessions")
    await _owned(svc, who, user_id, provider)
    status = await svc.credentials.validate(user_id, provider)
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
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
) -> OkResponse:
    _require(who, "sessions")
    await _owned(svc, who, user_id, provider)
    await svc.credentials.delete(user_id, provider, who.key_id)
    return OkResponse(status="deleted")


@router.post("/credentials/{user_id}/{provider}/export", response_model=ExportView)
async def export_credentials(
    user_id: str = UserId,
    provider: str = ProviderName,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
) -> ExportView:
    """The decrypted credential files, for keys with the ``export`` scope; every export is
    written to the audit log."""
    _require(who, "export")
    exported = await svc.credentials.export(user_id, provider, who.key_id)
    return ExportView(
        user_id=user_id,
        provider=provider,
        files=exported["files"],
        captured_at=exported["captured_at"],
    )
