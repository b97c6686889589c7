"""``master-controller deploy``: a release from version control, switched to atomically,
gated on health, rolled back by itself when the gate fails.

Steps (each timed, in this order):

1. ``fetch``: the ref from ``--repo`` into ``<deploy_dir>/source.git`` (a bare cache).
2. ``checkout``: ``git archive`` of the commit into ``releases/<commit>`` (extracted with
   tarfile's ``data`` filter: no links out, no devices).
3. ``virtualenv``: the release's own ``.venv`` (no system site-packages), the release
   installed in it; the noVNC client copied from a release or checkout with the same
   ``package-lock.json`` (``npm ci`` otherwise).
4. ``database``: refused if the database is at a revision the release does not know (it
   was written by a newer release: a downgrade); otherwise the release's migrations run,
   forward only, after a snapshot of a SQLite database (the way back if the gate fails).
5. ``image contract``: the current image checked against the release's own contract.
6. ``switch``: ``current`` renamed onto the release; the service restarted.
7. ``health gate``: :class:`~master_controller.ops.health.Gate`.

A failure in 6 or 7 switches ``current`` back, restores the snapshot if one was taken, and
restarts the previous release; nothing before 6 touches what runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import sqlite3
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from master_controller.commands import run
from master_controller.errors import DeployError, MCError
from master_controller.ops.health import Gate
from master_controller.ops.releases import Releases
from master_controller.ops.unit import SERVICE
from master_controller.settings import REPO_ROOT, Settings
from master_controller.steps import StepLog

# Run by the release's own Python, so its own code and migrations answer.
_DATABASE_STATE = """
import json, os
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from master_controller.settings import get_settings
from master_controller.store.database import Database, alembic_config, sync_url
os.umask(0o077)
url = get_settings().database
Database(url)  # a new SQLite file is made 0600 before anything opens it
script = ScriptDirectory.from_config(alembic_config(url))
engine = create_engine(sync_url(url))
with engine.connect() as connection:
    current = sorted(MigrationContext.configure(connection).get_current_heads())
engine.dispose()
known = {r.revision for r in script.walk_revisions()}
print(json.dumps({"current": current, "unknown": [r for r in current if r not in known],
                  "heads": sorted(script.get_heads())}))
"""
_MIGRATE = """
import os
from master_controller.settings import get_settings
from master_controller.store.database import Database
os.umask(0o077)
Database(get_settings().database).migrate()
"""
_CONTRACT = """
import json
from master_controller.images.store import ImageStore
from master_controller.settings import get_settings
from master_controller.verification import Verifier
settings = get_settings()
current = ImageStore(settings.images_dir).current()
failures = [] if current is None else Verifier(settings, None).contract_failures(current)
print(json.dumps({"image": current, "failures": failures}))
"""


def _extract(tar: tarfile.TarFile, target: Path) -> None:
    """Extract a release's archive: files, folders and links that stay inside it, only
    (what tarfile's ``data`` filter allows; checked here too, since Debian 12's Python
    3.11.2 predates the filter)."""
    for member in tar.getmembers():
        name = posixpath.normpath(member.name)
        if member.issym():
            link = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
            if member.linkname.startswith("/") or link.startswith(".."):
                raise DeployError(f"{member.name} links out of the release ({member.linkname})")
        elif not (member.isfile() or member.isdir()):
            raise DeployError(f"{member.name} is neither a file, a folder nor a link")
        if name.startswith(("/", "..")):
            raise DeployError(f"{member.name} lies outside the release")
    if hasattr(tarfile, "data_filter"):
        tar.extractall(target, filter="data")
    else:
        tar.extractall(target)  # noqa: S202 (every member was checked above)


def restart_blocker(mount: Path, cgroup: str, main_pid: int) -> str | None:
    """Why systemd could not start the unit in ``cgroup`` again now, or None.

    cgroup2 lets no process into a cgroup that gives controllers to its children. Once
    container guests run, the unit's cgroup gives them memory, pids and cpu; while any of
    them lives, a restarted service's new main process cannot be put there (systemd before
    254 has no ``DelegateSubgroup=``), and the start fails with 219/CGROUP. (Hybrid and v1
    hosts have no such rule.)"""
    if not cgroup or not (mount / "cgroup.controllers").is_file():
        return None  # not a cgroup2 host
    unit = mount / cgroup.lstrip("/")
    control = unit / "cgroup.subtree_control"
    if not control.is_file() or not control.read_text().split():
        return None
    others: set[int] = set()
    for folder, _, _ in os.walk(unit):
        with contextlib.suppress(OSError):
            others.update(int(p) for p in (Path(folder) / "cgroup.procs").read_text().split())
    others.discard(main_pid)
    if not others:
        return None
    return (
        f"{len(others)} processes of guests live in the service's cgroup {cgroup}, which gives "
        f"them the {', '.join(control.read_text().split())} controllers: cgroup2 would refuse "
        "the restarted controller a place there and the service would not start again; "
        "deploy when no container guest runs (see README, 'Running in production')"
    )


class SystemdService:
    """The unit, through systemctl."""

    def __init__(self, name: str = SERVICE) -> None:
        self.name = f"{name}.service"

    def restart_blocker(self) -> str | None:
        argv = ["systemctl", "show", "--property=ControlGroup", "--value", self.name]
        return restart_blocker(Path("/sys/fs/cgroup"), run(argv).strip(), self.main_pid())

    def restart(self) -> None:
        run(["systemctl", "restart", self.name], timeout=120)

    def stop(self) -> None:
        run(["systemctl", "stop", self.name], timeout=120)

    def log_tail(self, lines: int = 15) -> str:
        """The service's last log lines (its own output), for a failure's reason."""
        try:
            argv = ["journalctl", "--unit", self.name, "--lines", str(lines), "--output=cat"]
            return run([*argv, "--no-pager"], timeout=30).strip()
        except MCError as exc:
            return f"(no log: {exc.reason})"

    def main_pid(self) -> int:
        out = run(["systemctl", "show", "--property=MainPID", "--value", self.name])
        return int(out.strip() or 0)


def _last_json(output: str) -> dict[str, Any]:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    raise DeployError(f"no answer from the release: {output[-500:]}")


@dataclass
class Deployer:
    settings: Settings
    steps: StepLog
    service: SystemdService = field(default_factory=SystemdService)
    gate_kind: str = "session"
    wheels: Path | None = None  # a wheelhouse: pip then installs from it alone
    releases: Releases = field(init=False)

    def __post_init__(self) -> None:
        self.releases = Releases(self.settings.deploy_dir)

    # --- the parts ----------------------------------------------------------------------

    @property
    def cache(self) -> Path:
        return self.settings.deploy_dir / "source.git"

    def resolve(self, ref: str, repo: str) -> str:
        """The commit ``ref`` names in ``repo`` (fetched into the cache)."""
        if ref.startswith("-") or repo.startswith("-"):
            raise DeployError(f"not a ref or repository: {ref!r} {repo!r}")
        if not (self.cache / "HEAD").exists():
            run(["git", "init", "--quiet", "--bare", self.cache])
        git = ["git", "-C", str(self.cache)]
        fetch = [*git, "fetch", "--quiet", "--force", "--prune", repo]
        run([*fetch, "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], timeout=600)
        try:
            return run([*git, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"]).strip()
        except MCError:
            pass  # a commit no branch or tag holds: ask for it by name
        try:
            run([*fetch, ref], timeout=600)
            return run([*git, "rev-parse", "--verify", "FETCH_HEAD^{commit}"]).strip()
        except MCError as exc:
            raise DeployError(f"{ref!r} names no commit in {repo}") from exc

    def checkout(self, commit: str) -> Path:
        path = self.releases.path(commit)
        if path.is_dir():
            if self.releases.is_complete(commit):
                return path
            shutil.rmtree(path)  # an unfinished earlier try
        tmp = path.with_name(f".{commit}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = tmp.with_suffix(".tar")
        try:
            run(["git", "-C", self.cache, "archive", "--format=tar", f"--output={archive}", commit])
            with tarfile.open(archive) as tar:
                _extract(tar, tmp)
            os.rename(tmp, path)
        except (tarfile.TarError, DeployError) as exc:
            reason = exc.reason if isinstance(exc, DeployError) else str(exc)
            raise DeployError(
                f"commit {commit[:12]} holds what a release may not: {reason}"
            ) from exc
        finally:
            archive.unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def build(self, commit: str) -> None:
        path = self.releases.path(commit)
        if self.releases.is_complete(commit):
            return
        venv = path / ".venv"
        run([sys.executable, "-m", "venv", "--clear", venv], timeout=300)
        pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
        if self.wheels is not None:
            pip += ["--no-index", "--find-links", str(self.wheels)]
        run([*pip, "--editable", str(path)], timeout=1800)
        self._novnc(path)
        self.releases.mark_complete(commit)

    def _novnc(self, path: Path) -> None:
        lock = path / "package-lock.json"
        if not lock.exists():
            return
        current = self.releases.current()
        sources = [REPO_ROOT] + ([self.releases.path(current)] if current else [])
        for source in sources:
            modules = (source / "node_modules").resolve()
            same = (source / "package-lock.json").is_file() and (
                source / "package-lock.json"
            ).read_bytes() == lock.read_bytes()
            if same and (modules / "@novnc" / "novnc" / "core" / "rfb.js").is_file():
                shutil.copytree(modules, path / "node_modules", symlinks=True)
                return
        run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=path, timeout=900)

    def python(self, commit: str) -> Path:
        return self.releases.path(commit) / ".venv" / "bin" / "python"

    def database_state(self, commit: str) -> dict[str, Any]:
        return _last_json(run([self.python(commit), "-c", _DATABASE_STATE], timeout=120))

    def check_database(self, commit: str) -> dict[str, Any]:
        """Refuse a release that does not know the database's revision (a downgrade)."""
        state = self.database_state(commit)
        if state["unknown"]:
            raise DeployError(
                f"the database is at revision {', '.join(state['unknown'])}, which release "
                f"{commit[:12]} does not know: it was written by a newer release, and "
                "migrations only go forward"
            )
        return state

    def snapshot_path(self, commit: str) -> Path:
        return self.settings.data_dir / "deploy-snapshots" / f"{commit}.sqlite"

    def _sqlite_file(self) -> Path | None:
        url = make_url(self.settings.database)
        if url.drivername.startswith("sqlite") and url.database not in (None, "", ":memory:"):
            return Path(str(url.database))
        return None

    def snapshot(self, commit: str) -> Path | None:
        """A copy of a SQLite database as release ``commit`` left it (0600, 0700 dir)."""
        database = self._sqlite_file()
        if database is None or not database.exists():
            return None
        target = self.snapshot_path(commit)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        target.unlink(missing_ok=True)
        target.touch(mode=0o600)
        with sqlite3.connect(database) as source, sqlite3.connect(target) as copy:
            source.backup(copy)
        return target

    def restore(self, snapshot: Path) -> None:
        database = self._sqlite_file()
        assert database is not None
        with sqlite3.connect(snapshot) as source, sqlite3.connect(database) as copy:
            source.backup(copy)

    def migrate(self, commit: str) -> None:
        run([self.python(commit), "-c", _MIGRATE], timeout=600)

    def check_contract(self, commit: str) -> str | None:
        answer = _last_json(run([self.python(commit), "-c", _CONTRACT], timeout=300))
        if answer["failures"]:
            raise DeployError(
                f"the current image {answer['image']} does not meet release {commit[:12]}'s "
                "contract: " + "; ".join(answer["failures"][:5])
            )
        image = answer["image"]
        return str(image) if image else None

    def gate(self, commit: str, kind: str | None = None) -> dict[str, float]:
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
        return Gate(
            url=f"http://{host}:{self.settings.port}",
            release=self.releases.path(commit),
            main_pid=self.service.main_pid,
            cli=self.releases.path(commit) / ".venv" / "bin" / "master-controller",
            kind=kind or self.gate_kind,
            timeout=self.settings.boot_timeout + 60,
        ).check()

    # --- the whole ------------------------------------------------------------------------

    def deploy(self, ref: str, repo: str) -> dict[str, Any]:
        """Deploy ``ref``; return what happened. Raises DeployError (after rolling back if it
        had switched) when a step fails."""
        previous = self.releases.current()
        with self.steps.step("fetch") as record:
            commit = self.resolve(ref, repo)
            record.detail = commit
        with self.steps.step("checkout"):
            self.checkout(commit)
        with self.steps.step("virtualenv") as record:
            record.detail = "reused" if self.releases.is_complete(commit) else "built"
            self.build(commit)
        with self.steps.step("database") as record:
            state = self.check_database(commit)
            snapshot = None
            if state["current"] != state["heads"]:
                snapshot = self.snapshot(previous) if previous else None
                self.migrate(commit)
            record.detail = f"{state['current']} -> {state['heads']}"
        with self.steps.step("image contract") as record:
            record.detail = str(self.check_contract(commit))
        if blocker := self.service.restart_blocker():
            raise DeployError(f"release {commit[:12]} is ready but not switched to: {blocker}")
        try:
            with self.steps.step("switch"):
                self.releases.switch(commit)
                self.service.restart()
            with self.steps.step("health gate"):
                timings = self.gate(commit)
        except MCError as exc:
            log = self.service.log_tail()
            self._back(previous, snapshot)
            back = f"rolled back to {previous}" if previous else "no release to go back to"
            raise DeployError(
                f"release {commit[:12]} failed: {exc.reason}; {back}\nits log:\n{log}"
            ) from exc
        self.releases.record(commit, ref, "deploy")
        (self.settings.deploy_dir / "source").write_text(repo + "\n")
        return {"commit": commit, "previous": previous, "gate": timings}

    def _back(self, previous: str | None, snapshot: Path | None) -> None:
        with self.steps.step("rollback"):
            if previous is None:
                self.releases.switch(None)
                self.service.stop()
                return
            self.releases.switch(previous)
            if snapshot is not None:
                self.service.stop()
                self.restore(snapshot)
            self.service.restart()
            self.gate(previous, kind="liveness")

    def rollback(self) -> str:
        """Go back to the release that was current before this one."""
        current = self.releases.current()
        target = self.releases.previous()
        if target is None:
            raise DeployError("no earlier release to go back to")
        state = self.database_state(target)
        if state["unknown"]:
            snapshot = self.snapshot_path(target)
            raise DeployError(
                f"release {target[:12]} cannot read the database (revision "
                f"{', '.join(state['unknown'])} came later); its last copy of the database "
                f"is {snapshot if snapshot.exists() else 'gone'}: restoring it loses what "
                "was written since, so that is for an operator to do"
            )
        if blocker := self.service.restart_blocker():
            raise DeployError(blocker)
        with self.steps.step("switch"):
            self.releases.switch(target)
            self.service.restart()
        try:
            with self.steps.step("health gate"):
                self.gate(target)
        except MCError as exc:
            self._back(current, None)
            back = f"back on {current}"
            raise DeployError(f"release {target[:12]} failed: {exc.reason}; {back}") from exc
        self.releases.record(target, "rollback", "rollback")
        return target


def default_repo(settings: Settings) -> str:
    """The repository the last deploy came from, else the checkout this code runs from."""
    source = settings.deploy_dir / "source"
    return source.read_text().strip() if source.is_file() else str(REPO_ROOT)
