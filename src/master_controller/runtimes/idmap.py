"""ID-mapped mounts: a container's files seen through a user namespace's UID/GID map.

A container runs in a user namespace of its own (``systemd-nspawn --private-users``): its root
is an unprivileged UID range on the host. The image's rootfs on disk is owned by 0-based IDs
and is shared by every guest, so it is never chowned; instead the guest's overlayfs gets an
ID-mapped view of it as its lower layer (kernel >= 5.19 for overlayfs over ID-mapped layers),
and what the guest writes lands in its own upper layer under the guest's range.

The kernel API is the new mount API (``open_tree``, ``mount_setattr``, ``move_mount``), which
Python's ``os`` module does not wrap before 3.12-3.13; the three calls are made with ctypes.
A user namespace to map with comes from a short-lived ``unshare --user`` whose maps we write.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

from master_controller.errors import ConfigError

RANGE = 65536
# Guest ranges: slot n is [FIRST + n*RANGE, FIRST + (n+1)*RANGE), above regular users and
# nspawn's own "pick" area, below the 0x7FFF0000 that nspawn refuses. A guest's slot is its
# address lease's index, so ranges are unique among live guests and need no allocator.
FIRST = 0x20000000
SLOTS = (0x7FFF0000 - FIRST) // RANGE

_SYS_OPEN_TREE = 428  # x86_64 (and every architecture since 5.2 uses the same numbers)
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def base_for(slot: int) -> int:
    """The first host UID (and GID) of slot ``slot``'s range."""
    if not 0 <= slot < SLOTS:
        raise ConfigError(
            f"no UID range for lease {slot} (there are {SLOTS}); use a smaller guest_network"
        )
    return FIRST + slot * RANGE


def _userns_fd(base: int) -> int:
    """An fd of a fresh user namespace mapping 0..RANGE to base..base+RANGE (UIDs and GIDs)."""
    own = os.readlink("/proc/self/ns/user")
    helper = subprocess.Popen(
        ["unshare", "--user", "--", "sleep", "30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ns = f"/proc/{helper.pid}/ns/user"
        deadline = time.monotonic() + 5
        while os.readlink(ns) == own:  # unshare(2) has not happened yet
            if helper.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"unshare --user did not make a user namespace ({helper.poll()})")
            time.sleep(0.002)
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{helper.pid}/{name}").write_text(f"0 {base} {RANGE}\n")
        return os.open(ns, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.kill()
        helper.wait()


def mount_idmapped(source: Path, target: Path, base: int) -> None:
    """Attach at ``target`` a view of ``source`` whose owners appear shifted by ``base``
    (a file owned by 0 on disk is seen as owned by ``base``)."""
    userns = _userns_fd(base)
    tree = -1
    try:
        tree = _check(
            _libc.syscall(
                _SYS_OPEN_TREE,
                _AT_FDCWD,
                os.fsencode(source),
                _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE,
            ),
            f"open_tree {source}",
        )
        attr = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP, userns_fd=userns)
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR,
                tree,
                b"",
                _AT_EMPTY_PATH | _AT_RECURSIVE,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            f"ID-mapping {source}",
        )
        _check(
            _libc.syscall(
                _SYS_MOVE_MOUNT,
                tree,
                b"",
                _AT_FDCWD,
                os.fsencode(target),
                _MOVE_MOUNT_F_EMPTY_PATH,
            ),
            f"attaching {source} at {target}",
        )
    finally:
        if tree >= 0:
            os.close(tree)
        os.close(userns)
