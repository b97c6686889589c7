"""A snapshot of what guests can leave on a host, to compare before and after."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from master_controller.network.netns import namespaces
from master_controller.runtimes import cgroups
from master_controller.settings import Settings


@dataclass(frozen=True)
class HostSnapshot:
    processes: frozenset[str]
    mounts: frozenset[str]
    namespaces: frozenset[str]
    links: frozenset[str]
    leases: str
    guest_dirs: frozenset[str]
    cgroups: frozenset[str]

    @classmethod
    def take(cls, settings: Settings) -> HostSnapshot:
        procs = set()
        for stat in Path("/proc").glob("[0-9]*/comm"):
            try:
                name = stat.read_text().strip()
            except OSError:
                continue
            if name in {"systemd-nspawn", "Xvfb", "x11vnc", "chromium", "websockify"} or (
                name.startswith(("qemu-system", "firecracker"))
            ):
                procs.add(f"{stat.parent.name}:{name}")
        mounts = {line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()}
        links = {p.name for p in Path("/sys/class/net").iterdir()}
        leases_file = settings.data_dir / "network" / "leases.json"
        guests = settings.guests_dir
        return cls(
            processes=frozenset(procs),
            mounts=frozenset(m for m in mounts if str(settings.data_dir) in m),
            namespaces=frozenset(namespaces()),
            links=frozenset(links),
            leases=leases_file.read_text() if leases_file.exists() else "{}",
            guest_dirs=frozenset(p.name for p in guests.iterdir())
            if guests.is_dir()
            else frozenset(),
            cgroups=frozenset(cgroups.existing()),
        )


def wait_until_back(settings: Settings, before: HostSnapshot, seconds: float = 30) -> None:
    """Wait until the host is as ``before`` again: sessions record their end first and tear
    their guest down after, so a snapshot right after `terminated` may still differ."""
    deadline = time.monotonic() + seconds
    while (now := HostSnapshot.take(settings)) != before:
        assert time.monotonic() < deadline, (now, before)
        time.sleep(0.3)
