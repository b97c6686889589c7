"""Each user's own egress identity: a sticky upstream proxy, checked before use.

With upstreams configured (``egress_upstreams``, or a provider's template and port range),
every user is assigned one, persisted: the same user leaves through the same exit after a
restart and on every sign-in. Before a guest boots, the assignment is checked by fetching
``egress_check_url`` through it (trusted for ``egress_check_interval``); the exit address is
recorded. If the check fails the user is moved to another upstream (the least used first) and
the reason recorded; if none works, :class:`NoEgressIdentity` is raised and the session fails:
traffic never leaves directly instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import Counter, Gauge
from sqlalchemy import func, select

from master_controller.credentials import CredentialStore
from master_controller.errors import ConfigError, NoEgressIdentity, UpstreamFailed
from master_controller.network.upstream import Upstream, configured, exit_address
from master_controller.settings import Settings
from master_controller.store.database import Database
from master_controller.store.models import EgressAssignmentRow, utcnow

log = logging.getLogger("master_controller.egress")

# upstreams tried for one user before the session fails (each check may take its timeout)
MAX_TRIES = 3

UPSTREAM_USERS = Gauge("mc_egress_upstream_users", "Users assigned to an upstream", ["upstream"])
UPSTREAM_FAILURES = Counter(
    "mc_egress_upstream_failures_total", "Failed checks and connections", ["upstream"]
)
UPSTREAM_BYTES = Counter(
    "mc_egress_upstream_bytes_total", "Bytes carried through an upstream, both ways", ["upstream"]
)


@dataclass(frozen=True)
class Identity:
    """A user's checked exit: the upstream to dial (with its login) and its address."""

    user_id: str
    upstream: Upstream
    exit_address: str | None
    checked_at: datetime | None


class EgressIdentities:
    def __init__(self, settings: Settings, db: Database, credentials: CredentialStore) -> None:
        self.settings = settings
        self.db = db
        self.credentials = credentials
        self.upstreams = {u.name: u for u in configured(settings)}
        self._order = list(self.upstreams)
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.upstreams)

    async def assignment(self, user_id: str) -> EgressAssignmentRow | None:
        async with self.db.session() as db:
            return await db.get(EgressAssignmentRow, user_id)

    async def ensure(self, user_id: str) -> Identity:
        """The user's upstream, checked (or checked recently); moved to another that works
        if it fails. Raises NoEgressIdentity (fail closed) when none of those tried works."""
        async with self._lock(user_id):
            row = await self.assignment(user_id)
            current = row.upstream if row is not None and row.upstream in self.upstreams else None
            if row is not None and current is not None and self._fresh(row):
                return await self._identity(row)
            return await self._settle(user_id, await self._candidates(current))

    async def reassign(self, user_id: str) -> Identity:
        """Move the user to another upstream (checked first); the old one is kept only if
        no other works."""
        async with self._lock(user_id):
            row = await self.assignment(user_id)
            current = row.upstream if row is not None else None
            others = [name for name in await self._candidates(None) if name != current]
            if current in self.upstreams:
                others.append(current)  # the last resort
            return await self._settle(user_id, others, note="reassigned")

    # --- inside -----------------------------------------------------------------------------

    def _lock(self, user_id: str) -> asyncio.Lock:
        return self._locks.setdefault(user_id, asyncio.Lock())

    def _fresh(self, row: EgressAssignmentRow) -> bool:
        if not row.check_ok or row.checked_at is None:
            return False
        return utcnow() - row.checked_at < timedelta(seconds=self.settings.egress_check_interval)

    async def _candidates(self, current: str | None) -> list[str]:
        """The user's current upstream first, then the others, the least used first (the
        operator's order among equals)."""
        users = Tally(await self._users_per_upstream())
        rank = {name: i for i, name in enumerate(self._order)}
        others = sorted((n for n in self._order if n != current), key=lambda n: (users[n], rank[n]))
        return ([current] if current else []) + others

    async def _settle(self, user_id: str, candidates: list[str], note: str = "") -> Identity:
        if not candidates:
            raise ConfigError("no egress upstreams are configured")
        logins = await self.credentials.upstream_logins()
        reasons = []
        for name in candidates[:MAX_TRIES]:
            upstream = self._with_login(name, logins)
            try:
                address = await exit_address(upstream, self.settings.egress_check_url)
            except UpstreamFailed as exc:
                UPSTREAM_FAILURES.labels(name).inc()
                log.warning(
                    "egress for user %s: %s",
                    user_id[:128],
                    exc.reason,
                    extra={"user_id": user_id[:128], "upstream": name},
                )
                reasons.append(exc.reason)
                continue
            row = await self._record(user_id, name, address, "; ".join(reasons) or note)
            return await self._identity(row, logins)
        await self._record_failure(user_id, "; ".join(reasons))
        raise NoEgressIdentity(
            "no egress upstream works for this user, so the guest does not start (traffic "
            f"never leaves directly): {'; '.join(reasons)}"
        )

    def _with_login(self, name: str, logins: dict[str, tuple[str, str]]) -> Upstream:
        upstream = self.upstreams[name]
        if name in logins:
            return upstream.with_credentials(*logins[name])
        return upstream

    async def _identity(
        self, row: EgressAssignmentRow, logins: dict[str, tuple[str, str]] | None = None
    ) -> Identity:
        if logins is None:
            logins = await self.credentials.upstream_logins()
        upstream = self._with_login(row.upstream, logins)
        return Identity(row.user_id, upstream, row.exit_address, row.checked_at)

    async def _record(
        self, user_id: str, name: str, address: str, why_moved: str
    ) -> EgressAssignmentRow:
        async with self.db.session() as db:
            row = await db.get(EgressAssignmentRow, user_id)
            if row is None:
                row = EgressAssignmentRow(user_id=user_id, upstream=name)
                db.add(row)
                UPSTREAM_USERS.labels(name).inc()
            elif row.upstream != name:
                UPSTREAM_USERS.labels(row.upstream).dec()
                UPSTREAM_USERS.labels(name).inc()
                log.info(
                    "egress for user %s moved to %s",
                    user_id[:128],
                    name,
                    extra={"user_id": user_id[:128], "upstream": name},
                )
                row.upstream, row.assigned_at = name, utcnow()
            row.exit_address, row.checked_at, row.check_ok = address, utcnow(), True
            row.last_error = why_moved
            await db.commit()
            await db.refresh(row)
            return row

    async def _record_failure(self, user_id: str, why: str) -> None:
        async with self.db.session() as db:
            row = await db.get(EgressAssignmentRow, user_id)
            if row is not None:
                row.check_ok, row.checked_at, row.last_error = False, utcnow(), why
                await db.commit()

    async def count_users(self) -> None:
        """Set the per-upstream user gauge from the database (at start)."""
        for name, n in (await self._users_per_upstream()).items():
            UPSTREAM_USERS.labels(name).set(n)

    async def _users_per_upstream(self) -> dict[str, int]:
        async with self.db.session() as db:
            counted = await db.execute(
                select(EgressAssignmentRow.upstream, func.count()).group_by(
                    EgressAssignmentRow.upstream
                )
            )
            return {name: n for name, n in counted.all()}
