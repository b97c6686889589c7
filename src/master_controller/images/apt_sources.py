"""Which Debian mirror to build from: a setting, or what the host's apt sources use.

No mirror host name is written in this repository; the host already knows its mirror.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from master_controller.errors import ConfigError

APT_DIR = Path("/etc/apt")


@dataclass(frozen=True)
class AptEntry:
    uri: str
    suites: tuple[str, ...]


def host_entries(apt_dir: Path = APT_DIR) -> list[AptEntry]:
    """The ``deb`` entries of the host's apt configuration (one-line and deb822 formats)."""
    entries: list[AptEntry] = []
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".list" or path.name == "sources.list":
            entries += _one_line(text)
        elif path.suffix == ".sources":
            entries += _deb822(text)
    return entries


def _one_line(text: str) -> list[AptEntry]:
    entries = []
    for line in text.splitlines():
        parts = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
        if len(parts) >= 3 and parts[0] == "deb":
            entries.append(AptEntry(uri=parts[1].rstrip("/"), suites=(parts[2],)))
    return entries


def _deb822(text: str) -> list[AptEntry]:
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        for uri in fields.get("uris", "").split():
            entries.append(AptEntry(uri=uri.rstrip("/"), suites=suites))
    return entries


def mirror_for(suite: str, entries: list[AptEntry]) -> str | None:
    return next((e.uri for e in entries if suite in e.suites), None)


def build_sources(
    suite: str,
    mirror: str | None = None,
    security_mirror: str | None = None,
    apt_dir: Path = APT_DIR,
) -> list[str]:
    """One-line apt sources for ``suite``, its updates and its security suite."""
    entries = host_entries(apt_dir) if mirror is None or security_mirror is None else []
    main = mirror or mirror_for(suite, entries)
    if main is None:
        raise ConfigError(
            f"no Debian mirror for {suite!r}: the host's apt sources have none; "
            "set MC_DEBIAN_MIRROR"
        )
    security = security_mirror or mirror_for(f"{suite}-security", entries)
    sources = [f"deb {main} {suite} main", f"deb {main} {suite}-updates main"]
    if security is not None:
        sources.append(f"deb {security} {suite}-security main")
    return sources
