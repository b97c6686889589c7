"""Captured credentials: stored encrypted through the vault, listed without secrets,
validated with the provider's own validator, exported (audited), deleted, re-encrypted.

A record belongs to the API key whose session captured it: there is one record per (API key,
user, provider), and every read names the key it reads for (``api_key_id``). A key reaches
only its own records. A key with ``admin`` reaches every key's records; when a user has
records under several keys for one provider, an admin names the one it means (``of_key``: a
key id, or :data:`NO_KEY` for a record captured without a key, e.g. before migration 0003
gave records owners) and is refused with the candidates otherwise, rather than acting on
one chosen for it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.exc import IntegrityError

from master_controller.errors import AmbiguousCredentials, CredentialsNotFound, VaultError
from master_controller.store.database import Database
from master_controller.store.models import AuditRow, CredentialRow, UpstreamSecretRow, utcnow
from master_controller.vault import Binding, Sealed, Vault
from mc_agent import providers
from mc_agent.providers import CredentialStatus

# ``of_key`` naming the records that have no API key (visible to admin keys only)
NO_KEY = "none"
# records re-encrypted per round trip during a rotation (all in one transaction)
ROTATE_BATCH = 200


@dataclass(frozen=True)
class Captured:
    """What a guest's agent handed over: the provider's credential files."""

    provider: str
    files: dict[str, str]
    expires_at: float | None


@dataclass(frozen=True)
class Rotation:
    """What a rotation did. ``unreadable`` are record ids that did not decrypt; they were
    left as they were, and so were their keys (delete them, then rotate again)."""

    new_key: str
    reencrypted: int
    retired: list[str]
    unreadable: list[str]


def _key_is(api_key_id: str | None) -> ColumnElement[bool]:
    if api_key_id is None:
        return CredentialRow.api_key_id.is_(None)
    return CredentialRow.api_key_id == api_key_id


def binding(row: CredentialRow) -> Binding:
    """What the row's ciphertext is bound to."""
    return Binding(row.id, row.user_id, row.provider, row.api_key_id, row.binding)


# an upstream proxy's login is sealed bound to the upstream's URL under this "provider"
UPSTREAM = "egress-upstream"


def upstream_binding(upstream: str) -> Binding:
    return Binding(upstream, "", UPSTREAM, None)


class CredentialStore:
    def __init__(self, db: Database, vault: Vault) -> None:
        self.db = db
        self.vault = vault

    async def store(
        self, user_id: str, captured: Captured, session_id: str | None, api_key_id: str | None
    ) -> CredentialRow:
        """Encrypt and keep ``captured`` as the user's credentials for its provider under
        ``api_key_id`` (a newer capture through the same key replaces the older one; other
        keys' records are untouched)."""
        async with self.vault.shared():
            # the key file may have been rotated since this process read it
            self.vault.reload_if_changed()
            try:
                return await self._replace(user_id, captured, session_id, api_key_id)
            except IntegrityError:
                # two captures for one key, user and provider at once: the other one
                # inserted between our delete and insert; replace it in turn
                return await self._replace(user_id, captured, session_id, api_key_id)

    async def _replace(
        self, user_id: str, captured: Captured, session_id: str | None, api_key_id: str | None
    ) -> CredentialRow:
        record_id = str(uuid.uuid4())
        bound = Binding(record_id, user_id, captured.provider, api_key_id)
        sealed = self.vault.seal(bound, json.dumps({"files": captured.files}).encode())
        row = CredentialRow(
            id=record_id,
            user_id=user_id,
            provider=captured.provider,
            session_id=session_id,
            api_key_id=api_key_id,
            key_id=sealed.key_id,
            nonce=sealed.nonce,
            ciphertext=sealed.ciphertext,
            binding=bound.version,
            files=",".join(sorted(captured.files)),
            captured_at=utcnow(),
            expires_at=(
                datetime.fromtimestamp(captured.expires_at, UTC) if captured.expires_at else None
            ),
        )
        async with self.db.session() as db:
            await db.execute(
                delete(CredentialRow).where(
                    _key_is(api_key_id),
                    CredentialRow.user_id == user_id,
                    CredentialRow.provider == captured.provider,
                )
            )
            db.add(row)
            await db.commit()
        return row

    async def for_user(
        self, user_id: str, api_key_id: str | None, *, admin: bool = False
    ) -> list[CredentialRow]:
        """The user's records ``api_key_id`` reaches (every key's for an admin)."""
        query = select(CredentialRow).where(CredentialRow.user_id == user_id)
        if not admin:
            query = query.where(_key_is(api_key_id))
        async with self.db.session() as db:
            result = await db.execute(
                query.order_by(CredentialRow.provider, CredentialRow.captured_at)
            )
            return list(result.scalars())

    async def get(
        self,
        user_id: str,
        provider: str,
        api_key_id: str | None,
        *,
        admin: bool = False,
        of_key: str | None = None,
    ) -> CredentialRow:
        """The one record ``api_key_id`` means: its own, or for an admin the one of key
        ``of_key`` (or the only one there is). Another key's record is "not found" to a
        non-admin, as if it did not exist."""
        missing = CredentialsNotFound(f"no {provider[:32]} credentials for {user_id[:128]!r}")
        query = select(CredentialRow).where(
            CredentialRow.user_id == user_id, CredentialRow.provider == provider
        )
        if of_key is not None or not admin:
            owner = api_key_id if of_key is None else None if of_key == NO_KEY else of_key
            if not admin and owner != api_key_id:
                raise missing
            query = query.where(_key_is(owner))
        async with self.db.session() as db:
            rows: Sequence[CredentialRow] = (await db.scalars(query.limit(20))).all()
        if not rows:
            raise missing
        if len(rows) > 1:
            keys = ", ".join(sorted(r.api_key_id or NO_KEY for r in rows))
            raise AmbiguousCredentials(
                f"several API keys hold {provider[:32]} credentials for {user_id[:128]!r} "
                f"({keys}); name one with apiKeyId"
            )
        return rows[0]

    def _open(self, row: CredentialRow) -> dict[str, str]:
        plaintext = self.vault.open_sealed(
            binding(row), Sealed(row.key_id, row.nonce, row.ciphertext)
        )
        files: dict[str, str] = json.loads(plaintext)["files"]
        return files

    async def validate(
        self,
        user_id: str,
        provider: str,
        api_key_id: str | None,
        *,
        admin: bool = False,
        of_key: str | None = None,
    ) -> CredentialStatus:
        """Whether the record decrypts and passes the provider's checks."""
        # read and opened under the shared lock: a rotation cannot re-encrypt the row and
        # drop its key between the two
        async with self.vault.shared():
            row = await self.get(user_id, provider, api_key_id, admin=admin, of_key=of_key)
            try:
                files = self._open(row)
            except VaultError as exc:
                return CredentialStatus(False, exc.reason)
        return providers.get(provider).validate(files, time.time())

    async def export(
        self,
        user_id: str,
        provider: str,
        api_key_id: str | None,
        *,
        admin: bool = False,
        of_key: str | None = None,
    ) -> dict[str, Any]:
        """The decrypted files of the record ``api_key_id`` owns (any key's for an admin),
        with an audit record of who took whose. Whether the caller may export at all (the
        ``export`` scope) is the caller's check."""
        async with self.vault.shared():
            row = await self.get(user_id, provider, api_key_id, admin=admin, of_key=of_key)
            files = self._open(row)
        await self.audit(
            api_key_id,
            "export",
            user_id,
            provider,
            f"files: {row.files}; record of key {row.api_key_id or NO_KEY}",
        )
        return {"provider": provider, "files": files, "captured_at": row.captured_at}

    async def delete(
        self,
        user_id: str,
        provider: str,
        api_key_id: str | None,
        *,
        admin: bool = False,
        of_key: str | None = None,
    ) -> None:
        row = await self.get(user_id, provider, api_key_id, admin=admin, of_key=of_key)
        async with self.db.session() as db:
            await db.execute(delete(CredentialRow).where(CredentialRow.id == row.id))
            await db.commit()
        await self.audit(
            api_key_id, "delete", user_id, provider, f"record of key {row.api_key_id or NO_KEY}"
        )

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

    # --- rotation ---------------------------------------------------------------------------

    async def rotate(self) -> Rotation:
        """A new key; every record re-encrypted with it in one transaction; keys no record
        uses any more dropped. Safe while a controller runs (it waits for the lock, then
        reloads the key file), and a crash at any point loses nothing: the new key is on
        disk before a record changes, and an old key goes only after the commit."""
        async with self.vault.exclusive():
            self.vault.reload_if_changed()  # start from the key file, not from memory
            new_key = self.vault.add_key()
            count, unreadable = await self.reencrypt()
            retired = await self.retire_unused()
        await self.audit(
            None,
            "rotate",
            "",
            "",
            f"new key {new_key}; {count} records; retired {', '.join(retired) or 'none'}"
            + (f"; {len(unreadable)} unreadable records kept" if unreadable else ""),
        )
        return Rotation(new_key, count, retired, unreadable)

    async def reencrypt(self) -> tuple[int, list[str]]:
        """Re-seal every record with the current key (and the current binding) in one
        transaction; (records re-sealed, ids of records that do not decrypt). The caller
        holds the exclusive lock."""
        count, unreadable, last = 0, [], ""
        async with self.db.session() as db:
            while True:
                batch = list(
                    await db.scalars(
                        select(CredentialRow)
                        .where(CredentialRow.id > last)
                        .order_by(CredentialRow.id)
                        .limit(ROTATE_BATCH)
                    )
                )
                if not batch:
                    break
                for row in batch:
                    try:
                        plaintext = self.vault.open_sealed(
                            binding(row), Sealed(row.key_id, row.nonce, row.ciphertext)
                        )
                    except VaultError:
                        unreadable.append(row.id)
                        continue
                    bound = Binding(row.id, row.user_id, row.provider, row.api_key_id)
                    sealed = self.vault.seal(bound, plaintext)
                    row.key_id, row.nonce, row.ciphertext = (
                        sealed.key_id,
                        sealed.nonce,
                        sealed.ciphertext,
                    )
                    row.binding = bound.version
                    count += 1
                last = batch[-1].id
                await db.flush()
                db.expunge_all()  # memory stays bounded by one batch
            count += await self._reseal_upstream_logins(db)
            await db.commit()
        return count, unreadable

    async def retire_unused(self) -> list[str]:
        """Drop the keys no record names (checked now, under the exclusive lock the caller
        holds)."""
        async with self.db.session() as db:
            in_use = set(await db.scalars(select(CredentialRow.key_id).distinct()))
            in_use |= set(await db.scalars(select(UpstreamSecretRow.key_id).distinct()))
        return self.vault.retire(in_use)

    # --- upstream proxies' logins ----------------------------------------------------------

    async def seal_upstream_login(self, upstream: str, username: str, password: str) -> None:
        """Keep an upstream proxy's user name and password (replacing any), sealed."""
        plaintext = json.dumps({"username": username, "password": password}).encode()
        async with self.vault.shared():
            sealed = self.vault.seal(upstream_binding(upstream), plaintext)
            async with self.db.session() as db:
                row = await db.get(UpstreamSecretRow, upstream)
                if row is None:
                    row = UpstreamSecretRow(upstream=upstream)
                    db.add(row)
                row.key_id, row.nonce, row.ciphertext = (
                    sealed.key_id,
                    sealed.nonce,
                    sealed.ciphertext,
                )
                row.updated_at = utcnow()
                await db.commit()
        await self.audit(None, "upstream login", "", "", f"sealed for {upstream}")

    async def upstream_logins(self) -> dict[str, tuple[str, str]]:
        """Every upstream's (user name, password), opened. Raises VaultError for one that
        does not decrypt."""
        async with self.vault.shared():
            async with self.db.session() as db:
                rows = list(await db.scalars(select(UpstreamSecretRow)))
            logins = {}
            for row in rows:
                plaintext = self.vault.open_sealed(
                    upstream_binding(row.upstream), Sealed(row.key_id, row.nonce, row.ciphertext)
                )
                data = json.loads(plaintext)
                logins[row.upstream] = (str(data["username"]), str(data["password"]))
        return logins

    async def _reseal_upstream_logins(self, db: Any) -> int:
        count = 0
        for row in await db.scalars(select(UpstreamSecretRow)):
            bound = upstream_binding(row.upstream)
            plaintext = self.vault.open_sealed(bound, Sealed(row.key_id, row.nonce, row.ciphertext))
            sealed = self.vault.seal(bound, plaintext)
            row.key_id, row.nonce, row.ciphertext = sealed.key_id, sealed.nonce, sealed.ciphertext
            count += 1
        return count
