"""Small file systems of their own, for tests that fill a disk (root only)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: ``4m``, ``2g``) at ``where``, mode 0700, for the
    block; unmounted after (lazily, so a process still in it does not keep it)."""
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", where], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", where], check=True)
