"""Figures read when /metrics is scraped (files, not events): the image store's
verification states, the data dir's file system, the release and its limits."""

from __future__ import annotations

import os

from master_controller import __version__
from master_controller.images.store import ImageStore
from master_controller.metrics import (
    BUILD_INFO,
    CURRENT_IMAGE_VERIFIED,
    DATA_DIR_FREE,
    DATA_DIR_SIZE,
    IMAGES,
    MAX_SESSIONS,
)
from master_controller.settings import Settings

VERIFICATION_STATES = ("passed", "failed", "unverified")


def sample_host(settings: Settings) -> None:
    """Set the scrape-time gauges (blocking: reads a few small files and statvfs)."""
    BUILD_INFO.labels(__version__).set(1)
    MAX_SESSIONS.set(settings.max_sessions)
    store = ImageStore(settings.images_dir)
    images = store.images() if settings.images_dir.exists() else []
    for status in VERIFICATION_STATES:
        IMAGES.labels(status).set(sum(1 for i in images if i.verification_status == status))
    current = store.current() if settings.images_dir.exists() else None
    CURRENT_IMAGE_VERIFIED.set(int(any(i.id == current and i.verified for i in images)))
    fs = os.statvfs(settings.data_dir)
    DATA_DIR_FREE.set(fs.f_bavail * fs.f_frsize)
    DATA_DIR_SIZE.set(fs.f_blocks * fs.f_frsize)
