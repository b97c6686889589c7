"""Raising the host's inotify limits for many container guests (fast, on a fake /proc/sys)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from master_controller.errors import ConfigError
from master_controller.runtimes import hostlimits


def fake_sysctl(root: Path, instances: int, watches: int) -> Path:
    (root / "fs" / "inotify").mkdir(parents=True)
    (root / "fs/inotify/max_user_instances").write_text(f"{instances}\n")
    (root / "fs/inotify/max_user_watches").write_text(f"{watches}\n")
    return root


def test_the_kernel_default_is_too_low_for_forty_guests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sysctl = fake_sysctl(tmp_path, 128, 8192)
    assert not any(limit.enough for limit in hostlimits.check(40, sysctl))
    with caplog.at_level(logging.WARNING):
        raised = hostlimits.ensure(40, sysctl)
    assert [limit.name for limit in raised] == [
        "fs.inotify.max_user_instances",
        "fs.inotify.max_user_watches",
    ]
    assert int((sysctl / "fs/inotify/max_user_instances").read_text()) >= 40 * 7 + 128
    assert all(limit.enough for limit in hostlimits.check(40, sysctl))
    assert "raised fs.inotify.max_user_instances from 128" in caplog.text
    assert hostlimits.ensure(40, sysctl) == []  # once is enough


def test_a_higher_limit_is_left_alone(tmp_path: Path) -> None:
    sysctl = fake_sysctl(tmp_path, 1_048_576, 1_048_576)
    assert hostlimits.ensure(40, sysctl) == []
    assert (sysctl / "fs/inotify/max_user_instances").read_text() == "1048576\n"


def test_a_limit_that_cannot_be_raised_says_so(tmp_path: Path) -> None:
    sysctl = fake_sysctl(tmp_path, 128, 1_048_576)
    (sysctl / "fs/inotify/max_user_instances").unlink()
    # a read-only sysctl (even root cannot write it) in its place
    (sysctl / "fs/inotify/max_user_instances").symlink_to("/proc/sys/kernel/cap_last_cap")
    with pytest.raises(ConfigError, match="max_user_instances"):
        hostlimits.ensure(40, sysctl)
