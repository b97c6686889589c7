"""A real session core (SessionService on a real SQLite database, a real CredentialStore and
Vault, a ViewerRegistry) around the fake runtime, agent and viewer path, in one process."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from master_controller.credentials import CredentialStore
from master_controller.network.identities import EgressIdentities
from master_controller.sessions.service import SessionService
from master_controller.sessions.states import TERMINAL, State
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.store.models import EventRow, SessionRow, utcnow
from master_controller.vault import Vault
from master_controller.viewing.relay import ViewerRegistry
from tests.sessions.fake_runtime import FakeAgent, FakeRuntime, FakeViewerPath

IMAGE_ID = "fake-image-0001"
USER = "alice"
KEY = "key-a"
PROVIDER = "codex"
WATCH = 0.01  # seconds between the watcher's looks at the login


@functools.cache
def _template() -> Path:
    """One migrated database, copied for each core (migrating takes ~0.1 s)."""
    folder = Path(tempfile.mkdtemp(prefix="mc-session-core-"))
    path = folder / "template.db"
    Database(f"sqlite:///{path}").migrate()
    return path


def settings_for(data_dir: Path, **overrides: Any) -> Settings:
    chosen: dict[str, Any] = {"boot_timeout": 5.0, "egress_port": 0, **overrides}
    return Settings(data_dir=data_dir, vault_key_file=data_dir / "vault.keys", **chosen)


class Core:
    """The service under test and its surroundings. :meth:`restart` stands in for a new
    controller process on the same database and guests."""

    def __init__(
        self, settings: Settings, agent: FakeAgent, runtime: FakeRuntime, db: Database
    ) -> None:
        self.settings = settings
        self.agent = agent
        self.runtime = runtime
        self.db = db
        self.viewer_path = FakeViewerPath()
        self.viewers = ViewerRegistry()
        self.credentials = CredentialStore(db, Vault.open(settings))
        self.egress: Any = None  # an egress proxy (or a stand-in) the service grants to
        self.service = self._service()

    def _service(self) -> SessionService:
        service = SessionService(
            self.settings,
            self.db,
            self.runtime,
            self.viewers,
            self.credentials,
            self.viewer_path,
            egress=self.egress,
            identities=EgressIdentities(self.settings, self.db, self.credentials),
        )
        service.sign_in.watch_interval = WATCH
        return service

    async def restart(self) -> SessionService:
        await self.service.shutdown()
        self.viewers = ViewerRegistry()
        self.service = self._service()
        await self.service.reconcile()
        return self.service

    # --- acting -----------------------------------------------------------------------

    async def start(self, user: str = USER, key: str | None = KEY) -> SessionRow:
        return await self.service.start(user, PROVIDER, key)

    # --- reading ----------------------------------------------------------------------

    async def state(self, session_id: str) -> State:
        return State((await self.service.get(session_id)).state)

    async def wait_for(
        self, session_id: str, states: Collection[State], timeout: float = 5.0
    ) -> SessionRow:
        """Poll until the session is in one of ``states`` (fails the test past ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            row = await self.service.get(session_id)
            if State(row.state) in states:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"session {session_id} stayed {row.state}: {row.reason}")
            await asyncio.sleep(0.005)

    async def settle(self, timeout: float = 5.0) -> None:
        """Until no boot or resume runs, no lock is held, no capture is under way, and no
        watcher is about to capture (its guest's credentials valid)."""
        work = self.service.work
        deadline = time.monotonic() + timeout
        calm = 0
        while calm < 3:
            await asyncio.sleep(0.002)
            busy = bool(work._tasks) or bool(work._capturing)
            busy = busy or any(lock.locked() for lock in work._locks.values())
            busy = busy or await self._capture_due()
            calm = 0 if busy else calm + 1
            if time.monotonic() > deadline:
                raise AssertionError("the session core did not settle")

    async def _capture_due(self) -> bool:
        for row in await self.service.ledger.in_states({State.AUTHENTICATING}):
            if not self.service.work.watching(row.id):
                continue
            try:
                guest = self.agent.of(row.guest_id or "")
            except KeyError:
                continue
            if guest.valid and guest.reachable and not guest.fetched:
                return True
        return False

    async def events(self, session_id: str) -> list[EventRow]:
        return await self.service.ledger.events(session_id)

    async def states_seen(self, session_id: str) -> list[str]:
        return [e.name for e in await self.events(session_id) if e.kind == "state"]

    async def stored_for(self, session_id: str) -> bool:
        return any(
            e.kind == "step" and e.name == "credentials stored"
            for e in await self.events(session_id)
        )

    async def age(self, session_id: str, seconds: float, *, activity: bool = True) -> None:
        """Move the session's clock back ``seconds`` (created, sign-in time, last active)."""
        async with self.db.session() as db:
            row = await db.get(SessionRow, session_id)
            assert row is not None
            row.created_at = row.created_at - timedelta(seconds=seconds)
            if row.ends_at is not None:
                row.ends_at = row.ends_at - timedelta(seconds=seconds)
            if activity:
                row.last_activity_at = utcnow() - timedelta(seconds=seconds)
            await db.commit()

    async def leaked(self) -> list[str]:
        """Guests still on the host whose session has ended (or that no session has)."""
        sessions = {r.guest_id: r for r in await self.service.ledger.in_states(set(State))}
        found = []
        for guest_id in self.runtime.existing():
            row = sessions.get(guest_id)
            if row is None or State(row.state) in TERMINAL:
                found.append(guest_id)
        return found


@asynccontextmanager
async def core(root: Path, **overrides: Any) -> AsyncIterator[Core]:
    settings = settings_for(root / "data", **overrides)
    images = settings.images_dir
    images.mkdir(parents=True)
    history = {"history": [{"id": IMAGE_ID, "at": "2024-01-01T00:00:00+00:00"}]}
    (images / "promotions.json").write_text(json.dumps(history))
    path = settings.data_dir / "master-controller.db"
    shutil.copyfile(_template(), path)
    path.chmod(0o600)
    db = Database(settings.database)
    with FakeAgent() as agent:
        runtime = FakeRuntime(settings, agent)
        made = Core(settings, agent, runtime, db)
        try:
            yield made
        finally:
            for gate in runtime.gates.values():  # nothing stays held
                gate.open()
            await made.service.shutdown()
            await db.close()
