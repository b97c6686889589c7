"""Running sign-in sessions: start, readiness, cancel, limits, expiry, reconciliation.

Every state change goes through :meth:`SessionManager.transition`, which checks it against
the state machine and persists it (with an event) before anything acts on it, so a
restarted controller finds the truth in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TypeVar
from urllib.parse import urlsplit

from master_controller.auth import Tickets
from master_controller.credentials import Captured, CredentialStore
from master_controller.errors import (
    ConfigError,
    GuestAgentError,
    HibernateFailed,
    MCError,
    NoImage,
    ProbeError,
    SessionNotFound,
    SessionStateError,
    TooManySessions,
)
from master_controller.images.store import ImageStore
from master_controller.network.egress import Allowance, EgressProxy
from master_controller.readiness import (
    guest_give_up,
    non_blank_frame,
    poll,
    rfb_handshake,
    websocket_upgrade,
)
from master_controller.runtimes.base import GuestSecrets, GuestState, GuestStatus, Runtime
from master_controller.sessions import guest_input
from master_controller.sessions.agent import GuestAgent
from master_controller.sessions.states import (
    ACTIVE,
    HOLDING,
    TERMINAL,
    VIEWABLE,
    State,
    check_transition,
)
from master_controller.settings import Settings
from master_controller.steps import StepLog, StepRecord
from master_controller.store import repo
from master_controller.store.database import Database
from master_controller.store.models import SessionRow, utcnow
from master_controller.web.metrics import STEP_SECONDS
from master_controller.web.proxy import SESSION_ENDED, SESSION_HIBERNATED, ViewerRegistry
from mc_agent import providers
from mc_agent.providers.oauth2 import OAuth2

log = logging.getLogger("master_controller.sessions")
T = TypeVar("T")
PROVIDERS = ("claude_code", "codex", "gemini_cli")


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        runtime: Runtime,
        tickets: Tickets,
        viewers: ViewerRegistry,
        credentials: CredentialStore,
        egress: EgressProxy | None = None,
    ) -> None:
        self.settings = settings
        self.egress = egress
        self.credentials = credentials
        self._logins: dict[str, asyncio.Task[None]] = {}
        self.db = db
        self.runtime = runtime
        self.tickets = tickets
        self.viewers = viewers
        self.images = ImageStore(settings.images_dir)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # --- reading ---------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionRow:
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id)
        if row is None:
            raise SessionNotFound(f"no session {session_id}")
        return row

    def viewer_url(self, session_id: str) -> str:
        ticket = self.tickets.ticket(session_id)
        return f"{self.settings.base_url}/api/auth/session/{session_id}/novnc?ticket={ticket}"

    def guest(self, row: SessionRow) -> GuestState:
        if row.guest_id is None:
            raise SessionNotFound(f"session {row.id} has no guest")
        return self.runtime.load(row.guest_id)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, user_id: str, provider: str, api_key_id: str | None) -> SessionRow:
        """Record a new session and boot its guest in the background."""
        self.login_options(provider)  # refuses a provider this controller cannot sign in to
        image_id = self.images.current()
        if image_id is None:
            raise NoImage("no promoted image: run `master-controller image ensure`")
        async with self._lock, self.db.session() as db:
            active = await repo.list_sessions(db, states=[s.value for s in ACTIVE])
            self._check_capacity(active)
            held = await repo.list_sessions(db, states=[s.value for s in HOLDING])
            kept = self._kept_guests()
            held = [r for r in held if r.state != State.CAPTURED or r.guest_id in kept]
            self._check_quota(held, user_id, api_key_id)
            session_id = str(uuid.uuid4())
            row = SessionRow(
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
            await repo.add_session(db, row)
            await repo.add_event(db, session_id, "state", State.PROVISIONING)
        self._tasks[session_id] = asyncio.create_task(self._boot(row))
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

    async def transition(self, session_id: str, new: State, reason: str = "") -> SessionRow:
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id)
            if row is None:
                raise SessionNotFound(f"no session {session_id}")
            check_transition(State(row.state), new)
            row.state = new
            row.reason = reason
            now = utcnow()
            row.last_activity_at = now
            if new == State.READY and row.ready_at is None:
                row.ready_at = now
            if new in TERMINAL:
                row.ended_at = now
            await db.commit()
            await repo.add_event(
                db, session_id, "state", new, ok=new != State.FAILED, detail=reason
            )
        self._update_egress(row)
        log.info("session %s -> %s %s", session_id, new, reason)
        return row

    async def _boot(self, row: SessionRow) -> None:
        session_id = row.id
        started = time.monotonic()
        records: list[StepRecord] = []
        steps = StepLog(on_record=records.append)
        guest: GuestState | None = None
        step = "allocate"
        try:
            guest_secrets = GuestSecrets(
                vnc_password=secrets.token_urlsafe(6)[:8], agent_token=secrets.token_urlsafe(24)
            )
            guest = await self.runtime.create(
                row.guest_id or session_id, row.image_id, guest_secrets, steps
            )
            await self._flush(session_id, records)
            await self._set_browser_ip(session_id, guest.address)
            await self.transition(session_id, State.BOOTING)
            step = "boot"
            await self.runtime.start(guest, steps)
            await self._flush(session_id, records)
            step = "the viewer path"
            await self._await_viewer_path(session_id, guest, started)
            await self.transition(session_id, State.READY)
            step = "the login"
            await self._sign_in_if_due(row)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail_start(session_id, step, exc, records)
        finally:
            self._tasks.pop(session_id, None)

    # --- sign-in ---------------------------------------------------------------------------

    def login_options(self, provider: str) -> dict[str, str]:
        """What the guest's agent needs to start ``provider``'s login (oauth2: its
        endpoints and client, from the settings)."""
        if provider != "oauth2":
            return {}
        s = self.settings
        if not (s.oauth2_authorize_url and s.oauth2_token_url and s.oauth2_client_id):
            raise ConfigError(
                "the oauth2 provider is not configured (oauth2_authorize_url, "
                "oauth2_token_url, oauth2_client_id)"
            )
        options = {
            "authorize_url": s.oauth2_authorize_url,
            "token_url": s.oauth2_token_url,
            "client_id": s.oauth2_client_id,
            "scope": s.oauth2_scope,
        }
        try:
            return providers.get("oauth2").check_options(options)
        except providers.ProviderError as exc:
            raise ConfigError(f"oauth2 settings: {exc}") from exc

    def allowance(self, row: SessionRow) -> Allowance:
        """What a session's guest may reach while it signs in: its provider's sign-in
        domains on 443 (for ``oauth2``: its endpoints' hosts and ports)."""
        provider = providers.get(row.provider)
        if not isinstance(provider, OAuth2):
            return Allowance(session_id=row.id, domains=provider.domains)
        options = self.login_options(row.provider)
        endpoints = [urlsplit(options[k]) for k in ("authorize_url", "token_url")]
        ports = {u.port or (443 if u.scheme == "https" else 80) for u in endpoints}
        return Allowance(
            session_id=row.id, domains=provider.domains_for(options), ports=frozenset(ports)
        )

    def _update_egress(self, row: SessionRow) -> None:
        """Egress is granted to a guest only while its session is ready or signing in;
        leaving those states revokes it and closes the guest's open tunnels."""
        if self.egress is None or row.browser_ip is None:
            return
        try:
            allowance = self.allowance(row) if State(row.state) in VIEWABLE else None
        except ConfigError:  # oauth2 settings gone bad since the start: no egress, then
            allowance = None
        if allowance is not None:
            self.egress.grant(row.browser_ip, allowance)
        else:
            self.egress.revoke(row.browser_ip)

    async def start_login(self, session_id: str) -> None:
        """ready -> authenticating: the provider's login runs in the guest, watched until
        valid credentials are there."""
        row = await self.transition(session_id, State.AUTHENTICATING)
        agent = GuestAgent(self.runtime, self.guest(row))
        await agent.start_login(row.provider, self.login_options(row.provider))
        self._watch_login(row)

    def _watch_login(self, row: SessionRow) -> None:
        self._logins[row.id] = asyncio.create_task(self._login_watch(row))

    async def _login_watch(self, row: SessionRow, interval: float = 1.0) -> None:
        """Follow the login: record what the agent saw (prompts answered, the auth URL) as
        events; once the credentials are valid, fetch them, store them encrypted, and
        hibernate or destroy the guest."""
        session_id = row.id
        agent = GuestAgent(self.runtime, self.guest(row))
        reported: set[str] = set()
        try:
            while True:
                try:
                    login: object = await agent.login()
                except GuestAgentError as exc:
                    log.info("session %s: agent not answering (%s)", session_id, exc.reason)
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
            await self._capture(row, agent)
        except asyncio.CancelledError:
            raise
        except MCError as exc:
            await self.end(
                session_id, State.FAILED, f"capturing the credentials failed: {exc.reason}"
            )
        except Exception as exc:  # a bug: say so, rather than leave it authenticating
            log.exception("session %s: following the login failed", session_id)
            await self.end(
                session_id,
                State.FAILED,
                f"capturing the credentials failed: internal error ({type(exc).__name__}); "
                "see the controller's log",
            )
        finally:
            if self._logins.get(session_id) is asyncio.current_task():  # not a newer watcher
                del self._logins[session_id]

    async def _note(self, session_id: str, reported: set[str], name: str, detail: str) -> None:
        if name not in reported:
            reported.add(name)
            await self._event(session_id, StepRecord(name, 0.0, True, detail))

    async def _capture(self, row: SessionRow, agent: GuestAgent) -> None:
        """Fetch the credentials once, check them here, seal them in the vault, then make
        sure no one can reach them through the guest again: its viewers are closed and its
        egress revoked at once, and the guest is destroyed, or (``after_capture =
        "hibernate"``) kept only after its agent wiped the credential files and the
        provider's browser session out of it."""
        started = time.monotonic()
        if self.egress is not None and row.browser_ip is not None:
            self.egress.revoke(row.browser_ip)
        await self.viewers.close_all(row.id, SESSION_ENDED, "credentials captured")
        checked = guest_input.credentials(row.provider, await agent.fetch_credentials())
        captured = Captured(
            provider=row.provider, files=checked.files, expires_at=checked.status.expires_at
        )
        stored = await self.credentials.store(row.user_id, captured, row.id, row.api_key_id)
        await self._event(
            row.id,
            StepRecord("credentials stored", time.monotonic() - started, True, stored.files),
        )
        guest = self.guest(row)
        outcome = "guest destroyed"
        if self.settings.after_capture == "hibernate":
            outcome = await self._wipe_and_hibernate(row.id, agent, guest)
        if outcome != "guest hibernated":
            await self.runtime.destroy(guest)
        await self.transition(row.id, State.CAPTURED, f"credentials stored; {outcome}")

    async def _wipe_and_hibernate(
        self, session_id: str, agent: GuestAgent, guest: GuestState
    ) -> str:
        """Keep a captured guest only without its credentials; says what became of it."""
        started = time.monotonic()
        try:
            wiped = await agent.wipe_credentials()
        except GuestAgentError as exc:
            await self._event(
                session_id,
                StepRecord("wipe credentials", time.monotonic() - started, False, exc.reason[:500]),
            )
            return f"wiping the credentials in the guest failed ({exc.reason}), so it was destroyed"
        count = wiped.get("removed_count") if isinstance(wiped, dict) else None
        fresh = isinstance(wiped, dict) and wiped.get("chromium") == "active"
        detail = f"{count if isinstance(count, int) else '?'} files removed"
        await self._event(
            session_id,
            StepRecord("wipe credentials", time.monotonic() - started, fresh, detail),
        )
        if not fresh:  # a browser that did not come back fresh is not worth keeping
            return "the guest's browser did not restart after the wipe, so it was destroyed"
        try:
            await self.runtime.hibernate(guest)
        except HibernateFailed as exc:  # the credentials are safe; the guest is not needed
            return f"hibernating failed ({exc.reason}), so the guest was destroyed"
        return "guest hibernated"

    async def _fail_start(
        self, session_id: str, step: str, exc: Exception, records: list[StepRecord]
    ) -> None:
        """End a session whose start or resume failed, saying at which step and why."""
        await self._flush(session_id, records)
        if isinstance(exc, MCError | OSError):
            reason = exc.reason if isinstance(exc, MCError) else str(exc)
        else:  # a bug: fail the session with a reason rather than leave it starting
            log.exception("session %s: %s failed unexpectedly", session_id, step)
            reason = f"internal error ({type(exc).__name__}); see the controller's log"
        await self.end(session_id, State.FAILED, f"{step} did not come up: {reason}")

    async def _timed_step(
        self,
        session_id: str,
        name: str,
        check: Callable[[], Awaitable[T]],
        deadline: float,
        give_up: Callable[[], Awaitable[str | None]],
    ) -> T:
        """Poll ``check`` until it passes (recorded as step ``name`` with its duration)."""
        started = time.monotonic()
        try:
            result = await poll(check, deadline, 0.2, give_up)
        except ProbeError as exc:
            await self._event(
                session_id, StepRecord(name, time.monotonic() - started, False, exc.reason[:500])
            )
            raise ProbeError(f"{name}: {exc.reason}") from exc
        await self._event(session_id, StepRecord(name, time.monotonic() - started, True))
        return result

    async def _event(self, session_id: str, record: StepRecord) -> None:
        STEP_SECONDS.labels(record.name).observe(record.seconds)
        async with self.db.session() as db:
            await repo.add_event(
                db,
                session_id,
                "step",
                record.name,
                record.ok,
                round(record.seconds, 3),
                record.detail,
            )

    async def _flush(self, session_id: str, records: list[StepRecord]) -> None:
        while records:
            await self._event(session_id, records.pop(0))

    async def _set_browser_ip(self, session_id: str, address: str | None) -> None:
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id)
            if row is not None:
                row.browser_ip = address
                await db.commit()

    async def end(self, session_id: str, state: State, reason: str) -> SessionRow:
        """Terminate or fail a session: persist, close its viewers, destroy its guest."""
        row = await self.transition(session_id, state, reason)
        for tasks in (self._tasks, self._logins):
            task = tasks.pop(session_id, None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.viewers.close_all(session_id, SESSION_ENDED, f"session {state}: {reason}"[:120])
        if row.guest_id is not None:
            with contextlib.suppress(MCError):
                guest = self.runtime.load(row.guest_id)
                await self.runtime.destroy(guest)
        return row

    async def hibernate(self, session_id: str) -> SessionRow:
        """Save the session's guest (VMs: memory and disk; containers: disk) and free its CPU
        and memory. Its viewers are told the session is hibernated."""
        before = State((await self.get(session_id)).state)
        row = await self.transition(session_id, State.HIBERNATING)
        watcher = self._logins.pop(session_id, None)
        if watcher is not None:  # the login starts again on resume
            watcher.cancel()
        await self.viewers.close_all(session_id, SESSION_HIBERNATED, "session hibernated")
        started = time.monotonic()
        try:
            await self.runtime.hibernate(self.guest(row))
        except HibernateFailed as exc:
            # nothing was lost: the guest runs on, so the session goes back to where it was
            # (its viewers reconnect) and the caller hears why
            await self._event(
                session_id,
                StepRecord("hibernate", time.monotonic() - started, False, exc.reason[:500]),
            )
            await self.transition(session_id, before, f"hibernate failed: {exc.reason}")
            if before == State.AUTHENTICATING:
                self._watch_login(row)
            raise
        except MCError as exc:
            return await self.end(session_id, State.FAILED, f"hibernate failed: {exc.reason}")
        await self._event(session_id, StepRecord("hibernate", time.monotonic() - started, True))
        return await self.transition(session_id, State.HIBERNATED)

    async def resume(self, session_id: str) -> SessionRow:
        """Start a hibernated session's guest again; ready once the viewer path works. A
        captured session resumes only if its guest was kept (wiped of its credentials)."""
        async with self._lock:
            row = await self.get(session_id)
            if State(row.state) == State.CAPTURED:
                try:
                    kept = self.runtime.status(self.guest(row)) == GuestStatus.HIBERNATED
                except MCError:
                    kept = False
                if not kept:
                    raise SessionStateError(
                        f"session {session_id} is captured and its guest was destroyed; "
                        "start a new session to sign in again"
                    )
            async with self.db.session() as db:
                active = await repo.list_sessions(db, states=[s.value for s in ACTIVE])
            self._check_capacity(active)
            row = await self.transition(session_id, State.RESUMING)
        self._tasks[session_id] = asyncio.create_task(self._resume(row))
        return row

    async def _resume(self, row: SessionRow) -> None:
        session_id = row.id
        records: list[StepRecord] = []
        step = "resume"
        try:
            guest = self.guest(row)
            started = time.monotonic()
            await self.runtime.resume(guest, StepLog(on_record=records.append))
            await self._flush(session_id, records)
            step = "the viewer path"
            await self._await_viewer_path(session_id, guest, started)
            await self.transition(session_id, State.READY)
            step = "the login"
            await self._sign_in_if_due(row)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail_start(session_id, step, exc, records)
        finally:
            self._tasks.pop(session_id, None)

    async def _sign_in_if_due(self, row: SessionRow) -> None:
        """Start the provider's login in a ready guest, unless logins start by hand
        (``auto_login`` off) or this session's credentials are stored already."""
        if self.settings.auto_login and not await self._captured(row):
            await self.start_login(row.id)

    async def _captured(self, row: SessionRow) -> bool:
        """Whether this session's sign-in is stored already."""
        try:
            # the record of this session's own key: another key's capture of the same user
            # says nothing about this session
            stored = await self.credentials.get(row.user_id, row.provider, row.api_key_id)
        except MCError:
            return False
        return stored.session_id == row.id

    async def _await_viewer_path(self, session_id: str, guest: GuestState, started: float) -> None:
        """The readiness steps: WebSocket 101 through our own proxy, RFB, a non-blank frame."""
        deadline = started + self.settings.boot_timeout
        give_up = guest_give_up(self.runtime, guest)
        url, headers = self.internal_viewer(session_id)
        host, port = self.internal_address()
        checks: dict[str, Callable[[], Awaitable[object]]] = {
            "websocket 101": lambda: websocket_upgrade(host, port, _path(url), headers=headers),
            "vnc handshake": lambda: rfb_handshake(url, None, headers),
            "first frame": lambda: non_blank_frame(url, None, deadline, headers),
        }
        for step, check in checks.items():
            await self._timed_step(session_id, step, check, deadline, give_up)

    async def open_url(self, session_id: str, url: str) -> None:
        """Open ``url`` in the session's guest Chromium (a new tab)."""
        row = await self.get(session_id)
        if State(row.state) not in VIEWABLE:
            raise SessionStateError(f"session {session_id} is {row.state}; it has no browser now")
        await GuestAgent(self.runtime, self.guest(row)).open_url(url)
        async with self.db.session() as db:
            await repo.add_event(db, session_id, "step", "open url", detail=_origin(url))

    async def cancel(self, session_id: str) -> SessionRow:
        return await self.end(session_id, State.TERMINATED, "cancelled")

    async def heartbeat(self, session_id: str) -> SessionRow:
        row = await self.get(session_id)
        if State(row.state) in TERMINAL:
            check_transition(State(row.state), State.READY)  # raises: the session has ended
        async with self.db.session() as db:
            await repo.touch(db, session_id)
        return await self.get(session_id)

    async def viewer_activity(self, session_id: str) -> None:
        async with self.db.session() as db:
            await repo.touch(db, session_id)

    # --- the controller's own view through its proxy ---------------------------------------

    def internal_address(self) -> tuple[str, int]:
        host = self.settings.host
        return ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host), self.settings.port

    def internal_viewer(self, session_id: str) -> tuple[str, dict[str, str]]:
        """The WebSocket URL of the session's viewer route and the headers of a viewer."""
        host, port = self.internal_address()
        path = f"/api/auth/session/{session_id}/novnc/websock"
        cookie = self.tickets.cookie(session_id)
        return (
            f"ws://{host}:{port}{path}",
            {"Cookie": f"{VIEWER_COOKIE}={cookie}", "Origin": self.settings.base_url},
        )

    # --- housekeeping ----------------------------------------------------------------------

    async def reconcile(self) -> None:
        """At start-up: keep sessions whose guest still runs, fail the rest and clean up."""
        async with self.db.session() as db:
            active = await repo.list_sessions(db, states=[s.value for s in ACTIVE])
        for row in active:
            try:
                guest = self.guest(row)
                alive = self.runtime.status(guest) == GuestStatus.RUNNING
            except MCError:
                alive = False
            if alive and State(row.state) in VIEWABLE:
                log.info("session %s: guest still running, reattached", row.id)
                self._update_egress(row)
                if State(row.state) == State.AUTHENTICATING:
                    self._watch_login(row)
                continue
            why = (
                "the controller restarted while it was starting"
                if alive
                else ("its guest was gone when the controller restarted")
            )
            await self.end(row.id, State.FAILED, why)

    async def reap_once(self) -> None:
        now = utcnow()
        async with self.db.session() as db:
            active = await repo.list_sessions(db, states=[s.value for s in ACTIVE])
        await self._expire_kept(now)
        for row in active:
            state = State(row.state)
            if now - row.created_at > timedelta(seconds=self.settings.max_lifetime):
                await self.end(
                    row.id,
                    State.TERMINATED,
                    f"maximum lifetime of {self.settings.max_lifetime:.0f}s reached",
                )
            elif (
                state in VIEWABLE
                and self.viewers.count(row.id) == 0
                and now - row.last_activity_at > timedelta(seconds=self.settings.idle_timeout)
            ):
                await self.end(
                    row.id, State.TERMINATED, f"no viewer for {self.settings.idle_timeout:.0f}s"
                )
            elif (
                state in (State.PROVISIONING, State.BOOTING)
                and row.id not in self._tasks
                and now - row.created_at > timedelta(seconds=self.settings.boot_timeout + 30)
            ):
                await self.end(row.id, State.FAILED, "its start never finished")
            elif state in VIEWABLE and row.id not in self._tasks:
                with contextlib.suppress(MCError):
                    if self.runtime.status(self.guest(row)) == GuestStatus.DEAD:
                        await self.end(row.id, State.FAILED, "the guest stopped unexpectedly")

    async def _expire_kept(self, now: datetime) -> None:
        """Hibernated guests (and captured ones kept) are destroyed, their snapshots and
        disk layers with them, ``hibernated_ttl`` after their last activity."""
        ttl = timedelta(seconds=self.settings.hibernated_ttl)
        async with self.db.session() as db:
            kept = await repo.list_sessions(
                db, states=[State.HIBERNATED.value, State.CAPTURED.value]
            )
        expired = [r for r in kept if now - r.last_activity_at > ttl]
        guests = self._kept_guests() if expired else set()
        for row in expired:
            if State(row.state) == State.HIBERNATED:
                why = f"hibernated for over {self.settings.hibernated_ttl:.0f}s"
                await self.end(row.id, State.TERMINATED, why)
            elif row.guest_id in guests:
                await self._destroy_guest(row)

    def _kept_guests(self) -> set[str]:
        """Ids of the guests the runtime still keeps (running or hibernated)."""
        return {g.guest_id for g in self.runtime.guests()}

    async def _destroy_guest(self, row: SessionRow) -> None:
        with contextlib.suppress(MCError):
            await self.runtime.destroy(self.guest(row))
        await self._event(row.id, StepRecord("kept guest destroyed", 0.0, True, "expired"))

    async def run_reaper(self, interval: float = 2.0) -> None:
        while True:
            try:
                await self.reap_once()
            except Exception:  # the reaper must outlive a bad row
                log.exception("reaper pass failed")
            await asyncio.sleep(interval)

    def start_background(self) -> None:
        self._reaper = asyncio.create_task(self.run_reaper())

    async def shutdown(self) -> None:
        """Stop background work. Guests keep running: they outlive the controller."""
        running = (self._reaper, *self._tasks.values(), *self._logins.values())
        tasks = [t for t in running if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


VIEWER_COOKIE = "mc_viewer"


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def _origin(url: str) -> str:
    """Scheme and host of a URL, for events (its path and query may carry secrets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}"
