"""The store against real databases: SQLite and PostgreSQL, migrated by Alembic."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from master_controller.auth import Unauthorized, authenticate, create_api_key, revoke_api_key
from master_controller.errors import ConfigError
from master_controller.store import repo
from master_controller.store.database import Database
from master_controller.store.models import SessionRow, utcnow


def _session(user: str = "alice", state: str = "ready") -> SessionRow:
    sid = str(uuid.uuid4())
    return SessionRow(
        id=sid,
        user_id=user,
        provider="codex",
        state=state,
        reason="",
        runtime="container",
        image_id="img",
        guest_id=sid,
    )


def test_sessions_events_and_keys(database_url: str) -> None:
    async def scenario() -> None:
        database = Database(database_url)
        await asyncio.to_thread(database.migrate)
        await asyncio.to_thread(database.migrate)  # idempotent
        try:
            async with database.session() as db:
                a = await repo.add_session(db, _session("alice", "ready"))
                await repo.add_session(db, _session("bob", "failed"))
                await repo.add_session(db, _session("alice", "booting"))
                for name in ("provisioning", "network", "boot"):
                    await repo.add_event(db, a.id, "step", name, seconds=0.5)
                assert [e.name for e in await repo.events(db, a.id)] == [
                    "provisioning",
                    "network",
                    "boot",
                ]
                assert await repo.count_by_state(db) == {"ready": 1, "failed": 1, "booting": 1}
                assert len(await repo.list_sessions(db, user_id="alice")) == 2
                assert len(await repo.list_sessions(db, states=["ready", "booting"])) == 2
                row = await repo.get_session(db, a.id)
                assert row is not None and row.created_at.tzinfo is not None
                assert abs(row.created_at - utcnow()) < timedelta(minutes=1)
                await repo.touch(db, a.id, utcnow() - timedelta(hours=1))
            async with database.session() as db:
                again = await repo.get_session(db, a.id)
                assert again is not None and again.last_activity_at.tzinfo == UTC

                key = await create_api_key(db, "ci-key", ("sessions",))
                assert key.startswith("mc_")
                caller = await authenticate(db, key)
                assert caller.name == "ci-key" and caller.scopes == {"sessions"}
                with pytest.raises(ConfigError, match="exists already"):
                    await create_api_key(db, "ci-key")
                with pytest.raises(ConfigError, match="unknown scopes"):
                    await create_api_key(db, "other", ("root",))
                await revoke_api_key(db, "ci-key")
                with pytest.raises(Unauthorized, match="revoked"):
                    await authenticate(db, key)
                with pytest.raises(Unauthorized):
                    await authenticate(db, "mc_not-a-key")
            async with database.session() as db:
                with pytest.raises(IntegrityError):  # the database itself refuses dangling events
                    await repo.add_event(db, str(uuid.uuid4()), "step", "orphan")
        finally:
            await database.close()

    asyncio.run(scenario())
