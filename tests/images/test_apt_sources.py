from pathlib import Path

import pytest

from master_controller.errors import ConfigError
from master_controller.images.apt_sources import build_sources, host_entries

DEB822 = """Types: deb
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb-src
URIs: http://src.invalid/debian
Suites: bookworm

Types: deb
URIs: http://security.invalid/debian-security/
Suites: bookworm-security
Components: main
"""


def _apt(tmp_path: Path, sources: str, one_line: str = "") -> Path:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(sources)
    (tmp_path / "sources.list").write_text(one_line)
    return tmp_path


def test_deb822_sources(tmp_path: Path) -> None:
    apt = _apt(tmp_path, DEB822)
    assert build_sources("bookworm", apt_dir=apt) == [
        "deb http://mirror.invalid/debian bookworm main",
        "deb http://mirror.invalid/debian bookworm-updates main",
        "deb http://security.invalid/debian-security bookworm-security main",
    ]


def test_one_line_sources_with_options(tmp_path: Path) -> None:
    apt = _apt(
        tmp_path,
        "",
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://one.invalid/d bookworm main\n",
    )
    assert [e.uri for e in host_entries(apt)] == ["http://one.invalid/d"]
    assert build_sources("bookworm", apt_dir=apt)[0] == "deb http://one.invalid/d bookworm main"


def test_setting_overrides_host(tmp_path: Path) -> None:
    apt = _apt(tmp_path, DEB822)
    sources = build_sources("bookworm", "http://set.invalid/d", "http://sec.invalid/s", apt)
    assert sources[0] == "deb http://set.invalid/d bookworm main"
    assert sources[2] == "deb http://sec.invalid/s bookworm-security main"


def test_no_mirror_is_a_clear_error(tmp_path: Path) -> None:
    apt = _apt(tmp_path, "")
    with pytest.raises(ConfigError, match="MC_DEBIAN_MIRROR"):
        build_sources("bookworm", apt_dir=apt)
