"""The per-guest configuration drive of VM guests: a small ext4 image labelled MCCONFIG with
``guest.json`` on it, which the guest agent finds by its label (``blkid -L``), the same file
a container gets bind-mounted.

``guest.json`` carries the guest's agent token and VNC password, so the drive is 0600 from
the moment it exists, and the plain copy it is built from lives only in a 0700 folder for
as long as ``mkfs.ext4`` reads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from master_controller.commands import run
from master_controller.errors import CommandError, GuestStartFailed
from mc_agent.config import CONFIG_NAME, DRIVE_LABEL, GuestConfig

CONFIG_DRIVE_MIB = 8


def make_config_drive(config: GuestConfig, drive: Path) -> Path:
    """Write the drive ``drive`` (mode 0600) carrying ``config``; returns its path."""
    source = Path(tempfile.mkdtemp(prefix=".config-", dir=drive.parent))  # 0700
    try:
        fd = os.open(source / CONFIG_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(config.to_json())
        fd = os.open(drive, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.truncate(CONFIG_DRIVE_MIB * 2**20)
        os.chmod(drive, 0o600)  # O_CREAT's mode does not apply to a file that existed
        try:
            run(["mkfs.ext4", "-q", "-F", "-L", DRIVE_LABEL, "-d", source, drive])
        except CommandError as exc:
            raise GuestStartFailed("config drive", exc.reason) from exc
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return drive
