"""Removing a guest's folder without ever reaching through a mount into something shared.

A guest folder holds mount points while the guest runs (a container's ID-mapped view of the
shared image, its overlay root, its disk layer). A plain recursive delete descends into a
mount that was left behind and deletes what it shows: the shared image. So removal first
unmounts whatever is still mounted under the folder (deepest first), and then deletes with a
walk that refuses to cross into another file system; if something is still mounted it stops
and says so, leaving the folder for an operator rather than deleting through it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from master_controller.commands import run
from master_controller.errors import CommandError, GuestError


def mounts_under(folder: Path) -> list[Path]:
    """Mount points at or below ``folder``, deepest first (from /proc/self/mounts)."""
    root = os.path.realpath(folder)
    found = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            # the kernel escapes spaces and the like in mount points as octal
            target = line.split()[1].encode().decode("unicode_escape")
            if target == root or target.startswith(root + "/"):
                found.append(Path(target))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def remove_guest_folder(folder: Path) -> None:
    """Unmount what is mounted under ``folder``, then delete it without crossing file
    systems. Raises GuestError (leaving the folder) if a mount cannot be removed."""
    if not folder.exists():
        return
    for mount in mounts_under(folder):
        try:
            run(["umount", mount])
        except CommandError:
            with contextlib.suppress(CommandError):
                run(["umount", "--lazy", mount])
    if left := mounts_under(folder):
        raise GuestError(
            f"{left[0]} is still mounted; the guest folder {folder} was left in place so that "
            "nothing is deleted through the mount"
        )
    _remove_tree(folder, os.lstat(folder).st_dev)


def _remove_tree(path: Path, device: int) -> None:
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        path.unlink()
        return
    if info.st_dev != device:  # a mount we did not see: never descend into it
        raise GuestError(f"{path} is on another file system; not removing through it")
    with os.scandir(path) as entries:
        children = [Path(e.path) for e in entries]
    for child in children:
        _remove_tree(child, device)
    path.rmdir()
