"""Test doubles of the session core's outside world, real implementations of its interfaces:

- :class:`FakeAgent`: a guest agent's HTTP API (the routes and JSON shapes of
  ``mc_agent.server`` that ``agent_client.GuestAgent`` uses) served on loopback, one server
  for every guest, each guest told apart by its own bearer token. Tests say when a guest's
  credentials become valid, and whether a fetch or a wipe misbehaves.
- :class:`FakeRuntime`: a :class:`~master_controller.runtimes.base.Runtime` whose guests boot
  at once and whose endpoint is the fake agent. It can fail at a chosen step, be slow at one
  (it waits on a :class:`Gate` the test opens, so the test controls interleavings), let a
  guest die, and records every call so tests can assert that no guest leaks.
- :class:`FakeViewerPath`: the injected ``ViewerPathCheck``: passes, fails, or never passes
  until the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from master_controller.errors import (
    GuestError,
    GuestNotFound,
    GuestStartFailed,
    GuestStateError,
    HibernateFailed,
    ProbeError,
)
from master_controller.runtimes.base import (
    Endpoint,
    GuestSecrets,
    GuestState,
    GuestStatus,
    ProbeResult,
    Runtime,
)
from master_controller.settings import Settings
from master_controller.steps import StepLog, StepRecord, StepSink
from mc_agent import display, providers

# --- credential files that pass the providers' own validators ---------------------------


def credential_files(provider: str, label: str = "tok") -> dict[str, str]:
    """Files ``provider``'s validator accepts (``guest_input.credentials`` passes them)."""
    if provider == "codex":
        return {".codex/auth.json": json.dumps({"OPENAI_API_KEY": f"sk-{label}"})}
    later_ms = (time.time() + 3600) * 1000
    if provider == "claude_code":
        oauth = {"accessToken": f"at-{label}", "refreshToken": f"rt-{label}", "expiresAt": later_ms}
        return {".claude/.credentials.json": json.dumps({"claudeAiOauth": oauth})}
    if provider == "gemini_cli":
        creds = {
            "access_token": f"at-{label}",
            "refresh_token": f"rt-{label}",
            "expiry_date": later_ms,
        }
        return {".gemini/oauth_creds.json": json.dumps(creds)}
    if provider == "oauth2":
        token = {"access_token": label, "token_type": "Bearer", "expires_at": time.time() + 3600}
        return {".config/mc-oauth2/token.json": json.dumps(token)}
    raise ValueError(f"no fake credentials for {provider}")


# --- the agent --------------------------------------------------------------------------


@dataclass
class AgentGuest:
    """One guest's agent, as the test controls it."""

    guest_id: str
    token: str
    reachable: bool = False  # its guest runs
    provider: str | None = None  # the login started, if any
    options: dict[str, str] = field(default_factory=dict)
    valid: bool = False  # the person finished signing in
    auth_url: str | None = "https://auth.example.test/authorize?secret=1"  # the CLI's, if any
    fetched: bool = False
    wiped: bool = False
    chromium_after_wipe: str = "active"
    fetch_error: str | None = None  # answer POST /credentials/fetch with this 500
    wipe_error: str | None = None
    opened: list[str] = field(default_factory=list)
    clipboard: str | None = None  # what the viewer pasted last
    copied: str = ""  # what was copied in the guest (its clipboard, for a viewer's copy)
    screen: tuple[int, int] = (1280, 800)  # the display's size (the real agent's clamping)
    logins: int = 0

    def files(self) -> dict[str, str]:
        assert self.provider is not None
        return credential_files(self.provider, self.guest_id[:8])


class FakeAgent:
    """A loopback HTTP server answering as every fake guest's agent."""

    def __init__(self) -> None:
        self.guests: dict[str, AgentGuest] = {}  # by token
        self.refuse_login: str | None = None  # answer POST /login with this 500
        self.lock = threading.Lock()
        agent = self

        class Handler(_AgentHandler):
            owner: ClassVar[FakeAgent] = agent

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def __enter__(self) -> FakeAgent:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def register(self, guest: GuestState) -> AgentGuest:
        with self.lock:
            state = AgentGuest(guest.guest_id, guest.secrets.agent_token)
            self.guests[state.token] = state
            return state

    def unregister(self, guest_id: str) -> None:
        with self.lock:
            for token, state in list(self.guests.items()):
                if state.guest_id == guest_id:
                    del self.guests[token]

    def of(self, guest_id: str) -> AgentGuest:
        with self.lock:
            for state in self.guests.values():
                if state.guest_id == guest_id:
                    return state
        raise KeyError(guest_id)

    def set_reachable(self, guest_id: str, reachable: bool) -> None:
        with contextlib.suppress(KeyError):
            self.of(guest_id).reachable = reachable

    def sign_in(self, guest_id: str) -> None:
        """The person finished the provider's sign-in: valid credentials are there."""
        self.of(guest_id).valid = True


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away (a cancelled watcher) is no news


class _AgentHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: ClassVar[FakeAgent]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _guest(self) -> AgentGuest | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        with self.owner.lock:
            guest = self.owner.guests.get(token) if scheme.lower() == "bearer" else None
        if guest is None:
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong agent token"})
            return None
        if not guest.reachable:  # a stopped guest's agent does not answer
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the guest is not running"})
            return None
        return guest

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length", "0") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        assert isinstance(body, dict)
        return body

    def _describe(self, guest: AgentGuest) -> dict[str, Any]:
        return {
            "provider": guest.provider,
            "state": "wiped" if guest.wiped else "running",
            "started_at": 0.0,
            "auth_url": guest.auth_url,
            "opened_urls": [],
            "terminal_urls": [],
            "prompts_answered": [],
            "credentials": self._status(guest),
            "fetched": guest.fetched,
        }

    def _status(self, guest: AgentGuest) -> dict[str, Any]:
        if guest.valid and not guest.wiped:
            return {"valid": True, "reason": "valid", "expires_at": None, "fields": []}
        return {"valid": False, "reason": "not signed in yet", "expires_at": None, "fields": []}

    def do_GET(self) -> None:
        guest = self._guest()
        if guest is None:
            return
        if self.path == "/health":
            self._send(HTTPStatus.OK, {"services": {}, "boot_id": guest.guest_id})
        elif self.path == "/clipboard":
            self._send(HTTPStatus.OK, {"text": guest.copied})
        elif guest.provider is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": "no login has been started"})
        elif self.path == "/login":
            self._send(HTTPStatus.OK, self._describe(guest))
        elif self.path == "/credentials/status":
            self._send(HTTPStatus.OK, {"provider": guest.provider, **self._status(guest)})
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "no route"})

    def do_POST(self) -> None:
        guest = self._guest()
        if guest is None:
            return
        body = self._body()
        if self.path == "/open-url":
            guest.opened.append(str(body.get("url")))
            self._send(HTTPStatus.OK, {"opened": True})
        elif self.path == "/clipboard":
            guest.clipboard = str(body.get("text"))
            self._send(HTTPStatus.OK, {"characters": len(guest.clipboard)})
        elif self.path == "/display":
            try:
                guest.screen = display.clamp(body.get("width"), body.get("height"))
            except ValueError as exc:
                self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            self._send(HTTPStatus.OK, dict(zip(("width", "height"), guest.screen, strict=True)))
        elif self.path == "/login" and self.owner.refuse_login is not None:
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": self.owner.refuse_login})
        elif self.path == "/login":
            provider = str(body.get("provider"))
            providers.get(provider)
            guest.provider, guest.options = provider, body.get("options") or {}
            guest.fetched = guest.wiped = False
            guest.logins += 1
            self._send(HTTPStatus.ACCEPTED, self._describe(guest))
        elif guest.provider is None and self.path == "/credentials/fetch":
            self._send(HTTPStatus.NOT_FOUND, {"error": "no login has been started"})
        elif self.path == "/credentials/fetch":
            if guest.fetch_error is not None:
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": guest.fetch_error})
            elif guest.fetched:
                self._send(HTTPStatus.GONE, {"error": "the credentials were fetched already"})
            elif not guest.valid or guest.wiped:
                self._send(HTTPStatus.CONFLICT, {"error": "no valid credentials"})
            else:
                guest.fetched = True
                status = self._status(guest)
                self._send(
                    HTTPStatus.OK,
                    {"provider": guest.provider, "files": guest.files(), "status": status},
                )
        elif self.path == "/credentials/wipe":
            if guest.wipe_error is not None:
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": guest.wipe_error})
                return
            guest.wiped = True
            self._send(
                HTTPStatus.OK,
                {
                    "provider": guest.provider,
                    "processes_killed": 1,
                    "credential_files_removed": [],
                    "removed": [],
                    "removed_count": 3,
                    "chromium": guest.chromium_after_wipe,
                },
            )
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "no route"})


# --- the runtime ------------------------------------------------------------------------


class Gate:
    """Holds a runtime call until the test opens it: ``entered`` is set when the call
    arrives, the call goes on once ``open()`` is called."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    def open(self) -> None:
        self.opened.set()

    async def wait_entered(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.entered.wait(), timeout)


@dataclass(frozen=True)
class Call:
    op: str  # create, start, destroy, hibernate, resume
    guest_id: str


class FakeRuntime(Runtime):
    """Guests that boot at once, controlled by the test. Their state is saved with the
    base's ``save``/``load`` under ``settings.guests_dir``; what the "host" sees of them
    (running, dead, hibernated) is kept here, as a real host keeps its processes."""

    name = "fake"
    STEPS = ("create", "start", "destroy", "hibernate", "resume")

    def __init__(self, settings: Settings, agent: FakeAgent) -> None:
        super().__init__(settings)
        self.agent = agent
        self.calls: list[Call] = []
        # op -> the exception its next calls raise (until removed)
        self.fail: dict[str, Exception] = {}
        self.gates: dict[str, Gate] = {}  # op -> the gate its next call waits at
        self.host: dict[str, GuestStatus] = {}  # guest id -> what the host sees

    @classmethod
    def probe(cls, settings: Settings) -> ProbeResult:
        return ProbeResult(True, "fake guests")

    # --- test controls ----------------------------------------------------------------

    def hold(self, op: str) -> Gate:
        """Make the next ``op`` call wait until the returned gate opens."""
        gate = self.gates[op] = Gate()
        return gate

    def die(self, guest_id: str) -> None:
        """The guest's process goes away without being asked to."""
        if self.host.get(guest_id) == GuestStatus.RUNNING:
            self.host[guest_id] = GuestStatus.DEAD
            self.agent.set_reachable(guest_id, False)

    def called(self, op: str, guest_id: str | None = None) -> int:
        return sum(1 for c in self.calls if c.op == op and guest_id in (None, c.guest_id))

    def existing(self) -> set[str]:
        """Guests that hold anything on the host (not destroyed)."""
        return {g.guest_id for g in self.guests()}

    # --- the interface ----------------------------------------------------------------

    async def _enter(self, op: str, guest_id: str) -> None:
        self.calls.append(Call(op, guest_id))
        gate = self.gates.pop(op, None)
        if gate is not None:
            gate.entered.set()
            await gate.opened.wait()
        failure = self.fail.get(op)
        if failure is not None:
            raise failure

    async def create(
        self, guest_id: str, image_id: str, secrets: GuestSecrets, steps: StepLog | None = None
    ) -> GuestState:
        steps = steps or StepLog()
        with steps.step("allocate"):
            await self._enter("create", guest_id)
            if self.guest_dir(guest_id).exists():
                raise GuestStateError(f"guest {guest_id} exists already")
            guest = GuestState(
                guest_id=guest_id,
                runtime=self.name,
                image_id=image_id,
                address="127.0.0.1",
                secrets=secrets,
            )
            self.save(guest)
            self.host[guest_id] = GuestStatus.CREATED
            self.agent.register(guest)
        return guest

    async def start(self, guest: GuestState, steps: StepLog | None = None) -> None:
        steps = steps or StepLog()
        with steps.step("boot"):
            try:
                await self._enter("start", guest.guest_id)
            except GuestError as exc:
                guest.status = GuestStatus.STOPPED
                self.host[guest.guest_id] = GuestStatus.STOPPED
                self.save(guest)
                raise GuestStartFailed("boot", exc.reason) from exc
            self._set(guest, GuestStatus.RUNNING)

    async def destroy(self, guest: GuestState) -> None:
        guest_id = guest.guest_id
        # as the real runtimes do: the process is killed first (the host sees it dead,
        # its recorded state still says running), then the rest is released
        if self.host.get(guest_id) == GuestStatus.RUNNING:
            self.host[guest_id] = GuestStatus.DEAD
        self.agent.set_reachable(guest_id, False)
        await self._enter("destroy", guest_id)
        self.agent.unregister(guest_id)
        shutil.rmtree(self.guest_dir(guest_id), ignore_errors=True)
        self.host.pop(guest_id, None)
        guest.status = GuestStatus.DESTROYED

    async def hibernate(self, guest: GuestState) -> None:
        guest_id = guest.guest_id
        if self.status(guest) != GuestStatus.RUNNING:
            raise GuestStateError(f"guest {guest_id} is not running")
        # as a VM's: paused, saved, and its VMM exits before the state says "hibernated",
        # so the host sees it dead meanwhile
        self.host[guest_id] = GuestStatus.DEAD
        self.agent.set_reachable(guest_id, False)
        try:
            await self._enter("hibernate", guest_id)
        except HibernateFailed:
            # what was written is removed; the guest runs on
            self._set(guest, GuestStatus.RUNNING)
            raise
        except GuestError:
            raise  # any other error leaves it in an unknown state: here, dead
        self._set(guest, GuestStatus.HIBERNATED)

    async def resume(self, guest: GuestState, steps: StepLog | None = None) -> None:
        steps = steps or StepLog()
        with steps.step("resume"):
            if self.status(guest) != GuestStatus.HIBERNATED:
                raise GuestStateError(f"guest {guest.guest_id} is not hibernated")
            await self._enter("resume", guest.guest_id)
            self._set(guest, GuestStatus.RUNNING)

    def status(self, guest: GuestState) -> GuestStatus:
        if not self.guest_dir(guest.guest_id).exists():
            return GuestStatus.DESTROYED
        return self.host.get(guest.guest_id, GuestStatus.DEAD)

    def endpoint(self, guest: GuestState) -> Endpoint:
        if guest.address is None:
            raise GuestNotFound(f"guest {guest.guest_id} has no address")
        # VNC and websockify: a port nothing listens on (the viewer path is checked by the fake)
        return Endpoint(
            address=guest.address, websockify_port=9, vnc_port=9, agent_port=self.agent.port
        )

    def _set(self, guest: GuestState, status: GuestStatus) -> None:
        guest.status = status
        self.host[guest.guest_id] = status
        self.save(guest)
        self.agent.set_reachable(guest.guest_id, status == GuestStatus.RUNNING)


# --- the viewer path --------------------------------------------------------------------


class FakeViewerPath:
    """``mode``: "pass", "fail" (at once, naming a check) or "never" (keeps failing until
    the deadline). With ``gate`` set, the next check waits for it first."""

    def __init__(self, mode: str = "pass") -> None:
        self.mode = mode
        self.gate: Gate | None = None
        self.checked: list[str] = []

    def hold(self) -> Gate:
        self.gate = Gate()
        return self.gate

    async def __call__(self, guest: GuestState, deadline: float, record: StepSink) -> None:
        self.checked.append(guest.guest_id)
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.entered.set()
            await gate.opened.wait()
        started = time.monotonic()
        if self.mode == "pass":
            await record(StepRecord("vnc handshake", 0.0, True))
            return
        if self.mode == "never":
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        reason = "connection refused"
        await record(StepRecord("vnc handshake", time.monotonic() - started, False, reason))
        raise ProbeError(f"vnc handshake: {reason}")


@contextlib.contextmanager
def fake_agent() -> Iterator[FakeAgent]:
    with FakeAgent() as agent:
        yield agent
