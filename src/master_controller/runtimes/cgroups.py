"""A cgroup of its own for each container guest, with memory, pids and CPU limits.

systemd in a guest that runs in a user namespace may only manage a cgroup its root owns:
``systemd-nspawn`` hands the cgroup it starts in (``--keep-unit``) over to the guest, so each
guest's nspawn must start in a fresh cgroup made for it. That cgroup is also how the guest is
ended for sure: ``cgroup.kill`` reaches every process it ever started, wherever they moved
inside the guest's tree.

The guests' cgroups live under ``<the controller's own cgroup>/mc-guests/<guest id>`` in
every hierarchy that matters: the unified (cgroup2) one, on hybrid hosts the named
``systemd`` v1 one, and wherever the ``memory``, ``pids`` and ``cpu`` controllers are mounted
(cgroup2, or v1 hierarchies of their own on hybrid and legacy hosts). Under a systemd unit
that is the unit's own subtree (give it ``Delegate=yes``). They are recorded per guest and
removed by those records, never by name patterns.

The limits are written into ``mc-guests/<guest id>`` itself, the cgroup nspawn starts in.
nspawn chowns to the guest only what it delegates (in cgroup2 a ``payload`` child and its
``cgroup.procs``; nothing in the v1 controller hierarchies), so the limit files stay owned
by host root: the guest's root, an unmapped UID range on the host, can read them but not
raise them, and cannot move its processes out (every cgroup above is host root's too).
A host where one of the three controllers is missing cannot run container guests: a guest
without limits is refused rather than started.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from master_controller.errors import GuestError
from master_controller.settings import Settings

PARENT = "mc-guests"
LIMITED = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
MIB = 2**20
# Moves the shell into each cgroup named before "--", then becomes the command after it.
_ENTER = (
    'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; done; '
    'shift; exec "$@"'
)


@dataclass(frozen=True)
class Limits:
    """What one guest may use: memory (swap included), tasks, CPU time per period."""

    memory_bytes: int
    pids: int
    cpu_quota_us: int  # per CPU_PERIOD_US; above the period means more than one CPU

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            memory_bytes=settings.guest_memory_mib * MIB,
            pids=settings.guest_pids_max,
            # the kernel refuses quotas under 1 ms
            cpu_quota_us=max(1000, round(settings.guest_cpus * CPU_PERIOD_US)),
        )


@dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy that guests get a cgroup in."""

    mount_point: Path
    own: str  # this process's cgroup in it, where mc-guests goes
    version: int  # 2 (cgroup2) or 1
    controllers: tuple[str, ...]  # which of LIMITED it carries (a v2 one: bound to it)

    @property
    def base(self) -> Path:
        return self.mount_point / self.own.lstrip("/")

    def guest(self, guest_id: str) -> Path:
        return self.base / PARENT / guest_id


@functools.cache
def hierarchies() -> tuple[Hierarchy, ...]:
    """The hierarchies guests' cgroups go in: cgroup2 first (its ``cgroup.kill`` ends a guest
    at once), the named ``systemd`` v1 one, then the v1 ones carrying LIMITED controllers.
    Fixed for the life of the process (cached): ``own`` is where the process started."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, field, path = line.split(":", 2)
        for name in field.split(",") if field else [""]:
            own[name] = path
    unified: list[Hierarchy] = []
    named: list[Hierarchy] = []
    v1: list[Hierarchy] = []
    seen: set[str] = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        fstype, options = fields[separator + 1], fields[separator + 3].split(",")
        mount_point, device = Path(fields[4]), fields[2]
        if device in seen or fstype not in ("cgroup", "cgroup2"):
            continue  # the same hierarchy mounted twice counts once
        seen.add(device)
        if fstype == "cgroup2" and "" in own:
            bound = (mount_point / "cgroup.controllers").read_text().split()
            carried = tuple(c for c in LIMITED if c in bound)
            unified.append(Hierarchy(mount_point, own[""], 2, carried))
        elif "name=systemd" in options and "name=systemd" in own:
            named.append(Hierarchy(mount_point, own["name=systemd"], 1, ()))
        elif carried := tuple(c for c in LIMITED if c in options and c in own):
            v1.append(Hierarchy(mount_point, own[carried[0]], 1, carried))
    return (*unified, *named, *v1)


def missing_controllers() -> list[str]:
    """The LIMITED controllers no mounted hierarchy carries (a guest could not be limited)."""
    carried = {c for h in hierarchies() for c in h.controllers}
    return [c for c in LIMITED if c not in carried]


def create(guest_id: str, limits: Limits) -> list[str]:
    """Make the guest's (empty) cgroups with ``limits`` written in; returns their paths to
    record. Partly made ones are removed again if this fails."""
    if missing := missing_controllers():
        raise GuestError(
            f"no {', '.join(missing)} cgroup controller is mounted on this host: "
            "a container guest could not be limited"
        )
    if not any(h.version == 2 for h in hierarchies()):
        raise GuestError("no cgroup2 hierarchy is mounted (is /sys/fs/cgroup there?)")
    paths: list[str] = []
    try:
        for hierarchy in hierarchies():
            path = _make(hierarchy, guest_id)
            paths.append(str(path))
            _limit(path, hierarchy, limits)
    except OSError as exc:
        remove(paths)
        raise GuestError(f"cannot make the cgroups of guest {guest_id}: {exc}") from exc
    return paths


def _make(hierarchy: Hierarchy, guest_id: str) -> Path:
    path = hierarchy.guest(guest_id)
    attempts = 5
    while True:
        try:
            if hierarchy.version == 2 and hierarchy.controllers:
                _delegate(hierarchy)
            path.mkdir(parents=True, exist_ok=True)
            return path
        except FileNotFoundError:
            attempts -= 1
            if not attempts:
                raise
            time.sleep(0.01)  # the last guest's removal took mc-guests away meanwhile


def _delegate(hierarchy: Hierarchy) -> None:
    """Enable the hierarchy's LIMITED controllers for mc-guests and the guests under it.

    cgroup2 gives a cgroup's children controllers only while it holds no processes of its
    own (the root excepted). A controller started in a cgroup of its own (a systemd unit
    with ``Delegate=yes``) is the only process there: it moves itself into a child,
    ``mc-controller``, as systemd-nspawn does with its ``supervisor``. Where other processes
    share its cgroup the guests are refused, with what to do instead."""
    wanted = hierarchy.controllers
    base = hierarchy.base
    available = (base / "cgroup.controllers").read_text().split()
    if lacking := [c for c in wanted if c not in available]:
        raise GuestError(
            f"the {', '.join(lacking)} controller is not delegated to the controller's "
            f"cgroup {base} (under systemd: Delegate=yes)"
        )
    try:
        _enable(base, wanted)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        own = base / "mc-controller"
        own.mkdir(exist_ok=True)
        (own / "cgroup.procs").write_text(str(os.getpid()))  # with all its threads
        try:
            _enable(base, wanted)
        except OSError as again:
            if again.errno != errno.EBUSY:
                raise
            raise GuestError(
                f"the controller's cgroup {base} holds other processes too, so cgroup2 lets "
                f"it give no {', '.join(wanted)} controller to guests: start the controller "
                "in a cgroup of its own (under systemd: a unit with Delegate=yes)"
            ) from again
    parent = base / PARENT
    parent.mkdir(exist_ok=True)
    _enable(parent, wanted)


def _enable(cgroup: Path, controllers: tuple[str, ...]) -> None:
    enabled = (cgroup / "cgroup.subtree_control").read_text().split()
    if todo := [c for c in controllers if c not in enabled]:
        (cgroup / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in todo))


def _limit(path: Path, hierarchy: Hierarchy, limits: Limits) -> None:
    """Write ``limits`` for the controllers ``hierarchy`` carries into the cgroup ``path``.
    Swap counts as memory (a guest cannot escape its limit into swap)."""
    files: list[tuple[str, str]] = []
    if hierarchy.version == 2:
        if "memory" in hierarchy.controllers:
            files += [("memory.max", str(limits.memory_bytes)), ("memory.swap.max", "0")]
        if "pids" in hierarchy.controllers:
            files += [("pids.max", str(limits.pids))]
        if "cpu" in hierarchy.controllers:
            files += [("cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}")]
    else:
        if "memory" in hierarchy.controllers:  # memsw must never be below the limit: after it
            memory = str(limits.memory_bytes)
            files += [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory)]
        if "pids" in hierarchy.controllers:
            files += [("pids.max", str(limits.pids))]
        if "cpu" in hierarchy.controllers:
            files += [
                ("cpu.cfs_period_us", str(CPU_PERIOD_US)),
                ("cpu.cfs_quota_us", str(limits.cpu_quota_us)),
            ]
    for name, value in files:
        if (
            name in ("memory.swap.max", "memory.memsw.limit_in_bytes")
            and not (path / name).exists()
        ):
            continue  # a kernel without swap accounting: there is no swap to limit
        (path / name).write_text(value)


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


def processes(paths: list[str]) -> set[int]:
    """Every process in the guest's cgroups, its nested ones included (Chromium's sandboxed
    processes live in PID namespaces of their own, so the guest's PID namespace misses them;
    its cgroups do not)."""
    return set().union(*(_processes(Path(path)) for path in paths))


def remove(paths: list[str], timeout: float = 10.0) -> None:
    """Kill every process left in the guest's cgroups, then remove them (their subtrees
    first: the guest's systemd makes its own), and their ``mc-guests`` parent once no guest
    is left in it. Missing ones are fine. A cgroup whose last processes are still exiting
    refuses removal (EBUSY) for a moment: retried until ``timeout``."""
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
        if path.parent.name == PARENT:
            with contextlib.suppress(OSError):  # other guests still in it: kept
                path.parent.rmdir()


def existing() -> set[str]:
    """Every guest cgroup on this host (for leak checks)."""
    found: set[str] = set()
    for hierarchy in hierarchies():
        parent = hierarchy.base / PARENT
        if parent.is_dir():
            found.update(str(p) for p in parent.iterdir() if p.is_dir())
    return found
