import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from master_controller.digests import tree_digest
from master_controller.images.builder import path_in_root, replace_file
from master_controller.images.units import exec_start, is_enabled, parse_unit


def test_symlinks_never_lead_outside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "evil").symlink_to("/etc")
    (root / "up").symlink_to("../../..")
    assert path_in_root(root, "/lib/x") == root / "usr/lib/x"
    assert path_in_root(root, "/evil/passwd") == root / "etc/passwd"
    assert path_in_root(root, "/up/etc/x").is_relative_to(root)


@given(st.lists(st.sampled_from(["a", "..", ".", "lib", "evil", "b"]), min_size=1, max_size=8))
def test_any_path_stays_inside(parts: list[str]) -> None:
    root = Path("/nonexistent-root-for-test")
    assert path_in_root(root, "/" + "/".join(parts)).is_relative_to(root)


def test_replace_file_leaves_hard_links_alone(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "hosts").write_text("old\n")
    copy = tmp_path / "copy"
    copy.mkdir()
    os.link(base / "hosts", copy / "hosts")
    replace_file(copy, "/hosts", b"new\n", 0o600)
    assert (base / "hosts").read_text() == "old\n"
    assert (copy / "hosts").read_text() == "new\n"
    assert (copy / "hosts").stat().st_mode & 0o777 == 0o600


def test_tree_digest_follows_content_and_mode(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("x")
    (tmp_path / "l").symlink_to("d/f")
    os.link(tmp_path / "d/f", tmp_path / "hard")
    first = tree_digest(tmp_path)
    assert first.files == 2 and first.bytes == 1  # hard link counted once
    assert tree_digest(tmp_path) == first
    (tmp_path / "d/f").chmod(0o600)
    second = tree_digest(tmp_path)
    assert second.sha256 != first.sha256
    (tmp_path / "d/f").write_text("y")
    assert tree_digest(tmp_path).sha256 != second.sha256


def test_unit_parsing() -> None:
    unit = parse_unit(
        "[Unit]\nAfter=a.service\n[Service]\nExecStart=-/usr/bin/x --flag \\\n  value 'two words'\n"
        "Environment=DISPLAY=:1\n"
    )
    assert exec_start(unit) == ["/usr/bin/x", "--flag", "value", "two words"]
    assert unit["Service"]["Environment"] == ["DISPLAY=:1"]


def test_a_unit_is_enabled_in_the_target_its_link_is_in(tmp_path: Path) -> None:
    """Links point into the guest's own / (absolute), so they dangle on the host."""
    system = tmp_path / "etc/systemd/system"
    (system / "sockets.target.wants").mkdir(parents=True)
    (system / "multi-user.target.wants").mkdir()
    (system / "sockets.target.wants/a.socket").symlink_to("/etc/systemd/system/a.socket")
    assert is_enabled(tmp_path, "a.socket")
    assert is_enabled(tmp_path, "a.socket", "sockets.target")
    assert not is_enabled(tmp_path, "a.socket", "multi-user.target")
    assert not is_enabled(tmp_path, "b.service")
    assert not is_enabled(tmp_path / "nothing", "a.socket")
