"""Host-wide kernel limits that all container guests count against together.

Every container runs in a user namespace that host root made (nspawn runs as root), and the
kernel charges what a process in a user namespace holds to each namespace above it, up to
the init namespace's owner of the chain: every inotify instance opened by any guest (its
systemd, journald, dbus, Chromium: about 7 each once booted) counts against *host root's*
``fs.inotify.max_user_instances``, 128 by default. Forty guests starting together pass it;
then the guest that asks next gets EMFILE: a guest's systemd exits at once ("Failed to
allocate manager object") and nspawn ends with it, or a service in it (x11vnc, websockify,
Chromium) fails and the viewer path never comes up. Watches count the same way against
``fs.inotify.max_user_watches``.

:func:`ensure` raises both to what ``max_sessions`` guests need before a container starts
(never lowers them), and logs what it changed; :func:`check` says whether they suffice
(``doctor``). A guest's inotify objects are charged to its memory cgroup, so its memory
limit still bounds what one guest can take once the count limit is high.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from master_controller.errors import ConfigError

log = logging.getLogger(__name__)

SYSCTL = Path("/proc/sys")
# Measured: ~7 instances per booted guest (294 for 40); Chromium opens more as it runs.
INSTANCES_PER_GUEST = 32
WATCHES_PER_GUEST = 16384
# left for the host's own users of inotify (the kernel's defaults)
HOST_INSTANCES = 128
HOST_WATCHES = 65536

_lock = threading.Lock()


@dataclass(frozen=True)
class Limit:
    name: str  # sysctl name, e.g. fs.inotify.max_user_instances
    needed: int
    current: int

    @property
    def enough(self) -> bool:
        return self.current >= self.needed

    def describe(self) -> str:
        state = "ok" if self.enough else "too low"
        return f"{self.name} = {self.current} ({state}: {self.needed} needed)"


def needed(guests: int) -> dict[str, int]:
    """What ``guests`` container guests running at once need of each limit."""
    return {
        "fs.inotify.max_user_instances": HOST_INSTANCES + guests * INSTANCES_PER_GUEST,
        "fs.inotify.max_user_watches": HOST_WATCHES + guests * WATCHES_PER_GUEST,
    }


def check(guests: int, sysctl: Path = SYSCTL) -> list[Limit]:
    """Each limit with what ``guests`` guests need and its current value."""
    return [Limit(name, want, _read(sysctl, name)) for name, want in needed(guests).items()]


def ensure(guests: int, sysctl: Path = SYSCTL) -> list[Limit]:
    """Raise every limit below what ``guests`` guests need to that (a limit already
    higher is left alone); returns the limits raised. ConfigError if one cannot be."""
    raised = []
    with _lock:  # concurrent starts: one reads, raises and logs
        for limit in check(guests, sysctl):
            if limit.enough:
                continue
            try:
                _path(sysctl, limit.name).write_text(f"{limit.needed}\n")
            except OSError as exc:
                raise ConfigError(
                    f"{limit.describe()} for {guests} container guests, and it cannot be "
                    f"raised ({exc.strerror}): set it with sysctl, as root"
                ) from exc
            log.warning(
                "raised %s from %d to %d: every container guest's inotify use counts "
                "against host root's limit (%d guests)",
                limit.name,
                limit.current,
                limit.needed,
                guests,
            )
            raised.append(limit)
    return raised


def _path(sysctl: Path, name: str) -> Path:
    return sysctl.joinpath(*name.split("."))


def _read(sysctl: Path, name: str) -> int:
    return int(_path(sysctl, name).read_text().split()[0])
