"""What every browser image must contain, independent of the recipe that built it.

Verification checks an image against this contract *and* against its own recipe: a recipe
that leaves out the VNC services (as the rebuild in the incident did) still fails here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REQUIRED_PACKAGES = (
    "systemd",
    "dbus",
    "python3",
    "xvfb",
    "openbox",
    "x11vnc",
    "websockify",
    "novnc",
    "chromium",
    "x11-utils",
)


@dataclass(frozen=True)
class UnitContract:
    name: str
    executable: str
    required_args: tuple[str, ...] = ()
    one_of_args: tuple[str, ...] = ()  # at least one of these
    forbidden_args: tuple[str, ...] = ()
    environment: tuple[str, ...] = ()  # KEY=VALUE entries it must set
    after: tuple[str, ...] = ()  # units it must be ordered after
    ports: tuple[int, ...] = field(default=())  # listening ports the unit owns (documentation)


BROWSER_UNITS = (
    UnitContract(
        "mc-config.service", "/usr/bin/python3", required_args=("mc_agent", "apply-config")
    ),
    UnitContract(
        "xvfb.service",
        "/usr/bin/Xvfb",
        required_args=(":1", "1280x800x24"),
        after=("mc-config.service",),
    ),
    UnitContract(
        "openbox.service",
        "/usr/bin/openbox",
        environment=("DISPLAY=:1",),
        after=("xvfb.service",),
    ),
    UnitContract(
        "x11vnc.service",
        "/usr/bin/x11vnc",
        required_args=("-display", ":1", "-rfbport", "5900", "-localhost", "-forever", "-shared"),
        one_of_args=("-rfbauth", "-passwdfile"),
        forbidden_args=("-nopw",),
        after=("xvfb.service", "mc-config.service"),
        ports=(5900,),
    ),
    UnitContract(
        "websockify.service",
        "/usr/bin/websockify",
        required_args=("--web", "0.0.0.0:6080", "127.0.0.1:5900"),
        after=("x11vnc.service",),
        ports=(6080,),
    ),
    UnitContract(
        "chromium.service",
        "/usr/bin/chromium",
        required_args=(
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ),
        # it runs as an unprivileged user, so its sandbox works in containers and VMs alike
        forbidden_args=("--no-sandbox",),
        environment=("DISPLAY=:1",),
        after=("openbox.service",),
    ),
    UnitContract(
        "mc-agent.service",
        "/usr/bin/python3",
        required_args=("mc_agent", "serve"),
        after=("mc-config.service",),
        ports=(8080,),
    ),
)
