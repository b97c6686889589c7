"""Running external commands (argument lists only, never a shell), and blocking work from
async code: :func:`run` for synchronous callers (the CLI, the image builder, helpers that run
in a worker thread), :func:`arun` and :func:`in_thread` for the event loop, which relays
every viewer and must never wait on a command or a disk."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, ParamSpec, TypeVar

from master_controller.errors import CommandError

P = ParamSpec("P")
T = TypeVar("T")


def run(
    argv: Sequence[str | Path],
    *,
    log: IO[str] | None = None,
    timeout: float | None = None,
    input_text: str | None = None,
    cwd: Path | None = None,
) -> str:
    """Run ``argv``; return its output (stdout and stderr together), raise CommandError on
    failure. With ``log``, the output is also appended there."""
    args = [str(a) for a in argv]
    if log is not None:
        log.write(f"$ {' '.join(args)}\n")
        log.flush()
    try:
        done = subprocess.run(
            args,
            input=input_text,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(args, -1, f"timed out after {timeout}s") from exc
    if log is not None:
        log.write(done.stdout)
        log.flush()
    if done.returncode != 0:
        raise CommandError(args, done.returncode, done.stdout)
    return done.stdout


async def arun(
    argv: Sequence[str | Path],
    *,
    timeout: float | None = None,
    input_text: str | None = None,
    cwd: Path | None = None,
) -> str:
    """:func:`run` for async code: the command runs while the event loop goes on. Same
    contract: its output (stdout and stderr together), CommandError on failure, killed after
    ``timeout``. A caller cancelled meanwhile still waits for the command to end (a mount or
    copy cut short would leave the caller not knowing what it did), then is cancelled."""
    args = [str(a) for a in argv]
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if input_text is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: command not found") from exc
    data = input_text.encode() if input_text is not None else None

    async def communicate() -> bytes:
        try:
            out, _ = await asyncio.wait_for(proc.communicate(data), timeout)
        except TimeoutError:
            proc.kill()  # here, so that a cancelled caller's command does not outlive it
            await proc.wait()
            raise
        return out

    try:
        out = await to_the_end(communicate())
    except TimeoutError as exc:
        raise CommandError(args, -1, f"timed out after {timeout}s") from exc
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise CommandError(args, proc.returncode or -1, text)
    return text


async def in_thread(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``function(*args, **kwargs)`` in a worker thread (blocking file work, syscalls, a
    synchronous helper that runs commands), so the event loop goes on meanwhile. Like
    :func:`arun`, a caller cancelled meanwhile waits for it to end (a thread cannot be
    stopped, and a caller's clean-up must not race it), then is cancelled."""
    return await to_the_end(asyncio.to_thread(function, *args, **kwargs))


async def to_the_end(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile (once or more);
    the cancellation is raised after, and what ``work`` raised or returned is dropped."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})  # unlike awaiting it, leaves the task be when cancelled
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: dropped on purpose, not "never retrieved"
        raise cancelled
    return task.result()
