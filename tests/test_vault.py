"""The vault: AES-GCM records bound to their id, user and provider; key file 0600; key
rotation re-encrypts every record; a wrong key or a moved record does not decrypt."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from master_controller.credentials import Captured, CredentialStore
from master_controller.errors import ConfigError, VaultError
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.vault import Sealed, Vault


def _vault(tmp_path: Path) -> Vault:
    return Vault.open(Settings(data_dir=tmp_path, vault_key_file=tmp_path / "vault.keys"))


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    first = _vault(tmp_path)
    assert stat.S_IMODE((tmp_path / "vault.keys").stat().st_mode) == 0o600
    again = _vault(tmp_path)
    assert again.current == first.current and again.keys == first.keys


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=4096), user=st.text(min_size=1, max_size=40))
def test_round_trip(plaintext: bytes, user: str) -> None:
    vault = Vault({"k-1": b"k" * 32}, "k-1", None)
    sealed = vault.seal("rec-1", user, "codex", plaintext)
    assert sealed.ciphertext != plaintext or not plaintext
    assert vault.open_sealed("rec-1", user, "codex", sealed) == plaintext


def test_a_record_does_not_open_elsewhere_or_altered(tmp_path: Path) -> None:
    vault = _vault(tmp_path)
    sealed = vault.seal("rec-1", "alice", "codex", b'{"token": "secret"}')
    for record, user, provider in (
        ("rec-2", "alice", "codex"),
        ("rec-1", "bob", "codex"),
        ("rec-1", "alice", "gemini_cli"),
    ):
        with pytest.raises(VaultError, match="does not decrypt"):
            vault.open_sealed(record, user, provider, sealed)
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(VaultError):
        vault.open_sealed("rec-1", "alice", "codex", Sealed(sealed.key_id, sealed.nonce, flipped))
    with pytest.raises(VaultError, match="not in the vault"):
        Vault({"k-other": b"o" * 32}, "k-other", None).open_sealed(
            "rec-1", "alice", "codex", sealed
        )


def test_nonces_are_never_reused(tmp_path: Path) -> None:
    vault = _vault(tmp_path)
    nonces = {vault.seal("r", "u", "p", b"x").nonce for _ in range(2000)}
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


TOKEN = '{"access_token": "tok-SECRET-123", "token_type": "Bearer", "expires_at": 4102444800}'


def test_rotation_re_encrypts_every_record_and_drops_old_keys(tmp_path: Path) -> None:
    settings_ = Settings(data_dir=tmp_path, vault_key_file=tmp_path / "vault.keys")

    async def go() -> None:
        db = Database(f"sqlite:///{tmp_path / 'mc.db'}")
        await asyncio.to_thread(db.migrate)
        store = CredentialStore(db, Vault.open(settings_))
        old_key = store.vault.current
        for user in ("alice", "bob", "carol"):
            await store.store(
                user,
                Captured("oauth2", {".config/mc-oauth2/token.json": TOKEN}, 4102444800),
                None,
                None,
            )
        new_key, count, retired = await store.rotate()
        assert count == 3 and retired == [old_key] and new_key != old_key
        assert json.loads((tmp_path / "vault.keys").read_text())["keys"].keys() == {new_key}
        # a fresh process with the key file reads every record
        reopened = CredentialStore(db, Vault.open(settings_))
        for user in ("alice", "bob", "carol"):
            row = await reopened.get(user, "oauth2")
            assert row.key_id == new_key
            assert (await reopened.validate(user, "oauth2")).valid
        # the plaintext is nowhere in the database file
        assert b"tok-SECRET-123" not in (tmp_path / "mc.db").read_bytes()
        # with another key the records do not open, and say so
        other = CredentialStore(db, Vault({"k-x": b"x" * 32}, "k-x", None))
        status = await other.validate("alice", "oauth2")
        assert not status.valid and "not in the vault" in status.reason
        await db.close()

    asyncio.run(go())


def test_expired_credentials_validate_as_expired(tmp_path: Path) -> None:
    async def go() -> None:
        db = Database(f"sqlite:///{tmp_path / 'mc.db'}")
        await asyncio.to_thread(db.migrate)
        store = CredentialStore(db, _vault(tmp_path))
        old = TOKEN.replace("4102444800", str(int(time.time()) - 10))
        await store.store(
            "alice", Captured("oauth2", {".config/mc-oauth2/token.json": old}, None), None, None
        )
        status = await store.validate("alice", "oauth2")
        assert not status.valid and "expired" in status.reason
        await db.close()

    asyncio.run(go())


def test_vault_rotate_command(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MC_DATA_DIR": str(tmp_path),
        "MC_CONFIG": str(tmp_path / "none.toml"),
        "MC_DATABASE_URL": f"sqlite:///{tmp_path / 'mc.db'}",
    }
    command = [sys.executable, "-m", "master_controller.cli", "vault", "rotate"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "0 records re-encrypted" in first.stdout
    keys = json.loads((tmp_path / "vault.keys").read_text())
    assert len(keys["keys"]) == 1 and keys["current"] in first.stdout
    env["MC_VAULT_KEY"] = base64.b64encode(b"z" * 32).decode()
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "rotate it there" in refused.stderr
