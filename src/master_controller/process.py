"""Tracking processes by pid *and* start time, so a reused pid is never mistaken for ours.

Guests' VMM/container processes run in their own session (they outlive the controller);
the controller records a :class:`ProcessRef` and finds them again from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

from pydantic import BaseModel

# Children this controller process spawned, so that their exit status gets reaped.
_children: dict[int, subprocess.Popen[bytes]] = {}


def reap() -> None:
    """Collect the exit status of every child of ours that has ended, so none stays a
    zombie (a start cut short may kill a child nobody waits for afterwards)."""
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]


class ProcessRef(BaseModel):
    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        ticks = start_ticks(pid)
        return None if ticks is None else cls(pid=pid, start_ticks=ticks)

    def alive(self) -> bool:
        child = _children.get(self.pid)
        if child is not None and start_ticks(self.pid) == self.start_ticks:
            # our own child: only waitpid tells (and reaps it, so no zombie stays behind)
            if child.poll() is None:
                return True
            del _children[self.pid]
            return False
        return start_ticks(self.pid) == self.start_ticks and not _is_zombie(self.pid)

    def signal(self, sig: int) -> bool:
        """Send ``sig`` if this exact process still runs; False if it is gone."""
        if not self.alive():
            return False
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        try:
            # the pidfd pins this exact process: check once more, then signal through it
            if start_ticks(self.pid) != self.start_ticks:
                return False
            signal.pidfd_send_signal(fd, sig)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)

    async def wait(self, timeout: float) -> bool:
        """Wait until the process exits; True if it did within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.alive():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def children(self) -> list[ProcessRef]:
        refs = []
        try:
            tasks = list(Path(f"/proc/{self.pid}/task").iterdir())
        except OSError:
            return []
        for task in tasks:
            with contextlib.suppress(OSError):
                for pid in (task / "children").read_text().split():
                    ref = ProcessRef.of(int(pid))
                    if ref is not None:
                        refs.append(ref)
        return refs


def spawn(argv: list[str], log: Path) -> ProcessRef:
    """Start ``argv`` in a session of its own (it survives the controller), output to ``log``."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    ref = ProcessRef.of(proc.pid)
    if ref is None:  # exited already; keep a ref that reads as dead
        proc.wait()
        _children.pop(proc.pid, None)
        return ProcessRef(pid=proc.pid, start_ticks=-1)
    return ref


def start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: fields follow the last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
