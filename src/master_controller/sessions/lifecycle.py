"""Transitions and endings, with what follows from them: egress follows the state (granted
only while the guest is ready or signing in), an ending closes the viewers (saying why) and
destroys the guest. Callers hold the session's lock (:mod:`sessions.work`) or take it here."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection
from dataclasses import replace

from master_controller.errors import ConfigError, MCError, SessionNotFound
from master_controller.network.egress import EgressProxy
from master_controller.network.identities import EgressIdentities
from master_controller.network.upstream import Upstream
from master_controller.runtimes.base import GuestState, Runtime
from master_controller.sessions import providers
from master_controller.sessions.ledger import SessionLedger
from master_controller.sessions.states import TERMINAL, VIEWABLE, State
from master_controller.sessions.work import SessionWork
from master_controller.settings import Settings
from master_controller.steps import StepRecord
from master_controller.store.models import SessionRow
from master_controller.viewing.relay import ViewerRegistry


class Lifecycle:
    def __init__(
        self,
        settings: Settings,
        ledger: SessionLedger,
        runtime: Runtime,
        viewers: ViewerRegistry,
        work: SessionWork,
        egress: EgressProxy | None,
        identities: EgressIdentities | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.runtime = runtime
        self.viewers = viewers
        self.work = work
        self.egress = egress
        # with upstreams: each session's user's checked exit (absent: no egress at all)
        self.identities = identities if identities is not None and identities.enabled else None
        self.exits: dict[str, Upstream] = {}

    async def choose_exit(self, row: SessionRow) -> None:
        """With upstreams configured: the user's exit, checked now (or recently), for the
        session's egress; raises NoEgressIdentity (the session must fail: never direct)."""
        if self.identities is None:
            return
        started = time.monotonic()
        identity = await self.identities.ensure(row.user_id)
        self.exits[row.id] = identity.upstream
        detail = f"{identity.upstream.name}, exit {identity.exit_address}"
        await self.ledger.record(
            row.id, StepRecord("egress upstream", time.monotonic() - started, True, detail)
        )

    def guest(self, row: SessionRow) -> GuestState:
        """The session's guest as its runtime recorded it."""
        if row.guest_id is None:
            raise SessionNotFound(f"session {row.id} has no guest")
        return self.runtime.load(row.guest_id)

    async def transition(self, session_id: str, new: State, reason: str = "") -> SessionRow:
        row = await self.ledger.transition(session_id, new, reason)
        if new == State.READY:  # the person's sign-in time starts when they can sign in
            row = await self.extend(session_id)
        self.follow_egress(row)
        return row

    async def extend(self, session_id: str) -> SessionRow:
        """``signin_time`` more from now for the person (within ``max_lifetime``)."""
        s = self.settings
        return await self.ledger.extend(session_id, s.signin_time, s.max_lifetime)

    def follow_egress(self, row: SessionRow) -> None:
        """Egress is granted to a guest only while its session is ready or signing in;
        leaving those states revokes it and closes the guest's open tunnels."""
        if self.egress is None or row.browser_ip is None:
            return
        try:
            allowed = State(row.state) in VIEWABLE
            allowance = (
                providers.allowance(self.settings, row.id, row.provider) if allowed else None
            )
        except ConfigError:  # oauth2 settings gone bad since the start: no egress, then
            allowance = None
        if State(row.state) in TERMINAL:
            self.exits.pop(row.id, None)
        if allowance is not None and self.identities is not None:
            exit_ = self.exits.get(row.id)  # fail closed: no checked exit, no egress
            allowance = None if exit_ is None else replace(allowance, upstream=exit_)
        if allowance is not None:
            self.egress.grant(row.browser_ip, allowance)
        else:
            self.egress.revoke(row.browser_ip)

    async def end_locked(
        self,
        session_id: str,
        state: State,
        reason: str,
        *,
        only_from: Collection[State] | None = None,
    ) -> SessionRow:
        """End the session (the caller holds its lock): persist, close its viewers,
        destroy its guest. With ``only_from``, a session no longer in one of those states
        is left as it is (a decision taken on an older reading does not apply)."""
        row = await self.ledger.get(session_id)
        if only_from is not None and State(row.state) not in only_from:
            return row
        row = await self.transition(session_id, state, reason)
        self.work.drop_watcher(session_id)
        await self.viewers.session_ended(session_id, f"session {state}: {reason}")
        if row.guest_id is not None:
            with contextlib.suppress(MCError):
                await self.runtime.destroy(self.runtime.load(row.guest_id))
        return row

    async def end(
        self,
        session_id: str,
        state: State,
        reason: str,
        *,
        only_from: Collection[State] | None = None,
    ) -> SessionRow:
        """End the session: its boot or resume is cancelled, a capture under way finishes
        first, then :meth:`end_locked`. An ended session cannot end again
        (SessionStateError) unless ``only_from`` says which states to end from."""
        await self.work.stop(session_id)
        async with self.work.lock(session_id):
            row = await self.end_locked(session_id, state, reason, only_from=only_from)
        if State(row.state) in TERMINAL:
            self.work.forget(session_id)
        return row
