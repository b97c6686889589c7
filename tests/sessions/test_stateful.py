"""Random sequences of what people, guests and the reaper do to sessions (start, cancel,
hibernate, resume, a guest dying, a reaper pass, a sign-in finishing, a controller restart),
run against the real session core while its background work runs in between. After every
step: each session's recorded path is one the state machine allows and its row agrees; a
sign-in whose credentials were stored is captured next, never failed. Once the work has
settled: no guest is left for an ended session, a captured session's guest is hibernated
or gone, and no login is followed for a session that is not authenticating."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from master_controller.errors import (
    GuestError,
    GuestStartFailed,
    HibernateFailed,
    MCError,
)
from master_controller.runtimes.base import GuestStatus
from master_controller.sessions.states import TERMINAL, State, check_transition
from tests.sessions.harness import Core, core

USERS = ("alice", "bob")
KEYS = ("key-a", "key-b")


class SessionCore(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="mc-stateful-"))
        self.context = core(
            self.folder,
            max_sessions=3,
            max_sessions_per_user=3,
            after_capture="destroy",
            boot_timeout=1.0,
        )
        self.core: Core = self.run(self.context.__aenter__())
        self.ids: list[str] = []

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def teardown(self) -> None:
        try:
            self.run(self.core.settle())
            self.run(self._settled_checks())
        finally:
            self.run(self.context.__aexit__(None, None, None))
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def pick(self, index: int) -> str:
        return self.ids[index % len(self.ids)]

    # --- what happens ---------------------------------------------------------------------

    @rule(
        user=st.sampled_from(USERS),
        key=st.sampled_from(KEYS),
        fail=st.sampled_from([None, None, None, "create", "start", "viewer"]),
    )
    def start(self, user: str, key: str, fail: str | None) -> None:
        c = self.core
        if fail == "create":
            c.runtime.fail["create"] = GuestStartFailed("allocate", "no address")
        elif fail == "start":
            c.runtime.fail["start"] = GuestError("the VMM exited")
        elif fail == "viewer":
            c.viewer_path.mode = "fail"
        try:
            row = self.run(c.service.start(user, "codex", key))
            self.ids.append(row.id)
            self.run(asyncio.sleep(0.01))  # its boot takes the failure with it
        except MCError:
            pass
        finally:
            c.runtime.fail.pop("create", None)
            c.runtime.fail.pop("start", None)
            c.viewer_path.mode = "pass"

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(0, 50))
    def cancel(self, index: int) -> None:
        with contextlib.suppress(MCError):
            self.run(self.core.service.cancel(self.pick(index)))

    @precondition(lambda self: self.ids)
    @rule(
        index=st.integers(0, 50),
        fail=st.sampled_from([None, None, "failed", "error"]),
    )
    def hibernate(self, index: int, fail: str | None) -> None:
        runtime = self.core.runtime
        if fail == "failed":
            runtime.fail["hibernate"] = HibernateFailed("no space left")
        elif fail == "error":
            runtime.fail["hibernate"] = GuestError("the VMM crashed while saving")
        try:
            self.run(self.core.service.hibernate(self.pick(index)))
        except MCError:
            pass
        finally:
            runtime.fail.pop("hibernate", None)

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(0, 50))
    def resume(self, index: int) -> None:
        with contextlib.suppress(MCError):
            self.run(self.core.service.resume(self.pick(index)))

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(0, 50))
    def die(self, index: int) -> None:
        self.core.runtime.die(self.pick(index))

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(0, 50))
    def credentials_valid(self, index: int) -> None:
        with contextlib.suppress(KeyError):  # its guest is gone
            self.core.agent.sign_in(self.pick(index))

    @rule()
    def reap(self) -> None:
        self.run(self.core.service.reaper.reap_once())

    @rule(seconds=st.sampled_from([0.0, 0.01, 0.05]))
    def time_passes(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    @rule()
    def settle(self) -> None:
        self.run(self.core.settle())
        self.run(self._settled_checks())

    @rule()
    def restart(self) -> None:
        self.run(self.core.restart())

    # --- what always holds ----------------------------------------------------------------

    @invariant()
    def paths_follow_the_machine(self) -> None:
        self.run(self._paths())

    async def _paths(self) -> None:
        c = self.core
        for sid in self.ids:
            while True:  # a reading no transition went through the middle of
                events = await c.events(sid)
                row = await c.service.get(sid)
                if len(await c.events(sid)) == len(events):
                    break
            states = [State(e.name) for e in events if e.kind == "state"]
            assert states[0] == State.PROVISIONING
            for before, after in itertools.pairwise(states):
                check_transition(before, after)
            assert row.state == states[-1]
            # a stored sign-in is captured next, never failed
            after_store = False
            for event in events:
                if event.kind == "step" and event.name == "credentials stored":
                    after_store = True
                elif event.kind == "state" and after_store:
                    assert event.name == State.CAPTURED, f"{sid}: stored, then {event.name}"
                    after_store = False

    async def _settled_checks(self) -> None:
        c = self.core
        assert await c.leaked() == [], "guests left for ended sessions"
        for sid in self.ids:
            row = await c.service.get(sid)
            state = State(row.state)
            if state == State.CAPTURED and sid in c.runtime.existing():
                assert c.runtime.host.get(sid) == GuestStatus.HIBERNATED
            if state != State.AUTHENTICATING:
                assert not c.service.work.watching(sid), f"{sid} is {state} yet watched"
            if state in TERMINAL:
                assert sid not in c.runtime.existing()


SessionCore.TestCase.settings = settings(max_examples=10, stateful_step_count=12, deadline=None)
TestSessionCore = SessionCore.TestCase
