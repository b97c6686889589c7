from pathlib import Path

import pytest

from master_controller.errors import ConfigError
from master_controller.images.recipe import Recipe
from tests.conftest import RECIPES


def test_default_recipe_loads(repo_root: Path) -> None:
    recipe = Recipe.load(repo_root / "images/browser/recipe.toml")
    names = [u.name for u in recipe.units]
    assert names.index("xvfb.service") < names.index("x11vnc.service")
    assert names.index("x11vnc.service") < names.index("websockify.service")
    assert "chromium" in recipe.packages and all(u.source.is_file() for u in recipe.units)
    assert len(recipe.digest()) == 64


def test_variant_drops_units_and_keeps_base_layer(repo_root: Path) -> None:
    full = Recipe.load(repo_root / "images/browser/recipe.toml")
    broken = Recipe.load(RECIPES / "without-vnc.toml")
    assert broken.name == "browser-without-vnc"
    assert broken.unit("x11vnc.service") is None and broken.unit("chromium.service")
    assert broken.base_inputs() == full.base_inputs()
    assert broken.config_inputs() != full.config_inputs()


def test_changing_one_unit_changes_only_the_config_layer(tmp_path: Path, repo_root: Path) -> None:
    source = repo_root / "images/browser"
    unit = tmp_path / "x11vnc.service"
    unit.write_text((source / "units/x11vnc.service").read_text() + "# changed\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'extends = "{source / "recipe.toml"}"\n'
        '[[units]]\nname = "x11vnc.service"\nsource = "x11vnc.service"\n'
    )
    changed = Recipe.load(recipe)
    full = Recipe.load(source / "recipe.toml")
    assert changed.base_inputs() == full.base_inputs()
    assert changed.digest() != full.digest()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name = 'x'\npackages = ['ok']\n", "agent"),
        ("name = 'x'\nagent = '.'\npackages = ['Bad Name']\n", "not a Debian package name"),
        (
            "name = 'x'\nagent = '.'\npackages = ['a']\n[[files]]\ndest = 'rel'\nsource = 'f'\n",
            "absolute",
        ),
        (
            "name = 'x'\nagent = '.'\npackages = ['a']\n[[units]]\nname = '../x.service'\n"
            "source = 'f'\n",
            "not a unit file name",
        ),
        (
            "name = 'x'\nagent = '.'\npackages = ['a']\ndrop_units = ['nope.service']\n",
            "unknown units",
        ),
        ("name = \n", "recipe"),
    ],
)
def test_bad_recipes_are_refused_with_a_reason(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        Recipe.load(path)


def test_recipe_that_extends_itself(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text('extends = "recipe.toml"\n')
    with pytest.raises(ConfigError, match="extends itself"):
        Recipe.load(path)


def test_child_recipe_replaces_one_unit_and_keeps_the_rest(tmp_path: Path, repo_root: Path) -> None:
    source = repo_root / "images/browser"
    (tmp_path / "x.service").write_text("[Service]\nExecStart=/bin/true\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'extends = "{source / "recipe.toml"}"\n'
        '[[units]]\nname = "chromium.service"\nsource = "x.service"\n'
        '[[units]]\nname = "extra.service"\nsource = "x.service"\n'
        '[[files]]\ndest = "/etc/hosts"\nsource = "hosts"\n'
    )
    child = Recipe.load(recipe)
    parent = Recipe.load(source / "recipe.toml")
    assert [u.name for u in child.units] == [u.name for u in parent.units] + ["extra.service"]
    chromium = child.unit("chromium.service")
    assert chromium is not None and chromium.source == tmp_path / "x.service"
    hosts = [f for f in child.files if f.dest == "/etc/hosts"]
    assert len(hosts) == 1 and hosts[0].source == tmp_path / "hosts"
    assert len(child.files) == len(parent.files)
