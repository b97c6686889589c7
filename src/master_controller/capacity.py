"""What this host can take: the defaults of ``max_sessions`` and ``max_concurrent_boots``,
derived from its memory and CPUs, with the reasoning ``doctor`` shows.

Measured on a 2-core, 24 GiB host (bench/results): a container guest with a sign-in page
open uses about 250 MiB; booting one takes about a core-second to its first frame, so CPU
bounds how many boot at once, and memory how many live at once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GUEST_MIB_ESTIMATE = 320  # a live guest's memory, with a margin over the ~250 MiB measured
HOST_RESERVE_MIB = 2048  # kept for the controller, the page cache and the host itself
SESSIONS_PER_CPU = 20  # live sessions per CPU (a live guest idles; its boot is the cost)
BOOTS_PER_CPU = 2  # guests booting at once per CPU
MIN_BOOTS = 2


@dataclass(frozen=True)
class HostCapacity:
    cpus: int
    memory_mib: int

    @classmethod
    def of_this_host(cls) -> HostCapacity:
        return cls(cpus=_cpus(), memory_mib=_memory_mib())

    @property
    def sessions_by_memory(self) -> int:
        return max(1, (self.memory_mib - HOST_RESERVE_MIB) // GUEST_MIB_ESTIMATE)

    @property
    def sessions_by_cpu(self) -> int:
        return max(1, self.cpus * SESSIONS_PER_CPU)

    @property
    def max_sessions(self) -> int:
        return min(self.sessions_by_memory, self.sessions_by_cpu)

    @property
    def max_concurrent_boots(self) -> int:
        return max(MIN_BOOTS, self.cpus * BOOTS_PER_CPU)

    def explain(self) -> list[str]:
        """How the defaults were derived, one line each (``doctor`` prints them)."""
        return [
            f"max_sessions default {self.max_sessions}: the smaller of memory "
            f"({self.memory_mib} MiB - {HOST_RESERVE_MIB} MiB reserved) / "
            f"{GUEST_MIB_ESTIMATE} MiB per guest = {self.sessions_by_memory} and "
            f"{self.cpus} CPUs x {SESSIONS_PER_CPU} = {self.sessions_by_cpu}",
            f"max_concurrent_boots default {self.max_concurrent_boots}: {self.cpus} CPUs x "
            f"{BOOTS_PER_CPU} (at least {MIN_BOOTS}); further starts wait in order",
        ]


def _cpus() -> int:
    """CPUs this process may run on (its affinity, which containers and cgroups narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4096  # unknown: assume a small host


def default_max_sessions() -> int:
    return HostCapacity.of_this_host().max_sessions


def default_max_concurrent_boots() -> int:
    return HostCapacity.of_this_host().max_concurrent_boots
