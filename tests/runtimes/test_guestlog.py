"""Which lines of a guest's log say why it failed (fast, no guest)."""

from __future__ import annotations

from pathlib import Path

from master_controller.runtimes.guestlog import lines_that_matter, log_reason, read_tail

CLEANUP = (
    'Attempted to remove disk file system under "/run/systemd/nspawn/propagate/mc-1234", '
    "and we can't allow that."
)

# what a guest whose systemd ran out of inotify instances left (issue 18), trimmed
DIED = f"""Spawning container mc-dies-2b3a32 on /var/lib/mc/guests/dies/rootfs.
Failed to create symlink /sys/fs/cgroup/cpuacct: File exists
Failed to create symlink /sys/fs/cgroup/cpu: File exists
\x1b[0;1;31mFailed to create control group inotify object: Too many open files\x1b[0m
\x1b[0;1;31mFailed to allocate manager object: Too many open files\x1b[0m
[\x1b[0;1;31m!!!!!!\x1b[0m] Failed to allocate manager object.
Exiting PID 1...
Container mc-dies-2b3a32 failed with error code 255.
{CLEANUP}
"""


def test_the_cause_not_the_cleanup() -> None:
    picked = lines_that_matter(DIED)
    assert picked == [
        "Failed to create control group inotify object: Too many open files",
        "Failed to allocate manager object: Too many open files",
        "[!!!!!!] Failed to allocate manager object.",
        "Exiting PID 1...",
        "Container mc-dies-2b3a32 failed with error code 255.",
    ]


def test_only_cleanup_left_says_nothing_rather_than_the_cleanup() -> None:
    assert lines_that_matter(CLEANUP + "\n") == []


def test_no_error_falls_back_to_the_last_lines() -> None:
    text = "one\ntwo\nthree\nfour\n"
    assert lines_that_matter(text, fallback=2) == ["three", "four"]


def test_repeats_kept_once_time_stamps_dropped_and_bounded() -> None:
    text = "".join(
        f"[{16880 + n}.797620] systemd[1]: Failed to create inotify object: Too many open files\n"
        for n in range(50)
    )
    text += "[16999.1] x11vnc.service: Failed with result 'exit-code'.\n"
    assert lines_that_matter(text) == [
        "systemd[1]: Failed to create inotify object: Too many open files",
        "x11vnc.service: Failed with result 'exit-code'.",
    ]
    many = "".join(f"error {n}\n" for n in range(100))
    assert lines_that_matter(many, limit=3) == ["error 97", "error 98", "error 99"]
    assert lines_that_matter("error " + "x" * 10_000, width=50) == ["error " + "x" * 44]


def test_control_characters_from_a_guest_are_dropped() -> None:
    assert lines_that_matter("\x1b[31merror\x07\x00: real\x1b[0m\n") == ["error: real"]


def test_a_bounded_tail_of_the_file(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("error: early\n" + "x" * 100 + "\nerror: late\n")
    assert read_tail(log, size=20) == "error: late\n"
    assert log_reason(log) == "error: early\nerror: late"
    assert log_reason(tmp_path / "missing.log") == ""
