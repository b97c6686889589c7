"""Removing a guest's folder never deletes through a mount left in it (a leaked ID-mapped
view of the shared image once emptied the golden image's rootfs this way)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from master_controller.runtimes.guest_folder import mounts_under, remove_guest_folder
from tests.conftest import require_root


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    image = tmp_path / "image-rootfs"
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "os-release").write_text("ID=debian\n")
    yield image
    for mount in mounts_under(tmp_path):  # a failed test leaves no mount behind
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def _bind(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)


def test_a_mount_left_in_a_guest_folder_is_unmounted_not_emptied(
    tmp_path: Path, shared: Path
) -> None:
    require_root()
    folder = tmp_path / "guests" / "g1"
    _bind(shared, folder / "lower")
    _bind(shared, folder / "lower" / "etc")  # nested: the deepest goes first
    (folder / "state.json").write_text("{}")
    assert len(mounts_under(folder)) == 2
    remove_guest_folder(folder)
    assert not folder.exists()
    assert (shared / "etc" / "os-release").read_text() == "ID=debian\n"
    assert mounts_under(tmp_path) == []


def test_a_busy_mount_is_detached_and_the_shared_files_stay(tmp_path: Path, shared: Path) -> None:
    require_root()
    folder = tmp_path / "guests" / "g2"
    _bind(shared, folder / "lower")
    busy = subprocess.Popen(["sleep", "30"], cwd=folder / "lower")  # umount: target is busy
    try:
        remove_guest_folder(folder)
        assert not folder.exists()
        assert (shared / "etc" / "os-release").is_file()
    finally:
        busy.kill()
        busy.wait()
    assert mounts_under(tmp_path) == []


def test_removing_what_is_not_there_is_fine(tmp_path: Path) -> None:
    remove_guest_folder(tmp_path / "never-made")
