"""Picking, from a guest's console or VMM log, the lines that say why it failed.

A log's last lines are rarely the cause: when a container's init exits, the last thing
``systemd-nspawn`` prints is its own clean-up (on a host whose ``/run`` is no tmpfs, always
``Attempted to remove disk file system under "/run/systemd/nspawn/propagate/..."``), and a
VM's console ends with the kernel's reboot chatter. :func:`lines_that_matter` keeps the
errors and failures instead, drops known noise, and falls back to the last lines when
nothing matched. What a guest wrote is untrusted: lines are cut, control characters
dropped, and only a bounded tail of the file is read.
"""

from __future__ import annotations

import re
from pathlib import Path

# Lines that look like failures but never explain one.
NOISE = (
    # nspawn's clean-up of its propagation folder where /run is not a tmpfs: at every exit
    'Attempted to remove disk file system under "/run/systemd/nspawn/propagate/',
    # nspawn's seccomp filter naming calls this architecture lacks, and its rlimit fallback
    "Failed to add rule for system call",
    "Failed to add audit seccomp rule",
    "System call ",
    "Failed at setting rlimit",
    # nspawn on a hybrid cgroup host (cpu and cpuacct mounted together): at every start
    "Failed to create symlink /sys/fs/cgroup/",
    # nspawn's debug output listing optional /proc paths this host does not have
    "Failed to mount /proc/",
    "Failed to mount n/a (type n/a) on /proc/",
)
_MATTERS = re.compile(
    r"error|fail|fatal|cannot|can't|could not|couldn't|unable|denied|not permitted|"
    r"too many|no space|out of memory|oom|killed|terminated by|timed out|timeout|refus|"
    r"abort|panic|segfault|core dump|exiting|freezing|emergency|critical|not found|"
    r"no such file|invalid|exited with|exit code|status=\d",
    re.IGNORECASE,
)
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")  # colours on a console
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# the journal's forwarded lines start with a time stamp: a repeated line differs only there
_STAMP = re.compile(r"^\[\s*\d+\.\d+\]\s*")
TAIL_BYTES = 256 * 1024


def lines_that_matter(text: str, limit: int = 12, width: int = 300, fallback: int = 3) -> list[str]:
    """The lines of ``text`` that name an error or failure, oldest first, the last
    ``limit`` of them, each at most ``width`` characters; a line repeated is kept once (its
    last time; time stamps are dropped). Known noise (:data:`NOISE`) never counts. If no
    line matches, the last ``fallback`` lines that are not noise."""
    lines = []
    for raw in text.splitlines():
        line = _CONTROL.sub("", _ESCAPES.sub("", raw.split("\r")[-1])).strip()
        line = _STAMP.sub("", line)
        if line and not line.startswith(NOISE):
            lines.append(line[:width])
    matching = [line for line in lines if _MATTERS.search(line)]
    picked = _last_unique(matching, limit)
    return picked or _last_unique(lines, fallback)


def _last_unique(lines: list[str], limit: int) -> list[str]:
    seen: set[str] = set()
    kept: list[str] = []
    for line in reversed(lines):
        if line not in seen:
            seen.add(line)
            kept.append(line)
            if len(kept) == limit:
                break
    return kept[::-1]


def read_tail(path: Path, size: int = TAIL_BYTES) -> str:
    """The last ``size`` bytes of a log as text ('' if there is none); a line cut at the
    start is dropped."""
    try:
        with path.open("rb") as fh:
            end = fh.seek(0, 2)
            fh.seek(max(0, end - size))
            data = fh.read(size)
    except OSError:
        return ""
    text = data.decode(errors="replace")
    return text.split("\n", 1)[1] if end > size and "\n" in text else text


def log_reason(path: Path, limit: int = 12) -> str:
    """What in the log at ``path`` says why the guest failed, one line per line ('' if
    nothing)."""
    return "\n".join(lines_that_matter(read_tail(path), limit))
