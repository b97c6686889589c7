"""Captured credentials: stored encrypted through the vault, listed without secrets,
validated with the provider's own validator, exported (audited), deleted, re-encrypted."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select

from master_controller.errors import CredentialsNotFound, VaultError
from master_controller.store.database import Database
from master_controller.store.models import AuditRow, CredentialRow, utcnow
from master_controller.vault import Sealed, Vault
from mc_agent import providers
from mc_agent.providers import CredentialStatus


@dataclass(frozen=True)
class Captured:
    """What a guest's agent handed over: the provider's credential files."""

    provider: str
    files: dict[str, str]
    expires_at: float | None


class CredentialStore:
    def __init__(self, db: Database, vault: Vault) -> None:
        self.db = db
        self.vault = vault

    async def store(
        self, user_id: str, captured: Captured, session_id: str | None, api_key_id: str | None
    ) -> CredentialRow:
        """Encrypt and keep ``captured`` as the user's credentials for its provider (a newer
        capture replaces the older one)."""
        record_id = str(uuid.uuid4())
        plaintext = json.dumps({"files": captured.files}).encode()
        sealed = self.vault.seal(record_id, user_id, captured.provider, plaintext)
        expires = datetime.fromtimestamp(captured.expires_at, UTC) if captured.expires_at else None
        row = CredentialRow(
            id=record_id,
            user_id=user_id,
            provider=captured.provider,
            session_id=session_id,
            api_key_id=api_key_id,
            key_id=sealed.key_id,
            nonce=sealed.nonce,
            ciphertext=sealed.ciphertext,
            files=",".join(sorted(captured.files)),
            captured_at=utcnow(),
            expires_at=expires,
        )
        async with self.db.session() as db:
            await db.execute(
                delete(CredentialRow).where(
                    CredentialRow.user_id == user_id, CredentialRow.provider == captured.provider
                )
            )
            db.add(row)
            await db.commit()
        return row

    async def for_user(self, user_id: str) -> list[CredentialRow]:
        async with self.db.session() as db:
            result = await db.execute(
                select(CredentialRow)
                .where(CredentialRow.user_id == user_id)
                .order_by(CredentialRow.provider)
            )
            return list(result.scalars())

    async def get(self, user_id: str, provider: str) -> CredentialRow:
        async with self.db.session() as db:
            row = await db.scalar(
                select(CredentialRow).where(
                    CredentialRow.user_id == user_id, CredentialRow.provider == provider
                )
            )
        if row is None:
            raise CredentialsNotFound(f"no {provider[:32]} credentials for {user_id[:128]!r}")
        return row

    def files(self, row: CredentialRow) -> dict[str, str]:
        plaintext = self.vault.open_sealed(
            row.id, row.user_id, row.provider, Sealed(row.key_id, row.nonce, row.ciphertext)
        )
        files: dict[str, str] = json.loads(plaintext)["files"]
        return files

    async def validate(self, user_id: str, provider: str) -> CredentialStatus:
        row = await self.get(user_id, provider)
        try:
            files = self.files(row)
        except VaultError as exc:
            return CredentialStatus(False, exc.reason)
        return providers.get(provider).validate(files, time.time())

    async def export(self, user_id: str, provider: str, api_key_id: str | None) -> dict[str, Any]:
        """The decrypted files, with an audit record of who took them."""
        row = await self.get(user_id, provider)
        files = self.files(row)
        await self.audit(api_key_id, "export", user_id, provider, f"files: {row.files}")
        return {"provider": provider, "files": files, "captured_at": row.captured_at}

    async def delete(self, user_id: str, provider: str, api_key_id: str | None) -> None:
        row = await self.get(user_id, provider)
        async with self.db.session() as db:
            await db.execute(delete(CredentialRow).where(CredentialRow.id == row.id))
            await db.commit()
        await self.audit(api_key_id, "delete", user_id, provider, "")

    async def audit(
        self, api_key_id: str | None, action: str, user_id: str, provider: str, detail: str
    ) -> None:
        async with self.db.session() as db:
            db.add(
                AuditRow(
                    api_key_id=api_key_id,
                    action=action,
                    user_id=user_id,
                    provider=provider,
                    detail=detail,
                )
            )
            await db.commit()

    async def rotate(self) -> tuple[str, int, list[str]]:
        """A new key; every record re-encrypted with it in one transaction; old keys
        dropped. Returns (new key id, records re-encrypted, retired key ids)."""
        new_key = self.vault.add_key()
        count = 0
        async with self.db.session() as db:
            rows = list((await db.execute(select(CredentialRow))).scalars())
            for row in rows:
                plaintext = self.vault.open_sealed(
                    row.id, row.user_id, row.provider, Sealed(row.key_id, row.nonce, row.ciphertext)
                )
                sealed = self.vault.seal(row.id, row.user_id, row.provider, plaintext)
                row.key_id, row.nonce, row.ciphertext = (
                    sealed.key_id,
                    sealed.nonce,
                    sealed.ciphertext,
                )
                count += 1
            await db.commit()
        retired = self.vault.retire_others()
        await self.audit(None, "rotate", "", "", f"new key {new_key}; {count} records")
        return new_key, count, retired
