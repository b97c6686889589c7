"""Files in a directory tree that an untrusted user controls, handled by root safely.

The agent runs as root; the browser user (whom the person viewing the guest may become)
owns its home and ``/run/mc/login``, and can put a symbolic link, a FIFO or a hard link
anywhere in them at any moment. So nothing here resolves a path by name: every operation
walks from a descriptor of the tree's root, one component at a time, with ``O_NOFOLLOW``
(a symlink anywhere is refused, never followed), and acts on descriptors (``fchown``,
``fstat``) or on names relative to a checked directory descriptor (``unlinkat``). A file
root reads must be a regular file owned by that user (a hard link to a root file is not)
and no larger than the caller's bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(Exception):
    """A path the agent refuses to use (a symlink, not a regular file, someone else's file,
    too large); the message says which and why, without the file's content."""


def split(relative: str) -> tuple[str, ...]:
    """The components of a relative path; UnsafePath for absolute paths, ``.``, ``..``."""
    parts = tuple(relative.split("/"))
    if any(p in ("", ".", "..") for p in parts):  # also catches "/etc", "a//b", "a/"
        raise UnsafePath(f"{relative[:100]!r} is not a plain relative path")
    if "\x00" in relative:
        raise UnsafePath("a path with a NUL byte")
    return parts


class UserDir:
    """``root`` (a directory owned by ``uid``), seen from root without following links."""

    def __init__(self, root: Path, uid: int, gid: int) -> None:
        self.root = root
        self.uid = uid
        self.gid = gid

    @contextlib.contextmanager
    def _open_root(self) -> Iterator[int]:
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            raise UnsafePath(f"{self.root} cannot be opened as a directory: {_why(exc)}") from exc
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def parent(self, relative: str, create: bool = False) -> Iterator[tuple[int, str]]:
        """A descriptor of ``relative``'s parent directory and its last component.

        With ``create``, missing directories are made (0700, owned by the user). A component
        that is a symlink, or not a directory, is refused."""
        *dirs, leaf = split(relative)
        with self._open_root() as root_fd:
            fd = os.dup(root_fd)
            try:
                for index, name in enumerate(dirs):
                    where = "/".join(dirs[: index + 1])
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except FileNotFoundError:
                        if not create:
                            raise
                        try:
                            child = self._make_dir(fd, name)
                        except OSError as exc:
                            raise UnsafePath(f"{where} cannot be made: {_why(exc)}") from exc
                    except OSError as exc:
                        why = _why(exc, fd, name)
                        raise UnsafePath(f"{where} is not a directory: {why}") from exc
                    os.close(fd)
                    fd = child
                yield fd, leaf
            finally:
                os.close(fd)

    def _make_dir(self, parent_fd: int, name: str) -> int:
        made = True
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:  # made meanwhile by someone else: opened (checked) below
            made = False
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        if made:  # hand what root just made to the user (by descriptor: no link followed)
            os.fchown(fd, self.uid, self.gid)
        return fd

    def read(self, relative: str, limit: int) -> bytes | None:
        """The content of a regular file the user owns; None if it (or a parent) does not
        exist. UnsafePath if it is a symlink, not a regular file, not the user's, or larger
        than ``limit`` bytes."""
        try:
            with self.parent(relative) as (dir_fd, leaf):
                try:
                    fd = os.open(leaf, _READ_FLAGS, dir_fd=dir_fd)
                except FileNotFoundError:
                    return None
                except OSError as exc:
                    why = _why(exc, dir_fd, leaf)
                    raise UnsafePath(f"{relative} cannot be read: {why}") from exc
                with os.fdopen(fd, "rb") as fh:
                    info = os.fstat(fh.fileno())
                    if not stat.S_ISREG(info.st_mode):
                        raise UnsafePath(f"{relative} is not a regular file")
                    if info.st_uid != self.uid:
                        raise UnsafePath(f"{relative} is not owned by the user (uid {info.st_uid})")
                    if info.st_size > limit:
                        raise UnsafePath(f"{relative} is larger than {limit} bytes")
                    data = fh.read(limit + 1)  # it may grow after fstat
                    if len(data) > limit:
                        raise UnsafePath(f"{relative} is larger than {limit} bytes")
                    return data
        except FileNotFoundError:
            return None

    def create(self, relative: str, content: bytes, mode: int = 0o600) -> bool:
        """Write a new file owned by the user (missing parents made, 0700). Never replaces
        anything: False if a file, link or anything else already has that name."""
        with self.parent(relative, create=True) as (dir_fd, leaf):
            try:
                fd = os.open(leaf, _CREATE_FLAGS, mode, dir_fd=dir_fd)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                os.fchown(fh.fileno(), self.uid, self.gid)
                os.fchmod(fh.fileno(), mode)
                fh.write(content)
            return True

    def remove(self, relative: str) -> bool:
        """Remove whatever has that name (a file, a link itself, a whole directory tree),
        never following a link. False if there was nothing."""
        try:
            with self.parent(relative) as (dir_fd, leaf):
                return _remove_at(dir_fd, leaf)
        except FileNotFoundError:
            return False

    def exists(self, relative: str) -> bool:
        """Whether anything (a link included) has that name; False also when a parent is
        missing, UnsafePath when a parent is a link."""
        try:
            with self.parent(relative) as (dir_fd, leaf):
                os.lstat(leaf, dir_fd=dir_fd)
                return True
        except FileNotFoundError:
            return False

    def names(self) -> list[str]:
        """The names in the root directory, sorted."""
        with self._open_root() as fd:
            return sorted(os.listdir(fd))


def _remove_at(dir_fd: int, name: str) -> bool:
    try:
        info = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(info.st_mode):
        # rmtree with dir_fd walks by descriptors and checks each directory it enters is
        # the one it listed, so a link swapped in meanwhile is not followed either
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


def remove_owned(directory: Path, prefix: str, uid: int) -> list[str]:
    """Remove the entries of ``directory`` (a shared one such as /tmp) whose name starts
    with ``prefix`` and that ``uid`` owns; the names removed."""
    removed: list[str] = []
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except OSError:
        return removed
    try:
        for name in sorted(os.listdir(fd)):
            if not name.startswith(prefix):
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(name, dir_fd=fd).st_uid == uid and _remove_at(fd, name):
                    removed.append(name)
    finally:
        os.close(fd)
    return removed


def _why(exc: OSError, dir_fd: int | None = None, name: str = "") -> str:
    """Why opening failed, in words (O_NOFOLLOW|O_DIRECTORY on a link says ENOTDIR)."""
    if dir_fd is not None:
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
                return "it is a symbolic link"
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link"
    if exc.errno == errno.ENOTDIR:
        return "it is not a directory"
    return exc.strerror or type(exc).__name__
