"""Stored credentials through the API of a running controller, on SQLite and PostgreSQL: a
key sees only what its own sessions captured (another key signing in the same user gets a
record of its own), admin sees all and names whose record when there are several, decrypted
export needs the export scope (admin does not imply it) and ownership (unless the key is
also admin) and is audited, deletion is audited, bad names are refused."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from master_controller.auth import create_api_key
from master_controller.credentials import Captured, CredentialStore
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.store.models import ApiKeyRow, AuditRow, SessionRow
from master_controller.vault import Vault
from tests.servers import Controller, controller

pytestmark = pytest.mark.integration
TOKEN = '{"access_token": "tok-API-SECRET", "token_type": "Bearer", "expires_at": 4102444800}'
EXPIRED = '{"access_token": "tok-OLD", "token_type": "Bearer", "expires_at": 1000}'
FILE = ".config/mc-oauth2/token.json"
EXPORT = "/api/auth/credentials/user-1/oauth2/export"


@pytest.fixture
def ctl(
    golden_image: str, integration_settings: Settings, database_url: str, tmp_path: Path
) -> Iterator[Controller]:
    # `serve` wants a current image (it builds one otherwise), though no guest starts here
    with controller(
        integration_settings.data_dir,
        database_url,
        tmp_path,
        guest_network="10.213.144.0/20",
        runtime="container",
        vault_key_file=str(tmp_path / "vault.keys"),
    ) as running:
        running.keys.update(asyncio.run(_more_keys(database_url)))
        yield running


async def _more_keys(database_url: str) -> dict[str, str]:
    """Keys beside the controller's alice, bob (sessions) and ops (admin)."""
    db = Database(database_url)
    made = {}
    async with db.session() as session:
        for name, scopes in (
            ("exporter", ("sessions", "export")),  # exports what its own sessions captured
            ("export-only", ("export",)),
            ("ops-exporter", ("admin", "export")),  # exports any key's
        ):
            made[name] = await create_api_key(session, name, scopes)
    await db.close()
    return made


def _db(database_url: str) -> Database:
    return Database(database_url)


def _key_id(database_url: str, key_name: str) -> str:
    async def go() -> str:
        db = _db(database_url)
        async with db.session() as session:
            key_id = await session.scalar(select(ApiKeyRow.id).where(ApiKeyRow.name == key_name))
        await db.close()
        assert key_id is not None
        return key_id

    return asyncio.run(go())


def _store(database_url: str, tmp_path: Path, user: str, key_name: str, token: str = TOKEN) -> str:
    """A capture as the controller stores it for a session of ``key_name``, with a captured
    session row beside it; returns the session's id."""
    settings = Settings(data_dir=tmp_path, vault_key_file=tmp_path / "vault.keys")
    key_id = _key_id(database_url, key_name)
    session_id = str(uuid.uuid4())

    async def go() -> None:
        db = _db(database_url)
        async with db.session() as session:
            session.add(
                SessionRow(
                    id=session_id,
                    user_id=user,
                    provider="oauth2",
                    state="captured",
                    reason="credentials stored; guest destroyed",
                    runtime="container",
                    image_id="none",
                    api_key_id=key_id,
                )
            )
            await session.commit()
        store = CredentialStore(db, Vault.open(settings))
        await store.store(user, Captured("oauth2", {FILE: token}, None), session_id, key_id)
        await db.close()

    asyncio.run(go())
    return session_id


def _audit(database_url: str) -> list[tuple[str, str | None, str]]:
    async def go() -> list[tuple[str, str | None, str]]:
        db = _db(database_url)
        async with db.session() as session:
            rows = (await session.execute(select(AuditRow).order_by(AuditRow.id))).scalars()
            actions = [(f"{r.action}:{r.user_id}", r.api_key_id, r.detail) for r in rows]
        await db.close()
        return actions

    return asyncio.run(go())


def test_credentials_belong_to_the_key_that_captured_them(
    ctl: Controller, database_url: str, tmp_path: Path
) -> None:
    _store(database_url, tmp_path, "user-1", "alice")
    alice_id = _key_id(database_url, "alice")
    listed = ctl.request("GET", "/api/auth/credentials/user-1").json()["credentials"]
    assert [c["provider"] for c in listed] == ["oauth2"] and listed[0]["files"] == [FILE]
    assert listed[0]["apiKeyId"] == alice_id
    assert "tok-API-SECRET" not in json.dumps(listed)
    assert ctl.request("GET", "/api/auth/credentials/user-1", key="bob").json()["credentials"] == []
    assert (
        len(ctl.request("GET", "/api/auth/credentials/user-1", key="ops").json()["credentials"])
        == 1
    )

    assert ctl.request("GET", "/api/auth/validate/user-1/oauth2").json()["valid"] is True
    # none: 200 and not_found (as the original answered); another key's record looks the same
    none = {"valid": False, "reason": "not_found"}
    assert (
        ctl.request("GET", "/api/auth/validate/user-1/oauth2", key="bob").json().items()
        >= none.items()
    )
    assert ctl.request("GET", "/api/auth/validate/user-1/codex").json().items() >= none.items()
    # naming the owner's key does not help another key
    named = ctl.request(
        "GET", "/api/auth/validate/user-1/oauth2", key="bob", params={"apiKeyId": alice_id}
    )
    assert named.status_code == 200 and named.json().items() >= none.items()

    # decrypted export: the export scope (admin does not imply it) ...
    for key in ("alice", "ops"):
        refused = ctl.request("POST", EXPORT, key=key)
        assert refused.status_code == 403 and "'export' scope" in refused.json()["error"]
    # ... and the record's own key, unless the key is also admin (the finding: an export
    # key took any user's credentials)
    for key in ("exporter", "export-only"):
        assert ctl.request("POST", EXPORT, key=key).status_code == 404
    exported = ctl.request("POST", EXPORT, key="ops-exporter")
    assert exported.status_code == 200 and exported.json()["files"][FILE] == TOKEN
    _store(database_url, tmp_path, "user-1", "exporter")
    own = ctl.request("POST", EXPORT, key="exporter")
    assert own.status_code == 200 and own.json()["files"][FILE] == TOKEN
    # an export-only key cannot run sessions
    assert ctl.request("GET", "/api/auth/sessions", key="export-only").status_code == 403

    assert (
        ctl.request("DELETE", "/api/auth/credentials/user-1/oauth2", key="bob").status_code == 404
    )
    assert (
        ctl.request("DELETE", "/api/auth/credentials/user-1/oauth2").json()["status"] == "deleted"
    )
    assert ctl.request("GET", "/api/auth/credentials/user-1").json()["credentials"] == []
    audit = _audit(database_url)
    exporter_id = _key_id(database_url, "exporter")
    assert [(a, k) for a, k, _ in audit] == [
        ("export:user-1", _key_id(database_url, "ops-exporter")),
        ("export:user-1", exporter_id),
        ("delete:user-1", alice_id),
    ]
    # the audit says whose record was taken
    assert audit[0][2].endswith(f"record of key {alice_id}")
    assert audit[1][2].endswith(f"record of key {exporter_id}")


def test_another_key_signing_in_the_same_user_gets_its_own_record(
    ctl: Controller, database_url: str, tmp_path: Path
) -> None:
    """The finding: key B signing in "alice" replaced key A's credentials, and B's session
    reported on A's."""
    alice_session = _store(database_url, tmp_path, "user-1", "alice")
    bob_session = _store(database_url, tmp_path, "user-1", "bob", EXPIRED)
    alice_id, bob_id = _key_id(database_url, "alice"), _key_id(database_url, "bob")

    assert ctl.request("GET", "/api/auth/validate/user-1/oauth2").json()["valid"] is True
    bobs = ctl.request("GET", "/api/auth/validate/user-1/oauth2", key="bob").json()
    assert bobs["valid"] is False and "expired" in bobs["reason"]
    # each session reports on its own key's record
    status = f"/api/auth/session/{alice_session}/credentials/status"
    assert ctl.request("GET", status).json()["valid"] is True
    status = f"/api/auth/session/{bob_session}/credentials/status"
    assert ctl.request("GET", status, key="bob").json()["valid"] is False
    assert ctl.request("GET", status).status_code == 404  # alice's key: not her session

    # an admin sees both, and says whose it means
    listed = ctl.request("GET", "/api/auth/credentials/user-1", key="ops").json()["credentials"]
    assert sorted(c["apiKeyId"] for c in listed) == sorted([alice_id, bob_id])
    ambiguous = ctl.request("GET", "/api/auth/validate/user-1/oauth2", key="ops")
    assert ambiguous.status_code == 409
    assert alice_id in ambiguous.json()["error"] and bob_id in ambiguous.json()["error"]
    chosen = ctl.request(
        "GET", "/api/auth/validate/user-1/oauth2", key="ops", params={"apiKeyId": bob_id}
    )
    assert chosen.status_code == 200 and chosen.json()["valid"] is False
    assert ctl.request("POST", EXPORT, key="ops-exporter").status_code == 409
    exported = ctl.request("POST", EXPORT, key="ops-exporter", params={"apiKeyId": bob_id})
    assert exported.json()["files"][FILE] == EXPIRED
    # bob deletes his; alice's stays
    deleted = ctl.request("DELETE", "/api/auth/credentials/user-1/oauth2", key="bob")
    assert deleted.json()["status"] == "deleted"
    assert ctl.request("GET", "/api/auth/validate/user-1/oauth2").json()["valid"] is True
    assert (
        len(ctl.request("GET", "/api/auth/credentials/user-1", key="ops").json()["credentials"])
        == 1
    )


def test_bad_names_are_refused(ctl: Controller) -> None:
    for path in (
        "/api/auth/validate/user-1/Not-A-Provider",
        "/api/auth/credentials/bad%20user",
        "/api/auth/validate/" + "u" * 200 + "/oauth2",
        "/api/auth/validate/user-1/oauth2?apiKeyId=not-a-key-id",
    ):
        assert ctl.request("GET", path).status_code == 422, path


def test_starting_oauth2_without_its_settings_is_a_clear_error(ctl: Controller) -> None:
    answer = ctl.request("POST", "/api/auth/start", json={"userId": "u", "provider": "oauth2"})
    assert (
        answer.status_code == 400 and "oauth2 provider is not configured" in answer.json()["error"]
    )
