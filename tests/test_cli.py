"""The command line as an operator uses it (a real subprocess, its own data dir)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def mc(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MC_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "master_controller.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_empty_store(tmp_path: Path) -> None:
    done = mc(tmp_path, "image", "list", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == []
    done = mc(tmp_path, "image", "promote", "abc")
    assert done.returncode == 1 and "no image 'abc'" in done.stderr
    done = mc(tmp_path, "image", "rollback")
    assert done.returncode == 1 and "no earlier promoted image" in done.stderr


def test_bad_recipe_is_a_clear_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("name = 'x'\n")
    done = mc(tmp_path, "image", "build", "--recipe", str(recipe))
    assert done.returncode == 1 and "error:" in done.stderr and "packages" in done.stderr
    assert "Traceback" not in done.stderr


def test_doctor_explains_the_runtime_choice(tmp_path: Path) -> None:
    done = mc(tmp_path, "doctor", "--json")
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert set(report["runtimes"]) == {"firecracker", "qemu", "container"}
    for result in report["runtimes"].values():
        assert result["reason"]
    if os.geteuid() == 0:
        assert report["chosenRuntime"] == "container"


@pytest.mark.integration
def test_list_shows_the_current_image(golden_image: str, integration_settings) -> None:  # type: ignore[no-untyped-def]
    rows = json.loads(mc(integration_settings.data_dir, "image", "list", "--json").stdout)
    current = [r for r in rows if r["current"]]
    assert [r["id"] for r in current] == [golden_image]
    assert current[0]["verification"] == "passed" and current[0]["sizeBytes"] > 0
