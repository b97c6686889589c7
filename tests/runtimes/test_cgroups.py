"""Guest cgroups on the real host (root, no guest): limits written where the controllers
are, enforced on what runs inside, and everything removed by its recorded path."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from master_controller.runtimes import cgroups
from master_controller.runtimes.cgroups import Limits
from master_controller.settings import Settings

pytestmark = pytest.mark.integration
MIB = 2**20


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroups)")


@pytest.fixture
def made() -> Iterator[list[str]]:
    """Paths of the cgroups a test made; removed (and checked gone) afterwards."""
    paths: list[str] = []
    yield paths
    cgroups.remove(paths)
    assert not any(Path(p).exists() for p in paths)


def controller_path(paths: list[str], controller: str) -> tuple[Path, int]:
    """The guest cgroup (of ``paths``) the controller's limits are in, and its version."""
    for hierarchy in cgroups.hierarchies():
        if controller in hierarchy.controllers:
            path = next(Path(p) for p in paths if Path(p).is_relative_to(hierarchy.base))
            return path, hierarchy.version
    raise AssertionError(f"no hierarchy carries {controller}")


def test_limits_follow_the_settings(tmp_settings: Settings) -> None:
    settings = tmp_settings.model_copy(
        update={"guest_memory_mib": 512, "guest_pids_max": 100, "guest_cpus": 1.5}
    )
    assert Limits.from_settings(settings) == Limits(512 * MIB, 100, 150_000)
    tiny = settings.model_copy(update={"guest_cpus": 0.001})
    assert Limits.from_settings(tiny).cpu_quota_us == 1000  # the kernel's smallest quota


def test_every_controller_has_a_hierarchy_here() -> None:
    """memory, pids and cpu are limited wherever this host mounts them (cgroup2, or v1
    hierarchies on a hybrid host): none may be missing, or guests would run unlimited."""
    assert cgroups.missing_controllers() == []
    versions = {c: h.version for h in cgroups.hierarchies() for c in h.controllers}
    assert set(versions) == set(cgroups.LIMITED), versions


def test_a_guest_cgroup_holds_its_limits_and_goes_away(made: list[str]) -> None:
    guest_id = f"cg-{secrets.token_hex(3)}"
    limits = Limits(memory_bytes=300 * MIB, pids=77, cpu_quota_us=25_000)
    made += cgroups.create(guest_id, limits)
    assert {Path(p).name for p in made} == {guest_id}
    assert {Path(p).parent.name for p in made} == {cgroups.PARENT}
    assert set(made) <= cgroups.existing()
    memory, version = controller_path(made, "memory")
    if version == 2:
        assert (memory / "memory.max").read_text().strip() == str(300 * MIB)
    else:
        assert (memory / "memory.limit_in_bytes").read_text().strip() == str(300 * MIB)
        if (memory / "memory.memsw.limit_in_bytes").exists():  # swap counts too
            assert (memory / "memory.memsw.limit_in_bytes").read_text().strip() == str(300 * MIB)
    pids, _ = controller_path(made, "pids")
    assert (pids / "pids.max").read_text().strip() == "77"
    cpu, version = controller_path(made, "cpu")
    if version == 2:
        assert (cpu / "cpu.max").read_text().split() == ["25000", "100000"]
    else:
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "25000"
        assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
    for path in made:  # limit files stay host root's: nothing delegated can raise them
        assert all(f.stat().st_uid == 0 for f in Path(path).iterdir())
    cgroups.remove(made)
    assert not any(Path(p).exists() for p in made)
    assert not set(made) & cgroups.existing()


FORKER = """
import os, signal, sys, time
children = []
try:
    for _ in range(1000):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
except BlockingIOError:
    print(len(children), "refused", flush=True)
finally:
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
"""


def test_forks_stop_at_pids_max(made: list[str]) -> None:
    made += cgroups.create(f"fork-{secrets.token_hex(3)}", Limits(256 * MIB, 20, 100_000))
    done = subprocess.run(
        cgroups.enter(made, ["python3", "-c", FORKER]), capture_output=True, text=True, timeout=60
    )
    count, word = done.stdout.split()
    # the shell that became python3 is one task of the 20 already
    assert word == "refused" and 10 <= int(count) < 20, done
    pids, _ = controller_path(made, "pids")
    events = dict(line.split() for line in (pids / "pids.events").read_text().splitlines())
    assert int(events["max"]) >= 1  # the kernel counted the refusals


HOG = """
held = []
while len(held) < 64:  # 1 GiB at most, should the limit not hold
    held.append(b"x" * (16 * 2**20))  # filled, so the pages are really used
    print(len(held) * 16, flush=True)
"""


def test_a_memory_hog_is_killed_inside_its_cgroup(made: list[str]) -> None:
    made += cgroups.create(f"hog-{secrets.token_hex(3)}", Limits(96 * MIB, 64, 100_000))
    done = subprocess.run(
        cgroups.enter(made, ["python3", "-c", HOG]), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -9, done  # SIGKILLed by the OOM killer
    reached = int(done.stdout.split()[-1])
    assert reached < 96, done.stdout
    memory, version = controller_path(made, "memory")
    events = (memory / ("memory.events" if version == 2 else "memory.oom_control")).read_text()
    kills = dict(line.split() for line in events.splitlines())
    assert int(kills["oom_kill"]) >= 1
