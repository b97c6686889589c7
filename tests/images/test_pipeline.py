"""The image pipeline end to end, with real builds (root, mmdebstrap; base layer cached)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from master_controller.errors import BuildError, PromotionRefused, StorageFull
from master_controller.images.builder import ImageBuilder
from master_controller.images.recipe import Recipe
from master_controller.images.store import ImageStore
from master_controller.runtimes.container import ContainerRuntime
from master_controller.settings import Settings
from master_controller.verification import Verifier
from tests.conftest import RECIPES
from tests.filesystems import tmpfs

pytestmark = pytest.mark.integration


def test_golden_image_is_verified_and_current(
    golden_image: str, integration_settings: Settings
) -> None:
    store = ImageStore(integration_settings.images_dir)
    info = store.get(golden_image)
    assert store.current() == golden_image and info.verified
    names = [c["name"] for c in info.verification["checks"]]  # type: ignore[index]
    for check in (
        "websocket 101 on 6080",
        "rfb 3.8 handshake with password",
        "non-blank frame",
        "chromium window on :1",
        "agent health",
    ):
        assert check in names
    manifest = info.manifest
    assert {"xvfb", "x11vnc", "websockify", "chromium"} <= set(manifest["packages"])
    enabled = {u["name"]: u["enabled"] for u in manifest["units"]}
    # websockify is started by its socket on first use (costs nothing until then)
    assert enabled.pop("websockify.service") is False and enabled["websockify.socket"]
    assert all(enabled.values()), enabled
    assert (info.path / "vmlinuz").is_file() and (info.path / "initrd.img").is_file()
    assert info.disk.stat().st_size > 0 and (info.path / "build.log").stat().st_size > 0


def test_incident_regression_image_without_vnc(
    golden_image: str, integration_settings: Settings
) -> None:
    """The incident: an image rebuilt without its VNC services. It builds, fails
    verification naming what is missing, cannot be promoted, and the current image stays
    current and keeps booting."""
    settings = integration_settings
    store = ImageStore(settings.images_dir)
    broken = ImageBuilder(settings).build(Recipe.load(RECIPES / "without-vnc.toml"))
    assert broken.image_id != golden_image and broken.base_cached

    runtime = ContainerRuntime(settings)
    result = asyncio.run(Verifier(settings, runtime).verify(broken.image_id))
    assert not result["passed"]
    failures = "\n".join(result["failures"])
    for unit in (
        "xvfb.service",
        "openbox.service",
        "x11vnc.service",
        "websockify.socket",
        "websockify.service",
    ):
        assert f"{unit} not installed" in failures
    # the boot checks gave up early with the agent's word, not after a long timeout
    ws_check = next(c for c in result["checks"] if c["name"] == "websocket 101 on 6080")
    assert "x11vnc.service not installed" in ws_check["detail"]
    assert ws_check["seconds"] < settings.boot_timeout / 2

    with pytest.raises(PromotionRefused, match=r"x11vnc\.service not installed"):
        store.promote(broken.image_id)
    assert store.current() == golden_image

    again = asyncio.run(Verifier(settings, runtime).verify("current"))
    assert again["passed"], again["failures"]
    assert store.current() == golden_image


def test_changing_one_unit_rebuilds_from_the_cached_base(
    golden_image: str, integration_settings: Settings, tmp_path: Path, repo_root: Path
) -> None:
    source = repo_root / "images/browser"
    unit = tmp_path / "openbox.service"
    unit.write_text((source / "units/openbox.service").read_text() + "# a changed unit\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'extends = "{source / "recipe.toml"}"\n'
        'name = "browser-changed-unit"\n'
        '[[units]]\nname = "openbox.service"\nsource = "openbox.service"\n'
    )
    result = ImageBuilder(integration_settings).build(Recipe.load(recipe))
    assert result.base_cached and not result.already_built
    assert result.image_id != golden_image
    steps = {s["name"]: s for s in result.steps}
    assert steps["base layer"]["detail"] == "cached"
    store = ImageStore(integration_settings.images_dir)
    assert store.get(result.image_id).verification_status == "unverified"
    # the same inputs again: the identical image, found by content
    again = ImageBuilder(integration_settings).build(Recipe.load(recipe))
    assert again.image_id == result.image_id and again.already_built
    assert result.image_id in store.gc(keep=integration_settings.images_keep, in_use=set())
    assert store.current() == golden_image


def test_a_failed_build_leaves_nothing_in_the_store(
    golden_image: str, integration_settings: Settings, tmp_path: Path, repo_root: Path
) -> None:
    (tmp_path / "not-a-file").mkdir()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'extends = "{repo_root / "images/browser/recipe.toml"}"\n'
        '[[files]]\ndest = "/etc/broken"\nsource = "not-a-file"\n'
    )
    store = ImageStore(integration_settings.images_dir)
    before = store.ids()
    with pytest.raises(BuildError, match="not-a-file"):
        ImageBuilder(integration_settings).build(Recipe.load(recipe))
    assert store.ids() == before
    tmp = integration_settings.cache_dir / "tmp"
    assert not any(tmp.iterdir())


@pytest.fixture
def small_cache(
    integration_settings: Settings, golden_image: str, tmp_path: Path
) -> Iterator[Path]:
    """The build cache on a small file system of its own (tmpfs) that holds a copy of the
    golden image's base layer and 300 MiB more, so a build fills it. The image store stays
    where it is, with the current image in it. Yields the tmpfs (grow it with remount)."""
    cache = integration_settings.cache_dir
    base = ImageStore(integration_settings.images_dir).get(golden_image).manifest["base_layer"]
    layer = cache / "layers" / f"base-{base['key']}"
    fs = tmp_path / "fs"
    fs.mkdir()
    used = int(
        subprocess.run(
            ["du", "-sb", layer], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    with tmpfs(fs, f"{(used * 11 // 10 + 300 * 2**20) // 2**20}m"):
        (fs / "layers").mkdir()
        subprocess.run(["cp", "-a", layer, fs / "layers"], check=True)
        subprocess.run(["mount", "--bind", fs, cache], check=True)
        try:
            yield fs
        finally:
            subprocess.run(["umount", cache], check=False)


def test_a_build_that_fills_the_disk_says_so_and_leaves_nothing(
    golden_image: str,
    integration_settings: Settings,
    small_cache: Path,
    tmp_path: Path,
    repo_root: Path,
) -> None:
    """The disk fills during a build: first while npm writes the tools layer (mid-write),
    then, with more room, before the ext4 disk is written (checked up front). Each says
    which file system and how much is free; nothing half-made is kept; the store and the
    current image are untouched."""
    settings = integration_settings
    store = ImageStore(settings.images_dir)
    before = (store.ids(), store.promotions(), store.get(golden_image).disk.stat().st_mtime_ns)
    recipe = tmp_path / "recipe.toml"
    (tmp_path / "marker").write_text("a build on a small disk\n")
    recipe.write_text(
        f'extends = "{repo_root / "images/browser/recipe.toml"}"\n'
        'name = "browser-disk-full"\n'
        '[[files]]\ndest = "/etc/mc-disk-full"\nsource = "marker"\n'
    )

    with pytest.raises(BuildError) as failed:
        ImageBuilder(settings).build(Recipe.load(recipe))
    reason = failed.value.reason
    assert "no space left on the file system holding" in reason, reason
    assert "step 'configuration layer'" in reason and "partial files were removed" in reason
    assert not any((small_cache / "tmp").iterdir())
    assert not any(p.name.startswith("tools-") for p in (small_cache / "layers").iterdir())
    assert (store.ids(), store.promotions()) == before[:2]

    # room for the tools layer, not for the disk: refused before writing it
    usage = shutil.disk_usage(small_cache)
    subprocess.run(
        ["mount", "-o", f"remount,size={(usage.total + 1600 * 2**20) // 2**20}m", small_cache],
        check=True,
    )
    with pytest.raises(StorageFull, match=r"writing the image's ext4 disk needs about \d+ MiB"):
        ImageBuilder(settings).build(Recipe.load(recipe))
    assert any(p.name.startswith("tools-") for p in (small_cache / "layers").iterdir())
    assert not any((small_cache / "tmp").iterdir())
    after = (store.ids(), store.promotions(), store.get(golden_image).disk.stat().st_mtime_ns)
    assert after == before and store.current() == golden_image
