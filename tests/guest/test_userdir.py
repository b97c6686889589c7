"""The agent (root) handling files the browser user controls (:mod:`mc_agent.userdir`).

Each test plants what a hostile browser user could: a symlink to a file or folder outside
the home, a FIFO, a hard link to someone else's file, an oversized file, and checks the
agent neither reads, writes, changes the owner of, nor removes anything outside."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from mc_agent.userdir import UnsafePath, UserDir, remove_owned, split
from tests.conftest import require_root

# as root the agent hands what it makes to the user: pick a uid that is nobody's here
USER_UID = 4242 if os.geteuid() == 0 else os.getuid()
USER_GID = 4242 if os.geteuid() == 0 else os.getgid()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, USER_UID, USER_GID)
    return home


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder of root's (or the test's) with a secret the user must not reach."""
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o755)
    (folder / "shadow").write_text("root:$6$secret\n")
    return folder


def _user_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chown(path, USER_UID, USER_GID)


def _files(home: Path) -> UserDir:
    return UserDir(home, USER_UID, USER_GID)


def test_reads_the_users_own_regular_file(home: Path) -> None:
    _user_file(home / ".codex/auth.json", '{"tokens": {}}')
    assert _files(home).read(".codex/auth.json", 1024) == b'{"tokens": {}}'
    assert _files(home).read(".codex/missing.json", 1024) is None
    assert _files(home).read(".nothing/auth.json", 1024) is None


def test_a_symlinked_credential_file_is_not_read(home: Path, outside: Path) -> None:
    (home / ".codex").mkdir()
    (home / ".codex/auth.json").symlink_to(outside / "shadow")
    with pytest.raises(UnsafePath, match="symbolic link"):
        _files(home).read(".codex/auth.json", 1024)


def test_a_symlinked_folder_is_not_entered(home: Path, outside: Path) -> None:
    (outside / "auth.json").write_text("root's")
    (home / ".codex").symlink_to(outside)
    with pytest.raises(UnsafePath, match=r"\.codex is not a directory: it is a symbolic link"):
        _files(home).read(".codex/auth.json", 1024)


def test_a_hard_link_to_someone_elses_file_is_not_read(home: Path, outside: Path) -> None:
    (home / ".codex").mkdir()
    os.link(outside / "shadow", home / ".codex/auth.json")  # same inode, not the user's
    files = UserDir(home, USER_UID + 1, USER_GID) if os.geteuid() != 0 else _files(home)
    with pytest.raises(UnsafePath, match="not owned by the user"):
        files.read(".codex/auth.json", 1024)


def test_a_fifo_is_refused_without_blocking(home: Path) -> None:
    os.mkfifo(home / "auth.json")
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            _files(home).read("auth.json", 1024)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=attempt, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked the agent"
    assert isinstance(outcome[0], UnsafePath) and "not a regular file" in str(outcome[0])


def test_size_is_bounded(home: Path) -> None:
    _user_file(home / "big.json", "x" * 2048)
    with pytest.raises(UnsafePath, match="larger than 1024 bytes"):
        _files(home).read("big.json", 1024)


@pytest.mark.parametrize("bad", ["/etc/shadow", "../etc/shadow", "a/../../etc", "./x", ""])
def test_paths_must_be_plain_and_relative(bad: str) -> None:
    with pytest.raises(UnsafePath):
        split(bad)


def test_creating_under_a_symlinked_folder_is_refused(home: Path, outside: Path) -> None:
    """``~/.gemini -> /etc``: writing ``.gemini/settings.json`` as root once made /etc the
    browser user's and wrote a file into it."""
    (home / ".gemini").symlink_to(outside)
    before = outside.stat()
    with pytest.raises(UnsafePath, match="symbolic link"):
        _files(home).create(".gemini/settings.json", b"{}")
    after = outside.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert sorted(p.name for p in outside.iterdir()) == ["shadow"]


def test_create_never_replaces_a_link_or_a_file(home: Path, outside: Path) -> None:
    (home / ".claude.json").symlink_to(outside / "shadow")
    assert _files(home).create(".claude.json", b"{}") is False
    assert (outside / "shadow").read_text() == "root:$6$secret\n"
    _user_file(home / "kept.json", "mine")
    assert _files(home).create("kept.json", b"theirs") is False
    assert (home / "kept.json").read_text() == "mine"


def test_create_makes_the_users_folders_and_file(home: Path) -> None:
    assert _files(home).create(".config/mc/settings.json", b"{}") is True
    for path, mode in (
        (home / ".config", 0o700),
        (home / ".config/mc", 0o700),
        (home / ".config/mc/settings.json", 0o600),
    ):
        info = path.lstat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
            USER_UID,
            USER_GID,
            mode,
        )


def test_remove_takes_the_link_not_its_target(home: Path, outside: Path) -> None:
    (home / ".config").symlink_to(outside)
    with pytest.raises(UnsafePath):
        _files(home).remove(".config/shadow")  # through the link: refused
    assert _files(home).remove(".config") is True  # the link itself
    assert (outside / "shadow").exists() and not (home / ".config").is_symlink()


def test_remove_of_a_tree_with_links_inside_keeps_their_targets(home: Path, outside: Path) -> None:
    profile = home / ".config/chromium/Default"
    profile.mkdir(parents=True)
    (profile / "Cookies").write_text("session")
    (profile / "escape").symlink_to(outside)
    (profile / "secret").symlink_to(outside / "shadow")
    os.mkfifo(profile / "fifo")
    assert _files(home).remove(".config") is True
    assert not (home / ".config").exists()
    assert (outside / "shadow").read_text() == "root:$6$secret\n"


def test_remove_owned_takes_only_the_users_entries(tmp_path: Path) -> None:
    require_root()  # entries of two owners
    shared = tmp_path / "tmp"
    shared.mkdir()
    (shared / "org.chromium.Chromium.abc").mkdir()
    os.chown(shared / "org.chromium.Chromium.abc", USER_UID, USER_GID)
    (shared / "org.chromium.Chromium.root").mkdir()  # someone else's
    (shared / ".X1-lock").write_text("1")
    os.chown(shared / ".X1-lock", USER_UID, USER_GID)  # the user's, other name
    assert remove_owned(shared, "org.chromium.", USER_UID) == ["org.chromium.Chromium.abc"]
    assert sorted(p.name for p in shared.iterdir()) == [".X1-lock", "org.chromium.Chromium.root"]
