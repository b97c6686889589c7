"""A cgroup of its own for each container guest.

systemd in a guest that runs in a user namespace may only manage a cgroup its root owns:
``systemd-nspawn`` hands the cgroup it starts in (``--keep-unit``) over to the guest, so each
guest's nspawn must start in a fresh cgroup made for it. That cgroup is also how the guest is
ended for sure: ``cgroup.kill`` reaches every process it ever started, wherever they moved
inside the guest's tree.

The guests' cgroups live under ``<the controller's own cgroup>/mc-guests/<guest id>`` in the
unified (cgroup2) hierarchy and, on hybrid hosts, in the named ``systemd`` v1 hierarchy too.
Under a systemd unit that is the unit's own subtree (give it ``Delegate=yes``). They are
recorded per guest and removed by those records, never by name patterns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from master_controller.errors import GuestError

PARENT = "mc-guests"
# Moves the shell into each cgroup named before "--", then becomes the command after it.
_ENTER = (
    'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; done; '
    'shift; exec "$@"'
)


def _hierarchies() -> Iterator[tuple[Path, str]]:
    """(mount point, this process's cgroup path in it) for cgroup2 and name=systemd v1."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        fstype, options = fields[separator + 1], fields[separator + 3].split(",")
        mount_point = Path(fields[4])
        if fstype == "cgroup2" and "" in own:
            yield mount_point, own[""]
        elif fstype == "cgroup" and "name=systemd" in options and "name=systemd" in own:
            yield mount_point, own["name=systemd"]


def create(guest_id: str) -> list[str]:
    """Make the guest's (empty) cgroups; returns their paths to record."""
    paths = []
    for mount_point, own in _hierarchies():
        path = mount_point / own.lstrip("/") / PARENT / guest_id
        path.mkdir(parents=True, exist_ok=True)
        paths.append(str(path))
    if not paths:
        raise GuestError("no cgroup2 hierarchy is mounted (is /sys/fs/cgroup there?)")
    return paths


def enter(paths: list[str], argv: list[str]) -> list[str]:
    """``argv`` run so that it starts inside the cgroups ``paths`` (so do all its children)."""
    return ["sh", "-c", _ENTER, "mc-cgroup-enter", *paths, "--", *argv]


def _processes(path: Path) -> set[int]:
    pids: set[int] = set()
    for folder, _, _ in os.walk(path):
        try:
            pids.update(int(p) for p in (Path(folder) / "cgroup.procs").read_text().split())
        except OSError:
            continue
    return pids


def remove(paths: list[str], timeout: float = 10.0) -> None:
    """Kill every process left in the guest's cgroups, then remove them (their subtrees
    first: the guest's systemd makes its own). Missing ones are fine. A cgroup whose last
    processes are still exiting refuses removal (EBUSY) for a moment: retried until
    ``timeout``."""
    deadline = time.monotonic() + timeout
    for raw in paths:
        path = Path(raw)
        kill = path / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")
        while path.is_dir():
            for pid in _processes(path):  # v1, or a kernel without cgroup.kill
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                for folder, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(folder)
            except OSError as exc:
                if time.monotonic() > deadline:
                    left = sorted(_processes(path))
                    raise GuestError(
                        f"cannot remove cgroup {path} ({exc}); processes {left}"
                    ) from exc
                time.sleep(0.05)


def existing() -> set[str]:
    """Every guest cgroup on this host (for leak checks)."""
    found: set[str] = set()
    for mount_point, own in _hierarchies():
        parent = mount_point / own.lstrip("/") / PARENT
        if parent.is_dir():
            found.update(str(p) for p in parent.iterdir() if p.is_dir())
    return found
