"""The vault: AES-GCM records bound to their id, user, provider and API key; key file 0600;
key rotation re-encrypts every record; a wrong key or a moved record does not decrypt.
Rotation while a controller runs (another process holding the same key file) loses
nothing, and neither does a rotation that dies half-way."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.engine import make_url

from master_controller.credentials import Captured, CredentialStore
from master_controller.errors import ConfigError, VaultBusy, VaultError
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.store.models import CredentialRow
from master_controller.vault import Binding, Sealed, Vault


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, vault_key_file=tmp_path / "vault.keys")


def _vault(tmp_path: Path) -> Vault:
    return Vault.open(_settings(tmp_path))


def _keys_on_disk(tmp_path: Path) -> dict[str, str]:
    keys: dict[str, str] = json.loads((tmp_path / "vault.keys").read_text())["keys"]
    return keys


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    first = _vault(tmp_path)
    assert stat.S_IMODE((tmp_path / "vault.keys").stat().st_mode) == 0o600
    again = _vault(tmp_path)
    assert again.current == first.current and again.keys == first.keys


def _b(
    record: str = "rec-1", user: str = "alice", provider: str = "codex", key: str | None = "k1"
) -> Binding:
    return Binding(record, user, provider, key)


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=4096), user=st.text(min_size=1, max_size=40))
def test_round_trip(plaintext: bytes, user: str) -> None:
    vault = Vault({"k-1": b"k" * 32}, "k-1", None)
    sealed = vault.seal(_b(user=user), plaintext)
    assert sealed.ciphertext != plaintext or not plaintext
    assert vault.open_sealed(_b(user=user), sealed) == plaintext


def test_a_record_does_not_open_elsewhere_or_altered(tmp_path: Path) -> None:
    vault = _vault(tmp_path)
    sealed = vault.seal(_b(), b'{"token": "secret"}')
    for elsewhere in (
        _b(record="rec-2"),
        _b(user="bob"),
        _b(provider="gemini_cli"),
        _b(key="k2"),  # another API key's record: moved in the database
        _b(key=None),
        Binding("rec-1", "alice", "codex", "k1", version=1),  # claimed to be older
    ):
        with pytest.raises(VaultError, match="does not decrypt"):
            vault.open_sealed(elsewhere, sealed)
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(VaultError):
        vault.open_sealed(_b(), Sealed(sealed.key_id, sealed.nonce, flipped))
    with pytest.raises(VaultError, match="not in the vault"):
        Vault({"k-other": b"o" * 32}, "k-other", None).open_sealed(_b(), sealed)


def test_version_1_records_stay_readable(tmp_path: Path) -> None:
    """Records sealed before API keys were bound (binding 1) still open, as version 1."""
    vault = _vault(tmp_path)
    old = Binding("rec-1", "alice", "codex", "k1", version=1)
    sealed = vault.seal(old, b"x")
    assert vault.open_sealed(old, sealed) == b"x"
    # version 1 did not bind the key: whoever the row says owns it, it opens (rotation
    # turns it into version 2)
    assert vault.open_sealed(Binding("rec-1", "alice", "codex", "k2", version=1), sealed) == b"x"
    with pytest.raises(VaultError, match="does not decrypt"):
        vault.open_sealed(_b(), sealed)


def test_nonces_are_never_reused(tmp_path: Path) -> None:
    vault = _vault(tmp_path)
    nonces = {vault.seal(_b(), b"x").nonce for _ in range(2000)}
    assert len(nonces) == 2000


@pytest.mark.parametrize(
    ("value", "message"),
    [("not base64!", "not base64"), (base64.b64encode(b"short").decode(), "32 bytes")],
)
def test_a_bad_key_setting_is_refused(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Vault.open(Settings(data_dir=tmp_path, vault_key=value))


def test_a_key_from_the_setting_is_used_without_a_file(tmp_path: Path) -> None:
    key = base64.b64encode(b"s" * 32).decode()
    vault = Vault.open(Settings(data_dir=tmp_path, vault_key=key))
    assert vault.current.startswith("s-") and not (tmp_path / "vault.keys").exists()
    with pytest.raises(ConfigError, match="rotate it there"):
        vault.add_key()


def _open_after(barrier: threading.Barrier, settings_: Settings) -> str:
    barrier.wait()
    return Vault.open(settings_).current


def test_processes_starting_at_once_agree_on_the_first_key(tmp_path: Path) -> None:
    """A controller and the CLI creating the key file together: one file wins and both use
    it (a key kept only in one process's memory would lose what it seals)."""
    for attempt in range(10):
        settings_ = _settings(tmp_path / str(attempt))
        settings_.data_dir.mkdir()
        start = threading.Barrier(8)
        with ThreadPoolExecutor(8) as pool:
            currents = set(pool.map(_open_after, [start] * 8, [settings_] * 8))
        assert currents == {json.loads(settings_.vault_key_path.read_text())["current"]}


def test_the_lock_is_shared_by_readers_and_exclusive_for_rotation(tmp_path: Path) -> None:
    async def go() -> None:
        one, two = _vault(tmp_path), _vault(tmp_path)
        two.lock_wait = 0.2
        async with one.shared(), two.shared():  # readers do not wait for each other
            pass
        async with one.shared():
            with pytest.raises(VaultBusy, match="being rotated"):
                async with two.exclusive():
                    pass
        async with one.exclusive():
            with pytest.raises(VaultBusy):
                async with two.shared():
                    pass
        async with two.exclusive():  # released by the block's end
            pass

    asyncio.run(go())


TOKEN = '{"access_token": "tok-SECRET-123", "token_type": "Bearer", "expires_at": 4102444800}'
FILE = ".config/mc-oauth2/token.json"


def _captured() -> Captured:
    return Captured("oauth2", {FILE: TOKEN}, 4102444800)


async def _database(url: str) -> Database:
    db = Database(url)
    await asyncio.to_thread(db.migrate)
    return db


async def _key_ids(db: Database) -> dict[str, str]:
    """record id -> id of the vault key it is sealed with."""
    async with db.session() as session:
        rows = (await session.execute(select(CredentialRow.id, CredentialRow.key_id))).all()
    return {r.id: r.key_id for r in rows}


async def _all_readable(db: Database, tmp_path: Path) -> int:
    """Open every record with a vault read fresh from disk, as a restarted controller
    would; returns how many there are."""
    fresh = CredentialStore(db, _vault(tmp_path))
    async with db.session() as session:
        rows = list((await session.execute(select(CredentialRow))).scalars())
    for row in rows:
        assert fresh._open(row) == {FILE: TOKEN}, row.id
    return len(rows)


def test_rotation_re_encrypts_every_record_and_drops_old_keys(
    tmp_path: Path, database_url: str
) -> None:
    async def go() -> None:
        db = await _database(database_url)
        store = CredentialStore(db, _vault(tmp_path))
        old_key = store.vault.current
        for user in ("alice", "bob", "carol"):
            await store.store(user, _captured(), None, "key-a")
        done = await store.rotate()
        assert done.reencrypted == 3 and done.retired == [old_key] and not done.unreadable
        assert _keys_on_disk(tmp_path).keys() == {done.new_key} != {old_key}
        # a fresh process with the key file reads every record
        reopened = CredentialStore(db, _vault(tmp_path))
        for user in ("alice", "bob", "carol"):
            row = await reopened.get(user, "oauth2", "key-a")
            assert row.key_id == done.new_key and row.binding == 2
            assert (await reopened.validate(user, "oauth2", "key-a")).valid
        # the plaintext is nowhere in a SQLite database file
        if database_url.startswith("sqlite"):
            assert b"tok-SECRET-123" not in (tmp_path / "mc.db").read_bytes()
        # with another key the records do not open, and say so
        other = CredentialStore(db, Vault({"k-x": b"x" * 32}, "k-x", None))
        status = await other.validate("alice", "oauth2", "key-a")
        assert not status.valid and "not in the vault" in status.reason
        await db.close()

    asyncio.run(go())


def test_a_record_that_does_not_decrypt_keeps_its_key_and_is_named(
    tmp_path: Path, database_url: str
) -> None:
    async def go() -> None:
        db = await _database(database_url)
        store = CredentialStore(db, _vault(tmp_path))
        old_key = store.vault.current
        good = await store.store("alice", _captured(), None, "key-a")
        bad = await store.store("bob", _captured(), None, "key-a")
        async with db.session() as session:  # someone moved bob's record to another key
            row = await session.get(CredentialRow, bad.id)
            assert row is not None
            row.api_key_id = "key-b"
            await session.commit()
        done = await store.rotate()
        assert done.unreadable == [bad.id] and done.reencrypted == 1 and done.retired == []
        assert _keys_on_disk(tmp_path).keys() == {old_key, done.new_key}
        assert (await store.validate("alice", "oauth2", "key-a")).valid
        assert (await _key_ids(db))[good.id] == done.new_key
        await db.close()

    asyncio.run(go())


def test_expired_credentials_validate_as_expired(tmp_path: Path) -> None:
    async def go() -> None:
        db = await _database(f"sqlite:///{tmp_path / 'mc.db'}")
        store = CredentialStore(db, _vault(tmp_path))
        old = TOKEN.replace("4102444800", str(int(time.time()) - 10))
        await store.store("alice", Captured("oauth2", {FILE: old}, None), None, None)
        status = await store.validate("alice", "oauth2", None)
        assert not status.valid and "expired" in status.reason
        await db.close()

    asyncio.run(go())


# --- rotation with a running controller -----------------------------------------------------


def test_a_controller_keeps_working_through_a_rotation_by_another_process(
    tmp_path: Path, database_url: str
) -> None:
    """Two vaults on one key file: one is the running controller, one is `vault rotate`.
    Before the fix, the controller kept sealing with the key the rotation dropped, and could
    not read the re-encrypted records; after a restart its new records were lost."""

    async def go() -> None:
        db = await _database(database_url)
        server = CredentialStore(db, _vault(tmp_path))
        await server.store("alice", _captured(), None, "key-a")
        old_key = server.vault.current

        done = await CredentialStore(db, _vault(tmp_path)).rotate()
        assert done.retired == [old_key]
        # the controller reads a record sealed with a key it has never seen
        assert (await server.validate("alice", "oauth2", "key-a")).valid
        # and seals new records with the new key, not the dropped one
        bob = await server.store("bob", _captured(), None, "key-a")
        assert bob.key_id == done.new_key

        # a second rotation, and the controller seals without reading anything first
        again = await CredentialStore(db, _vault(tmp_path)).rotate()
        carol = await server.store("carol", _captured(), None, "key-a")
        assert carol.key_id == again.new_key

        # a restarted controller reads everything
        assert await _all_readable(db, tmp_path) == 3
        await db.close()

    asyncio.run(go())


def test_a_rotation_that_stopped_after_its_commit_loses_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """The rotation's steps up to the re-encryption's commit, then nothing (a crash): every
    record reads; the next rotation retires the keys left behind."""

    async def go() -> None:
        db = await _database(database_url)
        store = CredentialStore(db, _vault(tmp_path))
        first_key = store.vault.current
        for user in ("alice", "bob"):
            await store.store(user, _captured(), None, "key-a")
        crashed = CredentialStore(db, _vault(tmp_path))
        async with crashed.vault.exclusive():
            second_key = crashed.vault.add_key()
            await crashed.reencrypt()
        del crashed
        assert _keys_on_disk(tmp_path).keys() == {first_key, second_key}
        assert await _all_readable(db, tmp_path) == 2
        done = await CredentialStore(db, _vault(tmp_path)).rotate()
        assert sorted(done.retired) == sorted([first_key, second_key])
        assert _keys_on_disk(tmp_path).keys() == {done.new_key}
        assert await _all_readable(db, tmp_path) == 2
        await db.close()

    asyncio.run(go())


def _cli_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "MC_DATA_DIR": str(tmp_path),
        "MC_CONFIG": str(tmp_path / "none.toml"),
        "MC_DATABASE_URL": database_url,
    }


ROTATE = [sys.executable, "-m", "master_controller.cli", "vault", "rotate"]


@contextmanager
def _writes_blocked(database_url: str) -> Iterator[None]:
    """Hold the database so that a rotation's re-encryption cannot commit: SQLite's write
    lock, PostgreSQL's lock on the credentials table."""
    url = make_url(database_url)
    if url.drivername.startswith("sqlite"):
        held = sqlite3.connect(str(url.database), isolation_level=None)
        held.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            held.execute("ROLLBACK")
            held.close()
        return
    with psycopg.connect(dbname=url.database, host=url.query["host"]) as pg:
        pg.execute("LOCK TABLE credentials IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            pg.rollback()


def test_a_rotation_killed_after_writing_its_key_loses_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """`vault rotate` SIGKILLed after it wrote the new key and before its re-encryption
    committed (the database held so that it waits there): every record still reads with
    the key file as it is, and a later rotation completes and retires the stale keys."""

    async def fill() -> str:
        db = await _database(database_url)
        store = CredentialStore(db, _vault(tmp_path))
        for user in ("alice", "bob", "carol"):
            await store.store(user, _captured(), None, "key-a")
        await db.close()
        return store.vault.current

    first_key = asyncio.run(fill())
    with _writes_blocked(database_url):
        rotate = subprocess.Popen(
            ROTATE,
            env=_cli_env(tmp_path, database_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while len(_keys_on_disk(tmp_path)) < 2:
            assert rotate.poll() is None, rotate.communicate()
            assert time.monotonic() < deadline, "the rotation never wrote its key"
            time.sleep(0.01)
        time.sleep(0.3)  # it is waiting for the database now
        assert rotate.poll() is None
        rotate.send_signal(signal.SIGKILL)
        rotate.communicate(timeout=30)
    assert rotate.returncode == -signal.SIGKILL
    stale = set(_keys_on_disk(tmp_path))
    assert first_key in stale and len(stale) == 2

    async def after() -> None:
        db = await _database(database_url)
        assert set((await _key_ids(db)).values()) == {first_key}  # nothing re-encrypted
        assert await _all_readable(db, tmp_path) == 3
        done = await CredentialStore(db, _vault(tmp_path)).rotate()  # the lock is free again
        assert set(done.retired) == stale and done.reencrypted == 3
        assert _keys_on_disk(tmp_path).keys() == {done.new_key}
        assert await _all_readable(db, tmp_path) == 3
        await db.close()

    asyncio.run(after())


def test_vault_rotate_command_while_a_controller_stores_records(
    tmp_path: Path, database_url: str
) -> None:
    """A real `master-controller vault rotate` while this process (a controller) keeps
    storing records: the controller switches to the new key without a restart, the
    rotation retires the old one, and every record reads with a vault fresh from disk."""

    async def go() -> tuple[list[str], str, str]:
        db = await _database(database_url)
        server = CredentialStore(db, _vault(tmp_path))
        old_key = server.vault.current
        for i in range(100):
            await server.store(f"before-{i}", _captured(), None, "key-a")
        rotate = await asyncio.create_subprocess_exec(
            *ROTATE,
            env=_cli_env(tmp_path, database_url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        communicate = asyncio.ensure_future(rotate.communicate())
        used, i = [], 0
        while not communicate.done():
            row = await server.store(f"during-{i}", _captured(), None, f"key-{i % 3}")
            used.append(row.key_id)
            i += 1
            await asyncio.sleep(0.01)
        out, err = await communicate
        assert rotate.returncode == 0, err.decode()
        for j in range(3):
            row = await server.store(f"after-{j}", _captured(), None, "key-a")
            used.append(row.key_id)
        assert await _all_readable(db, tmp_path) == 100 + i + 3
        await db.close()
        return used, old_key, out.decode()

    used, old_key, out = asyncio.run(go())
    new_keys = set(_keys_on_disk(tmp_path))
    assert len(new_keys) == 1 and old_key not in new_keys
    (new_key,) = new_keys
    assert f"vault key {new_key} is current" in out and f"retired: {old_key}" in out
    # the controller stored records before the rotation and after it, in one run
    assert used[0] == old_key and used[-1] == new_key


def test_vault_rotate_command(tmp_path: Path) -> None:
    env = _cli_env(tmp_path, f"sqlite:///{tmp_path / 'mc.db'}")
    first = subprocess.run(ROTATE, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "0 records re-encrypted" in first.stdout
    keys = json.loads((tmp_path / "vault.keys").read_text())
    assert len(keys["keys"]) == 1 and keys["current"] in first.stdout
    env["MC_VAULT_KEY"] = base64.b64encode(b"z" * 32).decode()
    refused = subprocess.run(ROTATE, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "rotate it there" in refused.stderr
