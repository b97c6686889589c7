"""The releases on a host: ``<deploy_dir>/releases/<commit>``, each a checkout with its own
virtualenv, and ``<deploy_dir>/current``, the link the service runs.

``current`` changes only by renaming a fresh link over it (one ``rename(2)``): a reader
sees the old release or the new one, never neither. ``history.json`` (replaced atomically
too) lists the releases that were current, oldest first, so ``rollback`` goes back one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from master_controller.errors import DeployError
from master_controller.images.store import write_json_atomic

COMMIT = re.compile(r"[0-9a-f]{40}")
COMPLETE = ".mc-release-complete"  # written last: a release dir without it is unfinished


@dataclass(frozen=True)
class Release:
    commit: str
    path: Path
    complete: bool
    current: bool
    deployed: list[str]  # when it became current (from the history), oldest first
    ref: str | None  # the ref it was last deployed as


class Releases:
    def __init__(self, deploy_dir: Path) -> None:
        self.root = deploy_dir
        self.dir = deploy_dir / "releases"
        self.link = deploy_dir / "current"
        self.history_file = deploy_dir / "history.json"

    def path(self, commit: str) -> Path:
        if not COMMIT.fullmatch(commit):
            raise DeployError(f"{commit!r} is not a full commit id")
        return self.dir / commit

    def is_complete(self, commit: str) -> bool:
        return (self.path(commit) / COMPLETE).is_file()

    def mark_complete(self, commit: str) -> None:
        (self.path(commit) / COMPLETE).write_text(datetime.now(UTC).isoformat() + "\n")

    def current(self) -> str | None:
        """The commit ``current`` points at, or None."""
        try:
            target = os.readlink(self.link)
        except FileNotFoundError:
            return None
        commit = Path(target).name
        if Path(target).parent != Path("releases") or not COMMIT.fullmatch(commit):
            raise DeployError(f"{self.link} points at {target}, not at a release")
        return commit

    def switch(self, commit: str | None) -> None:
        """Point ``current`` at ``commit`` (None: remove it) in one rename."""
        if commit is None:
            self.link.unlink(missing_ok=True)
            return
        if not self.is_complete(commit):
            raise DeployError(f"release {commit} is not complete: not switching to it")
        tmp = self.root / f".current.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("releases") / commit)
        os.replace(tmp, self.link)

    def history(self) -> list[dict[str, Any]]:
        if not self.history_file.exists():
            return []
        entries = json.loads(self.history_file.read_text())
        return list(entries) if isinstance(entries, list) else []

    def record(self, commit: str, ref: str, event: str) -> None:
        """Add to the history that ``commit`` became current (by a deploy, or a rollback)."""
        entry = {"commit": commit, "ref": ref, "event": event}
        entry["at"] = datetime.now(UTC).isoformat(timespec="seconds")
        write_json_atomic(self.history_file, [*self.history(), entry])

    def previous(self) -> str | None:
        """The release that was current before the current one (still on disk), or None."""
        current = self.current()
        for entry in reversed(self.history()):
            commit = str(entry["commit"])
            if commit != current and self.is_complete(commit):
                return commit
        return None

    def releases(self) -> list[Release]:
        """Every release dir, the most recently deployed last."""
        current = self.current()
        history = self.history()
        last = {str(e["commit"]): i for i, e in enumerate(history)}
        found: list[Release] = []
        if self.dir.is_dir():
            for path in self.dir.iterdir():
                if not COMMIT.fullmatch(path.name):
                    continue
                entries = [e for e in history if e["commit"] == path.name]
                found.append(
                    Release(
                        commit=path.name,
                        path=path,
                        complete=self.is_complete(path.name),
                        current=path.name == current,
                        deployed=[str(e["at"]) for e in entries],
                        ref=str(entries[-1]["ref"]) if entries else None,
                    )
                )
        return sorted(found, key=lambda r: (last.get(r.commit, -1), r.commit))
