"""Firecracker's jailer: where a guest's chroot is, what goes in it, and the jailer's argv.

The jailer (shipped with Firecracker) starts as root, joins the guest's network namespace,
pivots into ``<chroot-base>/<exec-file name>/<id>/root`` in a mount namespace of its own,
makes ``/dev/kvm`` and ``/dev/net/tun`` there owned by the given UID/GID, drops to them and
execs its own copy of Firecracker, whose API socket, drives, kernel and snapshots are then
paths inside that root. Nothing of the host but what is put in the root is reachable.

Per guest the chroot base is ``<guest folder>/jail``: the kernel and initrd are hard links
to the image's (read-only, world-readable, shared), the disk and config drive are the
guest's own, owned by the guest's UID (:mod:`.vmm_user`) and 0600. Everything above the
root stays 0700 root.

Without ``--daemonize`` (which would fail: :func:`~master_controller.process.spawn` makes it
a session leader already) and without ``--new-pid-ns``, the jailer execs Firecracker in
place, so the PID spawned is Firecracker's. Each run makes the device nodes, its pid file
and its copy of Firecracker anew and fails where they exist, so :meth:`Jail.reset` removes
them first.

Reference: Firecracker's ``docs/jailer.md``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

JAIL_DIR = "jail"
API_SOCKET = "firecracker.sock"
KERNEL = "vmlinux"
INITRD = "initrd.img"
_JAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # what the jailer accepts as --id


def jail_id(guest_id: str) -> str:
    """The jailer's ``--id`` of a guest: its id where the jailer accepts it, else a digest."""
    if _JAIL_ID.match(guest_id):
        return guest_id
    return "mc-" + hashlib.sha256(guest_id.encode()).hexdigest()[:32]


def jailer_for(firecracker: str) -> str | None:
    """The jailer that came with the Firecracker binary ``firecracker`` (a path or a name
    on PATH): beside it, named as in Firecracker's releases (``firecracker-v1.x-x86_64`` ->
    ``jailer-v1.x-x86_64``) or plainly ``jailer``; else ``jailer`` on PATH; None if none."""
    binary = shutil.which(firecracker)
    if binary is None:
        return None
    found = Path(binary)
    real = found.resolve()
    for candidate in (
        real.with_name(real.name.replace("firecracker", "jailer")),
        found.with_name("jailer"),
        real.with_name("jailer"),
    ):
        if candidate != real and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("jailer")


@dataclass(frozen=True)
class Jail:
    """The chroot of one guest's Firecracker."""

    folder: Path  # the guest's folder
    exec_file: Path  # the Firecracker binary, symlinks resolved (the jailer names by it)
    id: str

    @classmethod
    def of(cls, folder: Path, guest_id: str, firecracker: str) -> Jail:
        binary = shutil.which(firecracker) or firecracker
        return cls(folder=folder, exec_file=Path(binary).resolve(), id=jail_id(guest_id))

    @property
    def base(self) -> Path:
        return self.folder / JAIL_DIR

    @property
    def root(self) -> Path:
        """The chroot: what Firecracker sees as ``/``."""
        return self.base / self.exec_file.name / self.id / "root"

    def host(self, name: str) -> Path:
        """The host path of ``name`` in the chroot."""
        return self.root / name

    @staticmethod
    def inside(name: str) -> str:
        """The path Firecracker uses for ``name`` in the chroot."""
        return f"/{name}"

    def make(self) -> None:
        """Create the chroot (0700 root all the way down); a chroot made under another
        Firecracker file name (an upgrade from ``firecracker-v1.7`` to ``-v1.8``) is moved
        to where the jailer will look now."""
        for old in self.base.glob(f"*/{self.id}"):
            if old != self.root.parent and not self.root.parent.exists():
                self.root.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                old.rename(self.root.parent)
                old.parent.rmdir()  # each guest has its own base: nothing else was there
        for path in (self.base, self.root.parent.parent, self.root.parent, self.root):
            path.mkdir(mode=0o700, exist_ok=True)
            path.chmod(0o700)

    def furnish(self, kernel: Path, initrd: Path) -> None:
        """Hard-link the image's kernel and initrd in (copied if another file system holds
        them, or if they are not world-readable, so the jailed UID can read them)."""
        for source, name in ((kernel, KERNEL), (initrd, INITRD)):
            target = self.host(name)
            if target.exists():
                continue
            if not (source.stat().st_mode & 0o004 and _linked(source, target)):
                shutil.copyfile(source, target)
                target.chmod(0o444)

    def reset(self) -> None:
        """Remove what the jailer makes on every run and refuses to find made already."""
        shutil.rmtree(self.host("dev"), ignore_errors=True)
        for name in (self.exec_file.name, f"{self.exec_file.name}.pid", API_SOCKET):
            self.host(name).unlink(missing_ok=True)

    def hand_over(self, uid: int, names: Iterable[str]) -> None:
        """Make the chroot and the files ``names`` in it the jailed UID's (files 0600)."""
        os.chown(self.root, uid, uid)
        for name in names:
            path = self.host(name)
            if path.exists():
                os.chown(path, uid, uid)
                path.chmod(0o600)

    def argv(self, jailer: str, uid: int, netns: Path) -> list[str]:
        """The jailer's command line: Firecracker as ``uid``:``uid`` in network namespace
        ``netns`` (its path), API socket at :data:`API_SOCKET` in the chroot."""
        return [
            jailer,
            "--id", self.id,
            "--exec-file", str(self.exec_file),
            "--uid", str(uid),
            "--gid", str(uid),
            "--chroot-base-dir", str(self.base),
            "--netns", str(netns),
            "--",
            "--api-sock", self.inside(API_SOCKET),
        ]  # fmt: skip


def _linked(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed there
        return False
    return True
