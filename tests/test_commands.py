"""Commands from async code: the same contract as the synchronous run, and a cancelled
caller that waits for what it started to end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from master_controller.commands import arun, in_thread, run
from master_controller.errors import CommandError


def test_arun_returns_output_like_run(tmp_path: Path) -> None:
    argv = ["sh", "-c", "echo out; echo err >&2; pwd; cat"]
    expected = run(argv, input_text="in\n", cwd=tmp_path)
    assert asyncio.run(arun(argv, input_text="in\n", cwd=tmp_path)) == expected
    assert expected.split() == ["out", "err", str(tmp_path), "in"]


def test_arun_failures_are_command_errors() -> None:
    with pytest.raises(CommandError) as failed:
        asyncio.run(arun(["sh", "-c", "echo no such thing; exit 3"]))
    assert failed.value.returncode == 3 and "no such thing" in failed.value.reason
    with pytest.raises(CommandError) as missing:
        asyncio.run(arun(["mc-no-such-command"]))
    assert missing.value.returncode == 127


def test_arun_kills_a_command_past_its_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(CommandError, match=r"timed out after 0\.2s"):
        asyncio.run(arun(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"], timeout=0.2))
    assert not Path(f"/proc/{pid_file.read_text().strip()}").exists()


def test_a_cancelled_caller_waits_for_its_command(tmp_path: Path) -> None:
    done = tmp_path / "done"

    async def go() -> None:
        task = asyncio.create_task(arun(["sh", "-c", f"sleep 0.3; touch {done}"]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done.exists()  # the command ran to its end before the cancellation

    asyncio.run(go())


def test_in_thread_keeps_the_loop_going_and_outlives_a_cancel() -> None:
    finished: list[str] = []

    def work() -> str:
        time.sleep(0.3)
        finished.append("work")
        return "result"

    async def go() -> None:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        assert await in_thread(work) == "result"
        assert ticks > 5  # the loop ran meanwhile
        task = asyncio.create_task(in_thread(work))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # twice: still waits
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == ["work", "work"]
        ticker.cancel()

    asyncio.run(go())
