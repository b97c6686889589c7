"""install: the unit and the example config, idempotent, with a dry run that writes nothing."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from master_controller.ops import install
from master_controller.ops.unit import UNIT_FILE, example_config, unit_text
from master_controller.settings import Settings


def _settings(tmp_path: Path) -> Settings:
    return Settings(deploy_dir=tmp_path / "opt", data_dir=tmp_path / "data")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_dry_run_writes_nothing_and_says_what_it_would(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    changes = install.plan(_settings(tmp_path), root)
    assert [c.action for c in changes] == ["create", "create"]
    assert _files(root) == {}
    assert "MC_CONFIG=/etc/master-controller/config.toml" in changes[0].content


def test_install_is_idempotent_and_never_overwrites_the_operators_config(tmp_path: Path) -> None:
    root, settings = tmp_path / "root", _settings(tmp_path)
    first = install.apply(settings, root)
    assert [c.action for c in first] == ["create", "create"]
    unit, config = root / UNIT_FILE, root / "etc/master-controller/config.toml"
    assert unit.stat().st_mode & 0o777 == 0o644
    assert config.stat().st_mode & 0o777 == 0o600  # it may hold the vault key
    assert (root / str(settings.deploy_dir).lstrip("/") / "releases").is_dir()
    before = _files(root)
    assert [c.action for c in install.apply(settings, root)] == ["keep", "keep"]
    assert _files(root) == before
    config.write_text("port = 4100\n")  # the operator's own
    edited = install.apply(settings, root)
    assert [c.action for c in edited] == ["keep", "leave", "create"]  # the example beside it
    assert [c.action for c in install.apply(settings, root)] == ["keep", "leave", "keep"]
    assert config.read_text() == "port = 4100\n"
    example = root / "etc/master-controller/config.toml.example"
    assert example.read_bytes() == before["etc/master-controller/config.toml"]


def test_a_changed_unit_is_shown_as_a_diff_and_rewritten(tmp_path: Path) -> None:
    root, settings = tmp_path / "root", _settings(tmp_path)
    install.apply(settings, root)
    (root / UNIT_FILE).write_text((root / UNIT_FILE).read_text().replace("KillMode=process", ""))
    changes = install.plan(settings, root)
    assert changes[0].action == "update"
    assert "+KillMode=process" in changes[0].diff
    install.apply(settings, root)
    assert "KillMode=process" in (root / UNIT_FILE).read_text()


def test_the_example_config_documents_every_setting_and_parses(tmp_path: Path) -> None:
    text = example_config()
    for name in Settings.model_fields:
        assert f"# {name} = " in text, name
    # every line with a value, uncommented, is valid TOML that Settings accepts
    active = "\n".join(
        line.removeprefix("# ")
        for line in text.splitlines()
        if line.startswith("# ") and " = " in line and "..." not in line
    )
    values = tomllib.loads(active)
    assert values["port"] == 4000 and values["guest_network"] == "10.213.0.0/16"
    config = tmp_path / "config.toml"
    config.write_text(active)
    Settings(**values)


def test_a_path_a_unit_cannot_hold_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute path"):
        unit_text(Settings(deploy_dir=Path("/opt/mc with space")), Path("/etc/x.toml"))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    binary = settings.deploy_dir / "current" / ".venv" / "bin" / "master-controller"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    unit = tmp_path / "master-controller.service"
    unit.write_text(unit_text(settings, tmp_path / "config.toml"))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "master-controller.service" in line
    ]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
