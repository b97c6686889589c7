import json
from pathlib import Path

import pytest

from master_controller.errors import ImageNotFound, PromotionRefused
from master_controller.images.store import ImageStore


def _add(store: ImageStore, tmp: Path, image_id: str, verification: dict | None) -> None:
    staging = store.root / f".staging-{image_id}"
    (staging / "rootfs").mkdir(parents=True)
    (staging / "manifest.json").write_text(json.dumps({"id": image_id, "created": image_id}))
    store.add(image_id, staging)
    if verification is not None:
        store.record_verification(image_id, {"image_id": image_id, **verification})


PASSED = {"passed": True, "boot_checked": True}


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    s = ImageStore(tmp_path / "images")
    s.root.mkdir()
    return s


def test_promote_requires_full_verification(store: ImageStore, tmp_path: Path) -> None:
    _add(store, tmp_path, "aaaa1111", None)
    _add(
        store,
        tmp_path,
        "bbbb2222",
        {
            "passed": False,
            "boot_checked": True,
            "failures": ["unit x11vnc.service: x11vnc.service not installed"],
        },
    )
    _add(store, tmp_path, "cccc3333", {"passed": True, "boot_checked": False})
    with pytest.raises(PromotionRefused, match="not been verified"):
        store.promote("aaaa")
    with pytest.raises(PromotionRefused, match=r"x11vnc\.service not installed"):
        store.promote("bbbb")
    with pytest.raises(PromotionRefused, match="without booting"):
        store.promote("cccc")
    assert store.current() is None


def test_verification_of_another_image_does_not_count(store: ImageStore, tmp_path: Path) -> None:
    _add(store, tmp_path, "dddd4444", None)
    store.record_verification("dddd4444", {"image_id": "eeee5555", **PASSED})
    with pytest.raises(PromotionRefused, match="another image"):
        store.promote("dddd4444")


def test_promote_rollback_and_gc(store: ImageStore, tmp_path: Path) -> None:
    for image_id in ("a1", "b2", "c3", "d4"):
        _add(store, tmp_path, image_id, PASSED)
    store.promote("a1")
    store.promote("b2")
    store.promote("c3")
    assert store.current() == "c3"
    assert store.rollback() == "b2"
    assert store.current() == "b2"
    store.promote("c3")
    removed = store.gc(keep=1, in_use={"a1"})
    assert removed == ["d4"]  # current c3, the last other promoted b2, a1 in use
    assert store.ids() == ["a1", "b2", "c3"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".removing")]


def test_rollback_without_history(store: ImageStore, tmp_path: Path) -> None:
    _add(store, tmp_path, "a1", PASSED)
    store.promote("a1")
    with pytest.raises(PromotionRefused, match="no earlier"):
        store.rollback()


def test_resolve(store: ImageStore, tmp_path: Path) -> None:
    _add(store, tmp_path, "abc1", PASSED)
    _add(store, tmp_path, "abc2", PASSED)
    with pytest.raises(ImageNotFound, match="ambiguous"):
        store.resolve("abc")
    with pytest.raises(ImageNotFound, match="no image"):
        store.resolve("zzz")
    with pytest.raises(ImageNotFound, match="promoted"):
        store.resolve("current")
    assert store.resolve("abc2") == "abc2"


def test_add_is_idempotent_for_the_same_id(store: ImageStore, tmp_path: Path) -> None:
    _add(store, tmp_path, "same", PASSED)
    staging = store.root / ".staging-again"
    staging.mkdir()
    store.add("same", staging)
    assert not staging.exists() and store.ids() == ["same"]
