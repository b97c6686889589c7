"""Backup and restore of an installation: the database, the vault's keys, the ticket signing
key and the settings file, in one archive encrypted with a secret the operator supplies.
Images are left out: they rebuild from their recipes.

The archive::

    MAGIC (8 bytes) | header length (4 bytes, big endian) | header (JSON) | ciphertext

The header names the key derivation (scrypt, with a salt of its own per archive) and the
AES-256-GCM nonce; the ciphertext is the zstd-compressed payload (JSON), authenticated
together with magic and header as associated data, so a changed byte anywhere, or the wrong
secret, is refused before anything is written. The file is 0600 from its first byte and
appears under its name only once complete.

Consistency: the copy is taken while holding the vault's lock shared (a ``vault rotate``
cannot change keys and records between reading the key file and reading the rows), from one
snapshot of the database: SQLite through its online backup API into memory, PostgreSQL in
one REPEATABLE READ transaction. Rows are dumped table by table from the reflected schema
with the Alembic revision they belong to, so an archive of SQLite restores into PostgreSQL
and the other way round.

Restore refuses an existing installation (key files, or rows in the database) unless told
to replace it (``force``), and holds the data dir's controller lock meanwhile, so no
controller starts half-way.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zstandard
from alembic import command
from alembic.script import ScriptDirectory
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, MetaData, Table, create_engine, func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from master_controller.credentials import upstream_binding
from master_controller.errors import BackupError, ConfigError
from master_controller.instance import claim
from master_controller.settings import Settings, settings_from_file_content
from master_controller.store.database import alembic_config, private_sqlite_file, sync_url
from master_controller.vault import Binding, Sealed, Vault, write_key_file

MAGIC = b"MCBACKUP"
FORMAT = 1
# scrypt's cost: about 0.1 s and 32 MiB per derivation, once per backup or restore
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_SECRET = 16  # bytes of a key file or passphrase
MAX_HEADER = 4096
VERSION_TABLE = "alembic_version"


@dataclass(frozen=True)
class Contents:
    """What an archive holds, opened."""

    created: str
    dialect: str
    revision: str
    tables: dict[str, list[dict[str, Any]]]
    vault_keys: bytes  # the key file's content: every key still needed, and the current one
    secret_key: bytes | None
    config: bytes | None  # the settings file, if there was one

    def counts(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.tables.items()}


@dataclass
class Summary:
    """What a backup wrote or a restore put back (no secrets)."""

    path: str
    bytes: int
    seconds: float
    rows: dict[str, int]
    credentials: int
    opened: int = 0
    upstream_logins: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "rows": self.rows,
            "credentials": self.credentials,
            "credentialsOpened": self.opened,
            "upstreamLogins": self.upstream_logins,
            "notes": self.notes,
        }


# --- the operator's secret ------------------------------------------------------------------


def read_key_file(path: Path) -> bytes:
    """The secret in a key file: the owner's alone (like ssh's keys), at least 16 bytes."""
    try:
        st = path.stat()
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise BackupError(f"cannot read the backup key file {path}: {exc}") from exc
    if st.st_mode & 0o077:
        raise BackupError(f"the backup key file {path} is readable by others: chmod 600 it")
    return check_secret(secret, f"the backup key file {path}")


def check_secret(secret: bytes, where: str) -> bytes:
    if len(secret) < MIN_SECRET:
        raise BackupError(f"{where} holds {len(secret)} bytes; at least {MIN_SECRET} are needed")
    return secret


def _derive(secret: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def seal(payload: bytes, secret: bytes) -> bytes:
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    header = json.dumps(
        {
            "format": FORMAT,
            "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
            "salt": base64.b64encode(salt).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "compression": "zstd",
        }
    ).encode()
    aad = MAGIC + len(header).to_bytes(4, "big") + header
    key = _derive(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return aad + AESGCM(key).encrypt(nonce, zstandard.compress(payload, 10), aad)


def unseal(blob: bytes, secret: bytes) -> bytes:
    """The payload, or BackupError: not an archive, or the wrong secret, or altered."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise BackupError("this is not a master-controller backup")
    size = int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 4], "big")
    if size > MAX_HEADER or len(blob) < len(MAGIC) + 4 + size:
        raise BackupError("the backup's header is damaged")
    aad = blob[: len(MAGIC) + 4 + size]
    try:
        header = json.loads(aad[len(MAGIC) + 4 :])
        if header["format"] != FORMAT:
            raise BackupError(f"backup format {header['format']} is not known to this release")
        kdf = header["kdf"]
        if kdf["name"] != "scrypt" or not (2**14 <= kdf["n"] <= 2**20 and kdf["r"] <= 32):
            raise BackupError("the backup's key derivation is not one this release accepts")
        salt = base64.b64decode(header["salt"], validate=True)
        nonce = base64.b64decode(header["nonce"], validate=True)
        key = _derive(secret, salt, kdf["n"], kdf["r"], kdf["p"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BackupError(f"the backup's header is damaged: {exc}") from exc
    try:
        compressed = AESGCM(key).decrypt(nonce, blob[len(aad) :], aad)
    except InvalidTag as exc:
        raise BackupError(
            "the backup does not decrypt: wrong key or passphrase, or the file was altered"
        ) from exc
    return zstandard.decompress(compressed)


# --- rows as JSON -----------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | memoryview):
        return {"$b": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return {"$t": aware.astimezone(UTC).isoformat()}
    return value


def _decode(value: Any, dialect: str) -> Any:
    if isinstance(value, dict) and "$b" in value:
        return base64.b64decode(value["$b"])
    if isinstance(value, dict) and "$t" in value:
        moment = datetime.fromisoformat(value["$t"])
        # SQLite keeps naive datetimes, UTC by the models' convention
        return moment.replace(tzinfo=None) if dialect == "sqlite" else moment
    return value


def _dump(conn: Connection) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    meta = MetaData()
    meta.reflect(conn)
    if VERSION_TABLE not in meta.tables:
        raise BackupError("the database has no schema yet: there is nothing to back up")
    revision = conn.execute(select(meta.tables[VERSION_TABLE].c.version_num)).scalar_one()
    tables = {}
    for table in meta.sorted_tables:
        if table.name == VERSION_TABLE:
            continue
        rows = conn.execute(select(table)).mappings()
        tables[table.name] = [{k: _encode(v) for k, v in row.items()} for row in rows]
    return str(revision), tables


@contextmanager
def _snapshot(url: str) -> Iterator[Connection]:
    """A connection on one consistent state of the database."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        if not parsed.database or not Path(parsed.database).exists():
            raise BackupError(f"there is no database at {parsed.database}")
        # read-only, and the path percent-encoded (a "?" or "#" in it is no URI syntax)
        source = sqlite3.connect(Path(parsed.database).resolve().as_uri() + "?mode=ro", uri=True)
        copy = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            source.backup(copy)  # SQLite's online backup: one consistent state
        finally:
            source.close()
        engine = create_engine("sqlite://", creator=lambda: copy, poolclass=StaticPool)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()
            copy.close()
        return
    engine = create_engine(sync_url(url), isolation_level="REPEATABLE READ")
    try:
        with engine.connect() as conn, conn.begin():
            yield conn
    finally:
        engine.dispose()


# --- backup -----------------------------------------------------------------------------------


async def backup(settings: Settings, path: Path, secret: bytes, config: Path | None) -> Summary:
    """Write the installation of ``settings`` (and the settings file ``config``, if it
    exists) to ``path``, encrypted with ``secret``. ``path`` must not exist yet."""
    started = time.monotonic()
    _refuse_existing(path)
    vault = Vault.open(settings)
    async with vault.shared():  # no rotation between the key file and the rows
        vault.reload_if_changed()
        try:
            with _snapshot(settings.database) as conn:
                revision, tables = _dump(conn)
        except SQLAlchemyError as exc:
            raise BackupError(f"reading the database failed: {exc}") from exc
        keys = vault.key_file_content()
    payload = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dialect": make_url(settings.database).get_backend_name(),
        "revision": revision,
        "tables": tables,
        "vaultKeys": base64.b64encode(keys).decode(),
        "secretKey": _file_b64(settings.secret_key_path),
        "config": _file_b64(config),
    }
    blob = seal(json.dumps(payload).encode(), secret)
    _write_new(path, blob)
    rows = {k: len(v) for k, v in tables.items()}
    summary = Summary(str(path), len(blob), 0.0, rows, rows.get("credentials", 0))
    if settings.vault_key is not None:
        summary.notes.append("the vault key came from the vault_key setting; it is in the archive")
    summary.seconds = time.monotonic() - started
    return summary


def _refuse_existing(path: Path) -> None:
    if path.exists() or path.is_symlink():
        raise BackupError(f"{path} exists already; give a new file name")


def _file_b64(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return base64.b64encode(path.read_bytes()).decode()


def _write_new(path: Path, content: bytes) -> None:
    """``content`` at ``path`` (which must not exist), 0600 from the first byte, on disk,
    visible under its name only once complete."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise BackupError(f"cannot write {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # refuses a file that appeared meanwhile, unlike a rename
    except FileExistsError as exc:
        raise BackupError(f"{path} exists already; give a new file name") from exc
    except OSError as exc:
        raise BackupError(f"cannot write {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


# --- restore ----------------------------------------------------------------------------------


def open_archive(path: Path, secret: bytes) -> Contents:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(unseal(blob, secret))

        def b64(name: str) -> bytes | None:
            value = data[name]
            return None if value is None else base64.b64decode(value, validate=True)

        return Contents(
            created=str(data["created"]),
            dialect=str(data["dialect"]),
            revision=str(data["revision"]),
            tables=data["tables"],
            vault_keys=b64("vaultKeys") or b"",
            secret_key=b64("secretKey"),
            config=b64("config"),
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BackupError(f"the backup's content is damaged: {exc}") from exc


def archived_vault(contents: Contents) -> Vault:
    """The vault the archive's keys make (in memory only)."""
    try:
        data = json.loads(contents.vault_keys)
        keys = {k: base64.b64decode(v, validate=True) for k, v in data["keys"].items()}
        return Vault(keys, str(data["current"]), None)
    except (ValueError, KeyError, TypeError, binascii.Error, ConfigError) as exc:
        raise BackupError(f"the backup's vault keys are damaged: {exc}") from exc


def existing_installation(settings: Settings) -> list[str]:
    """What of an installation is there already (empty on a fresh host)."""
    files = [settings.secret_key_path]
    if settings.vault_key is None:
        files.append(settings.vault_key_path)
    found = [str(p) for p in files if p.exists()]
    parsed = make_url(settings.database)
    if parsed.drivername.startswith("sqlite") and (
        not parsed.database or not Path(parsed.database).exists()
    ):
        return found
    engine = _engine(settings.database)
    try:
        with engine.connect() as conn:
            meta = MetaData()
            meta.reflect(conn)
            for table in meta.sorted_tables:
                if table.name != VERSION_TABLE and conn.execute(select(table).limit(1)).first():
                    found.append(f"rows in the database's {table.name} table")
    except SQLAlchemyError as exc:
        raise BackupError(f"cannot read the database to restore into: {exc}") from exc
    finally:
        engine.dispose()
    return found


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite") and parsed.database:
        private_sqlite_file(Path(parsed.database))
    return create_engine(sync_url(url))


def restore(settings: Settings, contents: Contents, *, force: bool = False) -> Summary:
    """Put ``contents`` back as the installation of ``settings``: refused if one is there
    already (unless ``force``: then its database and keys are replaced) or a controller
    runs on the data dir. The settings file is the caller's (see the command)."""
    started = time.monotonic()
    vault = archived_vault(contents)
    opened, unreadable = _open_all(vault, contents)
    if settings.vault_key is not None:
        # the key here is the setting's: it must open what the archive's keys open
        here, _ = _open_all(Vault.open(settings), contents)
        if here != opened:
            raise BackupError(
                "the vault_key setting here does not open the backup's credentials: set it to "
                "the key the backed-up installation used, or unset it to use the backup's keys"
            )
    existing = existing_installation(settings)
    if existing and not force:
        raise BackupError(
            "an installation is here already (" + "; ".join(existing[:5]) + "): restore "
            "refuses to replace it; pass --force to replace its database and keys"
        )
    script = ScriptDirectory.from_config(alembic_config(settings.database))
    known = {rev.revision for rev in script.walk_revisions()}
    if contents.revision not in known:
        raise BackupError(
            f"the backup's database is at revision {contents.revision}, which this release "
            "does not know (it is newer): restore it with the release that wrote it"
        )
    with claim(settings):  # no controller starts on the data dir meanwhile
        _restore_database(settings.database, contents, replace=bool(existing))
        if contents.secret_key is not None:
            _replace_file(settings.secret_key_path, contents.secret_key)
        notes = []
        if settings.vault_key is None:
            path = settings.vault_key_path
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_key_file(path, vault.keys, vault.current)
        else:
            notes.append(
                "the vault_key setting is used here: the archive's key file was not written"
            )
    if unreadable:
        notes.append(f"{len(unreadable)} records did not decrypt in the backup either")
    summary = Summary(
        "", 0, 0.0, contents.counts(), len(contents.tables.get("credentials", [])), notes=notes
    )
    summary.opened, summary.upstream_logins = opened
    summary.seconds = time.monotonic() - started
    return summary


def _open_all(vault: Vault, contents: Contents) -> tuple[tuple[int, int], list[str]]:
    """(credentials, upstream logins) that decrypt with the archive's keys, and the ids of
    those that do not."""
    opened = logins = 0
    unreadable = []
    for row in contents.tables.get("credentials", []):
        bound = Binding(
            row["id"], row["user_id"], row["provider"], row["api_key_id"], row["binding"]
        )
        sealed = Sealed(row["key_id"], _decode(row["nonce"], ""), _decode(row["ciphertext"], ""))
        try:
            vault.open_sealed(bound, sealed)
            opened += 1
        except Exception:  # VaultError, or a damaged row: counted, reported
            unreadable.append(str(row["id"]))
    for row in contents.tables.get("upstream_secrets", []):
        bound = upstream_binding(row["upstream"])
        sealed = Sealed(row["key_id"], _decode(row["nonce"], ""), _decode(row["ciphertext"], ""))
        try:
            vault.open_sealed(bound, sealed)
            logins += 1
        except Exception:
            unreadable.append(str(row["upstream"]))
    return (opened, logins), unreadable


def _restore_database(url: str, contents: Contents, *, replace: bool) -> None:
    engine = _engine(url)
    try:
        if replace:
            with engine.begin() as conn:
                meta = MetaData()
                meta.reflect(conn)
                meta.drop_all(conn)
        config = alembic_config(url)
        command.upgrade(config, contents.revision)
        dialect = engine.dialect.name
        with engine.begin() as conn:
            meta = MetaData()
            meta.reflect(conn)
            for table in meta.sorted_tables:
                rows = contents.tables.get(table.name, [])
                if table.name == VERSION_TABLE or not rows:
                    continue
                columns = set(table.columns.keys())
                conn.execute(
                    insert(table),
                    [{k: _decode(v, dialect) for k, v in r.items() if k in columns} for r in rows],
                )
                if dialect == "postgresql":
                    _advance_sequences(conn, table)
        command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise BackupError(
            f"writing the database failed (its rows were rolled back): {exc}"
        ) from exc
    finally:
        engine.dispose()


def _advance_sequences(conn: Connection, table: Table) -> None:
    """PostgreSQL hands out serial ids from a sequence that rows inserted with their ids do
    not move: move it past them."""
    for column in table.primary_key.columns:
        if column.type.python_type is int:
            highest = select(func.coalesce(func.max(column), 1)).scalar_subquery()
            sequence = func.pg_get_serial_sequence(table.name, column.name)
            conn.execute(select(func.setval(sequence, highest)))


def _replace_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def target_settings(config: Path, contents: Contents) -> Settings:
    """The settings a restore works with: the settings file ``config`` if there is one,
    else the archive's (a fresh host: the restore follows it, data dir and database
    included), environment variables over either."""
    if config.exists() or contents.config is None:
        return Settings()
    try:
        return settings_from_file_content(contents.config)
    except (ValueError, ValidationError) as exc:
        raise BackupError(f"the backup's settings file is not valid here: {exc}") from exc


def restored_config(config: Path, contents: Contents) -> str | None:
    """After a restore: the archive's settings file at ``config`` if none is there; if one
    is and differs, it is left and the archive's written next to it as
    ``<name>.from-backup``. What was done, or None."""
    if contents.config is None:
        return None
    if not config.exists():
        _replace_file(config, contents.config)
        return f"wrote the backup's settings to {config}"
    if config.read_bytes() == contents.config:
        return None
    aside = config.with_name(config.name + ".from-backup")
    _replace_file(aside, contents.config)
    return f"kept {config}; the backup's settings are in {aside}"
