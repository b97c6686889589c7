"""The per-guest configuration drive of VM guests: a small ext4 image labelled MCCONFIG with
``guest.json`` on it, which the guest agent finds by its label (``blkid -L``), the same file
a container gets bind-mounted."""

from __future__ import annotations

from pathlib import Path

from master_controller.errors import CommandError, GuestStartFailed
from master_controller.proc import run
from mc_agent.config import CONFIG_NAME, DRIVE_LABEL, GuestConfig

CONFIG_DRIVE_MIB = 8


def make_config_drive(config: GuestConfig, folder: Path) -> Path:
    """Write ``folder/config.img`` carrying ``config``; returns its path."""
    source = folder / "config"
    source.mkdir()
    (source / CONFIG_NAME).write_text(config.to_json())
    (source / CONFIG_NAME).chmod(0o600)
    drive = folder / "config.img"
    with drive.open("wb") as fh:
        fh.truncate(CONFIG_DRIVE_MIB * 2**20)
    try:
        run(["mkfs.ext4", "-q", "-F", "-L", DRIVE_LABEL, "-d", source, drive])
    except CommandError as exc:
        raise GuestStartFailed("config drive", exc.reason) from exc
    return drive
