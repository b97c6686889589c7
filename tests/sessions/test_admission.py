"""Admission and retries: at most ``max_concurrent_boots`` guests boot at once, the rest wait
in order (``queued``, with how many are ahead) and get their whole boot timeout once they
boot; a transient start failure is retried once on a fresh guest, a second one fails the
session with both reasons, and a lasting one is not retried."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from master_controller.errors import GuestError, GuestStartFailed, StorageFull
from master_controller.metrics import START_RETRIES
from master_controller.runtimes.base import GuestState
from master_controller.sessions.admission import BootSlots
from master_controller.sessions.states import State
from master_controller.steps import StepSink
from tests.sessions.harness import core

UP = {State.READY, State.AUTHENTICATING}
ENDED = {State.TERMINATED, State.FAILED}


class Once(dict[str, Exception]):
    """Runtime failures that happen once each."""

    def get(self, key: str, default: Any = None) -> Any:
        return self.pop(key, default)


async def test_slots_hand_out_in_order_and_say_who_is_ahead() -> None:
    slots = BootSlots(2)
    order: list[str] = []
    release = asyncio.Event()

    async def boot(name: str) -> None:
        async with slots.slot(name):
            order.append(name)
            await release.wait()

    tasks = [asyncio.create_task(boot(f"s{i}")) for i in range(5)]
    await asyncio.sleep(0.01)
    assert order == ["s0", "s1"]
    assert [slots.ahead_of(f"s{i}") for i in range(5)] == [None, None, 0, 1, 2]
    tasks[3].cancel()  # one leaves the queue: those behind it move up
    await asyncio.sleep(0.01)
    assert slots.ahead_of("s4") == 1 and slots.waiting == 2
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == ["s0", "s1", "s2", "s4"] and slots.waiting == 0


async def test_a_start_cancelled_once_handed_a_slot_gives_it_back() -> None:
    slots = BootSlots(1)
    first = slots.slot("a")
    await first.__aenter__()
    waiter = asyncio.create_task(slots.slot("b").__aenter__())
    await asyncio.sleep(0.01)
    await first.__aexit__(None, None, None)  # hands the slot to b ...
    waiter.cancel()  # ... which is cancelled in the same moment
    await asyncio.gather(waiter, return_exceptions=True)
    async with asyncio.timeout(1):
        async with slots.slot("c"):  # the slot is free again
            pass


async def test_a_burst_queues_in_order_with_positions(tmp_path: Path) -> None:
    async with core(tmp_path, max_concurrent_boots=1, max_sessions=10) as c:
        gate = c.runtime.hold("start")
        rows = [await c.start(user=f"u{i}", key=f"k{i}") for i in range(4)]
        await gate.wait_entered()
        for row in rows[1:]:
            await c.wait_for(row.id, {State.QUEUED})
        assert [c.service.queue_position(r.id) for r in rows] == [None, 0, 1, 2]
        assert "waiting for a boot slot (2 ahead)" in (await c.service.get(rows[3].id)).reason
        gate.open()
        for row in rows:
            await c.wait_for(row.id, UP)
        states = await c.states_seen(rows[2].id)
        assert states[:4] == ["provisioning", "queued", "booting", "ready"], states


async def test_a_queued_boot_gets_its_whole_timeout(tmp_path: Path) -> None:
    async with core(tmp_path, max_concurrent_boots=1, boot_timeout=1.5) as c:
        left: dict[str, float] = {}
        check = c.service.bring_up.viewer_path

        async def measuring(guest: GuestState, deadline: float, record: StepSink) -> None:
            left[guest.guest_id] = deadline - time.monotonic()
            await check(guest, deadline, record)

        c.service.bring_up.viewer_path = measuring
        gate = c.runtime.hold("start")
        first = await c.start(user="first", key="k1")
        second = await c.start(user="second", key="k2")
        await gate.wait_entered()
        await asyncio.sleep(1.8)  # longer than the boot timeout, waiting in the queue
        gate.open()
        await c.wait_for(second.id, UP)
        assert left[second.id] > 0.75, left  # its timeout started when it booted
        await c.wait_for(first.id, UP)


async def test_a_transient_failure_is_retried_once_on_a_fresh_guest(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        c.runtime.fail = Once({"start": GuestError("nspawn exited at once")})
        before = START_RETRIES._value.get()
        row = await c.start()
        up = await c.wait_for(row.id, UP)
        assert up.guest_id == f"{row.id}-2"
        assert c.runtime.called("destroy", row.id) >= 1  # the first guest is gone
        assert c.runtime.existing() == {f"{row.id}-2"}
        retried = [e for e in await c.events(row.id) if e.name == "retry on a fresh guest"]
        assert len(retried) == 1 and "nspawn exited at once" in retried[0].detail
        assert START_RETRIES._value.get() == before + 1
        assert await c.leaked() == []


async def test_a_second_failure_fails_with_both_reasons(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        c.runtime.fail["start"] = GuestError("nspawn exited at once")
        row = await c.start()
        done = await c.wait_for(row.id, ENDED)
        assert done.state == State.FAILED
        assert done.reason.count("nspawn exited at once") == 2, done.reason
        assert "retried on a fresh guest" in done.reason
        await c.settle()
        assert c.runtime.existing() == set()


async def test_a_lasting_failure_is_not_retried(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        c.runtime.fail["create"] = StorageFull("no space left on /var/lib/mc")
        row = await c.start()
        done = await c.wait_for(row.id, ENDED)
        assert done.state == State.FAILED and "retried" not in done.reason
        assert c.runtime.called("create") == 1


async def test_a_lasting_cause_inside_a_runtime_step_is_not_retried(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        full = StorageFull("no space left for the disk layer")
        wrapped = GuestStartFailed("disk layer", full.reason)
        wrapped.__cause__ = full
        c.runtime.fail["start"] = wrapped
        row = await c.start()
        done = await c.wait_for(row.id, ENDED)
        assert done.state == State.FAILED and "retried" not in done.reason, done.reason
        assert c.runtime.called("create") == 1


async def test_a_cancelled_queued_start_leaves_the_queue(tmp_path: Path) -> None:
    async with core(tmp_path, max_concurrent_boots=1) as c:
        gate = c.runtime.hold("start")
        first = await c.start(user="first", key="k1")
        second = await c.start(user="second", key="k2")
        third = await c.start(user="third", key="k3")
        await c.wait_for(third.id, {State.QUEUED})
        await c.service.cancel(second.id)
        assert c.service.queue_position(third.id) == 0
        gate.open()
        await c.wait_for(third.id, UP)
        await c.wait_for(first.id, UP)
        assert c.runtime.called("create", second.id) == 0
