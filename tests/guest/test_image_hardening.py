"""The image contract's hardening checks (``images/contract.py``) against the browser
recipe's own files laid out as a rootfs, and against each weakening a rebuild could bring
back (a missing policy, DevTools allowed, file:// re-allowed, a tmux prefix, a root menu)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from master_controller.images.contract import (
    CHROMIUM_POLICY_DIR,
    LOGIN_TMUX_CONF,
    OPENBOX_RC,
    hardening_problems,
)
from master_controller.images.recipe import Recipe
from master_controller.images.units import exec_start, parse_unit
from master_controller.settings import REPO_ROOT

RECIPE = REPO_ROOT / "images/browser/recipe.toml"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """The configuration layer of the browser recipe (its files and units), nothing else."""
    recipe = Recipe.load(RECIPE)
    root = tmp_path / "rootfs"
    for spec in recipe.files:
        dest = root / spec.dest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.source, dest)
    for unit in recipe.units:
        dest = root / "etc/systemd/system" / unit.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(unit.source, dest)
    return root


def test_the_recipe_meets_the_contract(rootfs: Path) -> None:
    assert hardening_problems(rootfs) == []


def _policy(rootfs: Path) -> Path:
    return next((rootfs / CHROMIUM_POLICY_DIR).glob("*.json"))


def _edit_policy(change: Callable[[dict[str, object]], None]) -> Callable[[Path], None]:
    def edit(rootfs: Path) -> None:
        path = _policy(rootfs)
        policy = json.loads(path.read_text())
        change(policy)
        path.write_text(json.dumps(policy))

    return edit


def _replace(relative: str, old: str, new: str) -> Callable[[Path], None]:
    def edit(rootfs: Path) -> None:
        path = rootfs / relative
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))

    return edit


WEAKENINGS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no policy": (lambda root: _policy(root).unlink(), "no chromium policy"),
    "devtools allowed": (
        _edit_policy(lambda p: p.update(DeveloperToolsAvailability=1)),
        "DeveloperToolsAvailability is 1",
    ),
    "downloads allowed": (
        _edit_policy(lambda p: p.pop("DownloadRestrictions")),
        "DownloadRestrictions is None",
    ),
    "file:// not blocked": (
        _edit_policy(lambda p: p.update(URLBlocklist=["chrome://*"])),
        "URLBlocklist lacks file://*",
    ),
    "a file re-allowed": (
        _edit_policy(lambda p: p.update(URLAllowlist=["file:///usr/share/mc-guest/start.html"])),
        "URLAllowlist re-allows file:///usr/share/mc-guest/start.html",
    ),
    "a file start page": (
        lambda root: (root / "etc/systemd/system/chromium.service").write_text(
            re.sub(
                r"data:text/html;base64,\S+",
                "file:///usr/share/mc-guest/start.html",
                (root / "etc/systemd/system/chromium.service").read_text(),
            )
        ),
        "chromium.service opens file:///usr/share/mc-guest/start.html",
    ),
    "tmux prefix back": (
        _replace(LOGIN_TMUX_CONF, "set -g prefix None\n", ""),
        "lacks 'set -g prefix None'",
    ),
    "tmux root table kept": (
        _replace(LOGIN_TMUX_CONF, "unbind-key -a -T root\n", ""),
        "lacks 'unbind-key -a -T root'",
    ),
    "openbox root menu": (
        _replace(
            OPENBOX_RC,
            "</mouse>",
            '<context name="Root"><mousebind button="Right" action="Press">'
            '<action name="ShowMenu"><menu>root-menu</menu></action></mousebind></context>'
            "</mouse>",
        ),
        "binds ShowMenu",
    ),
    "openbox launcher": (
        _replace(
            OPENBOX_RC,
            "</keyboard>",
            '<keybind key="W-t"><action name="Execute"><command>xterm</command></action>'
            "</keybind></keyboard>",
        ),
        "binds Execute",
    ),
}


@pytest.mark.parametrize("weakening", sorted(WEAKENINGS))
def test_each_weakening_is_caught(rootfs: Path, weakening: str) -> None:
    edit, expected = WEAKENINGS[weakening]
    edit(rootfs)
    problems = hardening_problems(rootfs)
    assert any(expected in p for p in problems), problems


def test_the_start_page_is_start_html() -> None:
    """The unit opens files/start.html as a data: URL; the two must not drift apart."""
    unit = parse_unit((REPO_ROOT / "images/browser/units/chromium.service").read_text())
    urls = [a for a in exec_start(unit) if a.startswith("data:")]
    html = (REPO_ROOT / "images/browser/files/start.html").read_bytes()
    assert urls == ["data:text/html;base64," + base64.b64encode(html).decode()]
