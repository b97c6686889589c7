"""Backup and restore of an installation with many users: how long `backup` and `restore`
take and how large the archive is, on SQLite (and PostgreSQL with --postgresql).

The installation: USERS users, each with a claude_code credential sealed through the real
vault and one finished session with its events (as a sign-in leaves them). Each run writes
a new archive and restores it on a fresh data dir (and a fresh database); the restore
includes the migrations and opening every credential with the archive's keys.

Prints the figures and saves them to bench/results/backup.json (or --results).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import save, summary
from master_controller.backup import backup, open_archive, restore
from master_controller.credentials import Captured, CredentialStore
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.store.models import EventRow, SessionRow
from master_controller.vault import Vault
from tests.servers import postgresql_database, postgresql_server
from tests.sessions.fake_runtime import credential_files

RESULTS = Path(__file__).parent / "results" / "backup.json"
SECRET = b"bench backup secret, 32 bytes.."
EVENTS = ("provisioning", "allocate", "booting", "boot", "ready", "authenticating", "captured")


async def populate(settings: Settings, users: int) -> None:
    db = Database(settings.database)
    await asyncio.to_thread(db.migrate)
    store = CredentialStore(db, Vault.open(settings))
    for i in range(users):
        files = credential_files("claude_code", f"user-{i:05d}")
        session_id = f"00000000-0000-4000-8000-{i:012d}"
        async with db.session() as session:
            session.add(
                SessionRow(
                    id=session_id,
                    user_id=f"user-{i:05d}",
                    provider="claude_code",
                    state="terminated",
                    runtime="container",
                    image_id="0" * 64,
                    api_key_id="bench-key",
                )
            )
            await session.flush()
            for name in EVENTS:
                session.add(EventRow(session_id=session_id, kind="state", name=name))
            await session.commit()
        captured = Captured("claude_code", files, None)
        await store.store(f"user-{i:05d}", captured, session_id, "bench-key")
    await db.close()


@contextmanager
def databases(kind: str, root: Path, count: int) -> Iterator[list[str]]:
    """``count`` fresh, empty databases of ``kind``."""
    if kind == "sqlite":
        yield [f"sqlite:///{root / f'db-{i}' / 'mc.db'}" for i in range(count)]
        return
    with postgresql_server() as server, ExitStack() as stack:
        name = f"mc_bench_{os.getpid()}"
        yield [
            stack.enter_context(postgresql_database(server, f"{name}_{i}")) for i in range(count)
        ]


def measure(kind: str, users: int, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mc-bench-backup-") as tmp:
        root = Path(tmp)
        with databases(kind, root, runs + 1) as urls:
            source = Settings(data_dir=root / "source", database_url=urls[0])
            started = time.monotonic()
            asyncio.run(populate(source, users))
            populate_seconds = time.monotonic() - started
            backups, restores, sizes = [], [], []
            for run in range(runs):
                archive = root / f"mc-{run}.backup"
                done = asyncio.run(backup(source, archive, SECRET, None))
                backups.append(done.seconds)
                sizes.append(done.bytes)
                target = Settings(data_dir=root / f"restored-{run}", database_url=urls[run + 1])
                started = time.monotonic()
                restored = restore(target, open_archive(archive, SECRET))
                restores.append(time.monotonic() - started)
                assert restored.opened == users, restored.as_dict()
            db_file = root / "db-0" / "mc.db"
            return {
                "users": users,
                "rows": done.rows,
                "populate_seconds": round(populate_seconds, 1),
                "backup_seconds": summary(backups),
                "restore_seconds": summary(restores),
                "archive_bytes": sizes[-1],
                "archive_bytes_per_user": round(sizes[-1] / users),
                "database_bytes": db_file.stat().st_size if db_file.exists() else None,
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgresql", action="store_true", help="Also on PostgreSQL.")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Where to save them.")
    args = parser.parse_args()
    figures: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "note": "backup: snapshot, dump, zstd, scrypt (n=2^15) and AES-GCM, fsync; restore: "
        "scrypt, decrypt, open every credential, migrations, insert, key files",
        "sqlite": measure("sqlite", args.users, args.runs),
    }
    if args.postgresql:
        figures["postgresql"] = measure("postgresql", args.users, args.runs)
    save(figures, args.results)


if __name__ == "__main__":
    main()
