"""Stored credentials belong to the API key whose session captured them, on SQLite and
PostgreSQL: another key signing in the same user neither replaces nor reads them; an admin
reaches every key's records but must say whose when a user has several; records from before
migration 0003 keep their key (none: admin only) and stay readable."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from master_controller.credentials import NO_KEY, Captured, CredentialStore
from master_controller.errors import AmbiguousCredentials, CredentialsNotFound
from master_controller.settings import Settings
from master_controller.store.database import Database, alembic_config, sync_url
from master_controller.vault import Binding, Vault

FILE = ".config/mc-oauth2/token.json"


def _token(name: str, expires_at: int = 4102444800) -> str:
    return json.dumps({"access_token": name, "token_type": "Bearer", "expires_at": expires_at})


def _captured(name: str, expires_at: int = 4102444800) -> Captured:
    return Captured("oauth2", {FILE: _token(name, expires_at)}, expires_at)


def _vault(tmp_path: Path) -> Vault:
    return Vault.open(Settings(data_dir=tmp_path, vault_key_file=tmp_path / "vault.keys"))


async def _store(tmp_path: Path, database_url: str) -> CredentialStore:
    db = Database(database_url)
    await asyncio.to_thread(db.migrate)
    return CredentialStore(db, _vault(tmp_path))


def test_another_key_neither_replaces_nor_reads_a_keys_credentials(
    tmp_path: Path, database_url: str
) -> None:
    """The finding: key B signing in "alice" replaced key A's record, and B's session
    reported on A's. Now each key has its own."""

    async def go() -> None:
        store = await _store(tmp_path, database_url)
        await store.store("alice", _captured("tok-A"), "session-a", "key-a")
        await store.store("alice", _captured("tok-B", expires_at=1), "session-b", "key-b")

        mine = await store.export("alice", "oauth2", "key-a")
        assert json.loads(mine["files"][FILE])["access_token"] == "tok-A"  # not replaced
        assert (await store.get("alice", "oauth2", "key-a")).session_id == "session-a"
        theirs = await store.validate("alice", "oauth2", "key-b")
        assert not theirs.valid and "expired" in theirs.reason  # B sees B's, not A's
        assert [r.api_key_id for r in await store.for_user("alice", "key-a")] == ["key-a"]
        assert await store.for_user("alice", "key-c") == []

        # a third key, or a key naming another key, finds nothing (as if nothing existed)
        for key, of_key in (("key-c", None), ("key-b", "key-a"), ("key-b", NO_KEY)):
            with pytest.raises(CredentialsNotFound):
                await store.export("alice", "oauth2", key, of_key=of_key)
            with pytest.raises(CredentialsNotFound):
                await store.delete("alice", "oauth2", key, of_key=of_key)
            with pytest.raises(CredentialsNotFound):
                await store.validate("alice", "oauth2", key, of_key=of_key)

        # a newer capture through the same key replaces only that key's record
        await store.store("alice", _captured("tok-A2"), "session-a2", "key-a")
        rows = await store.for_user("alice", "admin-key", admin=True)
        assert sorted((r.api_key_id, r.session_id) for r in rows) == [
            ("key-a", "session-a2"),
            ("key-b", "session-b"),
        ]
        await store.delete("alice", "oauth2", "key-b")
        assert (await store.get("alice", "oauth2", "key-a")).session_id == "session-a2"
        await store.db.close()

    asyncio.run(go())


def test_an_admin_names_whose_record_when_several_keys_hold_one(
    tmp_path: Path, database_url: str
) -> None:
    async def go() -> None:
        store = await _store(tmp_path, database_url)
        await store.store("alice", _captured("tok-A"), None, "key-a")
        # one record: an admin needs not say whose
        assert (await store.get("alice", "oauth2", "admin-key", admin=True)).api_key_id == "key-a"
        await store.store("alice", _captured("tok-B"), None, "key-b")
        await store.store("alice", _captured("tok-none"), None, None)
        with pytest.raises(AmbiguousCredentials, match="key-a, key-b, none") as refused:
            await store.export("alice", "oauth2", "admin-key", admin=True)
        assert refused.value.status == 409
        for of_key, token in (("key-b", "tok-B"), (NO_KEY, "tok-none")):
            got = await store.export("alice", "oauth2", "admin-key", admin=True, of_key=of_key)
            assert json.loads(got["files"][FILE])["access_token"] == token
        # records without a key are the admin's alone
        assert [r.api_key_id for r in await store.for_user("alice", "key-a")] == ["key-a"]
        with pytest.raises(CredentialsNotFound):
            await store.get("alice", "oauth2", "key-a", of_key=NO_KEY)
        await store.delete("alice", "oauth2", "admin-key", admin=True, of_key="key-a")
        rows = await store.for_user("alice", "admin-key", admin=True)
        assert sorted(r.api_key_id or NO_KEY for r in rows) == ["key-b", NO_KEY]
        await store.db.close()

    asyncio.run(go())


def test_a_record_moved_to_another_key_does_not_decrypt(tmp_path: Path, database_url: str) -> None:
    """Someone who can write the database gives key B's record to key A: A cannot read it
    (the ciphertext is bound to the key that captured it)."""

    async def go() -> None:
        store = await _store(tmp_path, database_url)
        row = await store.store("alice", _captured("tok-B"), None, "key-b")
        async with store.db.session() as db:
            await db.execute(
                sa.text("UPDATE credentials SET api_key_id = 'key-a' WHERE id = :id"),
                {"id": row.id},
            )
            await db.commit()
        status = await store.validate("alice", "oauth2", "key-a")
        assert not status.valid and "does not decrypt" in status.reason
        await store.db.close()

    asyncio.run(go())


def test_records_from_before_keys_owned_them_are_migrated(
    tmp_path: Path, database_url: str
) -> None:
    """A database at revision 0002 with records sealed the old way (binding 1): after the
    upgrade they keep their key, read as before, and one without a key is the admin's
    only; a rotation re-binds every record to its key."""
    vault = _vault(tmp_path)
    engine = sa.create_engine(sync_url(database_url))
    command.upgrade(alembic_config(database_url), "0002")
    legacy = {"alice": "key-a", "bob": None}
    with engine.begin() as conn:
        for user, key in legacy.items():
            record_id = str(uuid.uuid4())
            plaintext = json.dumps({"files": {FILE: _token(f"tok-{user}")}}).encode()
            sealed = vault.seal(Binding(record_id, user, "oauth2", key, version=1), plaintext)
            conn.execute(
                sa.text(
                    "INSERT INTO credentials (id, user_id, provider, session_id, api_key_id, "
                    "key_id, nonce, ciphertext, files, captured_at, expires_at) VALUES "
                    "(:id, :user, 'oauth2', NULL, :key, :key_id, :nonce, :ct, :files, :at, NULL)"
                ),
                {
                    "id": record_id,
                    "user": user,
                    "key": key,
                    "key_id": sealed.key_id,
                    "nonce": sealed.nonce,
                    "ct": sealed.ciphertext,
                    "files": FILE,
                    "at": datetime.now(UTC),
                },
            )
    engine.dispose()

    async def go() -> None:
        store = await _store(tmp_path, database_url)  # migrates to the newest revision
        alice = await store.get("alice", "oauth2", "key-a")
        assert alice.binding == 1 and (await store.validate("alice", "oauth2", "key-a")).valid
        assert await store.for_user("bob", "key-a") == []
        with pytest.raises(CredentialsNotFound):
            await store.get("bob", "oauth2", "key-a")
        bob = await store.export("bob", "oauth2", "admin-key", admin=True)
        assert json.loads(bob["files"][FILE])["access_token"] == "tok-bob"
        # another key may now hold its own record of alice beside the old one
        await store.store("alice", _captured("tok-new"), None, "key-b")
        assert len(await store.for_user("alice", "admin-key", admin=True)) == 2

        done = await store.rotate()
        assert done.reencrypted == 3 and not done.unreadable
        rows = await store.for_user("alice", "admin-key", admin=True)
        rows += await store.for_user("bob", "admin-key", admin=True)
        assert {r.binding for r in rows} == {2}
        assert (await store.validate("alice", "oauth2", "key-a")).valid
        assert (await store.validate("bob", "oauth2", "admin-key", admin=True)).valid
        await store.db.close()

    asyncio.run(go())
