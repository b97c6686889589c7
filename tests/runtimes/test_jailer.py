"""Firecracker's jailer: its command line and the chroot prepared for it. No Firecracker
binary is needed: these check the files and arguments the jailer is handed (the boot
itself is in test_firecracker.py, where the binary exists)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from master_controller.runtimes.jailer import API_SOCKET, Jail, jail_id, jailer_for
from tests.conftest import require_root


@pytest.fixture
def release(tmp_path: Path) -> Path:
    """A Firecracker release as unpacked: versioned binary names, a symlink to use."""
    bin_dir = tmp_path / "release"
    bin_dir.mkdir()
    for name in ("firecracker-v1.10.1-x86_64", "jailer-v1.10.1-x86_64"):
        (bin_dir / name).write_bytes(b"\x7fELF")
        (bin_dir / name).chmod(0o755)
    (bin_dir / "firecracker").symlink_to("firecracker-v1.10.1-x86_64")
    return bin_dir


def test_the_jailer_is_found_beside_its_firecracker(release: Path) -> None:
    assert jailer_for(str(release / "firecracker")) == str(release / "jailer-v1.10.1-x86_64")
    assert jailer_for(str(release / "no-such-firecracker")) is None


def test_jail_ids_are_what_the_jailer_accepts() -> None:
    assert jail_id("fcc-1a2b3c") == "fcc-1a2b3c"
    odd = jail_id("guest/../../etc")  # anything else becomes a digest, never a path
    assert odd.startswith("mc-") and odd.replace("-", "").isalnum() and len(odd) <= 64
    assert odd == jail_id("guest/../../etc") != jail_id("guest/../../etd")
    assert len(jail_id("a" * 65)) <= 64


def test_the_jailer_argv_runs_firecracker_unprivileged_in_the_guests_netns(
    tmp_path: Path, release: Path
) -> None:
    jail = Jail.of(tmp_path / "guest", "fcc-1a2b3c", str(release / "firecracker"))
    netns = Path("/run/netns/mc-0123456789ab")
    argv = jail.argv("/opt/fc/jailer", 536936448, netns)
    assert argv == [
        "/opt/fc/jailer",
        "--id", "fcc-1a2b3c",
        "--exec-file", str(release / "firecracker-v1.10.1-x86_64"),
        "--uid", "536936448",
        "--gid", "536936448",
        "--chroot-base-dir", str(tmp_path / "guest" / "jail"),
        "--netns", str(netns),
        "--",
        "--api-sock", "/firecracker.sock",
    ]  # fmt: skip
    # no --daemonize (it would fail: spawn() makes a session leader) and no --new-pid-ns
    # (the PID we track must be Firecracker's)
    assert "--daemonize" not in argv and "--new-pid-ns" not in argv
    # the jailer names the chroot after the binary's real file name
    expected = tmp_path / "guest/jail/firecracker-v1.10.1-x86_64/fcc-1a2b3c/root"
    assert jail.root == expected
    assert jail.host(API_SOCKET) == expected / "firecracker.sock"


def test_the_chroot_holds_the_guests_files_for_its_user_only(tmp_path: Path, release: Path) -> None:
    require_root()
    folder = tmp_path / "guest"
    folder.mkdir(mode=0o700)
    image = tmp_path / "image"
    image.mkdir()
    (image / "vmlinux").write_bytes(b"kernel")
    (image / "vmlinux").chmod(0o644)
    (image / "initrd.img").write_bytes(b"initrd")
    (image / "initrd.img").chmod(0o600)  # not world-readable: must be copied, not linked
    jail = Jail.of(folder, "fcc-1a2b3c", str(release / "firecracker"))
    jail.make()
    jail.furnish(image / "vmlinux", image / "initrd.img")
    (jail.host("disk.ext4")).write_bytes(b"disk")
    # what an earlier run of the jailer left, which it would refuse to find
    (jail.host("dev/net")).mkdir(parents=True)
    (jail.host("firecracker-v1.10.1-x86_64")).write_bytes(b"old copy")
    (jail.host("firecracker-v1.10.1-x86_64.pid")).write_text("123")
    jail.reset()
    uid = 536936448
    jail.hand_over(uid, ["disk.ext4", "config.img"])

    names = sorted(p.name for p in jail.root.iterdir())
    assert names == ["disk.ext4", "initrd.img", "vmlinux"]
    kernel = jail.host("vmlinux").stat()
    assert kernel.st_ino == (image / "vmlinux").stat().st_ino  # a hard link, not a copy
    assert kernel.st_uid == 0 and not kernel.st_mode & 0o022  # the jailed user cannot write it
    initrd = jail.host("initrd.img").stat()
    assert initrd.st_ino != (image / "initrd.img").stat().st_ino
    assert initrd.st_uid == 0 and stat.S_IMODE(initrd.st_mode) == 0o444
    disk = jail.host("disk.ext4").stat()
    assert (disk.st_uid, disk.st_gid, stat.S_IMODE(disk.st_mode)) == (uid, uid, 0o600)
    assert jail.root.stat().st_uid == uid
    # above the chroot, nothing is the jailed user's, nor anyone else's to enter
    for path in (folder / "jail", jail.root.parent.parent, jail.root.parent):
        mode = path.stat()
        assert mode.st_uid == 0 and stat.S_IMODE(mode.st_mode) == 0o700, path


def test_a_chroot_made_under_an_older_firecracker_is_moved(tmp_path: Path, release: Path) -> None:
    folder = tmp_path / "guest"
    folder.mkdir(mode=0o700)
    old = Jail(folder, release / "firecracker-v1.9.0-x86_64", "fcc-1a2b3c")
    old.make()
    old.host("disk.ext4").write_bytes(b"the guest's disk")
    new = Jail.of(folder, "fcc-1a2b3c", str(release / "firecracker"))
    new.make()
    assert new.host("disk.ext4").read_bytes() == b"the guest's disk"
    assert not old.root.exists()
    assert os.listdir(folder / "jail") == ["firecracker-v1.10.1-x86_64"]
