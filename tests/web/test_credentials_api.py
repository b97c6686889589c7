"""Stored credentials through the API, on SQLite and PostgreSQL: a key sees only what its
own sessions captured, admin sees all, decrypted export needs the export scope (admin does
not imply it) and is audited, deletion is audited, bad names are refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from master_controller.credentials import Captured, CredentialStore
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.store.models import ApiKeyRow, AuditRow
from master_controller.vault import Vault
from tests.servers import Controller, controller

pytestmark = pytest.mark.integration
TOKEN = '{"access_token": "tok-API-SECRET", "token_type": "Bearer", "expires_at": 4102444800}'
FILE = ".config/mc-oauth2/token.json"


@pytest.fixture
def ctl(
    golden_image: str, integration_settings: Settings, database_url: str, tmp_path: Path
) -> Iterator[Controller]:
    with controller(
        integration_settings.data_dir,
        database_url,
        tmp_path,
        guest_network="10.213.144.0/20",
        vault_key_file=str(tmp_path / "vault.keys"),
    ) as running:
        exporter = running.cli("apikey", "create", "exporter", "--scope", "export")
        assert exporter.returncode == 0, exporter.stderr
        running.keys["exporter"] = exporter.stdout.strip()
        yield running


def _store(ctl: Controller, database_url: str, tmp_path: Path, user: str, key_name: str) -> None:
    """A capture as the controller would store it, credited to ``key_name``'s sessions."""
    settings = Settings(data_dir=tmp_path, vault_key_file=tmp_path / "vault.keys")

    async def go() -> None:
        db = Database(database_url)
        async with db.session() as session:
            key_id = await session.scalar(select(ApiKeyRow.id).where(ApiKeyRow.name == key_name))
        store = CredentialStore(db, Vault.open(settings))
        await store.store(user, Captured("oauth2", {FILE: TOKEN}, 4102444800), None, key_id)
        await db.close()

    asyncio.run(go())


def _audit(database_url: str) -> list[str]:
    async def go() -> list[str]:
        db = Database(database_url)
        async with db.session() as session:
            rows = (await session.execute(select(AuditRow).order_by(AuditRow.id))).scalars()
            actions = [f"{r.action}:{r.user_id}" for r in rows]
        await db.close()
        return actions

    return asyncio.run(go())


def test_credentials_belong_to_the_key_that_captured_them(
    ctl: Controller, database_url: str, tmp_path: Path
) -> None:
    _store(ctl, database_url, tmp_path, "user-1", "alice")
    listed = ctl.request("GET", "/api/auth/credentials/user-1").json()
    assert [c["provider"] for c in listed] == ["oauth2"] and listed[0]["files"] == [FILE]
    assert "tok-API-SECRET" not in json.dumps(listed)
    assert ctl.request("GET", "/api/auth/credentials/user-1", key="bob").json() == []
    assert len(ctl.request("GET", "/api/auth/credentials/user-1", key="ops").json()) == 1

    assert ctl.request("GET", "/api/auth/validate/user-1/oauth2").json()["valid"] is True
    assert ctl.request("GET", "/api/auth/validate/user-1/oauth2", key="bob").status_code == 404
    assert ctl.request("GET", "/api/auth/validate/user-1/codex").status_code == 404

    # decrypted export: the export scope only, audited
    for key in ("alice", "ops"):
        refused = ctl.request("POST", "/api/auth/credentials/user-1/oauth2/export", key=key)
        assert refused.status_code == 403 and "'export' scope" in refused.json()["error"]
    exported = ctl.request("POST", "/api/auth/credentials/user-1/oauth2/export", key="exporter")
    assert exported.status_code == 200 and exported.json()["files"][FILE] == TOKEN
    # an export-only key cannot run sessions
    assert ctl.request("GET", "/api/auth/sessions", key="exporter").status_code == 403

    assert (
        ctl.request("DELETE", "/api/auth/credentials/user-1/oauth2", key="bob").status_code == 404
    )
    assert (
        ctl.request("DELETE", "/api/auth/credentials/user-1/oauth2").json()["status"] == "deleted"
    )
    assert ctl.request("GET", "/api/auth/credentials/user-1").json() == []
    assert _audit(database_url) == ["export:user-1", "delete:user-1"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/auth/validate/user-1/Not-A-Provider",
        "/api/auth/credentials/bad%20user",
        "/api/auth/validate/" + "u" * 200 + "/oauth2",
    ],
)
def test_bad_names_are_refused(ctl: Controller, path: str) -> None:
    assert ctl.request("GET", path).status_code == 422


def test_starting_oauth2_without_its_settings_is_a_clear_error(ctl: Controller) -> None:
    answer = ctl.request("POST", "/api/auth/start", json={"userId": "u", "provider": "oauth2"})
    assert (
        answer.status_code == 400 and "oauth2 provider is not configured" in answer.json()["error"]
    )
