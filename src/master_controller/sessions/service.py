"""Sign-in sessions, as the layers above see them: start, resume, hibernate, cancel, open a
URL, heartbeats, and what a viewer or an API answer needs of a session's guest.

Composed of parts with one job each: the :class:`~sessions.ledger.SessionLedger` (rows,
events, transitions), :class:`~sessions.work.SessionWork` (per-session lock and background
work), :class:`~sessions.lifecycle.Lifecycle` (transitions and endings, egress following the
state), :class:`~sessions.bringup.GuestBringUp` (boot and resume until the viewer path works),
:class:`~sessions.signin.SignIn` (login, watching, capture) and
:class:`~sessions.reaper.Reaper` (expiry, dead guests, restart reconciliation). This layer
knows nothing of HTTP: no routes, cookies or close codes; how to check a guest's viewer path
is handed to it."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from master_controller.agent_client import GuestAgent
from master_controller.credentials import CredentialStore
from master_controller.errors import (
    HibernateFailed,
    MCError,
    NoImage,
    SessionStateError,
    TooManySessions,
)
from master_controller.images.store import ImageStore
from master_controller.network.egress import EgressProxy
from master_controller.network.identities import EgressIdentities
from master_controller.runtimes.base import GuestFacts, GuestStatus, Runtime
from master_controller.sessions import guest_input, providers
from master_controller.sessions.admission import BootSlots
from master_controller.sessions.bringup import GuestBringUp, ViewerPathCheck
from master_controller.sessions.ledger import SessionLedger
from master_controller.sessions.lifecycle import Lifecycle
from master_controller.sessions.reaper import Reaper
from master_controller.sessions.signin import SignIn
from master_controller.sessions.states import (
    ACTIVE,
    CANCELLED,
    HOLDING,
    TERMINAL,
    VIEWABLE,
    State,
    check_transition,
)
from master_controller.sessions.work import SessionWork
from master_controller.settings import Settings
from master_controller.steps import StepRecord
from master_controller.store.database import Database
from master_controller.store.models import SessionRow
from master_controller.viewing.relay import ViewerRegistry


@dataclass(frozen=True)
class ViewerTarget:
    """Where the relay reaches a session's screen: the guest's VNC server (``vnc://``, RFB
    over TCP) and its password (which never leaves the controller)."""

    vnc_url: str
    vnc_password: str


class SessionService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        runtime: Runtime,
        viewers: ViewerRegistry,
        credentials: CredentialStore,
        viewer_path: ViewerPathCheck,
        egress: EgressProxy | None = None,
        identities: EgressIdentities | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.viewers = viewers
        self.ledger = SessionLedger(db)
        self.work = SessionWork()
        self.lifecycle = Lifecycle(
            settings, self.ledger, runtime, viewers, self.work, egress, identities
        )
        self.identities = identities
        self.sign_in = SignIn(self.lifecycle, credentials)
        self.slots = BootSlots(settings.max_concurrent_boots)
        self.bring_up = GuestBringUp(self.lifecycle, self.sign_in, viewer_path, self.slots)
        self.reaper = Reaper(self.lifecycle, self.sign_in)
        self.images = ImageStore(settings.images_dir)
        self._admission = asyncio.Lock()  # capacity checks and admissions, one at a time

    # --- reading ---------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionRow:
        return await self.ledger.get(session_id)

    def guest_facts(self, row: SessionRow) -> GuestFacts:
        """What the API shows of a session's guest (its status; a snapshot's size)."""
        try:
            return self.runtime.describe(self.lifecycle.guest(row))
        except MCError:
            return GuestFacts(GuestStatus.DESTROYED)

    def queue_position(self, session_id: str) -> int | None:
        """How many starts wait for a boot slot ahead of this session's (None: it is not
        waiting)."""
        return self.slots.ahead_of(session_id)

    def is_capturing(self, session_id: str) -> bool:
        """Whether the session's valid credentials are being fetched and sealed right now."""
        return self.work.is_capturing(session_id)

    def viewer_target(self, row: SessionRow) -> ViewerTarget:
        """Where a viewer of a ready session is relayed to (raises MCError without one)."""
        guest = self.lifecycle.guest(row)
        url = self.runtime.endpoint(guest).vnc_url
        return ViewerTarget(vnc_url=url, vnc_password=guest.secrets.vnc_password)

    def agent(self, row: SessionRow) -> GuestAgent:
        """The agent of a session's running guest."""
        if State(row.state) not in VIEWABLE:
            raise SessionStateError(f"session {row.id} is {row.state}; its guest is not running")
        return self.sign_in.agent(row)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, user_id: str, provider: str, api_key_id: str | None) -> SessionRow:
        """Record a new session and boot its guest in the background."""
        providers.login_options(self.settings, provider)  # refuses what we cannot sign in to
        image_id = self.images.current()
        if image_id is None:
            raise NoImage("no promoted image: run `master-controller image ensure`")
        async with self._admission:
            self._check_capacity(await self.ledger.in_states(ACTIVE))
            held = await self.ledger.in_states(HOLDING)
            kept = {g.guest_id for g in self.runtime.guests()}
            held = [r for r in held if r.state != State.CAPTURED or r.guest_id in kept]
            self._check_quota(held, user_id, api_key_id)
            session_id = str(uuid.uuid4())
            row = await self.ledger.create(
                SessionRow(
                    id=session_id,
                    user_id=user_id,
                    provider=provider,
                    state=State.PROVISIONING,
                    reason="",
                    runtime=self.runtime.name,
                    image_id=image_id,
                    guest_id=session_id,
                    api_key_id=api_key_id,
                )
            )
        self.work.spawn(session_id, self.bring_up.boot(row))
        return row

    def _check_capacity(self, active: list[SessionRow]) -> None:
        if len(active) >= self.settings.max_sessions:
            raise TooManySessions(
                f"this host runs its maximum of {self.settings.max_sessions} sessions; "
                "try again when one has ended"
            )

    def _check_quota(self, held: list[SessionRow], user_id: str, api_key_id: str | None) -> None:
        """Live plus hibernated sessions are capped per API key and per user, so one key
        (or one user) cannot fill the host's memory or disk with kept guests."""
        s = self.settings
        if sum(1 for r in held if r.api_key_id == api_key_id) >= s.max_sessions_per_key:
            raise TooManySessions(
                f"this API key holds its maximum of {s.max_sessions_per_key} live or "
                "hibernated sessions; cancel one first"
            )
        if sum(1 for r in held if r.user_id == user_id) >= s.max_sessions_per_user:
            raise TooManySessions(
                f"user {user_id[:128]!r} has the maximum of {s.max_sessions_per_user} live or "
                "hibernated sessions; cancel one first"
            )

    async def cancel(self, session_id: str) -> SessionRow:
        return await self.lifecycle.end(session_id, State.TERMINATED, CANCELLED)

    async def hibernate(self, session_id: str) -> SessionRow:
        """Save the session's guest (VMs: memory and disk; containers: disk) and free its CPU
        and memory. Its viewers are told the session is hibernated. A save that fails
        part-way leaves the guest running and the session where it was."""
        lifecycle = self.lifecycle
        # refused at once, not after waiting for an operation under way (a boot may queue)
        check_transition(State((await self.ledger.get(session_id)).state), State.HIBERNATING)
        await self.work.stop_watcher(session_id)  # the login starts again on resume
        async with self.work.lock(session_id):
            before = State((await self.ledger.get(session_id)).state)
            row = await lifecycle.transition(session_id, State.HIBERNATING)
            self.work.drop_watcher(session_id)  # one a boot started while we waited
            await self.viewers.session_hibernated(session_id)
            started = time.monotonic()
            try:
                await self.runtime.hibernate(lifecycle.guest(row))
            except HibernateFailed as exc:
                # nothing was lost: the guest runs on, so the session goes back to where it
                # was (its viewers reconnect) and the caller hears why
                seconds = time.monotonic() - started
                step = StepRecord("hibernate", seconds, False, exc.reason[:500])
                await self.ledger.record(session_id, step)
                row = await lifecycle.transition(
                    session_id, before, f"hibernate failed: {exc.reason}"
                )
                if before == State.AUTHENTICATING:
                    self.sign_in.watch(row)
                raise
            except MCError as exc:
                return await lifecycle.end_locked(
                    session_id, State.FAILED, f"hibernate failed: {exc.reason}"
                )
            step = StepRecord("hibernate", time.monotonic() - started, True)
            await self.ledger.record(session_id, step)
            return await lifecycle.transition(session_id, State.HIBERNATED)

    async def resume(self, session_id: str) -> SessionRow:
        """Start a hibernated session's guest again; ready once the viewer path works. A
        captured session resumes only if its guest was kept (wiped of its credentials)."""
        check_transition(State((await self.ledger.get(session_id)).state), State.RESUMING)
        # the session's lock first: waiting for it must not hold every other start back
        async with self.work.lock(session_id), self._admission:
            row = await self.ledger.get(session_id)
            if State(row.state) == State.CAPTURED:
                try:
                    guest = self.lifecycle.guest(row)
                    kept = self.runtime.status(guest) == GuestStatus.HIBERNATED
                except MCError:
                    kept = False
                if not kept:
                    raise SessionStateError(
                        f"session {session_id} is captured and its guest was destroyed; "
                        "start a new session to sign in again"
                    )
            self._check_capacity(await self.ledger.in_states(ACTIVE))
            row = await self.lifecycle.transition(session_id, State.RESUMING)
        self.work.spawn(session_id, self.bring_up.resume(row))
        return row

    async def open_url(self, session_id: str, url: str) -> None:
        """Open ``url`` in the session's guest Chromium (a new tab)."""
        row = await self.ledger.get(session_id)
        if State(row.state) not in VIEWABLE:
            raise SessionStateError(f"session {session_id} is {row.state}; it has no browser now")
        await self.sign_in.agent(row).open_url(url)
        opened = StepRecord("open url", 0.0, True, guest_input.origin(url) or "")
        await self.ledger.record(session_id, opened)

    async def paste(self, session_id: str, text: str) -> None:
        """Put the viewer's text on the guest's clipboard (nothing of it is recorded)."""
        await (await self._viewable_agent(session_id)).set_clipboard(text)

    async def copy(self, session_id: str) -> str:
        """The guest's clipboard text (what the person copied there; nothing recorded)."""
        return await (await self._viewable_agent(session_id)).get_clipboard()

    async def fit_screen(self, session_id: str, width: int, height: int) -> tuple[int, int]:
        """Resize the guest's screen for a viewer's window; the size it has after."""
        return await (await self._viewable_agent(session_id)).set_display(width, height)

    async def _viewable_agent(self, session_id: str) -> GuestAgent:
        row = await self.ledger.get(session_id)
        if State(row.state) not in VIEWABLE:
            raise SessionStateError(f"session {session_id} is {row.state}; it has no browser now")
        return self.sign_in.agent(row)

    async def heartbeat(self, session_id: str) -> SessionRow:
        row = await self.ledger.get(session_id)
        if State(row.state) in TERMINAL:
            raise SessionStateError(f"the session has ended ({row.state})")
        return await self.lifecycle.extend(session_id)

    async def viewer_activity(self, session_id: str) -> None:
        await self.ledger.touch(session_id)

    # --- background ------------------------------------------------------------------------

    async def reconcile(self) -> None:
        await self.reaper.reconcile()

    def start_background(self) -> None:
        self.reaper.start()

    async def shutdown(self) -> None:
        """Stop background work. Guests keep running: they outlive the controller."""
        await self.reaper.stop()
        await self.work.shutdown()
