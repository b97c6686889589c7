"""Reading systemd unit files (enough of the syntax to check what a unit runs)."""

from __future__ import annotations

import shlex
from pathlib import Path

UnitFile = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> UnitFile:
    """Sections -> keys -> values (a key may repeat). Continuation lines are joined."""
    sections: UnitFile = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line and current is not None:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exec_start(unit: UnitFile) -> list[str]:
    """The argv of the unit's (last) ExecStart, without systemd's prefix characters."""
    values = [v for v in unit.get("Service", {}).get("ExecStart", []) if v]
    if not values:
        return []
    return shlex.split(values[-1].lstrip("-@:+!"))


def wanted_by(unit: UnitFile) -> list[str]:
    return " ".join(unit.get("Install", {}).get("WantedBy", [])).split()


def unit_path(root: Path, name: str) -> Path | None:
    """Where ``name`` is installed in the rootfs ``root`` (admin units win over vendor ones)."""
    for folder in ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"):
        candidate = root / folder / name
        if candidate.is_file() or candidate.is_symlink():
            return candidate
    return None


def is_enabled(root: Path, name: str, target: str | None = None) -> bool:
    """Whether ``name`` is enabled in ``target`` (None: in any target, as its [Install]
    section chose: a service in multi-user.target, a socket in sockets.target)."""
    folder = root / "etc/systemd/system"
    if target:
        wants = [folder / f"{target}.wants"]
    else:  # not glob(): it drops links that point outside (absolute, into the guest's /)
        wants = (
            [d for d in folder.iterdir() if d.name.endswith(".wants")] if folder.is_dir() else []
        )
    return any((d / name).is_symlink() or (d / name).is_file() for d in wants)
