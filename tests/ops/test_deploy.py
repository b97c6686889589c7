"""deploy's parts on real git repositories, real files and a real SQLite database: which
commit a ref names, the release it checks out, the atomic switch of ``current`` and its
history, and the refusal of a database a newer release wrote."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from master_controller.errors import DeployError
from master_controller.ops.deploy import Deployer, restart_blocker
from master_controller.ops.releases import Releases
from master_controller.settings import Settings
from master_controller.steps import StepLog
from master_controller.store.database import Database


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
        git(repo, "add", name)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    repo = tmp_path / "source"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    return repo


def deployer(tmp_path: Path) -> Deployer:
    settings = Settings(
        deploy_dir=tmp_path / "opt",
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'data' / 'mc.db'}",
    )
    (tmp_path / "data").mkdir(exist_ok=True)
    return Deployer(settings, StepLog())


def test_a_ref_resolves_to_its_commit_whatever_its_kind(tmp_path: Path, source: Path) -> None:
    first = commit(source, {"a.txt": "one"}, "first")
    git(source, "tag", "v1")
    second = commit(source, {"a.txt": "two"}, "second")
    d = deployer(tmp_path)
    assert d.resolve("main", str(source)) == second
    assert d.resolve("v1", str(source)) == first
    assert d.resolve(first[:10], str(source)) == first
    with pytest.raises(DeployError, match="names no commit"):
        d.resolve("no-such-branch", str(source))
    with pytest.raises(DeployError, match="not a ref"):
        d.resolve("--upload-pack=touch /tmp/x", str(source))
    third = commit(source, {"a.txt": "three"}, "third")  # a later fetch sees it
    assert d.resolve("main", str(source)) == third


def test_checkout_holds_the_commits_files_and_nothing_else(tmp_path: Path, source: Path) -> None:
    sha = commit(source, {"a.txt": "one", "pkg/b.py": "print(1)\n"}, "first")
    (source / "untracked.txt").write_text("not in the commit")
    d = deployer(tmp_path)
    d.resolve("main", str(source))
    path = d.checkout(sha)
    assert path == tmp_path / "opt" / "releases" / sha
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
        "a.txt",
        "pkg/b.py",
    ]
    assert not d.releases.is_complete(sha)  # no virtualenv yet: switching to it is refused
    with pytest.raises(DeployError, match="not complete"):
        d.releases.switch(sha)


def test_a_commit_with_a_link_out_of_the_release_is_refused(tmp_path: Path, source: Path) -> None:
    (source / "evil").symlink_to("/etc/shadow")
    git(source, "add", "evil")
    sha = commit(source, {"a.txt": "x"}, "evil")
    d = deployer(tmp_path)
    d.resolve("main", str(source))
    with pytest.raises(DeployError, match="may not"):
        d.checkout(sha)
    assert not (tmp_path / "opt" / "releases" / sha).exists()


def _complete(releases: Releases, sha: str) -> None:
    releases.path(sha).mkdir(parents=True)
    releases.mark_complete(sha)


def test_current_switches_in_one_rename_and_rollback_goes_back_one(tmp_path: Path) -> None:
    releases = Releases(tmp_path)
    a, b, c = ("a" * 40, "b" * 40, "c" * 40)
    for sha in (a, b, c):
        _complete(releases, sha)
    assert releases.current() is None and releases.previous() is None
    seen: set[str | None] = set()
    stop = threading.Event()

    def reader() -> None:  # what the service (or a reader) sees while it switches
        while not stop.is_set():
            try:
                seen.add(os.readlink(tmp_path / "current"))
            except FileNotFoundError:
                seen.add(None)

    releases.switch(a)
    releases.record(a, "v1", "deploy")
    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(200):
        releases.switch(b)
        releases.switch(a)
    stop.set()
    thread.join()
    assert seen == {f"releases/{a}", f"releases/{b}"}  # never missing, never anything else
    releases.switch(b)
    releases.record(b, "v2", "deploy")
    releases.switch(c)
    releases.record(c, "v3", "deploy")
    assert releases.current() == c and releases.previous() == b
    listed = releases.releases()
    assert [r.commit for r in listed] == [a, b, c]
    assert [r.current for r in listed] == [False, False, True]
    assert listed[1].ref == "v2"
    releases.switch(b)
    releases.record(b, "rollback", "rollback")
    assert releases.previous() == c  # the one left, as the history says


def test_current_pointing_elsewhere_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "current").symlink_to("/usr")
    with pytest.raises(DeployError, match="not at a release"):
        Releases(tmp_path).current()


def _release_running_this_code(d: Deployer, sha: str) -> None:
    """A release whose Python is this test's (the code under test is the release's)."""
    venv_bin = d.releases.path(sha) / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv_bin / "python").chmod(0o755)
    d.releases.mark_complete(sha)


def test_migrations_go_forward_and_a_newer_database_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = deployer(tmp_path)
    # the release's Python reads its settings as the service would: from the environment
    monkeypatch.setenv("MC_DATABASE_URL", d.settings.database)
    monkeypatch.setenv("MC_DATA_DIR", str(d.settings.data_dir))
    monkeypatch.setenv("MC_CONFIG", str(tmp_path / "none.toml"))
    sha = "d" * 40
    _release_running_this_code(d, sha)
    fresh = d.check_database(sha)
    assert fresh["current"] == [] and fresh["heads"]
    database = tmp_path / "data" / "mc.db"
    assert database.stat().st_mode & 0o777 == 0o600
    d.migrate(sha)
    assert d.check_database(sha)["current"] == fresh["heads"]
    with sqlite3.connect(database) as db:
        db.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash, scopes, created_at) "
            "VALUES ('k', 'kept', 'p', 'd', 'sessions', '2026-01-01')"
        )
    snapshot = d.snapshot(sha)
    assert snapshot is not None and snapshot.stat().st_mode & 0o777 == 0o600
    assert snapshot.parent.stat().st_mode & 0o777 == 0o700
    with sqlite3.connect(database) as db:  # a newer release's migration ran
        db.execute("UPDATE alembic_version SET version_num = 'f0f0f0f0f0f0'")
        db.execute("DELETE FROM api_keys")
    with pytest.raises(DeployError, match="f0f0f0f0f0f0, which release dddddddddddd does not"):
        d.check_database(sha)
    d.restore(snapshot)
    assert d.check_database(sha)["current"] == fresh["heads"]
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT name FROM api_keys").fetchall() == [("kept",)]


def test_rollback_refuses_a_release_that_cannot_read_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = deployer(tmp_path)
    monkeypatch.setenv("MC_DATABASE_URL", d.settings.database)
    monkeypatch.setenv("MC_CONFIG", str(tmp_path / "none.toml"))
    old, new = "e" * 40, "f" * 40
    for sha in (old, new):
        _release_running_this_code(d, sha)
        d.releases.switch(sha)
        d.releases.record(sha, sha[:2], "deploy")
    Database(d.settings.database).migrate()
    with sqlite3.connect(tmp_path / "data" / "mc.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'f0f0f0f0f0f0'")
    with pytest.raises(DeployError, match="cannot read the database"):
        d.rollback()
    assert d.releases.current() == new  # nothing switched


def test_a_restart_cgroup2_would_refuse_is_not_attempted(tmp_path: Path) -> None:
    mount = tmp_path / "cgroup"
    unit = mount / "system.slice" / "master-controller.service"
    (unit / "mc-controller").mkdir(parents=True)
    (unit / "mc-guests" / "g1").mkdir(parents=True)
    (unit / "cgroup.subtree_control").write_text("")
    (unit / "mc-controller" / "cgroup.procs").write_text("100\n")
    (unit / "mc-guests" / "g1" / "cgroup.procs").write_text("")
    cgroup = "/system.slice/master-controller.service"
    assert restart_blocker(mount, cgroup, 100) is None  # not cgroup2
    (mount / "cgroup.controllers").write_text("memory pids cpu\n")
    assert restart_blocker(mount, cgroup, 100) is None  # no controllers given to children
    (unit / "cgroup.subtree_control").write_text("memory pids cpu\n")
    assert restart_blocker(mount, cgroup, 100) is None  # no guest lives: systemd trims it
    (unit / "mc-guests" / "g1" / "cgroup.procs").write_text("200\n201\n")
    why = restart_blocker(mount, cgroup, 100)
    assert why is not None and "2 processes" in why and "memory, pids, cpu" in why
