"""Settings, declared once.

Precedence: environment variables ``MC_*`` override the TOML file (``MC_CONFIG``, default
``/etc/master-controller/config.toml``), which overrides the defaults below. The defaults give
a working single-host setup.
"""

from __future__ import annotations

import os
from functools import lru_cache
from ipaddress import IPv4Network
from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = Path("/etc/master-controller/config.toml")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _config_file() -> Path:
    return Path(os.environ.get("MC_CONFIG", str(DEFAULT_CONFIG_FILE)))


class Settings(BaseSettings):
    """All settings of master-controller."""

    model_config = SettingsConfigDict(env_prefix="MC_", extra="forbid")

    data_dir: Path = Field(
        Path("/var/lib/master-controller"),
        description="Where images, guests, leases and the database live.",
    )
    recipe: Path = Field(
        REPO_ROOT / "images" / "browser" / "recipe.toml",
        description="Default image recipe for `image build`.",
    )
    debian_mirror: str | None = Field(
        None,
        description="Debian mirror URL for image builds (default: from the host's apt sources).",
    )
    debian_security_mirror: str | None = Field(
        None,
        description="Debian security mirror URL; default: read from the host's apt sources.",
    )
    guest_network: IPv4Network = Field(
        IPv4Network("10.213.0.0/16"),
        description="Private range carved into one /30 per guest (host end .1, guest .2).",
    )
    boot_timeout: float = Field(
        120.0, description="Seconds a guest may take from start to a working viewer path."
    )
    stop_timeout: float = Field(
        20.0, description="Seconds an orderly guest shutdown may take before it is killed."
    )
    images_keep: int = Field(
        3, ge=1, description="`image gc` keeps current plus this many other promoted images."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=_config_file()),
        )

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def guests_dir(self) -> Path:
        return self.data_dir / "guests"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
