"""A user's VM, as the original clients address it: by user id rather than session id.

A user's VM is the guest of their newest session this key started that still holds one
(running, or kept hibernated). Hibernating, resuming and deleting it act on that session.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends

from master_controller.auth import Caller
from master_controller.errors import ConfigError, SessionNotFound
from master_controller.sessions.states import HOLDING, VIEWABLE, State
from master_controller.store import repo
from master_controller.store.models import SessionRow
from master_controller.web.api import action_view, vm_view
from master_controller.web.deps import (
    Services,
    UserId,
    acting_user,
    caller,
    check_acting_user,
    require_scope,
    services,
)
from master_controller.web.schemas import ActionView, EgressView, UsersVmView

router = APIRouter(prefix="/api/users", dependencies=[require_scope("sessions")])  # type: ignore[list-item]


@dataclass(frozen=True)
class ForUser:
    """A request about one end user: who asks (their key), for which user, with what."""

    user_id: str
    who: Caller
    svc: Services

    async def session(self, states: frozenset[State], what: str = "") -> SessionRow:
        """The user's newest session this key started that is in ``states``."""
        async with self.svc.db.session() as db:
            rows = await repo.list_sessions(db, user_id=self.user_id, states=sorted(states))
        mine = [r for r in rows if self.who.owns(r.api_key_id)]
        if not mine:
            raise SessionNotFound(f"user {self.user_id[:128]!r} has no VM {what}".rstrip())
        return mine[0]


def for_user(
    user_id: str = UserId,
    who: Caller = Depends(caller),
    svc: Services = Depends(services),
    acting_for: str | None = Depends(acting_user),
) -> ForUser:
    check_acting_user(acting_for, user_id)
    return ForUser(user_id, who, svc)


@router.get("/{user_id}/vm", response_model=UsersVmView)
async def get_users_vm(asked: ForUser = Depends(for_user)) -> UsersVmView:
    """The user's VM (404 when they have none)."""
    return UsersVmView(vm=vm_view(asked.svc, await asked.session(HOLDING)))


@router.delete("/{user_id}/vm", response_model=ActionView)
async def delete_users_vm(asked: ForUser = Depends(for_user)) -> ActionView:
    """End the user's session that holds their VM; the VM is destroyed."""
    row = await asked.session(HOLDING)
    ended = await asked.svc.sessions.cancel(row.id)
    return await action_view(asked.svc, ended, "the VM was destroyed")


@router.post("/{user_id}/vm/hibernate", response_model=ActionView)
async def hibernate_users_vm(asked: ForUser = Depends(for_user)) -> ActionView:
    """Hibernate the user's newest live session."""
    row = await asked.session(VIEWABLE, "that can hibernate")
    saved = await asked.svc.sessions.hibernate(row.id)
    return await action_view(asked.svc, saved, "the VM was hibernated")


@router.post("/{user_id}/vm/resume", response_model=ActionView)
async def resume_users_vm(asked: ForUser = Depends(for_user)) -> ActionView:
    """Resume the user's newest hibernated session."""
    row = await asked.session(frozenset({State.HIBERNATED}), "hibernated")
    resumed = await asked.svc.sessions.resume(row.id)
    return await action_view(asked.svc, resumed, "the VM is resuming")


async def _egress_view(svc: Services, user_id: str) -> EgressView:
    identities = svc.sessions.identities
    row = None
    if identities is not None and identities.enabled:
        row = await identities.assignment(user_id)
    return EgressView(
        user_id=user_id,
        direct=identities is None or not identities.enabled,
        upstream=None if row is None else row.upstream,
        exit_address=None if row is None else row.exit_address,
        assigned_at=None if row is None else row.assigned_at,
        checked_at=None if row is None else row.checked_at,
        check_ok=None if row is None else row.check_ok,
        last_error="" if row is None else row.last_error,
    )


@router.get("/{user_id}/egress", response_model=EgressView)
async def get_users_egress(asked: ForUser = Depends(for_user)) -> EgressView:
    """The user's egress identity (none yet before their first sign-in): for admin keys,
    and for a key that started a session of this user."""
    if not asked.who.admin:
        await asked.session(frozenset(State))
    return await _egress_view(asked.svc, asked.user_id)


@router.post(
    "/{user_id}/egress/reassign",
    response_model=EgressView,
    dependencies=[require_scope("admin")],  # type: ignore[list-item]
)
async def reassign_users_egress(asked: ForUser = Depends(for_user)) -> EgressView:
    """Move the user to another upstream that passes its check (their next sign-in leaves
    through it); 503 if none does. Admin keys only: an exit is shared by every key's
    sessions of that user."""
    identities = asked.svc.sessions.identities
    if identities is None or not identities.enabled:
        raise ConfigError("no egress upstreams are configured: traffic leaves this host")
    await identities.reassign(asked.user_id)
    return await _egress_view(asked.svc, asked.user_id)
