"""The session core in one process, with no real guest: a real SessionService on a real SQLite
database, CredentialStore and Vault, around a fake runtime, agent and viewer path
(:mod:`tests.sessions.fake_runtime`). Each test says which interleaving it forces."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from master_controller.errors import (
    GuestError,
    GuestStartFailed,
    HibernateFailed,
    SessionStateError,
    TooManySessions,
)
from master_controller.runtimes.base import GuestStatus
from master_controller.sessions.states import State
from master_controller.store.models import CredentialRow, utcnow
from tests.sessions.harness import KEY, PROVIDER, USER, Core, core

ENDED = {State.TERMINATED, State.FAILED}


async def _authenticating(c: Core) -> str:
    row = await c.start()
    await c.wait_for(row.id, {State.AUTHENTICATING})
    await c.settle()  # its boot done, its login watched
    return row.id


async def _captured(c: Core, session_id: str) -> None:
    c.agent.sign_in(session_id)
    row = await c.wait_for(session_id, {State.CAPTURED, *ENDED})
    assert row.state == State.CAPTURED, row.reason


# --- the sign-in ----------------------------------------------------------------------------


async def test_a_sign_in_is_captured_sealed_and_its_guest_destroyed(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        assert c.service.work.watching(sid)
        assert c.agent.of(sid).provider == PROVIDER
        await _captured(c, sid)

        assert await c.states_seen(sid) == [
            "provisioning",
            "booting",
            "ready",
            "authenticating",
            "captured",
        ]
        exported = await c.credentials.export(USER, PROVIDER, KEY)
        assert json.loads(exported["files"][".codex/auth.json"])["OPENAI_API_KEY"] == (
            f"sk-{sid[:8]}"
        )
        async with c.db.session() as db:  # sealed: the token is nowhere in the row
            stored = (await db.scalars(sa.select(CredentialRow))).one()
        assert stored.session_id == sid and b"sk-" not in stored.ciphertext
        assert c.runtime.called("destroy", sid) == 1
        assert c.runtime.existing() == set()
        await c.settle()
        assert not c.service.work.watching(sid)


async def test_after_capture_hibernate_wipes_and_keeps_the_guest(tmp_path: Path) -> None:
    async with core(tmp_path, after_capture="hibernate") as c:
        sid = await _authenticating(c)
        await _captured(c, sid)
        row = await c.service.get(sid)
        assert "guest hibernated" in row.reason
        assert c.agent.of(sid).wiped
        assert c.runtime.host[sid] == GuestStatus.HIBERNATED
        # it resumes without starting the login again: this session's sign-in is stored
        await c.service.resume(sid)
        await c.wait_for(sid, {State.READY})
        await c.settle()
        assert c.agent.of(sid).logins == 1
        assert await c.state(sid) == State.READY


@pytest.mark.parametrize(
    ("breakage", "outcome"),
    [
        ("wipe", "wiping the credentials in the guest failed"),
        ("browser", "did not restart after the wipe"),
        ("hibernate-failed", "hibernating failed"),
        ("hibernate-error", "hibernating failed"),
    ],
)
async def test_a_guest_not_kept_cleanly_is_destroyed_and_the_sign_in_stands(
    tmp_path: Path, breakage: str, outcome: str
) -> None:
    async with core(tmp_path, after_capture="hibernate") as c:
        sid = await _authenticating(c)
        if breakage == "wipe":
            c.agent.of(sid).wipe_error = "systemctl failed"
        elif breakage == "browser":
            c.agent.of(sid).chromium_after_wipe = "failed"
        elif breakage == "hibernate-failed":
            c.runtime.fail["hibernate"] = HibernateFailed("disk full")
        else:
            c.runtime.fail["hibernate"] = GuestError("the VMM crashed")
        await _captured(c, sid)
        assert outcome in (await c.service.get(sid)).reason
        assert c.runtime.existing() == set()
        assert (await c.credentials.get(USER, PROVIDER, KEY)).session_id == sid


async def test_a_destroy_failing_after_the_store_still_ends_captured(tmp_path: Path) -> None:
    """The credentials are stored: the session is captured whatever its guest does; the
    guest the capture could not destroy is destroyed by the next reaper pass."""
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        c.runtime.fail["destroy"] = GuestError("the netns would not go")
        await _captured(c, sid)
        assert "destroying the guest failed" in (await c.service.get(sid)).reason
        assert c.runtime.existing() == {sid}
        del c.runtime.fail["destroy"]
        await c.service.reaper.reap_once()
        assert c.runtime.existing() == set()
        assert await c.state(sid) == State.CAPTURED


async def test_credentials_the_guest_sends_that_do_not_pass_fail_the_session(
    tmp_path: Path,
) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        c.agent.of(sid).fetch_error = "no valid credentials"
        c.agent.sign_in(sid)
        row = await c.wait_for(sid, ENDED)
        assert row.state == State.FAILED
        assert "capturing the credentials failed" in row.reason
        assert c.runtime.existing() == set()
        assert await c.credentials.for_user(USER, KEY) == []


# --- starting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "named"),
    [
        ("create", "allocate did not come up"),
        ("start", "boot did not come up"),
        ("viewer-fails", "the viewer path did not come up: vnc handshake"),
        ("viewer-never", "the viewer path did not come up: vnc handshake"),
        ("login", "the login did not come up"),
    ],
)
async def test_a_start_failing_at_each_step_fails_naming_it_and_leaves_no_guest(
    tmp_path: Path, step: str, named: str
) -> None:
    async with core(tmp_path, boot_timeout=0.2) as c:
        if step == "create":
            c.runtime.fail["create"] = GuestStartFailed("allocate", "no address left")
        elif step == "start":
            c.runtime.fail["start"] = GuestError("the VMM exited")
        elif step == "viewer-fails":
            c.viewer_path.mode = "fail"
        elif step == "viewer-never":
            c.viewer_path.mode = "never"
        else:
            c.agent.refuse_login = "tmux is not there"
        row = await c.start()
        done = await c.wait_for(row.id, ENDED)
        assert done.state == State.FAILED
        assert named in done.reason, done.reason
        await c.settle()
        assert c.runtime.existing() == set()
        if step != "create":
            assert c.runtime.called("destroy", row.id) >= 1
        assert not c.service.work.watching(row.id)


async def test_without_a_working_upstream_no_guest_boots(tmp_path: Path) -> None:
    """Fail closed: with upstreams configured and none answering, the session fails saying
    so before a guest exists (traffic never leaves directly instead)."""
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    async with core(tmp_path, egress_upstreams=[dead], egress_check_url="http://x.test/") as c:
        row = await c.start()
        done = await c.wait_for(row.id, ENDED)
        assert done.state == State.FAILED
        assert "no egress identity" in done.reason and dead in done.reason, done.reason
        assert c.runtime.called("create") == 0 and c.runtime.existing() == set()
        assignment = await c.service.identities.assignment(USER)  # type: ignore[union-attr]
        assert assignment is None  # nothing was assigned that never worked


async def test_cancel_during_boot_ends_it_and_destroys_the_guest(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        gate = c.runtime.hold("start")
        row = await c.start()
        await gate.wait_entered()
        assert await c.state(row.id) == State.BOOTING
        ended = await c.service.cancel(row.id)
        assert ended.state == State.TERMINATED and ended.reason == "cancelled"
        assert c.runtime.existing() == set()
        gate.open()
        await c.settle()
        assert await c.state(row.id) == State.TERMINATED


async def test_cancel_during_the_viewer_check_ends_it(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        gate = c.viewer_path.hold()
        row = await c.start()
        await gate.wait_entered()
        await c.service.cancel(row.id)
        assert await c.state(row.id) == State.TERMINATED
        assert c.runtime.existing() == set()


async def test_cancel_during_capture_waits_for_it(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        gate = c.runtime.hold("destroy")
        c.agent.sign_in(sid)
        await gate.wait_entered()  # stored, destroying the guest
        cancel = asyncio.create_task(c.service.cancel(sid))
        await asyncio.sleep(0.05)
        assert not cancel.done()  # it waits for the capture, never cuts it
        gate.open()
        ended = await cancel
        assert ended.state == State.TERMINATED
        seen = await c.states_seen(sid)
        assert seen[-2:] == ["captured", "terminated"]
        assert (await c.credentials.get(USER, PROVIDER, KEY)).session_id == sid
        assert c.runtime.existing() == set()


@pytest.mark.parametrize("after_capture", ["destroy", "hibernate"])
async def test_the_reaper_never_fails_a_capture_that_stops_its_guest(
    tmp_path: Path, after_capture: str
) -> None:
    """The race that failed CI: while the capture destroys (or hibernates) the guest the host
    sees it dead; a reaper pass then must not end the sign-in as 'the guest stopped
    unexpectedly'."""
    async with core(tmp_path, after_capture=after_capture) as c:
        sid = await _authenticating(c)
        step = "destroy" if after_capture == "destroy" else "hibernate"
        gate = c.runtime.hold(step)
        c.agent.sign_in(sid)
        await gate.wait_entered()
        assert c.runtime.status(c.runtime.load(sid)) == GuestStatus.DEAD

        stop = asyncio.Event()

        async def reap() -> int:
            passes = 0
            while not stop.is_set():
                await c.service.reaper.reap_once()
                passes += 1
                await asyncio.sleep(0)
            return passes

        reaping = asyncio.create_task(reap())
        await asyncio.sleep(0.05)
        assert await c.state(sid) == State.AUTHENTICATING
        gate.open()
        await c.wait_for(sid, {State.CAPTURED, *ENDED})
        await asyncio.sleep(0.02)
        stop.set()
        assert await reaping > 1
        row = await c.service.get(sid)
        assert row.state == State.CAPTURED, row.reason
        assert "stopped unexpectedly" not in " ".join(e.detail for e in await c.events(sid))


# --- hibernate and resume -------------------------------------------------------------------


async def test_hibernate_and_resume_restart_the_login(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        row = await c.service.hibernate(sid)
        assert row.state == State.HIBERNATED
        await c.settle()
        assert not c.service.work.watching(sid)
        assert c.runtime.host[sid] == GuestStatus.HIBERNATED
        assert c.service.guest_facts(row).status == GuestStatus.HIBERNATED

        await c.service.resume(sid)
        await c.wait_for(sid, {State.AUTHENTICATING})
        await c.settle()
        assert c.agent.of(sid).logins == 2
        assert c.service.work.watching(sid)
        await _captured(c, sid)
        assert c.runtime.existing() == set()


@pytest.mark.parametrize("before", [State.READY, State.AUTHENTICATING])
async def test_a_failed_hibernate_returns_to_where_it_was(tmp_path: Path, before: State) -> None:
    async with core(tmp_path, auto_login=before == State.AUTHENTICATING) as c:
        row = await c.start()
        await c.wait_for(row.id, {before})
        await c.settle()
        c.runtime.fail["hibernate"] = HibernateFailed("no space left")
        with pytest.raises(HibernateFailed):
            await c.service.hibernate(row.id)
        back = await c.service.get(row.id)
        assert back.state == before and "hibernate failed" in back.reason
        assert c.runtime.host[row.id] == GuestStatus.RUNNING
        assert c.service.work.watching(row.id) == (before == State.AUTHENTICATING)
        if before == State.AUTHENTICATING:  # the restarted watcher captures
            await _captured(c, row.id)


async def test_hibernate_failing_otherwise_fails_the_session(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        c.runtime.fail["hibernate"] = GuestError("the VMM crashed while saving")
        row = await c.service.hibernate(sid)
        assert row.state == State.FAILED and "hibernate failed" in row.reason
        assert c.runtime.existing() == set()


async def test_resume_failing_fails_the_session(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        await c.service.hibernate(sid)
        c.runtime.fail["resume"] = GuestStartFailed("resume", "snapshot corrupt")
        await c.service.resume(sid)
        row = await c.wait_for(sid, ENDED)
        assert row.state == State.FAILED and "resume did not come up" in row.reason
        assert c.runtime.existing() == set()


async def test_a_captured_session_whose_guest_is_gone_does_not_resume(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        await _captured(c, sid)
        with pytest.raises(SessionStateError):
            await c.service.resume(sid)
        with pytest.raises(SessionStateError):
            await c.service.hibernate(sid)


async def test_hibernate_while_booting_is_refused_at_once(tmp_path: Path) -> None:
    """As before the redesign: a booting session cannot hibernate (409 at once, not after
    waiting for the boot); once it is up, it can, and no login is left followed."""
    async with core(tmp_path) as c:
        gate = c.viewer_path.hold()
        row = await c.start()
        await gate.wait_entered()
        with pytest.raises(SessionStateError):
            await asyncio.wait_for(c.service.hibernate(row.id), 1)
        gate.open()
        await c.wait_for(row.id, {State.AUTHENTICATING})
        assert (await c.service.hibernate(row.id)).state == State.HIBERNATED
        await c.settle()
        assert not c.service.work.watching(row.id)  # no login followed in a saved guest
        await c.service.resume(row.id)
        await c.wait_for(row.id, {State.AUTHENTICATING})
        await _captured(c, row.id)


# --- the reaper -----------------------------------------------------------------------------


async def test_the_reaper_ends_a_session_past_its_lifetime(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        await c.age(sid, c.settings.max_lifetime + 1, activity=False)
        await c.service.reaper.reap_once()
        row = await c.service.get(sid)
        assert row.state == State.TERMINATED and "maximum lifetime" in row.reason
        assert c.runtime.existing() == set()


async def test_the_sign_in_time_runs_out_unless_extended_within_the_lifetime(
    tmp_path: Path,
) -> None:
    async with core(tmp_path, signin_time=60, max_lifetime=100) as c:
        sid = await _authenticating(c)
        row = await c.service.get(sid)
        assert row.ends_at is not None and row.ready_at is not None
        assert abs((row.ends_at - row.ready_at).total_seconds() - 60) < 2  # from ready
        await c.age(sid, 30)
        extended = await c.service.heartbeat(sid)  # 60 s from now: within the lifetime
        assert extended.ends_at is not None
        assert abs((extended.ends_at - utcnow()).total_seconds() - 60) < 2
        await c.age(sid, 20)
        capped = await c.service.heartbeat(sid)  # now + 60 would pass created + 100
        assert capped.ends_at is not None
        assert abs((capped.ends_at - capped.created_at).total_seconds() - 100) < 2
        await c.service.reaper.reap_once()
        assert await c.state(sid) == State.AUTHENTICATING  # time is left

        other = await _authenticating(c)
        watching = _Viewer()
        c.viewers.viewers[other].add(watching)  # type: ignore[arg-type]  # even watched:
        await c.age(other, 61, activity=False)  # no heartbeat for longer than signin_time
        await c.service.reaper.reap_once()
        ended = await c.service.get(other)
        assert ended.state == State.TERMINATED
        assert ended.reason == "timed out: the sign-in time ran out"
        assert watching.closed and "timed out" in watching.closed[0][1]


class _Viewer:
    """A viewer as the registry holds it: closed with a code and a reason."""

    def __init__(self) -> None:
        self.closed: list[tuple[int, str]] = []

    async def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))


async def test_the_reaper_ends_a_session_without_a_viewer(tmp_path: Path) -> None:
    async with core(tmp_path, auto_login=False) as c:
        row = await c.start()
        await c.wait_for(row.id, {State.READY})
        await c.settle()
        await c.age(row.id, c.settings.idle_timeout + 1)
        c.viewers.viewers[row.id].add(object())  # type: ignore[arg-type]
        await c.service.reaper.reap_once()
        assert await c.state(row.id) == State.READY  # someone watches
        c.viewers.viewers.pop(row.id)
        await c.service.reaper.reap_once()
        ended = await c.service.get(row.id)
        assert ended.state == State.TERMINATED and "no viewer" in ended.reason
        assert c.runtime.existing() == set()


async def test_the_reaper_fails_a_start_that_never_finished(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        gate = c.runtime.hold("start")
        row = await c.start()
        await gate.wait_entered()
        await c.age(row.id, c.settings.boot_timeout + 31)
        await c.service.reaper.reap_once()
        assert await c.state(row.id) == State.BOOTING  # its boot still runs: left alone
        await c.service.work.shutdown()  # the boot is lost (its task gone)
        gate.open()
        await c.service.reaper.reap_once()
        ended = await c.service.get(row.id)
        assert ended.state == State.FAILED and "never finished" in ended.reason
        assert c.runtime.existing() == set()


async def test_the_reaper_fails_a_session_whose_guest_died(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        c.runtime.die(sid)
        await c.service.reaper.reap_once()
        row = await c.service.get(sid)
        assert row.state == State.FAILED and "stopped unexpectedly" in row.reason
        assert c.runtime.existing() == set()
        await c.settle()
        assert not c.service.work.watching(sid)


async def test_the_reaper_expires_hibernated_and_kept_guests(tmp_path: Path) -> None:
    async with core(tmp_path, after_capture="hibernate") as c:
        parked = await _authenticating(c)
        await c.service.hibernate(parked)
        kept = await _authenticating(c)
        await _captured(c, kept)
        assert c.runtime.existing() == {parked, kept}
        await c.service.reaper.reap_once()
        assert c.runtime.existing() == {parked, kept}  # not yet
        for sid in (parked, kept):
            await c.age(sid, c.settings.hibernated_ttl + 1)
        await c.service.reaper.reap_once()
        assert c.runtime.existing() == set()
        row = await c.service.get(parked)
        assert row.state == State.TERMINATED and "hibernated for over" in row.reason
        assert await c.state(kept) == State.CAPTURED  # the sign-in stands
        assert any(e.name == "kept guest destroyed" for e in await c.events(kept))


# --- restart --------------------------------------------------------------------------------


async def test_reconcile_after_a_restart(tmp_path: Path) -> None:
    async with core(tmp_path, auto_login=True) as c:
        live = await _authenticating(c)
        dead = await _authenticating(c)
        c.runtime.die(dead)
        # a session the controller was ending (its destroy under way) when it stopped
        ending = await _authenticating(c)
        gate = c.runtime.hold("destroy")
        cancelling = asyncio.create_task(c.service.cancel(ending))
        await gate.wait_entered()
        assert await c.state(ending) == State.TERMINATED
        # one checking its viewer path
        viewer_gate = c.viewer_path.hold()
        starting = (await c.start(user="bob")).id
        await viewer_gate.wait_entered()
        cancelling.cancel()

        service = await c.restart()
        assert await c.state(live) == State.AUTHENTICATING
        assert service.work.watching(live)  # reattached: its login is followed again
        row = await c.service.get(dead)
        assert row.state == State.FAILED and "gone" in row.reason
        row = await c.service.get(starting)
        assert row.state == State.FAILED and "while it was starting" in row.reason
        assert ending not in c.runtime.existing()
        assert await c.leaked() == []

        await _captured(c, live)  # the new controller captures it
        assert c.runtime.existing() == set()


async def test_a_capture_cut_short_by_a_restart_ends_captured(tmp_path: Path) -> None:
    """The controller stopped after it stored the credentials but before the session was
    captured: the agent hands them out once, so the new controller must not fail it."""
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        gate = c.runtime.hold("destroy")
        c.agent.sign_in(sid)
        await gate.wait_entered()  # stored; the controller dies here
        await c.restart()
        row = await c.wait_for(sid, {State.CAPTURED, *ENDED})
        assert row.state == State.CAPTURED, row.reason
        gate.open()
        await c.settle()
        assert c.runtime.existing() == set()


# --- limits ---------------------------------------------------------------------------------


async def test_max_sessions_counts_live_sessions_only(tmp_path: Path) -> None:
    async with core(tmp_path, max_sessions=2, max_sessions_per_user=9) as c:
        first = await _authenticating(c)
        await _authenticating(c)
        with pytest.raises(TooManySessions, match="maximum of 2 sessions"):
            await c.start()
        await c.service.hibernate(first)  # a hibernated guest holds no CPU or memory
        third = await c.start()
        await c.wait_for(third.id, {State.AUTHENTICATING})
        with pytest.raises(TooManySessions):
            await c.service.resume(first)
        assert await c.state(first) == State.HIBERNATED


async def test_quotas_per_key_and_per_user(tmp_path: Path) -> None:
    async with core(
        tmp_path, max_sessions_per_user=2, max_sessions_per_key=3, after_capture="hibernate"
    ) as c:
        a1 = await _authenticating(c)
        a2 = await _authenticating(c)
        with pytest.raises(TooManySessions, match="user 'alice'"):
            await c.start()
        await c.start(user="bob")
        with pytest.raises(TooManySessions, match="API key"):
            await c.start(user="carol")
        await c.start(user="carol", key="key-b")  # another key has its own quota
        # a captured session counts while its wiped guest is kept, not once it is gone
        await c.service.hibernate(a1)
        await _captured(c, a2)
        with pytest.raises(TooManySessions, match="user 'alice'"):
            await c.start(key="key-c")
        await c.age(a2, c.settings.hibernated_ttl + 1)
        await c.service.reaper.reap_once()
        assert await c.state(a2) == State.CAPTURED
        row = await c.start(key="key-c")
        assert row.user_id == USER
        await c.settle()


# --- what the layers above read ---------------------------------------------------------


async def test_open_url_heartbeat_and_viewer_target(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        sid = await _authenticating(c)
        row = await c.service.get(sid)
        await c.service.open_url(sid, "https://example.test/path?secret=1")
        assert c.agent.of(sid).opened == ["https://example.test/path?secret=1"]
        assert any(e.detail == "https://example.test" for e in await c.events(sid))
        target = c.service.viewer_target(row)
        assert target.vnc_url.startswith("vnc://127.0.0.1:")
        assert target.vnc_password == c.runtime.load(sid).secrets.vnc_password
        assert (await c.service.agent(row).health())["boot_id"] == sid
        assert (await c.service.heartbeat(sid)).last_activity_at >= row.last_activity_at
        await c.service.cancel(sid)
        with pytest.raises(SessionStateError):
            await c.service.heartbeat(sid)
        with pytest.raises(SessionStateError):
            await c.service.open_url(sid, "https://example.test/")
        with pytest.raises(SessionStateError):
            await c.service.cancel(sid)
        assert c.service.guest_facts(await c.service.get(sid)).status == GuestStatus.DESTROYED
