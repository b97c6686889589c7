"""Per-guest configuration: where it comes from and what it turns into at boot.

The controller gives each guest one JSON document, ``guest.json``. Containers get it in a
folder bind-mounted read-only at ``/mnt/mc-config``; VMs get a small config drive labelled
``MCCONFIG`` which is mounted there. ``apply`` renders it into ``/run/mc`` for the services:
the VNC password file (x11vnc), the agent's token, the hostname.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOUNT_POINT = Path("/mnt/mc-config")
CONFIG_NAME = "guest.json"
DRIVE_LABEL = "MCCONFIG"
RUN_DIR = Path("/run/mc")
BROWSER_USER = "browser"

_PROXY = re.compile(r"^http://[0-9.]+:[0-9]{1,5}$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class GuestConfig:
    guest_id: str
    vnc_password: str
    agent_token: str
    hostname: str = "mc-guest"
    # VMs configure their own NIC: "10.213.0.2/30"; containers get theirs from the host.
    address: str | None = None
    gateway: str | None = None
    # the per-guest egress proxy on the host, "http://10.213.0.1:3180"; None: no egress
    egress_proxy: str | None = None

    @classmethod
    def from_json(cls, text: str) -> GuestConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"guest config is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("guest config must be a JSON object")
        missing = [k for k in ("guest_id", "vnc_password", "agent_token") if not data.get(k)]
        if missing:
            raise ConfigError(f"guest config lacks {', '.join(missing)}")
        password = str(data["vnc_password"])
        # VNC authentication uses at most 8 characters; refuse what would be silently cut.
        if not 6 <= len(password) <= 8 or not password.isprintable():
            raise ConfigError("vnc_password must be 6 to 8 printable characters")
        hostname = str(data.get("hostname", "mc-guest"))
        if not _HOSTNAME.match(hostname):
            raise ConfigError(f"invalid hostname {hostname!r}")
        address, gateway = data.get("address"), data.get("gateway")
        try:
            if address is not None:
                ipaddress.ip_interface(str(address))
            if gateway is not None:
                ipaddress.ip_address(str(gateway))
        except ValueError as exc:
            raise ConfigError(f"invalid network configuration: {exc}") from exc
        proxy = data.get("egress_proxy")
        if proxy is not None and not _PROXY.match(str(proxy)):
            raise ConfigError(f"invalid egress_proxy {str(proxy)[:80]!r}")
        return cls(
            guest_id=str(data["guest_id"]),
            vnc_password=password,
            agent_token=str(data["agent_token"]),
            hostname=hostname,
            address=None if address is None else str(address),
            gateway=None if gateway is None else str(gateway),
            egress_proxy=None if proxy is None else str(proxy),
        )

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def locate(mount_point: Path = MOUNT_POINT) -> Path:
    """Find guest.json: a bind-mounted folder (containers) or the config drive (VMs)."""
    candidate = mount_point / CONFIG_NAME
    if candidate.is_file():
        return candidate
    # A VM's config drive: blkid reads the disks itself (udev may not have named them yet,
    # and the virtio disk may still be probing), so look for a few seconds.
    for _ in range(50):
        found = subprocess.run(
            ["blkid", "-L", DRIVE_LABEL], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found:
            mount_point.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-o", "ro", found, str(mount_point)], check=True)
            if candidate.is_file():
                return candidate
            break
        time.sleep(0.2)
    raise ConfigError(f"no guest configuration: neither {candidate} nor a drive {DRIVE_LABEL}")


def configure_network(config: GuestConfig) -> None:
    """Give the first Ethernet interface the configured address (VMs only: a container's
    interface is addressed by the host before it boots)."""
    if config.address is None:
        return
    shown = subprocess.run(
        ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    if config.address.split("/")[0] + "/" in shown:
        return
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split(": ")[1].split("@")[0] for line in links.splitlines()]
    nic = next((n for n in names if n != "lo"), None)
    if nic is None:
        raise ConfigError("no network interface to configure")
    subprocess.run(["ip", "addr", "add", config.address, "dev", nic], check=True)
    subprocess.run(["ip", "link", "set", nic, "up"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if config.gateway:
        subprocess.run(["ip", "route", "replace", "default", "via", config.gateway], check=True)


def _write_secret(path: Path, text: str, uid: int = 0, gid: int = 0) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chown(tmp, uid, gid)
    tmp.replace(path)


def apply(config: GuestConfig, run_dir: Path = RUN_DIR) -> None:
    """Render the configuration for the guest's services."""
    import pwd

    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    browser = pwd.getpwnam(BROWSER_USER)
    _write_secret(run_dir / "vncpasswd", config.vnc_password + "\n", browser.pw_uid, browser.pw_gid)
    _write_secret(run_dir / "agent-token", config.agent_token)
    (run_dir / "guest-id").write_text(config.guest_id + "\n")
    proxy_env = run_dir / "proxy.env"
    if config.egress_proxy:
        names = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
        lines = [f"{n}={config.egress_proxy}" for n in names]
        lines += ["no_proxy=localhost,127.0.0.1,::1", "NO_PROXY=localhost,127.0.0.1,::1"]
        proxy_env.write_text("\n".join(lines) + "\n")
    else:
        proxy_env.unlink(missing_ok=True)
    configure_network(config)
    # a container may not be allowed to set its hostname; nothing depends on it
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        subprocess.run(["hostname", config.hostname], check=True, capture_output=True)


def main() -> None:
    config = GuestConfig.from_json(locate().read_text())
    apply(config)
    print(f"mc-config: applied configuration of guest {config.guest_id}")
