"""Declarative image recipes.

A recipe is a TOML file kept in the repo. It names the Debian suite and packages of the base
layer, and the files, units and guest agent of the configuration layer. A recipe may
``extends`` another one and drop units from it (that is how the test suite builds the
broken image of the incident on purpose).
"""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from master_controller.digests import file_digest, json_digest
from master_controller.errors import ConfigError

_PACKAGE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789+-.")


class UnitSpec(BaseModel):
    """A systemd unit shipped by the recipe, enabled into multi-user.target unless told not."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: Path
    enable: bool = True

    @field_validator("name")
    @classmethod
    def _unit_name(cls, value: str) -> str:
        if "/" in value or not value.endswith((".service", ".target", ".socket", ".timer")):
            raise ValueError(f"not a unit file name: {value!r}")
        return value


class FileSpec(BaseModel):
    """A file copied from the recipe directory to an absolute path in the guest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dest: str
    source: Path
    mode: int = 0o644

    @field_validator("dest")
    @classmethod
    def _absolute(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not path.is_absolute() or ".." in path.parts:
            raise ValueError(f"dest must be an absolute path without '..': {value!r}")
        return value


class Recipe(BaseModel):
    """A parsed, validated recipe. Paths are absolute (resolved against the recipe's folder)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    suite: str = "bookworm"
    architecture: str = "amd64"
    variant: str = "minbase"
    packages: tuple[str, ...]
    users: tuple[str, ...] = ("browser",)
    kernel_package: str = "linux-image-cloud-amd64"
    units: tuple[UnitSpec, ...] = ()
    files: tuple[FileSpec, ...] = ()
    agent: Path = Field(description="Folder of the guest agent package copied into the image.")
    tools: Path | None = Field(
        None,
        description="Folder with a package.json and package-lock.json of npm packages (the "
        "CLI tools and their Node.js) installed into the image at /opt/mc-tools.",
    )
    disk_headroom_mib: int = 512
    path: Path

    @field_validator("packages")
    @classmethod
    def _packages(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not name or not set(name) <= _PACKAGE_CHARS or name.startswith("-"):
                raise ValueError(f"not a Debian package name: {name!r}")
        return tuple(sorted(set(value)))

    @classmethod
    def load(cls, path: Path) -> Recipe:
        """Read ``path``, following ``extends``; any problem is a :class:`ConfigError`."""
        path = path.resolve()
        try:
            data = _load_merged(path, seen=())
            return cls.model_validate({**data, "path": path})
        except ValidationError as exc:
            raise ConfigError(f"recipe {path}: {exc}") from exc

    def unit(self, name: str) -> UnitSpec | None:
        return next((u for u in self.units if u.name == name), None)

    def base_inputs(self) -> dict[str, Any]:
        """What the base layer (the Debian rootfs) is made from."""
        return {
            "suite": self.suite,
            "architecture": self.architecture,
            "variant": self.variant,
            "packages": list(self.packages),
            "kernel": self.kernel_package,
            "users": list(self.users),
        }

    def config_inputs(self) -> dict[str, Any]:
        """What the configuration layer is made from: every file's digest, units, agent."""
        return {
            "units": [
                {"name": u.name, "enable": u.enable, "sha256": _digest(u.source)}
                for u in self.units
            ],
            "files": [
                {"dest": f.dest, "mode": f.mode, "sha256": _digest(f.source)} for f in self.files
            ],
            "agent": tree_digest_of_sources(self.agent),
            "tools": self.tools_digest(),
        }

    def tools_digest(self) -> str | None:
        """What the tools layer is made from: the npm manifest and its lock file."""
        if self.tools is None:
            return None
        files = ("package.json", "package-lock.json")
        missing = [f for f in files if not (self.tools / f).is_file()]
        if missing:
            raise ConfigError(f"tools folder {self.tools} lacks {', '.join(missing)}")
        return json_digest({f: _digest(self.tools / f) for f in files})

    def digest(self) -> str:
        return json_digest({"base": self.base_inputs(), "config": self.config_inputs()})


def _load_merged(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"recipe {path}: extends itself")
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"recipe {path}: {exc}") from exc
    base_dir = path.parent
    for unit in raw.get("units", []):
        unit["source"] = str(base_dir / unit["source"])
    for spec in raw.get("files", []):
        spec["source"] = str(base_dir / spec["source"])
    for folder in ("agent", "tools"):
        if folder in raw:
            raw[folder] = str(base_dir / raw[folder])
    parent = raw.pop("extends", None)
    drop_units = set(raw.pop("drop_units", []))
    if parent is None:
        merged = raw
    else:
        merged = _merge(_load_merged((base_dir / parent).resolve(), (*seen, path)), raw)
    if drop_units:
        known = {u["name"] for u in merged.get("units", [])}
        if missing := drop_units - known:
            raise ConfigError(f"recipe {path}: drop_units names unknown units {sorted(missing)}")
        merged["units"] = [u for u in merged["units"] if u["name"] not in drop_units]
    return merged


# list-valued keys merged entry by entry (a child's entry replaces the parent's of the same
# key, new entries are appended); other keys are replaced whole.
_MERGE_KEYS = {"units": "name", "files": "dest"}


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = {**parent, **child}
    for field, key in _MERGE_KEYS.items():
        if field in parent and field in child:
            entries = {e[key]: e for e in parent[field]}
            entries.update({e[key]: e for e in child[field]})
            merged[field] = list(entries.values())
    return merged


def _digest(path: Path) -> str:
    try:
        return file_digest(path)
    except OSError as exc:
        raise ConfigError(f"recipe file {path}: {exc}") from exc


def tree_digest_of_sources(root: Path) -> str:
    """Digest of a source folder (relative paths and contents; caches and bytecode ignored)."""
    if not root.is_dir():
        raise ConfigError(f"agent folder {root} does not exist")
    return json_digest([[str(p.relative_to(root)), file_digest(p)] for p in agent_files(root)])


def agent_files(root: Path) -> list[Path]:
    """The files of the agent package that go into the image (no caches or bytecode)."""
    return [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]
