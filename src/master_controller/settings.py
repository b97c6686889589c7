"""Settings, declared once.

Precedence: environment variables ``MC_*`` override the TOML file (``MC_CONFIG``, default
``/etc/master-controller/config.toml``), which overrides the defaults below. The defaults give
a working single-host setup.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from ipaddress import IPv4Network, ip_network
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from master_controller.capacity import default_max_concurrent_boots, default_max_sessions

DEFAULT_CONFIG_FILE = Path("/etc/master-controller/config.toml")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _config_file() -> Path:
    return Path(os.environ.get("MC_CONFIG", str(DEFAULT_CONFIG_FILE)))


def config_path() -> Path:
    """The settings file in effect (``MC_CONFIG``, or the default); it may not exist."""
    return _config_file()


class Settings(BaseSettings):
    """All settings of master-controller."""

    model_config = SettingsConfigDict(env_prefix="MC_", extra="forbid")

    data_dir: Path = Field(
        Path("/var/lib/master-controller"),
        description="Where images, guests, leases and the database live.",
    )
    deploy_dir: Path = Field(
        Path("/opt/master-controller"),
        description="Where `deploy` keeps releases/<commit> and the `current` link the "
        "service runs.",
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
        3, ge=0, description="`image gc` keeps current plus this many other promoted images."
    )
    vm_cpus: int = Field(2, ge=1, description="vCPUs of a VM guest.")
    vm_memory_mib: int = Field(2048, ge=512, description="Memory of a VM guest (MiB).")
    guest_memory_merging: bool = Field(
        False,
        description="Let the kernel merge identical memory pages across guests (KSM; takes "
        "effect where /sys/kernel/mm/ksm/run is 1): less memory per guest, but a guest could "
        "time whether another guest holds a page of given content. Off by default.",
    )
    host: str = Field("127.0.0.1", description="Address `serve` listens on.")
    port: int = Field(4000, ge=1, le=65535, description="Port `serve` listens on.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="`serve`'s log lines: json (one event per line, for a log collector), "
        "console (plain text), or auto: console on a terminal, json otherwise.",
    )
    public_url: str | None = Field(
        None,
        description="Base URL people reach the controller at (for novncURL); "
        "default http://HOST:PORT.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL (sqlite:///... or postgresql+psycopg://...); "
        "default: SQLite in the data dir.",
    )
    runtime: str = Field("auto", description="Guest runtime: auto, container, qemu, firecracker.")
    firecracker_binary: str = Field(
        "firecracker", description="The Firecracker binary (a path, or a name on PATH)."
    )
    egress_port: int = Field(
        3180,
        ge=0,
        le=65535,
        description="Port of the egress proxy guests reach on their gateway address; 0 "
        "turns guest egress off.",
    )
    egress_hosts: dict[str, str] = Field(
        default_factory=dict,
        description='Host name, or "name:port" -> IP address the egress proxy connects to '
        "instead of resolving the name. Loopback, private, link-local, CGNAT, multicast, "
        "reserved and this host's own addresses are refused unless that exact name and port "
        "is mapped here; a key without a port counts as port 443 (a local identity provider "
        'on 8443 needs "idp.test:8443").',
    )
    vault_key_file: Path | None = Field(
        None, description="The vault's key file (default <data_dir>/vault.keys, made 0600)."
    )
    vault_key: SecretStr | None = Field(
        None, description="The vault key itself (base64 of 32 bytes) instead of a key file."
    )
    auto_login: bool = Field(
        True, description="Start the provider's login in the guest as soon as it is ready."
    )
    after_capture: Literal["hibernate", "destroy"] = Field(
        "destroy",
        description="What happens to a guest once its credentials are stored: destroyed, or "
        "hibernated after its agent wiped the credential files and the provider's browser "
        "session (a VM's memory snapshot may still hold freed pages of them until it expires "
        "after hibernated_ttl).",
    )
    oauth2_authorize_url: str | None = Field(
        None, description="The oauth2 provider's authorization endpoint."
    )
    oauth2_token_url: str | None = Field(None, description="The oauth2 provider's token endpoint.")
    oauth2_client_id: str | None = Field(None, description="The oauth2 provider's client id.")
    oauth2_scope: str = Field("", description="Scopes the oauth2 provider asks for.")
    rate_limit_per_minute: int = Field(
        600, ge=0, description="API requests a key may make per minute (0: no limit)."
    )
    rate_limit_burst: int = Field(60, ge=1, description="Requests a key may make at once.")
    max_viewers: int = Field(4, ge=1, description="Viewer connections per session at once.")
    max_sessions: int = Field(
        default_factory=default_max_sessions,
        ge=1,
        description="Concurrent live sessions on this host (default: from its memory and "
        "CPUs; `master-controller doctor` shows how).",
    )
    max_concurrent_boots: int = Field(
        default_factory=default_max_concurrent_boots,
        ge=1,
        description="Guests booting or resuming at once (default: 2 per CPU); further "
        "starts wait in a queue, in order, and their boot timeout starts when they boot.",
    )
    idle_timeout: float = Field(
        600.0, description="Seconds a ready session may go without a viewer before it ends."
    )
    max_lifetime: float = Field(1800.0, description="Seconds a session may live at most.")
    signin_time: float = Field(
        900.0,
        gt=0,
        description="Seconds a person has to sign in once the browser is ready; a heartbeat "
        "(the viewer's 'More time' button, or the API's) gives this much again from then, "
        "never past max_lifetime.",
    )
    viewer_copy_out: bool = Field(
        False,
        description="Let the person copy text out of the guest (the viewer's Copy button, "
        "at most 1,024 characters). Off by default: credentials live in the guest.",
    )
    ticket_ttl: float = Field(
        300.0,
        description="Seconds a viewer link (novncURL) can be opened after it was issued; it "
        "can be opened once (a fresh link comes with every GET of the session).",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Extra Origins allowed to open viewer WebSockets (the controller's own "
        "origin always is).",
    )
    forwarded_allow_ips: list[str] = Field(
        default_factory=list,
        description="Addresses or networks of the reverse proxies in front of the controller "
        '(e.g. ["127.0.0.1"]): only from these are X-Forwarded-For and X-Forwarded-Proto '
        "believed (the client address in logs, the request's scheme). Empty: no forwarded "
        "header is believed, from anyone.",
    )
    secret_key_file: Path | None = Field(
        None, description="Key signing viewer tickets; default <data_dir>/secret.key (0600)."
    )
    max_body_bytes: int = Field(64 * 1024, description="Largest request body the API accepts.")
    # --- limits that keep one key, user or guest from taking the host --------------------
    hibernated_ttl: float = Field(
        86400.0,
        ge=1,
        description="Seconds a hibernated (or captured-and-kept) guest is kept before it is "
        "destroyed and its snapshot removed.",
    )
    max_sessions_per_key: int = Field(
        20, ge=1, description="Live plus hibernated sessions one API key may hold at once."
    )
    max_sessions_per_user: int = Field(
        3, ge=1, description="Live plus hibernated sessions one userId may hold at once."
    )
    guest_memory_mib: int = Field(
        1536, ge=256, description="Memory limit of a container guest (MiB, cgroup)."
    )
    guest_pids_max: int = Field(
        2048, ge=64, description="Tasks (processes and threads) a container guest may have."
    )
    guest_cpus: float = Field(
        1.0, gt=0, description="CPU time a container guest may use, in CPUs (cgroup quota)."
    )
    guest_disk_mib: int = Field(
        2048,
        ge=256,
        description="Size of a container guest's writable disk layer (MiB); a guest that "
        "fills it fills only its own layer, never the data dir.",
    )
    egress_max_connections: int = Field(
        32, ge=1, description="Egress proxy connections one guest may hold open at once."
    )
    egress_idle_timeout: float = Field(
        120.0, gt=0, description="Seconds an egress tunnel may stay silent before it is closed."
    )
    egress_upstreams: list[str] = Field(
        default_factory=list,
        description="Upstream proxies guests' traffic leaves through, one sticky exit per user: "
        '"http://host:port" (HTTP CONNECT) or "socks5://host:port". Credentials never go '
        "here: `master-controller egress credentials URL` seals them in the vault. Empty (and "
        "no template): traffic leaves from this host.",
    )
    egress_upstream_template: str = Field(
        "",
        description="A provider's upstream with one sticky exit per port, e.g. "
        '"http://gate.example.net:{port}", expanded over egress_upstream_ports.',
    )
    egress_upstream_ports: str = Field(
        "", description='The template\'s port range, "first-last" (e.g. "10001-19999").'
    )
    egress_check_url: str = Field(
        "https://api.ipify.org/?format=json",
        description="Fetched through a user's upstream before a guest boots: it must answer "
        'the exit address (as text, or JSON {"ip": ...}), which is recorded.',
    )
    egress_check_interval: float = Field(
        300.0,
        ge=0,
        description="Seconds an upstream's successful check is trusted before it is checked again.",
    )

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxy_addresses(cls, entries: list[str]) -> list[str]:
        # uvicorn would take anything else as a name it never matches, and "*" as everyone
        for entry in entries:
            try:
                ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an address or network (to believe every peer, which "
                    'any client that reaches the controller can then lie to, write "0.0.0.0/0")'
                ) from None
        return entries

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, cls.file_source(settings_cls))

    @classmethod
    def file_source(cls, settings_cls: type[BaseSettings]) -> PydanticBaseSettingsSource:
        """Where the settings file's values come from (the lowest precedence)."""
        return TomlConfigSettingsSource(settings_cls, toml_file=_config_file())

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def guests_dir(self) -> Path:
        return self.data_dir / "guests"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'master-controller.db'}"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def vault_key_path(self) -> Path:
        return self.vault_key_file or self.data_dir / "vault.keys"

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_from_file_content(content: bytes) -> Settings:
    """The settings as they would be with a settings file holding ``content`` (environment
    variables still override it), without writing that file anywhere."""
    try:
        data = tomllib.loads(content.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"the settings file is not valid TOML: {exc}") from exc

    class FromContent(Settings):
        @classmethod
        def file_source(cls, settings_cls: type[BaseSettings]) -> PydanticBaseSettingsSource:
            return InitSettingsSource(settings_cls, data)

    return FromContent()
