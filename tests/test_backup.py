"""Backup and restore: credentials sealed through the real vault come back byte for byte on
a fresh host (SQLite and PostgreSQL, and across the two); a wrong secret or an altered
archive is refused with nothing written; an existing installation is kept unless --force;
the archive is 0600 and holds no secret in the clear."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from master_controller.auth import authenticate, create_api_key, load_secret
from master_controller.backup import (
    backup,
    existing_installation,
    open_archive,
    restore,
    restored_config,
)
from master_controller.credentials import Captured, CredentialStore
from master_controller.errors import BackupError, DataDirInUse
from master_controller.instance import claim
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.vault import Vault
from tests.servers import postgresql_database

SECRET = b"correct horse battery staple, twice"
FILE = ".config/mc-oauth2/token.json"
USERS = 12


def _settings(root: Path, database_url: str) -> Settings:
    return Settings(data_dir=root / "data", database_url=database_url)


def _captured(user: str, key: str) -> Captured:
    token = {"access_token": f"tok-{user}-{key}-secret", "token_type": "Bearer"}
    token["expires_at"] = 4102444800  # type: ignore[assignment]
    return Captured("oauth2", {FILE: json.dumps(token), "extra.bin": f"x{user}"}, 4102444800)


async def _install(settings: Settings) -> dict[str, object]:
    """An installation with an API key, credentials of USERS users under two API keys (a
    rotation in between, and one that stopped after writing its key, so records are under
    two vault keys), an upstream login and the ticket signing key; what it holds."""
    db = Database(settings.database)
    await asyncio.to_thread(db.migrate)
    store = CredentialStore(db, Vault.open(settings))
    async with db.session() as session:
        api_key = await create_api_key(session, "ops", ("sessions",))
    for i in range(USERS):
        await store.store(f"user-{i}", _captured(f"user-{i}", "a"), None, "key-a")
        if i == USERS // 2:
            await store.rotate()  # records under an older key, re-sealed; a new current key
        if i == 3 * USERS // 4:  # a rotation stopped after writing its key: records under
            async with store.vault.exclusive():  # two keys from here on
                store.vault.add_key()
        await store.store(f"user-{i}", _captured(f"user-{i}", "b"), None, "key-b")
    await store.seal_upstream_login("http://127.0.0.1:3128", "proxy-user", "proxy-pass-xyz")
    secret_key = load_secret(settings.secret_key_path)
    await db.close()
    return {"api_key": api_key, "secret_key": secret_key, "current": store.vault.current}


async def _check_restored(settings: Settings, installed: dict[str, object]) -> None:
    """Every credential of the installation decrypts to the same bytes, the upstream login,
    the API key and the signing key work, the key files are 0600."""
    db = Database(settings.database)
    store = CredentialStore(db, Vault.open(settings))
    try:
        for i in range(USERS):
            for key in ("a", "b"):
                got = await store.export(f"user-{i}", "oauth2", f"key-{key}")
                assert got["files"] == _captured(f"user-{i}", key).files
        logins = await store.upstream_logins()
        assert logins == {"http://127.0.0.1:3128": ("proxy-user", "proxy-pass-xyz")}
        async with db.session() as session:
            caller = await authenticate(session, str(installed["api_key"]))
        assert caller.name == "ops"
        # a new capture after the restore works and uses the restored current key
        row = await store.store("late", _captured("late", "a"), None, "key-a")
        assert row.key_id == installed["current"]
    finally:
        await db.close()
    assert settings.secret_key_path.read_bytes() == installed["secret_key"]
    assert len(json.loads(settings.vault_key_path.read_text())["keys"]) == 2
    for path in (settings.vault_key_path, settings.secret_key_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.fixture
def fresh_url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of the same kind as ``database_url``, for the restored host."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'restored' / 'data' / 'mc.db'}"
        return
    server = request.getfixturevalue("postgresql")
    with postgresql_database(server, f"mc_restored_{os.getpid()}") as url:
        yield url


def test_backup_wipe_restore_gives_back_every_credential(
    tmp_path: Path, database_url: str, fresh_url: str
) -> None:
    source = _settings(tmp_path / "source", database_url)
    installed = asyncio.run(_install(source))
    archive = tmp_path / "mc.backup"
    summary = asyncio.run(backup(source, archive, SECRET, None))
    assert summary.credentials == 2 * USERS
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    blob = archive.read_bytes()
    for clear in (b"tok-user-1-a-secret", b"proxy-pass-xyz", installed["secret_key"]):
        assert clear not in blob
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # nothing left
    with pytest.raises(BackupError, match="exists already"):  # never overwritten
        asyncio.run(backup(source, archive, SECRET, None))

    shutil.rmtree(source.data_dir)  # the host is gone
    target = _settings(tmp_path / "restored", fresh_url)
    done = restore(target, open_archive(archive, SECRET))
    assert (done.credentials, done.opened, done.upstream_logins) == (2 * USERS, 2 * USERS, 1)
    asyncio.run(_check_restored(target, installed))

    if not database_url.startswith("sqlite"):  # and PostgreSQL's archive into SQLite
        other = _settings(tmp_path / "to-sqlite", f"sqlite:///{tmp_path / 'to-sqlite.db'}")
        restore(other, open_archive(archive, SECRET))
        asyncio.run(_check_restored(other, installed))


def test_wrong_secret_or_altered_archive_is_refused_and_nothing_written(tmp_path: Path) -> None:
    source = _settings(tmp_path / "source", f"sqlite:///{tmp_path / 'source.db'}")
    asyncio.run(_install(source))
    archive = tmp_path / "mc.backup"
    asyncio.run(backup(source, archive, SECRET, None))
    blob = archive.read_bytes()
    target = _settings(tmp_path / "restored", f"sqlite:///{tmp_path / 'restored.db'}")

    with pytest.raises(BackupError, match="wrong key or passphrase, or the file was altered"):
        open_archive(archive, b"not the secret at all, sorry")
    for where in (len(blob) // 2, len(blob) - 1):  # the ciphertext, the tag
        altered = tmp_path / f"altered-{where}"
        altered.write_bytes(blob[:where] + bytes([blob[where] ^ 1]) + blob[where + 1 :])
        with pytest.raises(BackupError, match="was altered"):
            open_archive(altered, SECRET)
    # the header is authenticated too: a changed salt derives another key
    header_end = blob.index(b'"salt": "') + len(b'"salt": "')
    salted = bytearray(blob)
    salted[header_end] = ord("A") if salted[header_end] != ord("A") else ord("B")
    (tmp_path / "salted").write_bytes(bytes(salted))
    with pytest.raises(BackupError, match="was altered"):
        open_archive(tmp_path / "salted", SECRET)
    (tmp_path / "junk").write_bytes(b"not a backup")
    with pytest.raises(BackupError, match="not a master-controller backup"):
        open_archive(tmp_path / "junk", SECRET)
    assert not target.data_dir.exists()
    assert not (tmp_path / "restored.db").exists()


def test_restore_refuses_an_existing_installation_unless_forced(tmp_path: Path) -> None:
    source = _settings(tmp_path / "source", f"sqlite:///{tmp_path / 'source.db'}")
    installed = asyncio.run(_install(source))
    archive = tmp_path / "mc.backup"
    asyncio.run(backup(source, archive, SECRET, None))
    contents = open_archive(archive, SECRET)

    # another installation with its own keys and records is where the restore would go
    other = _settings(tmp_path / "other", f"sqlite:///{tmp_path / 'other.db'}")
    asyncio.run(_install(other))
    keys_before = other.vault_key_path.read_bytes()
    with pytest.raises(BackupError, match="an installation is here already"):
        restore(other, contents)
    assert other.vault_key_path.read_bytes() == keys_before

    restore(other, contents, force=True)
    asyncio.run(_check_restored(other, installed))


def test_cli_backup_and_restore_on_a_fresh_host(tmp_path: Path) -> None:
    """Through the command line: the settings file comes back and the restore follows it;
    a key file others can read is refused; the secret never is an argument."""
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    data = tmp_path / "host" / "data"
    config.write_text(f'data_dir = "{data}"\negress_port = 0\n')
    settings = Settings(data_dir=data)
    installed = asyncio.run(_install(settings))
    key_file = tmp_path / "backup.key"
    key_file.write_bytes(SECRET)
    key_file.chmod(0o644)
    env = {**os.environ, "MC_CONFIG": str(config), "PYTHONPATH": "src"}
    archive = tmp_path / "mc.backup"

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "master-controller"), *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = cli("backup", str(archive), "--key-file", str(key_file))
    assert refused.returncode == 1 and "readable by others" in refused.stderr
    key_file.chmod(0o600)
    made = cli("backup", str(archive), "--key-file", str(key_file), "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["credentials"] == 2 * USERS

    shutil.rmtree(tmp_path / "host")
    config.unlink()  # a fresh host: no settings file either
    wrong = cli("restore", str(archive), "--passphrase-stdin", stdin="a wrong passphrase!!\n")
    assert wrong.returncode == 1 and "wrong key or passphrase" in wrong.stderr
    assert not config.exists() and not data.exists()

    done = cli("restore", str(archive), "--key-file", str(key_file), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["credentialsOpened"] == 2 * USERS
    assert config.read_text().startswith(f'data_dir = "{data}"')
    asyncio.run(_check_restored(Settings(data_dir=data), installed))
    again = cli("restore", str(archive), "--key-file", str(key_file))
    assert again.returncode == 1 and "refuses to replace it" in again.stderr


def test_restore_with_the_vault_key_setting_checks_it_first(tmp_path: Path) -> None:
    """An installation whose vault key is a setting: the archive carries that key; a
    restore where the setting holds another key is refused before anything is written, one
    with the same key opens every credential."""
    key = base64.b64encode(bytes(range(32))).decode()
    url = f"sqlite:///{tmp_path / 'source.db'}"
    source = Settings(data_dir=tmp_path / "source" / "data", database_url=url, vault_key=key)
    installed = asyncio.run(_install_without_rotation(source))
    archive = tmp_path / "mc.backup"
    asyncio.run(backup(source, archive, SECRET, None))
    contents = open_archive(archive, SECRET)

    other_key = base64.b64encode(bytes(32)).decode()
    wrong = Settings(
        data_dir=tmp_path / "wrong",
        database_url=f"sqlite:///{tmp_path / 'w.db'}",
        vault_key=other_key,
    )
    with pytest.raises(BackupError, match="vault_key setting here does not open"):
        restore(wrong, contents)
    assert not wrong.data_dir.exists() and not (tmp_path / "w.db").exists()

    right = Settings(
        data_dir=tmp_path / "right", database_url=f"sqlite:///{tmp_path / 'r.db'}", vault_key=key
    )
    done = restore(right, contents)
    assert done.opened == USERS and not right.vault_key_path.exists()
    assert asyncio.run(_exported(right)) == installed


async def _install_without_rotation(settings: Settings) -> dict[str, dict[str, str]]:
    db = Database(settings.database)
    await asyncio.to_thread(db.migrate)
    store = CredentialStore(db, Vault.open(settings))
    for i in range(USERS):
        await store.store(f"user-{i}", _captured(f"user-{i}", "a"), None, "key-a")
    await db.close()
    return {f"user-{i}": _captured(f"user-{i}", "a").files for i in range(USERS)}


async def _exported(settings: Settings) -> dict[str, dict[str, str]]:
    db = Database(settings.database)
    store = CredentialStore(db, Vault.open(settings))
    try:
        return {
            f"user-{i}": (await store.export(f"user-{i}", "oauth2", "key-a"))["files"]
            for i in range(USERS)
        }
    finally:
        await db.close()


def test_restore_refuses_a_newer_schema_a_running_controller_and_keeps_a_settings_file(
    tmp_path: Path,
) -> None:
    source = _settings(tmp_path / "source", f"sqlite:///{tmp_path / 'source.db'}")
    asyncio.run(_install_without_rotation(source))
    archive = tmp_path / "mc.backup"
    config = tmp_path / "config.toml"
    config.write_text("egress_port = 0\nport = 4100\n")
    asyncio.run(backup(source, archive, SECRET, config))
    contents = open_archive(archive, SECRET)
    target = _settings(tmp_path / "target", f"sqlite:///{tmp_path / 'target.db'}")

    with pytest.raises(BackupError, match="newer"):
        restore(target, dataclasses.replace(contents, revision="9999"))
    with claim(target), pytest.raises(DataDirInUse):  # a controller runs there
        restore(target, contents)
    assert not (tmp_path / "target.db").exists() and not existing_installation(target)

    here = tmp_path / "etc" / "config.toml"
    here.parent.mkdir()
    here.write_text("port = 4200\n")
    assert "kept" in (restored_config(here, contents) or "")
    assert here.read_text() == "port = 4200\n"
    aside = here.with_name("config.toml.from-backup")
    assert aside.read_text() == config.read_text()
    assert stat.S_IMODE(aside.stat().st_mode) == 0o600


def test_a_backup_while_the_database_is_in_use_takes_what_was_committed(tmp_path: Path) -> None:
    """SQLite in WAL mode with a writer holding the database: what it committed (still in
    the write-ahead log) is in the archive, what it has not committed is not."""
    db_path = tmp_path / "in use.db"  # a space: the path is percent-encoded in a URI
    source = _settings(tmp_path / "source", f"sqlite:///{db_path}")
    asyncio.run(_install_without_rotation(source))
    writer = sqlite3.connect(db_path, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute(
            "INSERT INTO audit (at, action, user_id, provider, detail) "
            "VALUES ('2026-01-01 00:00:00', 'committed', '', '', '')"
        )
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "INSERT INTO audit (at, action, user_id, provider, detail) "
            "VALUES ('2026-01-01 00:00:00', 'uncommitted', '', '', '')"
        )
        assert Path(f"{db_path}-wal").stat().st_size > 0
        archive = tmp_path / "mc.backup"
        asyncio.run(backup(source, archive, SECRET, None))
    finally:
        writer.rollback()
        writer.close()
    actions = [row["action"] for row in open_archive(archive, SECRET).tables["audit"]]
    assert "committed" in actions and "uncommitted" not in actions
