"""The session state machine: every allowed and every forbidden transition, checked against a
table written out here (not read from states.py), both by ``check_transition`` and through
the ledger on a real database (row and event in one commit; a refused transition changes
nothing)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from master_controller.errors import SessionStateError
from master_controller.sessions.ledger import SessionLedger
from master_controller.sessions.states import (
    ACTIVE,
    HOLDING,
    TERMINAL,
    VIEWABLE,
    State,
    check_transition,
)
from master_controller.store.database import Database
from master_controller.store.models import SessionRow
from tests.sessions.harness import _template

S = State
LIVE = set(State) - {S.TERMINATED, S.FAILED}
# what the design allows besides ending (any live state may become terminated or failed)
NEXT = {
    S.PROVISIONING: {S.QUEUED, S.BOOTING},
    S.QUEUED: {S.BOOTING},
    S.BOOTING: {S.READY},
    S.READY: {S.AUTHENTICATING, S.HIBERNATING},
    S.AUTHENTICATING: {S.CAPTURED, S.READY, S.HIBERNATING},
    S.CAPTURED: {S.RESUMING},
    S.HIBERNATING: {S.HIBERNATED, S.READY, S.AUTHENTICATING},
    S.HIBERNATED: {S.RESUMING},
    S.RESUMING: {S.READY},
    S.TERMINATED: set(),
    S.FAILED: set(),
}


def allowed(current: State, new: State) -> bool:
    return current in LIVE and (new in NEXT[current] or new in (S.TERMINATED, S.FAILED))


@given(st.sampled_from(State), st.sampled_from(State))
def test_check_transition_allows_exactly_the_table(current: State, new: State) -> None:
    if allowed(current, new):
        check_transition(current, new)
    else:
        with pytest.raises(SessionStateError):
            check_transition(current, new)


def test_every_pair_is_covered_and_the_groups_agree() -> None:
    pairs = [(a, b) for a in State for b in State]
    assert sum(allowed(a, b) for a, b in pairs) == sum(len(v) for v in NEXT.values()) + 2 * len(
        LIVE
    )
    assert set(TERMINAL) == {S.TERMINATED, S.FAILED}
    assert set(VIEWABLE) == {S.READY, S.AUTHENTICATING}
    assert set(ACTIVE) == LIVE - {S.HIBERNATED, S.CAPTURED}
    assert set(HOLDING) == LIVE
    # every live state can be left, and every state is reachable from provisioning
    reached, frontier = {S.PROVISIONING}, [S.PROVISIONING]
    while frontier:
        for new in State:
            if allowed(frontier[-1], new) and new not in reached:
                reached.add(new)
                frontier.insert(0, new)
        frontier.pop()
    assert reached == set(State)


async def _walk(path: Path, tries: list[State]) -> None:
    shutil.copyfile(_template(), path)
    db = Database(f"sqlite:///{path}")
    ledger = SessionLedger(db)
    try:
        row = SessionRow(
            id="s1",
            user_id="u",
            provider="codex",
            state=S.PROVISIONING,
            reason="",
            runtime="fake",
            image_id="i",
            guest_id="s1",
            api_key_id=None,
        )
        await ledger.create(row)
        current, accepted = S.PROVISIONING, [S.PROVISIONING]
        for new in tries:
            if allowed(current, new):
                changed = await ledger.transition("s1", new, f"to {new}")
                assert changed.state == new
                current = new
                accepted.append(new)
            else:
                with pytest.raises(SessionStateError):
                    await ledger.transition("s1", new)
            row = await ledger.get("s1")
            assert row.state == current  # a refused transition changed nothing
            assert (row.ended_at is not None) == (current in TERMINAL)
            assert (row.ready_at is not None) == (S.READY in accepted)
            states = [e.name for e in await ledger.events("s1") if e.kind == "state"]
            assert states == accepted  # one event per transition, committed with it
    finally:
        await db.close()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from(State), max_size=12))
def test_the_ledger_follows_the_machine(tries: list[State]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mc-states-"))
    try:
        asyncio.run(_walk(folder / "mc.db", tries))
    finally:
        shutil.rmtree(folder)
