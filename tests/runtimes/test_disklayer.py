"""A guest's disk layer on the real host (root, no guest): a loop-mounted ext4 of its own
that a writer fills up to its size and no further, and that leaves no mount or loop device
behind."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from master_controller.diskspace import free_bytes
from master_controller.errors import GuestStartFailed, StorageFull
from master_controller.runtimes import idmap
from master_controller.runtimes.disklayer import RESERVE, DiskLayer, loop_devices, room_to_keep

pytestmark = pytest.mark.integration
MIB = 2**20
OWNER = idmap.base_for(4001)


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts)")


def mounted_under(path: Path) -> list[str]:
    return [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(path))
    ]


def test_made_once_mounted_owned_and_gone_after(tmp_path: Path) -> None:
    layer = DiskLayer(tmp_path, 64, owner=OWNER)
    with layer:
        assert mounted_under(tmp_path) == [str(layer.mount_point)]
        assert len(loop_devices(layer.image)) == 1
        assert layer.upper.stat().st_uid == OWNER and layer.work.is_dir()
        assert layer.image.stat().st_mode & 0o777 == 0o600
        (layer.upper / "kept").write_text("yes")
        total = os.statvfs(layer.mount_point)
        assert 48 * MIB < total.f_blocks * total.f_frsize <= 64 * MIB
    assert not mounted_under(tmp_path) and not loop_devices(layer.image)
    assert not (layer.mount_point / "upper").exists() and layer.image.exists()
    with layer:  # the next start finds what the guest wrote
        assert (layer.upper / "kept").read_text() == "yes"
    assert not mounted_under(tmp_path) and not loop_devices(layer.image)


def test_filling_the_layer_stops_at_its_size(tmp_path: Path) -> None:
    """Whoever writes into the layer gets ENOSPC at its size; the file system holding the
    guest's folder loses at most that much."""
    free_before = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    layer = DiskLayer(tmp_path, 64, owner=OWNER)
    written = 0
    with layer, (layer.upper / "fill").open("wb") as fill:
        chunk = b"\xa5" * MIB
        with pytest.raises(OSError) as full:
            for _ in range(1024):  # sixteen times the quota, should it not hold
                fill.write(chunk)
                fill.flush()
                written += MIB
        assert full.value.errno == errno.ENOSPC
    assert 32 * MIB < written <= 64 * MIB
    allocated = layer.image.stat().st_blocks * 512
    assert allocated <= 64 * MIB
    free_after = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert free_before - free_after < 64 * MIB + 256 * MIB  # (others may write meanwhile)
    assert not mounted_under(tmp_path) and not loop_devices(layer.image)


def test_a_layer_that_cannot_be_mounted_fails_the_step_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    layer = DiskLayer(tmp_path, 64, owner=OWNER)
    layer.image.write_bytes(b"not a file system" * 1000)
    with pytest.raises(GuestStartFailed, match="disk layer"), layer:
        pass
    assert not mounted_under(tmp_path) and not loop_devices(layer.image)


def test_a_busy_layer_is_unmounted_lazily_and_its_device_freed_when_let_go(
    tmp_path: Path,
) -> None:
    layer = DiskLayer(tmp_path, 64, owner=OWNER)
    with layer:
        holder = (layer.upper / "open").open("w")
    try:
        assert not mounted_under(tmp_path)  # detached from the tree at once
    finally:
        holder.close()
    deadline = time.monotonic() + 5
    while loop_devices(layer.image):
        assert time.monotonic() < deadline, "the loop device outlived its last user"
        time.sleep(0.05)


def test_layers_are_mounted_only_while_all_of_them_could_fill_up(tmp_path: Path) -> None:
    """Images are sparse, so the host must keep room for every mounted layer to be filled:
    a layer that would not fit beside the others is refused before anything is made."""
    running, starting = tmp_path / "running", tmp_path / "starting"
    running.mkdir()
    starting.mkdir()
    with DiskLayer(running, 64, owner=OWNER):
        need = room_to_keep(starting, 32)
        assert 64 * MIB + 32 * MIB + RESERVE - 2 * MIB < need <= 96 * MIB + RESERVE
        too_big = free_bytes(tmp_path) // MIB  # fits alone, not beside the running one
        with pytest.raises(StorageFull, match="needs about"), DiskLayer(starting, too_big, OWNER):
            pass
    assert not (starting / "disk.ext4").exists()
    assert not mounted_under(tmp_path) and not loop_devices(running / "disk.ext4")
