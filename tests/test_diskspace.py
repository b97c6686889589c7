"""Telling a full disk apart, and saying so in words."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from master_controller.diskspace import free_bytes, full_reason, is_full_error, require_free
from master_controller.errors import BuildError, CommandError, StorageFull
from tests.filesystems import tmpfs


def test_a_full_disk_is_recognised_through_causes_and_command_output() -> None:
    assert is_full_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_full_error(OSError(errno.EDQUOT, "Disk quota exceeded"))
    npm = CommandError(
        ["npm", "ci"],
        228,
        "npm error code ENOSPC\nnpm error syscall write\n"
        "npm error nospc ENOSPC: no space left on device, write",
    )
    assert is_full_error(npm)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise BuildError("ext4 disk failed") from exc
    except BuildError as wrapped:
        assert is_full_error(wrapped)
    assert not is_full_error(OSError(errno.EACCES, "Permission denied"))
    assert not is_full_error(CommandError(["cp"], 1, "cp: cannot stat 'x'"))
    assert not is_full_error(None)


def test_free_space_of_a_path_not_made_yet_is_its_parents(tmp_path: Path) -> None:
    assert free_bytes(tmp_path / "not" / "made" / "yet") == free_bytes(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_file_system_is_named_with_what_is_free(tmp_path: Path) -> None:
    with tmpfs(tmp_path, "4m"):
        with pytest.raises(OSError) as full:
            (tmp_path / "big").write_bytes(b"\0" * 5 * 2**20)
        assert is_full_error(full.value)
        reason = full_reason(tmp_path / "guest", "saving the guest's memory")
        assert reason.startswith(f"no space left on the file system holding {tmp_path}/guest")
        assert "while saving the guest's memory (0 MiB free now)" in reason
        (tmp_path / "big").unlink()
        require_free(tmp_path, 2**20, "writing a small file")
        with pytest.raises(StorageFull, match=r"needs about 8 MiB .* 4 MiB are free"):
            require_free(tmp_path, 8 * 2**20, "writing a big file")
