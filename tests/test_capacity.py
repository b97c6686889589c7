"""The host-derived defaults of max_sessions and max_concurrent_boots."""

from __future__ import annotations

from pathlib import Path

import pytest

from master_controller import capacity
from master_controller.capacity import HostCapacity
from master_controller.settings import Settings


@pytest.mark.parametrize(
    ("cpus", "memory_mib", "sessions", "boots"),
    [
        (2, 24 * 1024, 40, 4),  # the machine we develop on: CPU bounds it
        (16, 8 * 1024, 19, 32),  # little memory: memory bounds it
        (1, 1024, 1, 2),  # tiny: never below one session, two boots
    ],
)
def test_defaults_follow_cpus_and_memory(
    cpus: int, memory_mib: int, sessions: int, boots: int
) -> None:
    host = HostCapacity(cpus=cpus, memory_mib=memory_mib)
    assert (host.max_sessions, host.max_concurrent_boots) == (sessions, boots)
    explained = " ".join(host.explain())
    assert f"max_sessions default {sessions}" in explained
    assert f"max_concurrent_boots default {boots}" in explained


def test_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\n")
    assert capacity._memory_mib(meminfo) == 16000
    assert capacity._memory_mib(tmp_path / "missing") == 4096


def test_settings_default_from_the_host_and_yield_to_the_operator(tmp_path: Path) -> None:
    host = HostCapacity.of_this_host()
    derived = Settings(data_dir=tmp_path)
    assert derived.max_sessions == host.max_sessions
    assert derived.max_concurrent_boots == host.max_concurrent_boots
    chosen = Settings(data_dir=tmp_path, max_sessions=3, max_concurrent_boots=1)
    assert (chosen.max_sessions, chosen.max_concurrent_boots) == (3, 1)
