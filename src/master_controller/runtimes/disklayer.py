"""A container guest's writable layer on a file system of its own: its disk quota.

The overlay's upper and work directories live on an ext4 file system in a sparse image file
in the guest's folder (``disk.ext4``, ``guest_disk_mib`` big), loop-mounted at ``layer/``
while the guest runs. A guest that fills its disk fills only that file system: the data dir
(database, vault keys, other guests) never loses more than the image's size. The image takes
host space only as the guest writes; it is made on the guest's first start, kept across
stops and hibernation (it is the guest's disk), and removed with the guest's folder.

Because images are sparse, a layer is mounted only while the host has room for it and for
every other mounted layer beside it to be filled, plus :data:`RESERVE` for the controller's
own files: all running guests filling their disks at once still leave the data dir usable.

The guest writes its files through the kernel's ext4 and never sees the image file itself,
so it cannot hand the kernel a crafted file system. The loop device is made with the
autoclear flag and detached on unmount: it goes as soon as its last user lets go.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

from master_controller.commands import run
from master_controller.diskspace import require_free
from master_controller.errors import CommandError, GuestStartFailed

IMAGE = "disk.ext4"
MOUNT_POINT = "layer"
MIB = 2**20
# kept free beyond the layers' sizes: the database, keys, logs and snapshots need room too
RESERVE = 256 * MIB


class DiskLayer:
    """The guest's layer file system in ``folder``: a context manager that mounts it (made
    first if there is none yet) and unmounts it again on exit. Inside, ``upper`` (owned by
    ``owner``, the guest's root on the host) and ``work`` exist."""

    def __init__(self, folder: Path, size_mib: int, owner: int) -> None:
        self.folder = folder
        self.size_mib = size_mib
        self.owner = owner

    @property
    def image(self) -> Path:
        return self.folder / IMAGE

    @property
    def mount_point(self) -> Path:
        return self.folder / MOUNT_POINT

    @property
    def upper(self) -> Path:
        return self.mount_point / "upper"

    @property
    def work(self) -> Path:
        return self.mount_point / "work"

    def __enter__(self) -> DiskLayer:
        return self.mount()

    def mount(self) -> DiskLayer:
        """Mount the layer (made first if there is none yet); what ``with`` does on entry.
        Raises GuestStartFailed (nothing left mounted) if it cannot."""
        require_free(
            self.folder,
            room_to_keep(self.folder, self.size_mib),
            "starting a guest (room for the disk layers of the running guests to fill up)",
        )
        try:
            if not self.image.exists():
                make(self.image, self.size_mib)
            self.mount_point.mkdir(mode=0o700, exist_ok=True)
            run(
                [
                    "mount",
                    "-t",
                    "ext4",
                    # noinit_itable: a fresh image reads as zeros already, so the kernel
                    # need not write its inode tables out (which would allocate host space)
                    "-o",
                    "loop,nodev,nosuid,noatime,noinit_itable",
                    self.image,
                    self.mount_point,
                ]
            )
        except (CommandError, OSError) as exc:
            reason = exc.reason if isinstance(exc, CommandError) else str(exc)
            raise GuestStartFailed("disk layer", f"cannot mount the disk layer: {reason}") from exc
        try:
            self.mount_point.chmod(0o700)  # the file system's root: the host's business only
            self.upper.mkdir(exist_ok=True)
            # the upper dir's mode is the mode of the guest's `/`: the controller's umask (077)
            # would make it 0700 and lock the guest's own users out of its whole file system
            os.chmod(self.upper, 0o755)  # noqa: S103 (the guest root dir, inside the 0700 layer)
            self.work.mkdir(exist_ok=True)
            os.chown(self.upper, self.owner, self.owner)
        except OSError as exc:
            unmount(self.folder)
            raise GuestStartFailed("disk layer", str(exc)) from exc
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        unmount(self.folder)


def make(image: Path, size_mib: int) -> None:
    """A sparse ``size_mib`` file holding an empty ext4, made under a temporary name so that
    a half-made one is never taken for a made one. Nothing is allocated until written."""
    partial = image.with_name(image.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_mib * MIB)
    finally:
        os.close(fd)
    try:
        run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",  # root's reserve would be the host root's, never the guest's
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                partial,
            ]
        )
    except CommandError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, image)


def unwritten(folder: Path, size_mib: int) -> int:
    """Bytes the layer in ``folder`` may still take from the host: its size less what its
    image holds already (all ``size_mib`` for one not made yet)."""
    try:
        stat = (folder / IMAGE).stat()
    except FileNotFoundError:
        return size_mib * MIB
    return max(0, stat.st_size - stat.st_blocks * 512)


def room_to_keep(folder: Path, size_mib: int) -> int:
    """Free bytes the host needs before ``folder``'s layer is mounted: what it may still grow
    by, what every other layer mounted beside it (the running guests) may, and RESERVE."""
    with open("/proc/self/mounts") as fh:
        mounted = {line.split()[1] for line in fh}
    others = [
        other
        for other in folder.parent.iterdir()
        if other != folder and str(other / MOUNT_POINT) in mounted
    ]
    return unwritten(folder, size_mib) + sum(unwritten(o, 0) for o in others) + RESERVE


def unmount(folder: Path) -> None:
    """Unmount ``folder``'s layer (if mounted) and detach its loop device. A layer still
    busy is unmounted lazily: it leaves the tree at once, and its device goes when its last
    user lets go (autoclear). Safe to call again."""
    target = folder / MOUNT_POINT
    if _is_mountpoint(target):
        try:
            run(["umount", target])
        except CommandError:
            run(["umount", "--lazy", target])
            return
    # Autoclear usually detached it already; where it did not (it has been seen to linger
    # after a guest's mount namespace went), detaching now frees it, or marks it to go as
    # soon as its last user lets go.
    for device in loop_devices(folder / IMAGE):
        with contextlib.suppress(CommandError):  # gone meanwhile
            run(["losetup", "--detach", device])


def loop_devices(image: Path) -> list[str]:
    """The loop devices backed by ``image`` (found by its path, as the kernel recorded it)."""
    wanted = os.path.realpath(image)
    found = []
    for device in Path("/sys/block").glob("loop*"):
        try:
            backing = (device / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        if backing in (wanted, f"{wanted} (deleted)"):
            found.append(f"/dev/{device.name}")
    return found


def _is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as fh:
        return any(line.split()[1] == target for line in fh)
