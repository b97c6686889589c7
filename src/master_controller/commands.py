"""Running external commands: argument lists only, never a shell."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from master_controller.errors import CommandError


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


async def arun(argv: Sequence[str | Path], *, timeout: float | None = 60.0) -> str:
    """Async :func:`run` (output returned, CommandError on failure)."""
    args = [str(a) for a in argv]
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: command not found") from exc
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise CommandError(args, -1, f"timed out after {timeout}s") from exc
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise CommandError(args, proc.returncode or -1, text)
    return text
