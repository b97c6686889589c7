"""Wiping what a sign-in left in the guest, once the controller holds the credentials.

After a capture nothing in the guest may still grant the account: not the CLI's files, not
the signed-in browser profile, not a process that could write them again. So the wipe

1. ends the login: every process of the browser user that the agent started (they share
   the agent's cgroup: the tmux server, the CLI and its helpers, the xterm, a Chromium that
   mc-browser had to start), with SIGKILL, so none of them writes its files once more on the
   way out; each is signalled through a pidfd after checking it is still that process;
2. stops ``chromium.service`` (systemd ends its whole cgroup);
3. removes everything in the browser user's home (the credential files, the CLIs' other
   state, the Chromium profile and caches), everything in ``/run/mc/login``, and Chromium's
   own entries in ``/tmp`` and ``/dev/shm``, all without following a link the user made;
4. starts ``chromium.service`` again, on a fresh profile.

It is idempotent: a second wipe finds nothing of the login, and only the new profile of the
restarted Chromium to remove. The answer says what was done, with bounded lists.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from mc_agent.login import Account, Login
from mc_agent.userdir import UnsafePath, remove_owned

CHROMIUM_UNIT = "chromium.service"
# Chromium's temporary folders and shared memory files (the user's own, by name; removed
# through a descriptor of the shared folder, never by a path)
CHROMIUM_LEFTOVERS = (
    (Path("/tmp"), "org.chromium."),  # noqa: S108
    (Path("/tmp"), ".org.chromium."),  # noqa: S108
    (Path("/dev/shm"), ".org.chromium."),  # noqa: S108
)
MAX_LISTED = 64
KILL_SECONDS = 5.0
WATCH_SECONDS = 30.0  # the longest look: the provider's status command has 20 s


def _status_field(pid: int, field: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def login_processes(uid: int, cgroup: str | None = None) -> list[int]:
    """Live processes of ``uid`` in the agent's own cgroup (``cgroup``: the text of a
    /proc/PID/cgroup file), that is the ones the agent's logins started."""
    own = cgroup if cgroup is not None else Path("/proc/self/cgroup").read_text()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        uids = _status_field(pid, "Uid")
        state = _status_field(pid, "State") or ""
        if uids is None or int(uids.split()[0]) != uid or state.startswith("Z"):
            continue
        try:
            if (entry / "cgroup").read_text() == own:
                found.append(pid)
        except OSError:
            continue
    return found


def _kill(pid: int, uid: int) -> bool:
    """SIGKILL ``pid`` if it is still a process of ``uid``: the pidfd pins the process, so
    the check and the signal are about the same one even if the number is reused."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        uids = _status_field(pid, "Uid")
        if uids is None or int(uids.split()[0]) != uid:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def end_login_processes(uid: int, seconds: float = KILL_SECONDS) -> list[str]:
    """Kill the login's processes until none is left (a dying tree may still fork); the
    names (``comm``) of those killed."""
    killed: list[str] = []
    deadline = time.monotonic() + seconds
    while pids := login_processes(uid):
        for pid in pids:
            name = _status_field(pid, "Name") or "?"
            if _kill(pid, uid):
                killed.append(name)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return killed


def _systemctl(action: str, unit: str) -> None:
    subprocess.run(["systemctl", action, unit], check=True, capture_output=True, timeout=30)


def _unit_state(unit: str) -> str:
    done = subprocess.run(
        ["systemctl", "is-active", unit], capture_output=True, text=True, check=False, timeout=10
    )
    return done.stdout.strip()[:32] or "unknown"


def remove_user_files(
    account: Account, leftovers: tuple[tuple[Path, str], ...] = CHROMIUM_LEFTOVERS
) -> list[str]:
    """Everything in the user's home and login folder, and the user's entries named by
    ``leftovers`` (folder, name prefix) in shared folders; the paths removed (``~/name``,
    ``/run/mc/login/name``, ``/tmp/org.chromium.X``)."""
    removed = []
    for files, label in ((account.home_files(), "~"), (account.login_files(), None)):
        try:
            names = files.names()
        except UnsafePath:
            continue
        for name in names:
            if files.remove(name):
                removed.append(f"{label or files.root}/{name}")
    for directory, prefix in leftovers:
        removed += [f"{directory}/{n}" for n in remove_owned(directory, prefix, account.uid)]
    return sorted(set(removed))


def wipe(login: Login | None, account: Account) -> dict[str, Any]:
    """Wipe the login and the browser session (see the module's docstring); the answer:
    ``provider`` (or None), ``processes_killed``, ``credential_files_removed`` (the
    provider's files that were there), ``removed`` (at most MAX_LISTED paths),
    ``removed_count`` (all of them) and ``chromium`` (its unit's state after the restart)."""
    if login is not None:
        login.stop(wait=WATCH_SECONDS)  # a look in progress could still start a Chromium
    killed = end_login_processes(account.uid)
    if login is not None:
        login.reap()
    credential_files = []
    if login is not None:
        for relative in login.provider.credential_files:
            with contextlib.suppress(UnsafePath):
                if login.home_files.exists(relative):
                    credential_files.append(relative)
    _systemctl("stop", CHROMIUM_UNIT)
    try:
        removed = remove_user_files(account)
    finally:
        _systemctl("start", CHROMIUM_UNIT)
    if login is not None:
        login.state = "wiped"
        login.status = login.check_credentials()
    return {
        "provider": login.provider.name if login is not None else None,
        "processes_killed": len(killed),
        "credential_files_removed": credential_files,
        "removed": removed[:MAX_LISTED],
        "removed_count": len(removed),
        "chromium": _unit_state(CHROMIUM_UNIT),
    }
