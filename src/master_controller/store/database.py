"""The database: engines, migrations at start-up, sessions for queries."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from master_controller.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"


def async_url(url: str) -> str:
    """The asyncio driver URL for a configured (synchronous) URL."""
    parsed = make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if parsed.drivername in ("postgresql", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ConfigError(f"unsupported database {parsed.drivername!r}: use sqlite or postgresql")


def sync_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    return config


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        if parsed.drivername.startswith("sqlite") and parsed.database not in (None, "", ":memory:"):
            private_sqlite_file(Path(parsed.database))
        if parsed.drivername.startswith("sqlite"):
            # One connection: SQLite has one writer at a time anyway, and a busy event loop
            # (many guests starting on few cores) must queue for it, not fail with
            # "database is locked". Other processes (the CLI) wait up to busy_timeout.
            self.engine: AsyncEngine = create_async_engine(
                async_url(url), pool_size=1, max_overflow=0, pool_timeout=120
            )
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_async_engine(async_url(url), pool_pre_ping=True)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest migration (synchronous; call before serving)."""
        command.upgrade(alembic_config(self.url), "head")

    def session(self) -> AsyncSession:
        return self.sessionmaker()

    async def close(self) -> None:
        await self.engine.dispose()


def private_sqlite_file(path: Path) -> None:
    """Make the SQLite file (and its -wal and -shm, if there) readable by its owner only,
    whatever the umask: SQLite creates the -wal and -shm files with the database file's
    mode, so creating that file 0600 first covers all three. An older, wider file we own is
    narrowed."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        try:
            st = name.stat()
        except FileNotFoundError:
            continue
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            name.chmod(stat.S_IMODE(st.st_mode) & 0o700)


def _sqlite_pragmas(dbapi_connection: object, record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
