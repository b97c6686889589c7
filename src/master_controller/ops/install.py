"""``master-controller install``: put the unit and an example config in place.

Idempotent: a second run changes nothing. An operator's config is never overwritten (the
example goes next to it as ``config.toml.example``). ``plan`` says what would change, so
``--dry-run`` shows it without touching anything.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from master_controller.commands import run
from master_controller.errors import DeployError
from master_controller.ops.unit import SERVICE, UNIT_FILE, example_config, unit_text
from master_controller.settings import Settings

CONFIG_FILE = Path("etc/master-controller/config.toml")


@dataclass(frozen=True)
class Change:
    """One file install writes (or leaves alone, and why)."""

    path: Path
    content: str
    mode: int
    action: str  # "create", "update", "keep" (same content), "leave" (the operator's)
    diff: str = ""

    @property
    def writes(self) -> bool:
        return self.action in ("create", "update")

    def describe(self) -> str:
        text = {
            "create": f"create {self.path} (mode {self.mode:o})",
            "update": f"update {self.path}",
            "keep": f"unchanged {self.path}",
            "leave": f"leave {self.path} as it is (the operator's config)",
        }[self.action]
        return text + (f"\n{self.diff}" if self.diff else "")


def _change(path: Path, content: str, mode: int, operators: bool = False) -> Change:
    if not path.exists():
        return Change(path, content, mode, "create")
    old = path.read_text()
    if old == content and (operators or (path.stat().st_mode & 0o777) == mode):
        return Change(path, content, mode, "keep")
    if operators:
        return Change(path, content, mode, "leave")
    diff = "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), content.splitlines(keepends=True), str(path), "new"
        )
    )
    return Change(path, content, mode, "update", diff)


def plan(settings: Settings, root: Path = Path("/")) -> list[Change]:
    """What install would write under ``root`` (``/`` on a host; a staging dir otherwise)."""
    config = Path("/") / CONFIG_FILE
    unit = unit_text(settings, config)
    example = example_config()
    changes = [_change(root / UNIT_FILE, unit, 0o644)]
    config_path = root / CONFIG_FILE
    changes.append(_change(config_path, example, 0o600, operators=True))
    if changes[-1].action == "leave":
        changes.append(_change(config_path.with_name("config.toml.example"), example, 0o600))
    return changes


def _write(change: Change) -> None:
    change.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=change.path.parent, prefix=f".{change.path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(change.content)
        os.chmod(tmp, change.mode)  # mkstemp made it 0600 whatever the umask
        os.replace(tmp, change.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def systemd_running(root: Path) -> bool:
    """A systemd manages this host (and install writes into the host, not a staging dir)."""
    return root == Path("/") and Path("/run/systemd/system").is_dir()


def apply(settings: Settings, root: Path = Path("/")) -> list[Change]:
    """Write what :func:`plan` says; reload systemd and enable the unit where one runs.
    The deploy dir is made too (``deploy`` fills it)."""
    changes = plan(settings, root)
    for change in changes:
        if change.writes:
            try:
                _write(change)
            except OSError as exc:
                raise DeployError(f"cannot write {change.path}: {exc}") from exc
    deploy_dir = root / settings.deploy_dir.relative_to("/")
    (deploy_dir / "releases").mkdir(mode=0o755, parents=True, exist_ok=True)
    if systemd_running(root):
        run(["systemctl", "daemon-reload"])
        run(["systemctl", "enable", f"{SERVICE}.service"])
    return changes
