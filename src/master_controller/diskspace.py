"""Free space on the file systems master-controller writes to, and how to say that one is full.

A full disk is an operator's problem, not a bug: the message names the file system (by a path
on it), what was being written, and how much room is left, so the fix is obvious.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from master_controller.errors import StorageFull

MIB = 2**20
REMEDY = "free some space on it, or move the data dir to a larger one"
# errors that mean "the file system (or the user's quota on it) is full"
_FULL = {errno.ENOSPC, errno.EDQUOT}


def free_bytes(path: Path) -> int:
    """Bytes available to us on the file system holding ``path`` (or its nearest existing
    parent, so it works before a folder is made)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def is_full_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is the file system running out of space."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        text = str(exc).lower()  # a command's output: "No space left on device", "ENOSPC: ..."
        if "no space left on device" in text or "disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def full_reason(path: Path, doing: str) -> str:
    """The words for a full file system: ``doing`` is what was being written."""
    return (
        f"no space left on the file system holding {path} while {doing} "
        f"({free_bytes(path) / MIB:.0f} MiB free now)"
    )


def require_free(path: Path, need: int, doing: str) -> None:
    """Refuse up front (StorageFull) when ``path``'s file system has less than ``need`` bytes
    free, rather than failing part-way through writing them."""
    free = free_bytes(path)
    if free < need:
        raise StorageFull(
            f"{doing} needs about {need / MIB:.0f} MiB on the file system holding {path}; "
            f"{free / MIB:.0f} MiB are free; {REMEDY}"
        )


def file_bytes(path: Path) -> int:
    """Allocated bytes of a file (0 if it is not there)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
