"""Start a VMM as an unprivileged user with the host files it needs already open.

QEMU's ``-sandbox elevateprivileges=deny`` forbids the setuid() its own ``-runas`` makes, and
a guest folder that stays 0700 root cannot be reached by an unprivileged QEMU by path. So a
QEMU never opens a host file itself: this helper, run as root in the guest's network
namespace, opens each file, socket and tap the VMM needs, places them at descriptors 3, 4, ...
in the order given, drops to the guest's own UID and GID with no other groups (only those
named with ``--group``, such as the group of /dev/kvm), sets no_new_privs and execs the VMM.
The VMM's argv names the files as ``/dev/fdset/N``, ``fd=N`` or ``/proc/self/fd/N``.

Run as a script, with no import from the package (``python -I -S vmm_exec.py``)::

    vmm_exec.py --uid U --gid G [--group K] --open KIND:TARGET ... -- VMM ARGS...

Kinds (``TARGET`` is a path unless said otherwise):

- ``read``: O_RDONLY; ``rdwr``: O_RDWR (the file must exist);
- ``new``: a fresh file, truncated, 0600; ``append``: created 0600 if missing, appended to;
- ``listen``: a unix stream socket listening at TARGET (a stale socket there is replaced),
  0600;
- ``tap``: the tap device named TARGET in this network namespace (``TUNSETIFF``).

Any failure prints one line ``vmm_exec: <reason>`` on stderr and exits 1 before the VMM
runs. :class:`VmmLaunch` builds the command line from the controller's side.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
import sys
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # kept out of the helper's own start-up, which every VM launch waits for
    from collections.abc import Sequence
    from pathlib import Path

FIRST_FD = 3
KINDS = ("read", "rdwr", "new", "append", "listen", "tap")

_TUNSETIFF = 0x400454CA
_TUNGETFEATURES = 0x800454CF
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_PR_SET_NO_NEW_PRIVS = 38


class VmmLaunch:
    """The command line that runs a VMM through this helper.

    ``fd(kind, target)`` reserves the next descriptor for a file and returns its number, for
    the VMM's own arguments; ``argv(vmm_argv)`` is the whole command."""

    def __init__(self, uid: int, gid: int, groups: Sequence[int] = ()) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = list(groups)
        self.opens: list[str] = []

    def fd(self, kind: str, target: str | Path) -> int:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        self.opens.append(f"{kind}:{target}")
        return FIRST_FD + len(self.opens) - 1

    def argv(self, vmm_argv: Sequence[str]) -> list[str]:
        command = [sys.executable, "-I", "-S", __file__, "--uid", str(self.uid)]
        command += ["--gid", str(self.gid)]
        for group in self.groups:
            command += ["--group", str(group)]
        for spec in self.opens:
            command += ["--open", spec]
        return [*command, "--", *vmm_argv]


class LaunchError(Exception):
    pass


class _Request(NamedTuple):
    uid: int
    gid: int
    groups: list[int]
    opens: list[tuple[str, str]]
    argv: list[str]


def parse(args: Sequence[str]) -> _Request:
    """The request in ``args`` (this script's arguments), checked."""
    uid = gid = -1
    groups: list[int] = []
    opens: list[tuple[str, str]] = []
    rest = list(args)
    while rest and rest[0] != "--":
        if len(rest) < 2:
            raise LaunchError(f"{rest[0]} needs a value")
        option, value = rest[0], rest[1]
        del rest[:2]
        if option in ("--uid", "--gid", "--group"):
            if not value.isdigit():
                raise LaunchError(f"{option} {value!r} is not a number")
            if option == "--uid":
                uid = int(value)
            elif option == "--gid":
                gid = int(value)
            else:
                groups.append(int(value))
        elif option == "--open":
            kind, _, target = value.partition(":")
            if kind not in KINDS or not target:
                raise LaunchError(f"--open {value!r}: expected KIND:TARGET, KIND one of {KINDS}")
            opens.append((kind, target))
        else:
            raise LaunchError(f"unknown option {option}")
    if uid <= 0 or gid <= 0:
        raise LaunchError("--uid and --gid are required and must not be 0 (root)")
    if len(rest) < 2:
        raise LaunchError("no VMM command after --")
    return _Request(uid, gid, groups, opens, rest[1:])


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        features = struct.unpack("I", fcntl.ioctl(fd, _TUNGETFEATURES, struct.pack("I", 0)))[0]
        flags = _IFF_TAP | _IFF_NO_PI | (features & _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def _listen(path: str) -> int:
    import socket  # only QEMU's monitor needs it

    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):  # left by an earlier VMM of this guest
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def open_one(kind: str, target: str) -> int:
    """Open one ``KIND:TARGET`` (close-on-exec until it is placed)."""
    cloexec = os.O_CLOEXEC | os.O_NOCTTY
    if kind == "read":
        return os.open(target, os.O_RDONLY | cloexec)
    if kind == "rdwr":
        return os.open(target, os.O_RDWR | cloexec)
    if kind in ("new", "append"):
        mode = os.O_TRUNC if kind == "new" else os.O_APPEND
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | mode | cloexec, 0o600)
        os.fchmod(fd, 0o600)  # a file made by an older version may be wider
        return fd
    if kind == "listen":
        return _listen(target)
    return _open_tap(target)


def place(opens: Sequence[tuple[str, str]]) -> None:
    """Open every file and put the n-th at descriptor FIRST_FD + n; close all others above
    stderr, so the VMM inherits exactly these."""
    high = FIRST_FD + len(opens)
    moved = []
    for kind, target in opens:
        try:
            fd = open_one(kind, target)
        except OSError as exc:
            raise LaunchError(f"{kind} {target}: {exc.strerror or exc}") from exc
        # above the range being filled, so no later dup2 overwrites one still to be placed
        moved.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high))
        os.close(fd)
    for index, fd in enumerate(moved):
        os.dup2(fd, FIRST_FD + index)  # inheritable
        os.close(fd)
    os.closerange(high, os.sysconf("SC_OPEN_MAX"))


def drop_privileges(uid: int, gid: int, groups: Sequence[int]) -> None:
    """Become ``uid``/``gid`` for good: real, effective and saved IDs, supplementary groups
    ``groups`` only, no capabilities (the kernel clears them when root's UIDs all change),
    and no_new_privs, so no later exec (of a setuid file) can gain any."""
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise LaunchError(f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise LaunchError("still able to become root after dropping privileges")


def main(args: Sequence[str]) -> int:
    os.umask(0o077)
    try:
        request = parse(args)
        place(request.opens)
        drop_privileges(request.uid, request.gid, request.groups)
        os.execv(request.argv[0], request.argv)  # noqa: S606 (an argument list, no shell)
    except (LaunchError, OSError) as exc:
        print(f"vmm_exec: {exc}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
