"""The content-addressed image store.

Layout under ``<data_dir>/images``::

    <id>/               one folder per image, never changed after it is added
        rootfs/         read-only lower layer for containers
        disk.ext4       the same tree as an ext4 disk for VMs
        vmlinuz, initrd.img  kernel (bzImage) and initrd
        vmlinux         the same kernel uncompressed (ELF), for Firecracker
        manifest.json   what the image is made of (see builder)
        build.log
        verify.json     written by verification, next to the image
    promotions.json     the stack of promoted ids; the top one is ``current``
    .lock               serialises store changes

An image enters the store only by an atomic rename of a finished staging folder, and
``current`` changes only by an atomic replace of ``promotions.json``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from master_controller.errors import ImageError, ImageNotFound, PromotionRefused

MANIFEST = "manifest.json"
VERIFICATION = "verify.json"
PROMOTIONS = "promotions.json"


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


@dataclass(frozen=True)
class ImageInfo:
    id: str
    path: Path
    manifest: dict[str, Any]
    verification: dict[str, Any] | None

    @property
    def created(self) -> str:
        return str(self.manifest.get("created", ""))

    @property
    def verified(self) -> bool:
        """True only if a complete verification (static and boot) passed for this exact id."""
        v = self.verification
        return bool(
            v
            and v.get("image_id") == self.id
            and v.get("passed") is True
            and v.get("boot_checked") is True
        )

    @property
    def verification_status(self) -> str:
        if self.verification is None:
            return "unverified"
        return "passed" if self.verified else "failed"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def disk(self) -> Path:
        return self.path / "disk.ext4"

    @property
    def size_bytes(self) -> int:
        sizes = self.manifest.get("sizes", {})
        return int(sizes.get("rootfs", 0)) + int(sizes.get("disk_allocated", 0))


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- reading -------------------------------------------------------------------------

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
        )

    def resolve(self, ref: str) -> str:
        """An id from a full id, a unique prefix of one, or ``current``."""
        if ref == "current":
            current = self.current()
            if current is None:
                raise ImageNotFound("no image has been promoted yet")
            return current
        matches = [i for i in self.ids() if i.startswith(ref)] if ref else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ImageNotFound(f"no image {ref!r} in {self.root}")
        raise ImageNotFound(f"{ref!r} is ambiguous: {', '.join(matches)}")

    def get(self, ref: str) -> ImageInfo:
        image_id = self.resolve(ref)
        path = self.root / image_id
        manifest = json.loads((path / MANIFEST).read_text())
        verification_file = path / VERIFICATION
        verification = (
            json.loads(verification_file.read_text()) if verification_file.is_file() else None
        )
        return ImageInfo(id=image_id, path=path, manifest=manifest, verification=verification)

    def images(self) -> list[ImageInfo]:
        return sorted((self.get(i) for i in self.ids()), key=lambda i: i.created)

    def promotions(self) -> list[dict[str, str]]:
        path = self.root / PROMOTIONS
        if not path.is_file():
            return []
        history: list[dict[str, str]] = json.loads(path.read_text()).get("history", [])
        return history

    def current(self) -> str | None:
        history = self.promotions()
        return str(history[-1]["id"]) if history else None

    # --- changing ------------------------------------------------------------------------

    def add(self, image_id: str, staging: Path) -> Path:
        """Move a finished staging folder into the store as ``image_id`` (atomic rename).
        If the id exists already the content is the same; the staging folder is removed."""
        with self.locked():
            target = self.root / image_id
            if target.exists():
                shutil.rmtree(staging)
                return target
            if staging.stat().st_dev != self.root.stat().st_dev:
                raise ImageError(f"staging {staging} is not on the store's file system")
            staging.rename(target)
            return target

    def record_verification(self, image_id: str, result: dict[str, Any]) -> None:
        write_json_atomic(self.root / image_id / VERIFICATION, result)

    def promote(self, ref: str) -> str:
        """Make ``ref`` current; refused unless that exact id passed full verification."""
        with self.locked():
            info = self.get(ref)
            if not info.verified:
                raise PromotionRefused(f"image {info.id} cannot be promoted: {_refusal(info)}")
            history = self.promotions()
            if history and history[-1]["id"] == info.id:
                return info.id
            history.append({"id": info.id, "at": _now()})
            write_json_atomic(self.root / PROMOTIONS, {"history": history})
            return info.id

    def rollback(self) -> str:
        """Return to the image promoted before the current one."""
        with self.locked():
            history = self.promotions()
            if len(history) < 2:
                raise PromotionRefused("there is no earlier promoted image to roll back to")
            previous = str(history[-2]["id"])
            if not (self.root / previous / MANIFEST).is_file():
                raise PromotionRefused(f"the previous image {previous} is no longer in the store")
            write_json_atomic(self.root / PROMOTIONS, {"history": history[:-1]})
            return previous

    def gc(self, keep: int, in_use: set[str]) -> list[str]:
        """Remove images that are neither current, among the last ``keep`` other promoted
        ones, nor used by a guest. Returns the removed ids."""
        with self.locked():
            promoted: list[str] = []
            for entry in reversed(self.promotions()):
                if entry["id"] not in promoted:
                    promoted.append(entry["id"])
            kept = set(promoted[: keep + 1]) | in_use
            removed = []
            for image_id in self.ids():
                if image_id in kept:
                    continue
                doomed = self.root / f".removing-{image_id}-{time.monotonic_ns()}"
                (self.root / image_id).rename(doomed)  # out of sight first, then delete
                shutil.rmtree(doomed)
                removed.append(image_id)
            return removed


def _refusal(info: ImageInfo) -> str:
    v = info.verification
    if v is None:
        return "it has not been verified (run `image verify`)"
    if v.get("image_id") != info.id:
        return f"its verify.json belongs to another image ({v.get('image_id')})"
    if v.get("passed") is not True:
        return "its verification failed: " + "; ".join(v.get("failures", [])[:5])
    return "it was verified without booting (run `image verify` with boot checks)"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
