"""The sign-in: the provider's login started in a ready guest, watched until its credentials
are valid, then captured: fetched once, checked here, sealed in the vault, and the guest made
harmless (destroyed, or wiped and hibernated)."""

from __future__ import annotations

import asyncio
import logging
import time

from master_controller.agent_client import GuestAgent
from master_controller.credentials import Captured, CredentialStore
from master_controller.errors import GuestAgentError, MCError
from master_controller.runtimes.base import GuestState
from master_controller.sessions import guest_input, providers
from master_controller.sessions.ledger import session_fields
from master_controller.sessions.lifecycle import Lifecycle
from master_controller.sessions.states import State
from master_controller.steps import StepRecord
from master_controller.store.models import SessionRow

log = logging.getLogger("master_controller.sessions")
WATCH_INTERVAL = 1.0


class SignIn:
    def __init__(self, lifecycle: Lifecycle, credentials: CredentialStore) -> None:
        self.lifecycle = lifecycle
        self.credentials = credentials
        self.settings = lifecycle.settings
        self.watch_interval = WATCH_INTERVAL  # seconds between looks at the login

    def agent(self, row: SessionRow) -> GuestAgent:
        return GuestAgent(self.lifecycle.runtime, self.lifecycle.guest(row))

    async def start_if_due(self, row: SessionRow) -> None:
        """Start the login in a ready guest (the caller holds the session's lock), unless
        logins start by hand (``auto_login`` off) or this session's sign-in is stored."""
        if self.settings.auto_login and not await self._captured(row):
            await self.start_login(row.id)

    async def start_login(self, session_id: str) -> None:
        """ready -> authenticating: the provider's login runs in the guest, and is watched
        until valid credentials are there. The caller holds the session's lock."""
        row = await self.lifecycle.transition(session_id, State.AUTHENTICATING)
        await self.agent(row).start_login(
            row.provider, providers.login_options(self.settings, row.provider)
        )
        self.watch(row)

    def watch(self, row: SessionRow) -> None:
        self.lifecycle.work.watch(row.id, self._follow(row))

    async def _captured(self, row: SessionRow) -> bool:
        try:
            # the record of this session's own key: another key's capture of the same user
            # says nothing about this session
            stored = await self.credentials.get(row.user_id, row.provider, row.api_key_id)
        except MCError:
            return False
        return stored.session_id == row.id

    async def _follow(self, row: SessionRow) -> None:
        """Record what the agent saw (prompts answered, the auth URL) as events until the
        credentials are valid, then capture them under the session's lock."""
        session_id, lifecycle, interval = row.id, self.lifecycle, self.watch_interval
        agent = self.agent(row)
        reported: set[str] = set()
        try:
            while True:
                try:
                    login: object = await agent.login()
                except GuestAgentError as exc:
                    log.info(
                        "session %s: agent not answering (%s)",
                        session_id,
                        exc.reason,
                        extra=session_fields(row),
                    )
                    await asyncio.sleep(interval)
                    continue
                report = guest_input.login_report(row.provider, login)
                for name in report.prompts_answered:
                    await self._note(session_id, reported, f"prompt: {name}", "answered")
                if report.auth_origin:
                    await self._note(session_id, reported, "auth url", report.auth_origin)
                if report.credentials_valid:
                    break
                await asyncio.sleep(interval)
        except Exception as exc:
            await lifecycle.end(
                session_id, State.FAILED, _why(session_id, exc), only_from={State.AUTHENTICATING}
            )
            return
        async with lifecycle.work.capturing(session_id):
            row = await lifecycle.ledger.get(session_id)
            if State(row.state) != State.AUTHENTICATING:  # ended or hibernated meanwhile
                return
            try:
                await self._capture(row, agent)
            except Exception as exc:
                await lifecycle.end_locked(
                    session_id,
                    State.FAILED,
                    _why(session_id, exc),
                    only_from={State.AUTHENTICATING},
                )

    async def finish_if_stored(self, row: SessionRow) -> bool:
        """At start-up: whether this authenticating session's credentials were stored by a
        controller that stopped before the session was captured; if so, the capture is
        finished now (its guest destroyed, or kept as ``after_capture`` says)."""
        if not await self._captured(row):
            return False
        lifecycle = self.lifecycle
        async with lifecycle.work.lock(row.id):
            row = await lifecycle.ledger.get(row.id)
            if State(row.state) != State.AUTHENTICATING:
                return True
            try:
                agent = self.agent(row)
            except MCError:
                reason = "credentials stored; its guest was gone"
                await lifecycle.transition(row.id, State.CAPTURED, reason)
                return True
            await self._capture(row, agent)
        return True

    async def _note(self, session_id: str, reported: set[str], name: str, detail: str) -> None:
        if name not in reported:
            reported.add(name)
            await self.lifecycle.ledger.record(session_id, StepRecord(name, 0.0, True, detail))

    async def _capture(self, row: SessionRow, agent: GuestAgent) -> None:
        """Fetch the credentials once, check them here, seal them in the vault, then make
        sure no one can reach them through the guest again: its viewers are closed and its
        egress revoked at once, and the guest is destroyed, or (``after_capture =
        "hibernate"``) kept only after its agent wiped the credential files and the
        provider's browser session out of it."""
        lifecycle = self.lifecycle
        started = time.monotonic()
        if lifecycle.egress is not None and row.browser_ip is not None:
            lifecycle.egress.revoke(row.browser_ip)
        await lifecycle.viewers.session_ended(row.id, "credentials captured")
        if await self._captured(row):
            # stored already: a controller stopped after the store and before the session
            # was captured (the agent hands the files out once); only the guest is left
            log.info(
                "session %s: credentials stored before a restart", row.id, extra=session_fields(row)
            )
        else:
            checked = guest_input.credentials(row.provider, await agent.fetch_credentials())
            captured = Captured(
                provider=row.provider, files=checked.files, expires_at=checked.status.expires_at
            )
            stored = await self.credentials.store(row.user_id, captured, row.id, row.api_key_id)
            seconds = time.monotonic() - started
            await lifecycle.ledger.record(
                row.id, StepRecord("credentials stored", seconds, True, stored.files)
            )
        # the sign-in has succeeded: whatever becomes of the guest, the session is captured
        outcome = await self._make_harmless(row, agent)
        await lifecycle.transition(row.id, State.CAPTURED, f"credentials stored; {outcome}")

    async def _make_harmless(self, row: SessionRow, agent: GuestAgent) -> str:
        """Destroy the captured session's guest, or keep it wiped and hibernated; says what
        became of it. A guest that could not be destroyed is left to the reaper, which
        destroys a captured session's guest unless it is hibernated."""
        lifecycle = self.lifecycle
        try:
            guest = lifecycle.guest(row)
        except MCError:
            return "its guest was gone"
        outcome = "guest destroyed"
        if self.settings.after_capture == "hibernate":
            outcome = await self._wipe_and_hibernate(row.id, agent, guest)
        if outcome != "guest hibernated":
            try:
                await lifecycle.runtime.destroy(guest)
            except MCError as exc:
                await lifecycle.ledger.record(
                    row.id, StepRecord("destroy guest", 0.0, False, exc.reason[:500])
                )
                return f"destroying the guest failed ({exc.reason}); the reaper retries"
        return outcome

    async def _wipe_and_hibernate(
        self, session_id: str, agent: GuestAgent, guest: GuestState
    ) -> str:
        """Keep a captured guest only without its credentials; says what became of it."""
        record = self.lifecycle.ledger.record
        started = time.monotonic()
        try:
            wiped = await agent.wipe_credentials()
        except GuestAgentError as exc:
            seconds = time.monotonic() - started
            await record(
                session_id, StepRecord("wipe credentials", seconds, False, exc.reason[:500])
            )
            return f"wiping the credentials in the guest failed ({exc.reason}), so it was destroyed"
        count = wiped.get("removed_count") if isinstance(wiped, dict) else None
        fresh = isinstance(wiped, dict) and wiped.get("chromium") == "active"
        detail = f"{count if isinstance(count, int) else '?'} files removed"
        seconds = time.monotonic() - started
        await record(session_id, StepRecord("wipe credentials", seconds, fresh, detail))
        if not fresh:  # a browser that did not come back fresh is not worth keeping
            return "the guest's browser did not restart after the wipe, so it was destroyed"
        try:
            await self.lifecycle.runtime.hibernate(guest)
        except MCError as exc:
            # HibernateFailed (it runs on), or any other error (its state unknown): the
            # credentials are safe, and the guest is not kept
            return f"hibernating failed ({exc.reason}), so the guest was destroyed"
        return "guest hibernated"


def _why(session_id: str, exc: Exception) -> str:
    if isinstance(exc, MCError):
        return f"capturing the credentials failed: {exc.reason}"
    # a bug: say so, rather than leave it authenticating
    log.error(
        "session %s: following the login failed",
        session_id,
        exc_info=exc,
        extra={"session_id": session_id},
    )
    return (
        f"capturing the credentials failed: internal error ({type(exc).__name__}); "
        "see the controller's log"
    )
